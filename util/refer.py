"""Reader for the REFER annotations (RefCOCO / RefCOCO+ / RefCOCOg) and ReferIt masks — our own Python 3 code.

Layout read (the defaults of the originals): ``<refer_root>/<dataset>/refs(<split_by>).p`` (a pickle written by
Python 2: a list of ref dicts with ref_id, ann_id, image_id, category_id, split, sentences[{sent, sent_id, tokens,
raw}]) and ``<refer_root>/<dataset>/instances.json`` (COCO images / annotations / categories).

The refs pickles are downloaded from the internet, so they are loaded with ``SafeUnpickler``: only pickle opcodes
for plain containers and scalars are honoured (list, dict, tuple, str, bytes, int, float, bool, None, and the
builtins ``set``/``frozenset``); any other global (a class, a function such as ``os.system``) is refused with
``AnnotationError`` naming the file. Python 2 ``str`` objects are decoded as latin-1 (byte-preserving).
"""
import json
import os
import pickle

import numpy as np

COCO_DATASETS = {"refcoco": ("unc",), "refcoco+": ("unc",), "refcocog": ("google", "umd")}
SPLITS = {("refcoco", "unc"): ("train", "val", "testA", "testB"),
          ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
          ("refcocog", "google"): ("train", "val"),
          ("refcocog", "umd"): ("train", "val", "test")}


class AnnotationError(Exception):
    """An annotation file is missing, unreadable or not what it should be (message names the file)."""


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves no globals except ``set`` / ``frozenset`` (py3 ``builtins`` or py2 ``__builtin__``)."""

    _ALLOWED = {("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
                ("__builtin__", "set"): set, ("__builtin__", "frozenset"): frozenset}

    def find_class(self, module, name):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def safe_load_pickle(path):
    """Load a data-only pickle (Python 2 or 3) from ``path`` with ``SafeUnpickler`` (encoding='latin1').

    Raises AnnotationError (one line, naming ``path``) if the file is missing, is not a pickle, or would need any
    non-container object.
    """
    try:
        with open(path, "rb") as f:
            return SafeUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise AnnotationError(f"annotation file not found: {path}") from None
    except pickle.UnpicklingError as e:
        raise AnnotationError(f"{path}: {e} (only plain containers and scalars are allowed)") from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, ImportError) as e:
        raise AnnotationError(f"{path}: not a valid data pickle ({type(e).__name__}: {e})") from None


def load_json(path):
    """``json.load`` of ``path``; AnnotationError (one line naming the file) if missing or invalid."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise AnnotationError(f"annotation file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path}: invalid JSON ({e})") from None


class Refer:
    """Index of one REFER dataset: ``refs`` (ref_id → ref), ``anns`` (ann_id → ann), ``imgs`` (image_id → image),
    ``cats`` (category_id → name).

    ``Refer(refer_root, dataset, split_by)`` reads ``<refer_root>/<dataset>/refs(<split_by>).p`` and
    ``instances.json`` there. Raises AnnotationError for missing or malformed files.
    """

    def __init__(self, refer_root, dataset, split_by):
        folder = os.path.join(refer_root, dataset)
        refs_path = os.path.join(folder, f"refs({split_by}).p")
        inst_path = os.path.join(folder, "instances.json")
        refs = safe_load_pickle(refs_path)
        instances = load_json(inst_path)
        try:
            self.refs = {ref["ref_id"]: ref for ref in refs}
            self.anns = {ann["id"]: ann for ann in instances["annotations"]}
            self.imgs = {img["id"]: img for img in instances["images"]}
            self.cats = {cat["id"]: cat["name"] for cat in instances.get("categories", [])}
        except (TypeError, KeyError) as e:
            raise AnnotationError(f"{folder}: malformed annotations (missing or bad field {e})") from None

    def ref_ids(self, split):
        """ref_ids whose ``split`` equals ``split``, ascending (= the py2 dict order the original iterated)."""
        return sorted(rid for rid, ref in self.refs.items() if ref["split"] == split)


def coco_image_name(image_id, image_set="train2014"):
    """``COCO_<image_set>_<image_id zero-padded to 12>.jpg``."""
    return f"COCO_{image_set}_{int(image_id):012d}.jpg"


def ann_to_mask(segmentation, h, w):
    """float32 [h, w] union mask of a COCO segmentation (polygon list or RLE dict) via pycocotools.

    As the original: ``frPyObjects(seg, h, w)`` → ``decode`` → max over the polygons → float32 (1 = object).
    """
    from pycocotools import mask as cocomask
    rle = cocomask.frPyObjects(segmentation, h, w)
    m = cocomask.decode(rle)
    if m.ndim == 3:
        m = np.max(m, axis=2)
    return m.astype(np.float32)


def load_referit_gt_mask(path):
    """ReferIt ground truth: ``scipy.io.loadmat(path)['segimg_t'] == 0`` (0 marks the object) as float32."""
    import scipy.io
    return (scipy.io.loadmat(path)["segimg_t"] == 0).astype(np.float32)
