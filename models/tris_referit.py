"""TRIS on ReferIt from TRIS's own pickled annotations, for ``trainval_model.py -m test -n TRIS_stage1|TRIS_stage2
-d referit --data-root ROOT`` (through ``TRISSpec.test_source``): what ``validate_referit.py`` evaluates, read as
``dataset/Dataset_referit.py``'s ``ImageLoader`` (the test loader of ``get_refit_dataset``) reads it. Our own code.

Files (TRIS's ``./data/referit/`` under ``--data-root``):
- ``<root>/data/referit/annotations/<split>.pickle``: TRIS's ``referit_annotations.zip`` (``ANNOTATIONS_URL``, linked
  from TRIS's README; train.pickle and test.pickle), made by hassanhub/MultiGrounding's ``data/data_utils.py``
  (``Data._referit``, refclef under the UNC split): a dict {str(image id): {'image_id', 'size', 'queries',
  'annotations': [ann, ...], 'captions'}}, one ann per unique query of each ref: {'ref_id', 'image_id', 'query'
  (str), 'category' (set), 'bbox': [[x1, y1, x2, y2]] (ints, corners from refclef's [x, y, w, h]), 'bbox_norm',
  'segmentation' (refclef's COCO RLEs: a list of {'size': [h, w], 'counts'}), 'idx', 'image_size'}.
- ``<root>/data/referit/images/<image id>.jpg`` (saiapr_tc-12).

Semantics (``ImageLoader.__getitem__`` and ``validate_referit.validate``):
- ``pickle.load(f, encoding='latin1')``; the images in the dict's key order, each key's annotations in list order.
- An annotation is a sample when the area of its FIRST box, ``(b[3] - b[1]) * (b[2] - b[0])``, exceeds
  ``0.05 * H * W`` of the image FILE (PIL's size; ``keeps_annotation``); the others are left out (not counted).
- Sentence: ``query`` (tokenized by the predictor: CLIP BPE, cut to 20 ids, as ``clip.tokenize(query)[:20]``).
- Target: ``pycocotools.mask.decode(segmentation)`` summed over its RLEs, uint8, at the RLEs' size (the original's
  output size); a pixel under two RLEs is 2: foreground for I and U (``compute_mask_IU``: logical and / or), but
  NOT a point hit (``isCorrectHit``: ``gt_mask[peak] + 1 == 2``). The sample carries it as ``target``
  (``mask_batch`` = target > 0 for our metric block).
- Boxes: ``np.array(bbox)`` as stored, [K, 4] x1, y1, x2, y2 in original pixels, no cast; Hit = the peak inside any
  of them (inclusive).

Differences: the original builds the train set (``ImageLoader_train`` on train.pickle) before evaluating, so it needs
both files; we read only ``<-t>.pickle`` (any name MultiGrounding writes: train, test, val, train_val; TRIS's zip
holds train and test). The pickle is read with a restricted unpickler (``load_annotations``); a missing image, an
image PIL cannot open or a malformed entry stops the run with one line naming the file and the entry (the original
fails with a traceback); dict keys are used as ``str(key)`` for the image name, as the original does. Training on
ReferIt is not offered: TRIS's ``train_stage1.py`` / ``train_stage2.py`` train on ``ReferDataset`` only
(``ImageLoader_train`` is never used).
"""
import logging
import numbers
import os
import pickle

import numpy as np

from models.tris_train import NUMPY_ARRAY_GLOBALS, RefusedGlobal, RestrictedNumpyUnpickler, bpe_problem, read_rgb
from util import pth

log = logging.getLogger("models")

ANNOTATIONS_URL = "https://github.com/fawnliu/storage/releases/download/v1.0.2/referit_annotations.zip"
RELEASED_SPLITS = ("train", "test")
MIN_BOX_FRACTION = 0.05   # Dataset_referit.ImageLoader.__getitem__: box area > 0.05 * H * W
_NUMERIC_KINDS = "biuf"


def referit_root(data_root):
    """TRIS's ``./data/referit`` under ``--data-root``."""
    return os.path.join(data_root, "data", "referit")


def annotation_path(data_root, split):
    """``<root>/data/referit/annotations/<split>.pickle`` (``ImageLoader``'s ``annotations/<split>.pickle``)."""
    return os.path.join(referit_root(data_root), "annotations", f"{split}.pickle")


def image_folder(data_root):
    """``<root>/data/referit/images`` (``ImageLoader``'s ``img_folder``)."""
    return os.path.join(referit_root(data_root), "images")


def referit_input_problem(command, spec, cfg, root):
    """Why ``-d referit -t <split> --data-root root`` cannot be evaluated (one line starting with ``command``), else
    None: the annotation pickle (with where to get it), the image folder or the BPE merges file missing."""
    path = annotation_path(root, cfg.split)
    if not os.path.isfile(path):
        released = "" if cfg.split in RELEASED_SPLITS else "; the released annotations are train and test only"
        return (f"{command} {root}: {path} not found (TRIS's ReferIt annotations: unzip {ANNOTATIONS_URL}, linked "
                f"from TRIS's README, into {os.path.dirname(path)}{released})")
    if not os.path.isdir(image_folder(root)):
        return (f"{command} {root}: image folder {image_folder(root)} not found (the saiapr_tc-12 images as "
                f"<image id>.jpg, TRIS's data/referit/images)")
    return bpe_problem(spec, cfg)


def _numpy_scalar(dtype, data=None):
    """``util.pth``'s numeric-only ``numpy.core.multiarray.scalar``, real dtypes only (``_NUMERIC_KINDS``); ``data``
    may also be a str, as a Python 2 pickle read with ``encoding='latin1'`` gives it."""
    if not (isinstance(dtype, np.dtype) and dtype.kind in _NUMERIC_KINDS):
        raise RefusedGlobal("refused numpy.core.multiarray.scalar that is not a plain number")
    return pth._numpy_scalar(dtype, data.encode("latin-1") if isinstance(data, str) else data)


REFERIT_GLOBALS = {**NUMPY_ARRAY_GLOBALS,
                   ("numpy.core.multiarray", "scalar"): _numpy_scalar,
                   ("numpy._core.multiarray", "scalar"): _numpy_scalar,
                   ("_codecs", "encode"): pth._latin1_encode,
                   ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
                   ("__builtin__", "set"): set, ("__builtin__", "frozenset"): frozenset}


def load_annotations(path):
    """The annotation pickle as ``pickle.load(f, encoding='latin1')`` gives it, through ``RestrictedNumpyUnpickler``
    with ``REFERIT_GLOBALS`` (containers, numbers, strings, bytes, sets, numeric numpy arrays and scalars): a
    non-empty dict. ValueError (one line naming the file, and the global when one is refused) otherwise."""
    try:
        with open(path, "rb") as f:
            content = RestrictedNumpyUnpickler(f, REFERIT_GLOBALS, encoding="latin1").load()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file (TRIS's ReferIt annotations: {ANNOTATIONS_URL})") from None
    except (RefusedGlobal, pth._Refused) as e:
        raise ValueError(f"{path}: not TRIS's ReferIt annotation pickle ({e.args[0]})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
        raise ValueError(f"{path}: not a readable pickle ({type(e).__name__})") from None
    if not (isinstance(content, dict) and content):
        raise ValueError(f"{path}: expected a non-empty dict {{image id: {{'annotations': [...]}}}}, got "
                         f"{type(content).__name__}{' (empty)' if isinstance(content, dict) else ''}")
    return content


def box_array(bbox):
    """``np.array(bbox)`` as ``ImageLoader`` keeps it, [K, 4] (x1, y1, x2, y2; K ≥ 1, the stored numbers, no cast),
    or None when ``bbox`` is not K real boxes."""
    try:
        boxes = np.array(bbox)
    except (ValueError, TypeError):
        return None
    ok = boxes.ndim == 2 and boxes.shape[0] > 0 and boxes.shape[1] == 4 and boxes.dtype.kind in "iuf"
    return boxes if ok and np.isfinite(boxes).all() else None


def keeps_annotation(boxes, height, width):
    """``ImageLoader.__getitem__``'s filter: the first box's area ``(b[3] - b[1]) * (b[2] - b[0])`` exceeds
    ``0.05 * H * W`` (image file height, width)."""
    b = boxes[0]
    return bool((b[3] - b[1]) * (b[2] - b[0]) > MIN_BOX_FRACTION * height * width)


def _rle_problem(segmentation):
    """What keeps ``segmentation`` from being a list of COCO RLEs of one size (``cocomask.decode``'s input), or
    None."""
    if not (isinstance(segmentation, (list, tuple)) and segmentation):
        return f"'segmentation' must be a non-empty list of COCO RLEs, got {type(segmentation).__name__}"
    sizes = set()
    for rle in segmentation:
        size = rle.get("size") if isinstance(rle, dict) else None
        if not (isinstance(size, (list, tuple)) and len(size) == 2
                and all(isinstance(v, numbers.Integral) and v > 0 for v in size)
                and isinstance(rle.get("counts"), (str, bytes))):
            return "'segmentation' entries must be COCO RLEs {'size': [h, w], 'counts': compressed string}"
        sizes.add(tuple(int(v) for v in size))
    return None if len(sizes) == 1 else f"'segmentation' RLEs of different sizes {sorted(sizes)}"


def annotation_problem(ann):
    """What makes one annotation unusable (one phrase), else None: 'query' a str, 'bbox' K real boxes,
    'segmentation' COCO RLEs of one size."""
    if not isinstance(ann, dict):
        return f"expected a dict, got {type(ann).__name__}"
    if not isinstance(ann.get("query"), str):
        return f"'query' must be a str, got {type(ann.get('query')).__name__}"
    if box_array(ann.get("bbox")) is None:
        return "'bbox' must be [[x1, y1, x2, y2], ...] (real numbers)"
    return _rle_problem(ann.get("segmentation"))


def referit_target(segmentation):
    """``cocomask.decode(segmentation)`` summed over the RLEs, cast to uint8: the original's target [h, w] at the
    RLEs' size (2 where two RLEs overlap)."""
    from pycocotools import mask as cocomask

    rles = [dict(rle, size=[int(v) for v in rle["size"]]) for rle in segmentation]
    return np.sum(cocomask.decode(rles), axis=2).astype(np.uint8)


def image_size(path, where):
    """(height, width) of the image file ``path`` (PIL, header only). ValueError (one line naming the file and
    ``where``, the entry that needs it) when it is missing or unreadable."""
    from PIL import Image

    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file (the image of {where}; the saiapr_tc-12 images, see the TRIS section "
                         f"of README.md)")
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except OSError as e:
        raise ValueError(f"{path}: unreadable image of {where} ({type(e).__name__}: {e})") from None


class ReferItEvalSet:
    """``Dataset_referit.ImageLoader(root, split)`` as ``validate_referit.validate`` reads it (see the module
    docstring), with ``models.tris_train.ReferEvalSet``'s sample interface.

    ``path`` the pickle; ``image_keys[i]`` / ``image_paths[i]`` the images in the dict's order; ``annotations[i]``
    their annotation lists; ``keys`` (image i, annotation a) of every sample in the original's order (those whose
    first box passes ``keeps_annotation``); ``left_out`` how many annotations the filter dropped. ``sample(i, a)``:
    ``im_batch`` the RGB image at its file's size (uint8), ``target`` ``referit_target`` (uint8 [h, w]),
    ``mask_batch`` target > 0, ``sent_batch`` [query], ``boxes`` ``box_array(bbox)``. Malformed entries, missing
    or unreadable images: one-line ValueError naming the file and the entry."""

    def __init__(self, data_root, split):
        self.path = annotation_path(data_root, split)
        content = load_annotations(self.path)
        folder = image_folder(data_root)
        self.image_keys, self.image_paths, self.annotations, self.keys = [], [], [], []
        self.left_out = 0
        for key, entry in content.items():
            where = f"{self.path} image {key!r}"
            anns = entry.get("annotations") if isinstance(entry, dict) else None
            if not isinstance(anns, (list, tuple)):
                raise ValueError(f"{where}: expected a dict with an 'annotations' list")
            for a, ann in enumerate(anns):
                problem = annotation_problem(ann)
                if problem:
                    raise ValueError(f"{where} annotation {a}: {problem}")
            path = os.path.join(folder, f"{key}.jpg")
            height, width = image_size(path, where)
            index = len(self.image_keys)
            kept = [a for a, ann in enumerate(anns) if keeps_annotation(box_array(ann["bbox"]), height, width)]
            self.keys += [(index, a) for a in kept]
            self.left_out += len(anns) - len(kept)
            self.image_keys.append(str(key))
            self.image_paths.append(path)
            self.annotations.append(anns)
        if not self.keys:
            raise ValueError(f"{self.path}: no annotation whose box exceeds {MIN_BOX_FRACTION:g} of its image "
                             f"({self.left_out} left out)")
        self._cached = (None, None)

    def __len__(self):
        return len(self.keys)

    def name(self, index, a):
        """The sample's name for the test loop: ``<pickle> image <key> annotation <a>``."""
        return f"{self.path} image {self.image_keys[index]} annotation {a}"

    def _image(self, index):
        """RGB uint8 [h, w, 3] of image ``index`` (``Image.open(...).convert("RGB")``), the last one kept; an image
        that cannot be decoded raises ``util.data.BadSample`` naming it (the test loop skips and lists it)."""
        if self._cached[0] != index:
            self._cached = (index, read_rgb(self.image_paths[index]))
        return self._cached[1]

    def sample(self, index, a):
        """The test-loop sample of annotation ``a`` of image ``index`` (see the class docstring)."""
        ann = self.annotations[index][a]
        target = referit_target(ann["segmentation"])
        return {"im_batch": self._image(index), "target": target, "mask_batch": target > 0,
                "sent_batch": np.array([ann["query"]]), "boxes": box_array(ann["bbox"])}
