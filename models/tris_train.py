"""TRIS training for ``trainval_model.py -m train``, reached through ``TRISSpec.train_loop`` (the generic loop's
hook for models with their own recipe): stage 1 (``train_stage1.main`` / ``train_one_epoch``, ``-n TRIS_stage1``)
and stage 2 (``train_stage2.main`` / ``train_one_epoch``, ``-n TRIS_stage2``, on IRNet's pseudo masks). The same
refer reader gives ``-m test --data-root`` its samples (``ReferEvalSet``: ``ReferDataset(eval_mode=True)`` as
``validate.validate`` reads it, through ``TRISSpec.test_source``).

STAGE 1

Data (``dataset/ReferDataset.py`` with ``eval_mode=False``, ``negative_samples=3``): the refer files are read
directly with our restricted readers (``util.refer.Refer``: ``<data-root>/external/refer/data/<refcoco|refcoco+|
refcocog>/refs(<unc|google>).p`` and ``instances.json``; images ``<data-root>/data/coco/images/train2014/<file_name>``,
build_batches.py's ``--data-root`` layout). One item per ref (ascending ref_id), each epoch a seeded shuffle, batches
of ``-bs`` without drop_last. Per item: the image stretched to S×S (PIL bilinear) and ImageNet-normalised, ONE
sentence drawn at random (CLIP BPE, cut to 20 ids), and 3 negative sentences: from the other refs of the same image
in the split (drawn with replacement; as coded, the image's ref list is read in file order only up to the first ref of
another split), else random sentences of the whole split that differ from the drawn one. The draws come from a
generator seeded by (``--seed``, epoch, iteration), so a resumed run sees the batches an uninterrupted one would.

Objective: ``models.tris.stage1_losses`` (w1·MaxLoss of the frozen CLIP ViT-B/32 on the masked foreground + w4·the
multilabel soft margin with the background channel, GAP+GMP and focal term + w5·the negatives' −log(1 − cos)). The
frozen ViT-B/32 comes from ``<--data-dir>/weights/ViT-B-32.pt``: OpenAI's TorchScript archive (``clip.load(
"ViT-B/32")``'s download, read by ``util.torchscript`` without torch), else ``<--data-dir>/weights/ViT-B-32.pth``: its
state_dict as ``torch.save`` writes it. It runs in float32 (the original: float16 on a GPU, float32 on CPU; OpenAI's
float16 values are widened exactly).

Optimizer (``train_stage1.main``): ``util.adamw.AdamW`` with group 0 = every backbone parameter at lr·0.1 and group
1 = vis_project, lan_project, attn_fusion at lr, weight decay 0.01; ``TRIS.logit_scale`` in no group. LambdaLR factor
(1 − t/(len(loader)·epochs))^0.9 stepped every iteration, with len(loader)·epochs = ``-i`` (pass ``-i`` = epochs ×
ceil(train refs / batch) for the original's schedule). Initial weights (``--init-weights``): the original starts
from OpenAI's CLIP RN50 (``clip.load('RN50', jit=False, txt_length=20)`` → ``build_model(jit_model.state_dict())``
→ ``.float()``) with the heads at torch's default initialisation; here OpenAI's TorchScript ``RN50.pt`` (read by
``util.torchscript``, float16 widened exactly to float32) or a ``.pth`` holding CLIP RN50's state_dict gives the
backbone (keys ``backbone.<key>``; ``input_resolution``/``context_length``/``vocab_size`` dropped and the text
positional embedding kept whole, 77 rows, as ``build_model`` does: ``txt_length`` only sizes the causal mask) and
the heads (``vis_project``, ``lan_project``, ``attn_fusion``, at ``--hidden_dim`` 1024) are drawn with torch's
default initialisers from ``--seed``; a TRIS stage-1 ``.pth`` gives everything (the model takes its sizes from it).
Loop and snapshots: ``util.loop.run_training`` (ours: atomic, model + optimizer state, resume from the newest complete
and finite one).
No per-epoch validation or best-mIoU/Hit checkpoints (evaluate a snapshot with ``-m test``).

STAGE 2 (``train_stage2.main``; ``ReferDataset(split, eval_mode=False, pseudo_path=…)``, no negatives)
Data: the same refer files, images and per-epoch draws as stage 1 (one random sentence per ref, no augmentation),
plus each ref's pseudo mask: IRNet's ``make_ins_seg_labels`` output ``<pseudo folder>/<index>_<image id>.npy``
(``index`` = the ref's position in the split's ref list, ``image id`` = the ref's image_id; the original's
``--pseudo_path``). Here the pseudo folder is ``<--data-root>/output/<refcoco|refcoco+|refcocog>_<unc|google>/
ins_seg``, the place TRIS's README has IRNet write it (``output/refcocog_umd/ins_seg``). Each file is
``np.save`` of a dict whose ``mask`` is bool [n, H, W] (one instance per row); target = ``mask`` summed over the
instances (float64), stretched to S×S with PIL nearest on the float image, cast to int64 (``ReferDataset.
__getitem__``). The ``.npy`` dict is a pickle: ``load_pseudo_mask`` reads it with a restricted unpickler (numpy
arrays and dtypes only). Objective: ``models.tris.stage2_losses`` = the sum of the four side outputs'
BCE-with-logits (``criterion``; no EMA term: ``--model_ema`` is off in ``scripts/train_stage2.sh``).
Optimizer (``train_stage2.main``, ``TRIS.trainable_parameters`` of ``model_stage2.py``): group 0 = backbone
parameters whose name does not contain ``positional_embedding`` at lr·0.1, group 1 = everything else (the heads and
the backbone's two positional embeddings) at lr, weight decay 0.01; the LambdaLR factor (1 − e/(len(loader)·
epochs))^0.9 with e = the number of EPOCHS done (``scheduler.step()`` once per epoch), len(loader)·epochs = ``-i``,
an epoch = ceil(train refs / ``-bs``) iterations — practically a constant rate. Parameters that get no gradient
(the attention pool, ``backbone.logit_scale``, ``backbone.text_projection``) are left alone, as torch's AdamW skips
them. Initial weights (``--init-weights``): the original starts from OpenAI's CLIP RN50 with the heads at torch's
default initialisation; here OpenAI's TorchScript ``RN50.pt``, a ``.pth`` holding CLIP RN50's state_dict or a TRIS
stage-1 ``.pth`` (its ``backbone.*``) gives the backbone (as for stage 1) and the heads are drawn with torch's
default initialisers from ``--seed``; a TRIS stage-2 ``.pth`` gives everything.
"""
import logging
import math
import os
import pickle

import numpy as np
import tensorflow as tf

log = logging.getLogger("train")

COCO_SOURCES = {"unc": ("refcoco", "unc"), "unc+": ("refcoco+", "unc"), "Gref": ("refcocog", "google")}
NEGATIVE_SAMPLES = 3     # scripts/train_stage1.sh --negative_samples
LR_MULTI = 0.1           # args.py --lr_multi
WEIGHT_DECAY = 0.01      # args.py --weight_decay
VIT_FILE = os.path.join("weights", "ViT-B-32.pt")         # OpenAI's TorchScript archive (the default)
VIT_PTH_FILE = os.path.join("weights", "ViT-B-32.pth")    # or its state_dict saved with torch.save
CLIP_URLS = {   # CLIP/clip/clip.py _MODELS (the SHA-256 of the file is the folder name)
    "RN50": "https://openaipublic.azureedge.net/clip/models/"
            "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/"
                "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
}
CLIP_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")   # deleted by clip.build_model
PSEUDO_FOLDER = "ins_seg"   # TRIS README: output/<dataset>_<splitBy>/ins_seg (IRNet --ins_seg_out_dir)
CAM_FOLDER = "cam"          # TRIS README: output/<dataset>_<splitBy>/cam (validate.py --cam_save_dir)


def refer_root(data_root):
    return os.path.join(data_root, "external", "refer", "data")


def image_root(data_root):
    return os.path.join(data_root, "data", "coco", "images", "train2014")


def output_root(data_root, dataset):
    """``<data-root>/output/<refcoco|refcoco+|refcocog>_<unc|google>``: TRIS's README's ``output/refcocog_umd``,
    where the PRMS maps (``cam/``), the names list and IRNet's pseudo masks (``ins_seg/``) go."""
    source, split_by = COCO_SOURCES[dataset]
    return os.path.join(data_root, "output", f"{source}_{split_by}")


def pseudo_folder(data_root, dataset):
    """Where stage 2 reads IRNet's pseudo masks (the original's ``--pseudo_path``)."""
    return os.path.join(output_root(data_root, dataset), PSEUDO_FOLDER)


def pseudo_name(index, image_id):
    """``ReferDataset.__getitem__``'s ``f'{index}_{this_img_id[0]}.npy'``."""
    return f"{index}_{image_id}.npy"


def vit_path(cfg):
    """The frozen CLIP ViT-B/32: ``<--data-dir>/weights/ViT-B-32.pt`` (OpenAI's archive) when it exists, else
    ``<--data-dir>/weights/ViT-B-32.pth`` when that exists, else the ``.pt`` path."""
    pth = os.path.join(cfg.data_dir, VIT_PTH_FILE)
    pt = os.path.join(cfg.data_dir, VIT_FILE)
    return pth if not os.path.isfile(pt) and os.path.isfile(pth) else pt


def vit_problem(cfg):
    """The frozen ViT-B/32 missing (one line naming both accepted files and where OpenAI's comes from), else
    None."""
    if os.path.isfile(vit_path(cfg)):
        return None
    return (f"{os.path.join(cfg.data_dir, VIT_FILE)} or {os.path.join(cfg.data_dir, VIT_PTH_FILE)}: no such file "
            f"(the frozen CLIP ViT-B/32 of the stage-1 loss and PRMS: OpenAI's ViT-B-32.pt from "
            f"{CLIP_URLS['ViT-B/32']}, or its state_dict saved with torch.save)")


def train_data_root(cfg):
    """``--data-root`` for training: the folder given, else the current folder (trainval_model.py leaves it None
    when not given, which ``-m test`` reads as "evaluate from the .npz batches")."""
    return "." if cfg.data_root is None else cfg.data_root


def refer_input_problem(command, spec, cfg, root):
    """Why the refer files of ``-d`` cannot be read from ``root`` (one line), else None: ReferIt (training only
    reaches here with it: TRIS's ``train_stage1.py`` / ``train_stage2.py`` build ``ReferDataset`` only, and
    ``Dataset_referit.ImageLoader_train`` is never used; ``-m test --data-root`` reads ReferIt with
    ``models.tris_referit``), ``refs(<splitBy>).p``, the image folder or the BPE merges file missing. ``command``
    starts the ReferIt line."""
    if cfg.dataset not in COCO_SOURCES:
        return (f"{command} reads RefCOCO-style refer files: -d unc, unc+ or Gref (not {cfg.dataset}: TRIS trains "
                f"on RefCOCO/+/g only; ReferIt is evaluated with -m test --data-root)")
    source, split_by = COCO_SOURCES[cfg.dataset]
    refs = os.path.join(refer_root(root), source, f"refs({split_by}).p")
    if not os.path.isfile(refs):
        return f"--data-root {root}: {refs} not found (the refer data; see data/README.md)"
    if not os.path.isdir(image_root(root)):
        return f"--data-root {root}: image folder {image_root(root)} not found"
    return bpe_problem(spec, cfg)


def bpe_problem(spec, cfg):
    """The BPE merges file of ``spec`` missing (one line), else None."""
    if not os.path.isfile(spec.bpe_path(cfg)):
        return f"{spec.bpe_path(cfg)}: no such file (CLIP's BPE merges; see data/README.md)"
    return None


def train_input_problem(spec, cfg):
    """What makes a TRIS training command line unusable before any work starts (one line), else None: ReferIt, the
    refer pickle, the image folder, the BPE merges file, the initial weights (an existing ``.pt`` or ``.pth``), and
    per stage the ViT-B/32 file (stage 1: ``vit_problem``) or the pseudo-mask folder (stage 2) missing. A missing
    pseudo-mask file is reported when the data set is built (``PseudoMaskTrainSet``); a file of the wrong kind when
    it is read."""
    root = train_data_root(cfg)
    problem = refer_input_problem(f"-m train -n {spec.name}", spec, cfg, root)
    if problem:
        return problem
    if spec.stage == 2:
        folder = pseudo_folder(root, cfg.dataset)
        if not os.path.isdir(folder):
            return (f"--data-root {root}: pseudo-mask folder {folder} not found (IRNet's ins_seg output "
                    f"for -n TRIS_stage2; see the TRIS section of README.md)")
        expected = ("an existing .pt or .pth: OpenAI's CLIP RN50.pt, CLIP RN50's state_dict, a TRIS stage-1 or a "
                    "TRIS stage-2 checkpoint")
    else:
        problem = vit_problem(cfg)
        if problem:
            return problem
        expected = ("an existing TRIS stage-1 checkpoint (.pth), OpenAI's CLIP RN50.pt or CLIP RN50's state_dict "
                    "(.pth)")
    if not (cfg.init_weights.endswith((".pt", ".pth")) and os.path.isfile(cfg.init_weights)):
        return f"--init-weights {cfg.init_weights}: expected {expected} (OpenAI's RN50.pt: {CLIP_URLS['RN50']})"
    return None


def read_refer(data_root, dataset):
    """``REFER(refer_data_root, dataset, splitBy)`` over our restricted reader (``util.refer.Refer``) for ``-d``
    (unc → refcoco/unc, unc+ → refcoco+/unc, Gref → refcocog/google); the entries it leaves out are logged."""
    from util.refer import Refer

    source, split_by = COCO_SOURCES[dataset]
    refer = Refer(refer_root(data_root), source, split_by)
    for problem in refer.problems:
        log.warning("left out: %s", problem)
    return refer


class ReferTrainSet:
    """``ReferDataset(split, eval_mode=False, negative_samples=3)`` over our restricted refer reader
    (``read_refer``, or the ``refer`` index given).

    ``ids[i]`` int32 [k_i, 20] (every sentence of ref i, ``clip.tokenize(s)[:20]``), ``sentences[i]`` the raw
    strings, ``image_paths[i]``, ``image_ids[i]``, ``split_index[i]`` (the ref's position in the split's ref list:
    the original's data-set index), ``neg_pool[i]`` the indices its negatives are drawn from (empty: whole split).
    Refs without a sentence are left out (the original fails on them)."""

    def __init__(self, data_root, dataset, split, tokenizer, size, negatives=NEGATIVE_SAMPLES, refer=None):
        from util import clip_bpe
        from util.refer import coco_image_name

        source = COCO_SOURCES[dataset][0]
        refer = read_refer(data_root, dataset) if refer is None else refer
        self.size, self.negatives = size, negatives
        split_refs = refer.ref_ids(split)
        ref_ids = [r for r in split_refs if refer.refs[r]["sentences"]]
        position = {r: i for i, r in enumerate(split_refs)}
        self.ref_ids = ref_ids
        self.split_index = [position[r] for r in ref_ids]
        self.image_ids = [refer.refs[r]["image_id"] for r in ref_ids]
        if not ref_ids:
            raise ValueError(f"{refer_root(data_root)}/{source}: no {split} ref with a sentence")
        index_of = {r: i for i, r in enumerate(ref_ids)}
        self.sentences = [[s["sent"] for s in refer.refs[r]["sentences"]] for r in ref_ids]
        self.ids = [np.array([clip_bpe.tris_ids(tokenizer.tokenize(s)) for s in sents], np.int32)
                    for sents in self.sentences]
        self.image_paths = []
        for r in ref_ids:
            image_id = refer.refs[r]["image_id"]
            name = refer.imgs.get(image_id, {}).get("file_name") or coco_image_name(image_id)
            self.image_paths.append(os.path.join(image_root(data_root), name))
        image_refs = {}
        for ref in refer.refs.values():                       # REFER.imgToRefs: the refs file's order
            image_refs.setdefault(ref["image_id"], []).append(ref["ref_id"])
        self.neg_pool = []
        for r in ref_ids:
            pool = []
            for other in image_refs[refer.refs[r]["image_id"]]:
                if other not in index_of:                     # the original's KeyError → break
                    break
                if other != r:
                    pool.append(index_of[other])
            self.neg_pool.append(pool)
        if negatives and len({s for sents in self.sentences for s in sents}) < 2:
            raise ValueError(f"{refer_root(data_root)}/{source}: the {split} split has fewer than two distinct "
                             f"sentences (no negatives)")

    def __len__(self):
        return len(self.ids)

    def image(self, index):
        """float32 [S, S, 3]: ``get_transform(size, train=True)`` of the RGB image (PIL bilinear stretch, /255,
        ImageNet mean/std)."""
        from PIL import Image

        from models import tris
        from models.tris_spec import stretch_rgb

        with Image.open(self.image_paths[index]) as img:
            rgb = np.asarray(img.convert("RGB"))
        return tris.preprocess(stretch_rgb(rgb, self.size)).numpy()

    def item(self, index, rng):
        """(image [S, S, 3], ids [20], neg_ids [K, 20]) with ``__getitem__``'s draws from ``rng`` (stage 1)."""
        choice = rng.choice(len(self.ids[index]))
        ids, sentence = self.ids[index][choice], self.sentences[index][choice]
        neg = []
        pool = self.neg_pool[index]
        while len(neg) < self.negatives:
            if pool:
                n_index = pool[rng.choice(len(pool))]
                neg.append(self.ids[n_index][rng.choice(len(self.ids[n_index]))])
            else:
                n_index = rng.choice(len(self.ids))
                k = rng.choice(len(self.ids[n_index]))
                if self.sentences[n_index][k] != sentence:
                    neg.append(self.ids[n_index][k])
        return self.image(index), ids, np.stack(neg)

    def iterations_per_epoch(self, batch_size):
        return math.ceil(len(self) / batch_size)

    def batch(self, iteration, batch_size, seed):
        """Batch number ``iteration`` (0-based, over all epochs): the stacked ``item`` parts (stage 1: images
        [B, S, S, 3], ids [B, 20], neg_ids [B, K, 20]); the last batch of an epoch may be smaller (no drop_last)."""
        epoch, position = divmod(iteration, self.iterations_per_epoch(batch_size))
        order = np.random.default_rng([seed, epoch]).permutation(len(self))
        rng = np.random.default_rng([seed, epoch, position])
        items = [self.item(i, rng) for i in order[position * batch_size:(position + 1) * batch_size]]
        return tuple(np.stack(parts) for parts in zip(*items))


def refer_gt_mask(segmentation, height, width):
    """``REFER.getMask`` + ``ReferDataset.__getitem__``'s target: the COCO segmentation at height × width
    (``frPyObjects`` → ``decode``), summed over its polygons, cast to uint8, then ``annot[mask == 1] = 1``: bool
    [H, W], so a pixel covered by two polygons of the annotation is background (``util.refer.ann_to_mask`` takes
    the union). An RLE segmentation (one map; the original's ``getMask`` fails on it) is taken as it is."""
    from pycocotools import mask as cocomask

    m = cocomask.decode(cocomask.frPyObjects(segmentation, height, width))
    if m.ndim == 3:
        m = np.sum(m, axis=2)
    return m.astype(np.uint8) == 1


def refer_box(bbox):
    """``ReferDataset.__getitem__``'s box: COCO [x, y, w, h] → ``np.array(bbox, dtype=int)`` (truncated), then
    x2 = x + w, y2 = y + h; int64 [1, 4] (x1, y1, x2, y2) in original pixels."""
    x, y, w, h = np.array(bbox, dtype=np.int64)
    return np.array([[x, y, x + w, y + h]], np.int64)


class ReferEvalSet(ReferTrainSet):
    """``ReferDataset(split, eval_mode=True)`` as ``validate.validate`` reads it, over the same reader and refs as
    ``ReferTrainSet`` (every ref of ``split`` with a sentence, ascending ref_id; ``--data-root`` layout).

    ``keys`` lists (ref position i, sentence j) for every sentence of every ref in that order; ``sample(i, j)`` is
    one test-loop sample: ``im_batch`` the image at its file's size (``Image.open(...).convert("RGB")``, uint8),
    ``mask_batch`` ``refer_gt_mask`` at the size instances.json gives the image (the original's target size; the
    file's size when the entry has none), ``sent_batch`` [sentence j], ``boxes`` ``refer_box`` of the ref's
    annotation. A ref whose annotation is missing or unusable is refused in one line (ValueError); an image that
    cannot be read raises ``util.data.BadSample`` naming it (the test loop skips and lists it)."""

    def __init__(self, data_root, dataset, split, tokenizer):
        refer = read_refer(data_root, dataset)
        super().__init__(data_root, dataset, split, tokenizer, 0, negatives=0, refer=refer)
        source = COCO_SOURCES[dataset][0]
        self.refs_path = os.path.join(refer_root(data_root), source, f"refs({COCO_SOURCES[dataset][1]}).p")
        self.annotations, self.image_sizes = [], []
        for ref_id, image_id in zip(self.ref_ids, self.image_ids):
            ann = refer.anns.get(refer.refs[ref_id]["ann_id"])
            if ann is None:
                raise ValueError(f"{refer_root(data_root)}/{source}/instances.json: {split} ref_id {ref_id}'s "
                                 f"annotation {refer.refs[ref_id]['ann_id']} is missing or unusable")
            image = refer.imgs.get(image_id, {})
            self.annotations.append(ann)
            self.image_sizes.append((image.get("height"), image.get("width")))
        self.keys = [(i, j) for i, sentences in enumerate(self.sentences) for j in range(len(sentences))]
        self._cached = (None, None)

    def _ref(self, index):
        """(RGB uint8 [h, w, 3], gt bool [H, W], boxes [1, 4]) of ref ``index``, the last one kept."""
        if self._cached[0] != index:
            rgb = read_rgb(self.image_paths[index])
            height, width = self.image_sizes[index]
            if not (isinstance(height, int) and isinstance(width, int)):
                height, width = rgb.shape[:2]
            ann = self.annotations[index]
            self._cached = (index, (rgb, refer_gt_mask(ann["segmentation"], height, width), refer_box(ann["bbox"])))
        return self._cached[1]

    def sample(self, index, j):
        """The test-loop sample of sentence ``j`` of ref ``index`` (see the class docstring)."""
        rgb, gt, boxes = self._ref(index)
        return {"im_batch": rgb, "mask_batch": gt, "sent_batch": np.array([self.sentences[index][j]]),
                "boxes": boxes}


def read_rgb(path):
    """RGB uint8 [h, w, 3] of an image file (``Image.open(path).convert("RGB")``, as TRIS's loaders read it); an
    image that cannot be decoded raises ``util.data.BadSample`` naming it (the test loop skips and lists it)."""
    from PIL import Image

    from util.data import BadSample

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except OSError as e:
        raise BadSample(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


class RestrictedNumpyUnpickler(pickle.Unpickler):
    """Resolves only the globals of ``allowed`` ({(module, name): object}); any other global raises
    ``RefusedGlobal`` naming it. ``NUMPY_ARRAY_GLOBALS`` is what ``np.save`` of a dict of arrays pickles (the
    pseudo masks); ``models.tris_referit`` adds numpy scalars, latin-1 bytes and sets for TRIS's ReferIt pickles."""

    def __init__(self, file, allowed, **kwargs):
        super().__init__(file, **kwargs)
        self.allowed = allowed

    def find_class(self, module, name):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"refused global {module}.{name}") from None


class RefusedGlobal(Exception):
    """Raised by ``RestrictedNumpyUnpickler``; the readers turn it into a ValueError naming the file."""


_RECONSTRUCT = np.empty(0).__reduce__()[0]
NUMPY_ARRAY_GLOBALS = {("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
                       ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
                       ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}


def load_pseudo_mask(path):
    """The target of one IRNet pseudo-mask file (``make_ins_seg_labels``: ``np.save`` of {'score', 'mask' bool
    [n, H, W], 'class', 'cam'}): ``mask * 1.0`` summed over the n instances, float64 [H, W]. ValueError (one line
    naming the file) for anything else."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            is_pickle = dtype == object and shape == ()
            content = RestrictedNumpyUnpickler(f, NUMPY_ARRAY_GLOBALS).load() if is_pickle else None
        except RefusedGlobal as e:
            raise ValueError(f"{path}: not an IRNet pseudo-mask .npy ({e.args[0]})") from None
        except (ValueError, pickle.UnpicklingError, EOFError) as e:
            raise ValueError(f"{path}: not an IRNet pseudo-mask .npy ({type(e).__name__})") from None
    content = content.item() if isinstance(content, np.ndarray) else None
    mask = content.get("mask") if isinstance(content, dict) else None
    if not (isinstance(mask, np.ndarray) and mask.ndim == 3):
        raise ValueError(f"{path}: not an IRNet pseudo-mask .npy (expected np.save of a dict with 'mask' "
                         f"[n, H, W])")
    return (mask * 1.0).sum(0)


class PseudoMaskTrainSet(ReferTrainSet):
    """``ReferDataset(split, eval_mode=False, pseudo_path=folder)`` (stage 2, no negatives): ``item`` →
    (image [S, S, 3], ids [20], target int64 [S, S, 1]). Every ref's file ``folder/<index>_<image id>.npy`` must
    exist: the first missing one is named in a one-line ValueError."""

    def __init__(self, data_root, dataset, split, tokenizer, size, folder):
        super().__init__(data_root, dataset, split, tokenizer, size, negatives=0)
        self.pseudo_paths = [os.path.join(folder, pseudo_name(i, image_id))
                             for i, image_id in zip(self.split_index, self.image_ids)]
        missing = [k for k, path in enumerate(self.pseudo_paths) if not os.path.isfile(path)]
        if missing:
            k = missing[0]
            raise ValueError(f"{self.pseudo_paths[k]}: no such file (the pseudo mask of {split} ref_id "
                             f"{self.ref_ids[k]}; {len(missing)} of {len(self)} missing in {folder})")

    def target(self, index):
        """int64 [S, S, 1]: ``load_pseudo_mask`` → ``Image.fromarray`` (mode F) → PIL nearest to S×S → int64."""
        from PIL import Image

        pseudo = Image.fromarray(load_pseudo_mask(self.pseudo_paths[index]))
        return np.asarray(pseudo.resize((self.size, self.size), Image.NEAREST)).astype(np.int64)[:, :, None]

    def item(self, index, rng):
        """(image [S, S, 3], ids [20], target [S, S, 1]): one sentence drawn from ``rng``."""
        ids = self.ids[index][rng.choice(len(self.ids[index]))]
        return self.image(index), ids, self.target(index)


def load_weights(path, get_from=None):
    """{key: array} of a weights file: a TorchScript archive (OpenAI's CLIP ``.pt``: its ``state_dict()`` after
    ``.float()``, ``util.torchscript``), else a ``torch.save`` ``.pth`` (a state_dict or a TRIS checkpoint's
    'model'). Errors: one line naming the file."""
    from models import tris
    from util.torchscript import load_weights as read

    return tris.model_state_dict(read(path, get_from), path)


def clip_state_dict(state):
    """A CLIP state_dict as ``clip.build_model`` loads it: without ``input_resolution``, ``context_length``,
    ``vocab_size`` (everything else as it is: the text positional embedding keeps all its rows)."""
    return {k: v for k, v in state.items() if k not in CLIP_EXTRA_KEYS}


def load_frozen_vit(path):
    """The frozen CLIP ViT-B/32 (``models.clip.CLIP``, sizes from the state_dict, causal mask of 20) from OpenAI's
    TorchScript ``ViT-B-32.pt`` or a ``.pth`` state_dict; float16 tensors (OpenAI's) are widened to float32."""
    from models import clip, tris

    state = clip_state_dict(load_weights(path, f"OpenAI's CLIP ViT-B/32: {CLIP_URLS['ViT-B/32']}"))
    if "visual.proj" not in state:
        raise ValueError(f"{path}: not a CLIP ViT state_dict (no visual.proj)")
    model = clip.CLIP("", **tris.clip_config_from_state_dict(state, prefix="", source=path))
    tris.load_state_dict_strict(model, state, path, "CLIP ViT")
    return model


def param_groups(model):
    """``TRIS.trainable_parameters()``: (backbone parameters, head parameters), ``logit_scale`` in neither."""
    params = {k: v for k, v in model.state_dict_variables().items() if v.trainable}
    backbone = {k: v for k, v in params.items() if k.startswith("backbone.")}
    heads = {k: v for k, v in params.items() if not k.startswith("backbone.") and k != "logit_scale"}
    return backbone, heads


def stage2_param_groups(model):
    """``model_stage2.TRIS.trainable_parameters()``: (backbone parameters without ``positional_embedding`` in the
    name, everything else)."""
    params = {k: v for k, v in model.state_dict_variables().items() if v.trainable}
    backbone = {k: v for k, v in params.items() if k.startswith("backbone.") and "positional_embedding" not in k}
    return backbone, {k: v for k, v in params.items() if k not in backbone}


def make_stage2_optimizer(model, lr, max_iter, iterations_per_epoch):
    """AdamW over ``stage2_param_groups`` (lr·0.1, lr; wd 0.01); the LambdaLR factor of the epochs done,
    (1 − e/max_iter)^0.9 with e = t // iterations_per_epoch (``scheduler.step()`` after each epoch)."""
    from models import tris
    from util import adamw

    backbone, rest = stage2_param_groups(model)
    table = adamw.schedule_table(lambda t: lr * tris.lr_factor(t // iterations_per_epoch, max_iter, 1), max_iter)
    return adamw.AdamW([(backbone, LR_MULTI), (rest, 1.0)], table, WEIGHT_DECAY)


def backbone_state_dict(state, path, accepted):
    """The TRIS backbone entries (``backbone.<CLIP key>``) of a CLIP ResNet state_dict (OpenAI's RN50, its extra
    entries dropped as ``clip.build_model`` drops them) or of a TRIS stage-1 checkpoint (its ``backbone.*``);
    anything else: ValueError, one line naming ``path`` and what is ``accepted``."""
    if "vis_project.weight" in state:
        state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    backbone = {f"backbone.{k}": v for k, v in clip_state_dict(state).items()}
    if "backbone.visual.layer1.0.conv1.weight" not in backbone:
        raise ValueError(f"{path}: neither {accepted}")
    return backbone


def model_from_backbone(cls, backbone, path, seed):
    """``cls`` (TRISStage1 / TRISStage2) sized by the CLIP ``backbone`` entries, heads drawn with torch's default
    initialisers from ``seed``, the backbone assigned strictly (float32)."""
    from models import tris

    model = cls(tris.clip_config_from_state_dict(backbone, source=path), rng=np.random.default_rng(seed))
    tris.load_state_dict_strict(model.backbone, backbone, path, "CLIP ResNet")
    return model


def initial_stage1_model(path, seed):
    """The stage-1 model to start from (see the module docstring): a TRIS stage-1 ``.pth`` as it is; OpenAI's
    ``RN50.pt`` or a CLIP ResNet state_dict as the backbone, heads drawn from ``seed`` (``--hidden_dim`` 1024)."""
    from models import tris

    state = load_weights(path, f"OpenAI's CLIP RN50: {CLIP_URLS['RN50']}")
    if "vis_project.weight" in state:
        return tris.TRISStage1.from_state_dict(state, path)
    backbone = backbone_state_dict(state, path, "a TRIS stage-1 checkpoint nor a CLIP ResNet state_dict "
                                                "(OpenAI's RN50.pt or its state_dict)")
    return model_from_backbone(tris.TRISStage1, backbone, path, seed)


def initial_stage2_model(path, seed):
    """The stage-2 model to start from (see the module docstring): a TRIS stage-2 ``.pth`` as it is; OpenAI's
    ``RN50.pt``, a CLIP ResNet state_dict or a TRIS stage-1 ``.pth`` as the backbone, heads drawn from ``seed``
    (full-size decoder)."""
    from models import tris

    state = load_weights(path, f"OpenAI's CLIP RN50: {CLIP_URLS['RN50']}")
    if "reduced_c1.conv.weight" in state:
        return tris.TRISStage2.from_state_dict(state, path)
    backbone = backbone_state_dict(state, path, "a TRIS stage-2 checkpoint nor a CLIP ResNet state_dict (OpenAI's "
                                                "RN50.pt, its state_dict or a TRIS stage-1 checkpoint's backbone)")
    return model_from_backbone(tris.TRISStage2, backbone, path, seed)


def make_optimizer(model, lr, max_iter):
    """AdamW over ``param_groups`` (lr·0.1, lr; wd 0.01) with the LambdaLR table of ``max_iter`` iterations."""
    from models import tris
    from util import adamw

    backbone, heads = param_groups(model)
    table = adamw.schedule_table(lambda t: lr * tris.lr_factor(t, max_iter, 1), max_iter)
    return adamw.AdamW([(backbone, LR_MULTI), (heads, 1.0)], table, WEIGHT_DECAY)


def make_step(optimizer, objective, terms):
    """One ``train_one_epoch`` iteration: ``objective(*batch)`` → losses dict (the training forward — BatchNorms on
    batch statistics — and the loss, under the tape), gradients of ``losses['loss']`` for the optimizer's
    parameters, AdamW update. → ({term: value} for ``terms``, group-0 learning rate used)."""
    names = [n for group, _ in optimizer.groups for n in group]
    var_list = [v for group, _ in optimizer.groups for v in group.values()]

    def step(*batch):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(var_list)
            losses = objective(*batch)
        grads = dict(zip(names, tape.gradient(losses["loss"], var_list)))
        lr = optimizer.apply_gradients(grads)
        return {k: losses[k] for k in terms}, lr

    return tf.function(step, reduce_retracing=True, autograph=False)


def train_stage1(spec, cfg):
    """``train_stage1.main`` without validation, through the shared own-recipe loop (``util.loop.run_training``:
    ``cfg.max_iter`` iterations, stop at ``cfg.stop_iter``, a snapshot every ``cfg.snapshot`` and at the end, resume
    from the newest good snapshot in ``-f`` else ``--resume-from``, ``TrainingDiverged`` on a non-finite loss or
    weights). Logged terms: ``loss`` and l1, l4, l5 of ``stage1_losses``; ``lr`` is group 0's (the backbone's)."""
    from models import tris
    from util.loop import run_training

    problem = train_input_problem(spec, cfg)
    if problem:
        raise ValueError(problem)
    tokenizer = spec.tokenizer(spec.bpe_path(cfg))
    data = ReferTrainSet(train_data_root(cfg), cfg.dataset, cfg.split, tokenizer, cfg.image_size)
    log.info("%s: %d %s refs, %d iterations per epoch at batch %d", spec.name, len(data), cfg.split,
             data.iterations_per_epoch(cfg.batch_size), cfg.batch_size)
    vit = load_frozen_vit(vit_path(cfg))
    log.info("Loading the initial weights from %s", cfg.init_weights)
    model = initial_stage1_model(cfg.init_weights, cfg.seed)
    model.model_name = spec.name
    optimizer = make_optimizer(model, cfg.lr, cfg.max_iter)
    step_fn = make_step(optimizer, lambda images, ids, neg_ids: tris.stage1_losses(
        model(images, ids, training=True), images, ids, neg_ids, vit), ("loss", "fg_loss_l1", "cls_loss_l4",
                                                                        "cbs_loss_l5"))

    def step(n_iter):
        images, ids, neg_ids = data.batch(n_iter, cfg.batch_size, cfg.seed)
        losses, lr = step_fn(tf.constant(images), tf.constant(ids), tf.constant(neg_ids))
        return {"loss": float(losses["loss"]), "lr": float(lr), "l1": float(losses["fg_loss_l1"]),
                "l4": float(losses["cls_loss_l4"]), "l5": float(losses["cbs_loss_l5"])}

    run_training(cfg, model, optimizer, step, lambda path: spec.restore(model, path, optimizer))


def stage2_objective(model):
    """(images, ids, targets) → ``models.tris.stage2_losses`` of the training forward (``loss``, ``l1``..``l4``)."""
    from models import tris

    return lambda images, ids, targets: tris.stage2_losses(model(images, ids, training=True), targets)


def train_stage2(spec, cfg):
    """``train_stage2.main`` without validation, through ``util.loop.run_training`` like ``train_stage1``. Logged
    terms: ``loss`` and the side outputs' l1..l4; ``lr`` is group 0's (the backbone's)."""
    from util.loop import run_training

    problem = train_input_problem(spec, cfg)
    if problem:
        raise ValueError(problem)
    tokenizer = spec.tokenizer(spec.bpe_path(cfg))
    folder = pseudo_folder(train_data_root(cfg), cfg.dataset)
    data = PseudoMaskTrainSet(train_data_root(cfg), cfg.dataset, cfg.split, tokenizer, cfg.image_size, folder)
    per_epoch = data.iterations_per_epoch(cfg.batch_size)
    log.info("%s: %d %s refs with pseudo masks from %s, %d iterations per epoch at batch %d", spec.name, len(data),
             cfg.split, folder, per_epoch, cfg.batch_size)
    log.info("Loading the initial weights from %s", cfg.init_weights)
    model = initial_stage2_model(cfg.init_weights, cfg.seed)
    model.model_name = spec.name
    optimizer = make_stage2_optimizer(model, cfg.lr, cfg.max_iter, per_epoch)
    step_fn = make_step(optimizer, stage2_objective(model), ("loss", "l1", "l2", "l3", "l4"))

    def step(n_iter):
        images, ids, targets = data.batch(n_iter, cfg.batch_size, cfg.seed)
        losses, lr = step_fn(tf.constant(images), tf.constant(ids), tf.constant(targets))
        return {"loss": float(losses["loss"]), "lr": float(lr),
                **{k: float(losses[k]) for k in ("l1", "l2", "l3", "l4")}}

    run_training(cfg, model, optimizer, step, lambda path: spec.restore(model, path, optimizer))
