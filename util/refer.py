"""Reader for the REFER annotations (RefCOCO / RefCOCO+ / RefCOCOg) and ReferIt masks — our own Python 3 code.

Layout read (the defaults of the originals): ``<refer_root>/<dataset>/refs(<split_by>).p`` (a pickle written by
Python 2: a list of ref dicts with ref_id, ann_id, image_id, category_id, split, sentences[{sent, sent_id, tokens,
raw}]) and ``<refer_root>/<dataset>/instances.json`` (COCO images / annotations / categories).

The refs pickles are downloaded from the internet, so they are loaded with ``SafeUnpickler``: only pickle opcodes
for plain containers and scalars are honoured (list, dict, tuple, str, bytes, int, float, bool, None, and the
builtins ``set``/``frozenset``); any other global (a class, a function such as ``os.system``) is refused with
``AnnotationError`` naming the file. Python 2 ``str`` objects are decoded as latin-1 (byte-preserving).

Validation when read: a file that is missing, unreadable (an OS error), not of its format, or whose top level is not
what it should be raises ``AnnotationError`` (one line naming the file). A single bad ENTRY — a ref, a sentence, a
COCO annotation, a ReferIt query — is left out and described in a ``problems`` list (one line each, naming the file and
the entry); the caller warns and counts them, like an unreadable image.
"""
import json
import math
import numbers
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
    except OSError as e:
        raise AnnotationError(f"{path}: cannot read ({e.strerror or e})") from None
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
    except OSError as e:
        raise AnnotationError(f"{path}: cannot read ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise AnnotationError(f"{path}: invalid JSON ({e})") from None


def _is_int(x):
    """An integer that is not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def rle_string_counts(s):
    """Run lengths of a COCO compressed RLE string, decoded as pycocotools' ``rleFrString``: 6-bit groups
    (character − 48), 5 value bits each, least significant first, bit 0x20 = another group follows, bit 0x10 of the
    last group = negative (sign-extended); from the third count on, the count before the previous one is added.
    Raises ValueError on a character outside '0'…'o' or a string ending inside a number (pycocotools would read past
    the end); the counts are returned as decoded (the caller checks signs and sum)."""
    counts, p = [], 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s):
                raise ValueError("compressed RLE string ends inside a number")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"compressed RLE string has character {s[p]!r} at {p}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def segmentation_problem(seg):
    """None if pycocotools can decode COCO segmentation ``seg`` safely, else a short description of the defect.

    Polygons: a non-empty list of polygons, each a list of ≥ 6 finite numbers of even length (pycocotools reads a
    4-number list as a box and drops an odd last number). RLE: a dict with ``size`` [h, w] (non-negative ints) and
    ``counts`` — a list of non-negative ints or a compressed string (``rle_string_counts``) — whose runs sum to
    exactly h·w (pycocotools writes past its buffer otherwise).
    """
    if isinstance(seg, list):
        if not seg:
            return "empty polygon list"
        for k, poly in enumerate(seg):
            if not isinstance(poly, list) or not all(isinstance(v, numbers.Real) and not isinstance(v, bool)
                                                     and math.isfinite(v) for v in poly):
                return f"polygon {k} is not a list of finite numbers"
            if len(poly) < 6 or len(poly) % 2:
                return f"polygon {k} has {len(poly)} coordinates (need an even number, at least 6)"
        return None
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v >= 0 for v in size)):
            return f"RLE size {size!r} is not [height, width]"
        if isinstance(counts, bytes):
            counts = counts.decode("ascii", "replace")
        if isinstance(counts, str):
            try:
                counts = rle_string_counts(counts)
            except ValueError as e:
                return str(e)
        elif not (isinstance(counts, list) and all(_is_int(v) for v in counts)):
            return "RLE counts is neither a list of integers nor a compressed string"
        if any(not 0 <= v < 2 ** 32 for v in counts):
            return "RLE counts hold a negative or too large run"
        if sum(counts) != size[0] * size[1]:
            return f"RLE runs sum to {sum(counts)}, not height × width = {size[0] * size[1]}"
        return None
    return f"segmentation is a {type(seg).__name__}, not a polygon list or an RLE dict"


def _ref_problem(ref):
    """None or the defect of one refs-pickle entry (fields the readers use: ref_id, ann_id, image_id, split,
    sentences)."""
    if not isinstance(ref, dict):
        return f"is a {type(ref).__name__}, not a dict"
    for key in ("ref_id", "ann_id", "image_id"):
        if not _is_int(ref.get(key)):
            return f"{key} {ref.get(key)!r} is not an integer"
    if not isinstance(ref.get("split"), str):
        return f"split {ref.get('split')!r} is not a string"
    if not isinstance(ref.get("sentences"), list):
        return f"sentences is {type(ref.get('sentences')).__name__}, not a list"
    return None


def load_referit_queries(path):
    """A ReferIt query file ``{"<imgid>_<region>": [query, ...]}`` → (queries {key: [str]}, problems [str], number
    of keys left out).

    The top level must be a JSON object (else AnnotationError). A key whose value is a single string is taken as ONE
    query (what a person who wrote ``{"8756_2": "the man"}`` means; the original iterated it character by
    character) and reported once per file; a value that is neither a string nor a list of strings (a number, null,
    an object, a list holding a non-string) is left out and reported with its key.
    """
    data = load_json(path)
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: expected an object {{region key: [queries]}}, got a {type(data).__name__}")
    queries, problems, single = {}, [], []
    for key, value in data.items():
        if isinstance(value, str):
            single.append(key)
            queries[key] = [value]
        elif isinstance(value, list) and all(isinstance(q, str) for q in value):
            queries[key] = value
        else:
            kind = type(value).__name__ if not isinstance(value, list) else "list holding a non-string"
            problems.append(f"{path}: region {key!r}: queries must be a list of strings, got a {kind}")
    if single:
        problems.append(f"{path}: {len(single)} region(s) hold a single string instead of a list (first: "
                        f"{single[0]!r}); each is taken as one query")
    return queries, problems, len(data) - len(queries)


class Refer:
    """Index of one REFER dataset: ``refs`` (ref_id → ref), ``anns`` (ann_id → ann), ``imgs`` (image_id → image),
    ``cats`` (category_id → name), and ``problems`` (one line per entry left out, naming the file and the entry).

    ``Refer(refer_root, dataset, split_by)`` reads ``<refer_root>/<dataset>/refs(<split_by>).p`` and
    ``instances.json`` there. Raises AnnotationError for missing or unreadable files and for a wrong top level (refs
    not a list; instances without ``annotations`` / ``images`` lists). Entries left out: a ref missing an integer
    ref_id / ann_id / image_id, a string split or a sentences list, or repeating an earlier ref_id; a sentence that
    is not a dict with a string ``sent`` (only that sentence); an annotation or image without integer ids; an
    annotation referred to by a ref whose segmentation pycocotools cannot decode (``segmentation_problem``; its
    id is in ``bad_ann_ids``).
    """

    def __init__(self, refer_root, dataset, split_by):
        folder = os.path.join(refer_root, dataset)
        refs_path = os.path.join(folder, f"refs({split_by}).p")
        inst_path = os.path.join(folder, "instances.json")
        refs = safe_load_pickle(refs_path)
        instances = load_json(inst_path)
        if not isinstance(refs, list):
            raise AnnotationError(f"{refs_path}: expected a list of refs, got a {type(refs).__name__}")
        if not (isinstance(instances, dict) and isinstance(instances.get("annotations"), list)
                and isinstance(instances.get("images"), list)):
            raise AnnotationError(f"{inst_path}: expected an object with 'annotations' and 'images' lists")
        self.problems = []
        self.refs = self._index_refs(refs, refs_path)
        self.anns = self._index(instances["annotations"], inst_path, "annotations", ("id", "image_id"))
        self.imgs = self._index(instances["images"], inst_path, "images", ("id",))
        cats = instances.get("categories", [])
        self.cats = {c["id"]: c.get("name") for c in cats if isinstance(c, dict) and "id" in c} \
            if isinstance(cats, list) else {}
        self.bad_ann_ids = set()
        for ann_id in sorted({ref["ann_id"] for ref in self.refs.values()} & set(self.anns)):
            problem = segmentation_problem(self.anns[ann_id].get("segmentation"))
            if problem:
                self.problems.append(f"{inst_path}: annotation id {ann_id}: {problem}")
                self.bad_ann_ids.add(ann_id)
                del self.anns[ann_id]

    def _index_refs(self, refs, path):
        """ref_id → ref (sentences filtered to valid ones) of the valid entries of ``refs``."""
        out = {}
        for i, ref in enumerate(refs):
            problem = _ref_problem(ref)
            if problem is None and ref["ref_id"] in out:
                problem = "repeats an earlier ref_id"
            if problem:
                rid = f" (ref_id {ref.get('ref_id')!r})" if isinstance(ref, dict) else ""
                self.problems.append(f"{path}: entry {i}{rid} {problem}")
                continue
            sentences = []
            for k, sent in enumerate(ref["sentences"]):
                if isinstance(sent, dict) and isinstance(sent.get("sent"), str):
                    sentences.append(sent)
                else:
                    self.problems.append(f"{path}: ref_id {ref['ref_id']}: sentence {k} has no string 'sent'")
            out[ref["ref_id"]] = {**ref, "sentences": sentences}
        return out

    def _index(self, entries, path, name, int_keys):
        """id → entry of the dict entries of ``entries`` whose ``int_keys`` are integers; the rest in problems."""
        out = {}
        for i, entry in enumerate(entries):
            bad = [k for k in int_keys if not (isinstance(entry, dict) and _is_int(entry.get(k)))]
            if bad:
                self.problems.append(f"{path}: {name}[{i}] has no integer {bad[0]}")
            else:
                out[entry["id"]] = entry
        return out

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
    """ReferIt ground truth: ``segimg_t == 0`` (0 marks the object) as float32 [H, W].

    Read with ``scipy.io.loadmat``; a MATLAB v7.3 file (HDF5) with h5py, transposed (MATLAB stores column-major).
    Raises FileNotFoundError if missing, ValueError naming the file if it is not a .mat file, has no ``segimg_t``, or
    holds something other than a 2-D numeric array there.
    """
    import scipy.io

    try:
        seg = scipy.io.loadmat(path).get("segimg_t")
    except NotImplementedError:
        seg = _load_mat73_variable(path, "segimg_t")
    except FileNotFoundError:
        raise
    except (scipy.io.matlab.MatReadError, ValueError, TypeError, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable .mat file ({e})") from None
    if seg is None:
        raise ValueError(f"{path}: no variable segimg_t")
    seg = np.asarray(seg)
    if seg.ndim != 2 or seg.dtype.kind not in "biuf":
        raise ValueError(f"{path}: segimg_t is {seg.dtype} {list(seg.shape)}, expected a 2-D numeric array")
    return (seg == 0).astype(np.float32)


def _load_mat73_variable(path, name):
    """Variable ``name`` of a MATLAB v7.3 (HDF5) file as a numpy array in MATLAB's orientation, or None."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return np.asarray(f[name]).T if name in f else None
    except (OSError, TypeError) as e:
        raise ValueError(f"{path}: not a readable .mat file ({e})") from None
