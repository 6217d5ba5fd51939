"""Build the one-sample-per-file ``.npz`` batches the trainers read (the originals' ``build_batches.py``, spec §1).

Usage: ``python build_batches.py -d {unc,unc+,Gref,referit} -t <split> [options]``.

Output: ``<output-dir>/<name>/<split>_batch/<name>_<split>_<n>.npz``, one file per (referring expression, sentence)
with keys ``text_batch`` (int64 [20], ids left-padded with 0), ``im_batch`` (uint8 [H, W, 3]), ``mask_batch`` (bool
[H, W]) and ``sent_batch`` (str array [1]). ``<name>`` is the dataset (``unc``, ``unc+``, ``Gref``, ``referit``),
except ``Gref_umd`` for ``-d Gref --split-by umd`` so that the UMD and Google partitions of RefCOCOg never mix.
Splits whose name contains 'train' are resized-and-padded to ``--img-size`` squared (pad value 0 = black); other
splits keep the original resolution. Grayscale images are tiled to 3 channels.

``--family`` picks the model family's format (``FAMILIES``): ``tf1`` (default; RMI, RRN, CMPC, LSTM: the TF1
originals' ``build_batches.py``) — ``--img-size`` 320, ``--resize skimage013``, the four keys above; ``restr``
(ReSTR's own ``build_batches.py``) — ``--img-size`` 480, ``--resize skimage019`` and a fifth key ``im_name_batch``
(0-d str: ``COCO_train2014_<id:012d>`` without extension for COCO, ``<id>.jpg`` for ReferIt, as ReSTR writes it);
``sag`` (SaG's "no-pad" ``build_batches.py``, ``util.sag_batches``) — training images resized by min(480/h, 480/w)
with ``skimage019`` and NOT padded (variable sizes, the longer side 480), ``im_name_batch`` as ReSTR's.
``--img-size`` and ``--resize`` override the family's defaults. ``--resize skimage013``: scikit-image 0.13's
``resize`` (bilinear, no anti-aliasing), reimplemented in numpy (``util.image.resize_and_pad``), what the TF1 models
were trained on; ``skimage019``: scikit-image 0.19.3's (Gaussian anti-aliasing when shrinking, mirror edges; ReSTR's
pinned version), run through the installed scikit-image (``util.image.resize_and_pad_skimage019``). Masks are
resized as float32 and thresholded ``> 0``, so the 0.19 blur grows shrunk masks by a pixel or so at the border.
Input normalisation ((x − 127.5) / 127.5 for ReSTR, BGR − mean for the TF1 models) is the model's, not the files'.

Numbering and order: refs in ascending ref_id (the Python 2 dict order the original iterated, spec §7.19),
sentences in list order; ReferIt region keys in sorted order (the original used py2 string-hash order). With
``--family restr`` the annotation files' own order instead (ReSTR ran on Python 3.7, whose dicts keep insertion
order): refs in the order of the refs pickle, ReferIt keys in the order of the query JSON. ``n`` runs
over the valid samples of that order and is fixed before any image is read, so ``-j N`` writes byte-identical files
to ``-j 1``. Sentences without any token are skipped (the original crashed) and take no number. A missing or
unreadable image (or mask) skips its samples and leaves their numbers unused: the summary then warns, because the
trainers' DataReader stops at the first gap; fix the file and re-run — existing files are kept, only the missing
ones are written. Files are written to a temporary name in the same folder and renamed, so no partial ``.npz`` is
ever left behind. The ``.npz`` archives carry fixed timestamps (contents are reproducible byte for byte).

``sent_batch`` holds a Python 3 ``str`` (dtype ``<U``); the original stored py2 ``str`` (``S``, bytes) for COCO.
``--format tfrecord`` then checks every ``.npz`` it would pack (``util.data.load_sample``: a corrupt file stops the
run with one line naming it, before TensorFlow is imported) and packs the split's samples, in sample order, into
TFRecord shards ``<output-dir>/<name>/<split>_tfrecord/<name>_<split>-00000-of-000NN.tfrecord``
(``util/data.write_tfrecords``: the same keys, arrays identical), which the trainer reads when the ``.npz`` folder is
absent. This module does not import TensorFlow unless ``--format tfrecord`` is given.

Re-runs verify what is there: an existing file counts as present only if it reads back completely and matches the
plan (``existing_sample_problem``: keys, dtypes, token ids, sentence, ``im_name_batch``, and the ``--img-size`` of
training splits; the resize semantics cannot be read back from a file, so build with another ``--resize`` into a new
``--output-dir``);
otherwise it is rewritten and the summary says how many were. Annotations are validated when read (``util/refer.py``):
a bad ref, sentence, annotation, segmentation or ReferIt query entry is skipped with one warning naming the file and
the entry, and counted in the summary; a file that cannot be read at all stops the run (exit 1). Images are decoded by
``util.image.read_image`` (16-bit, float, alpha, palette and CMYK files to 8 bits by its documented rules). An OS
error (permission denied, read-only or full disk, a file where a folder is expected) stops the run with one line
naming the path, exit 1; the temporary file being written is removed.
"""
import argparse
import logging
import multiprocessing
import os
import signal
import sys
import time
import zipfile
from collections import Counter

import numpy as np

from util import image as im_proc
from util import text as text_proc
from util.refer import (SPLITS, AnnotationError, Refer, ann_to_mask, coco_image_name, load_referit_gt_mask,
                        load_referit_queries)

log = logging.getLogger("build_batches")

T = 20
COCO_SOURCES = {"unc": "refcoco", "unc+": "refcoco+", "Gref": "refcocog"}
DEFAULT_SPLIT_BY = {"unc": "unc", "unc+": "unc", "Gref": "google"}
REFERIT_SPLITS = ("trainval", "test", "train", "val", "all")
FAMILIES = {"tf1": {"img_size": 320, "resize": "skimage013", "im_name": False, "file_order": False, "pad": True},
            "restr": {"img_size": 480, "resize": "skimage019", "im_name": True, "file_order": True, "pad": True},
            "sag": {"img_size": 480, "resize": "skimage019", "im_name": True, "file_order": True, "pad": False}}
DATASETS = ("unc", "unc+", "Gref", "referit")


class UsageError(Exception):
    """Bad command-line choice (unknown dataset, split or split-by)."""


class CorruptBatch(Exception):
    """An existing ``.npz`` that ``--format tfrecord`` would pack is unreadable (message names it)."""


class BadSample(Exception):
    """A sample's image or mask cannot be used: ``reason`` (short, for the summary counts) and ``detail``."""

    def __init__(self, reason, detail):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def output_name(dataset, split_by):
    """Folder / file-prefix name: the dataset, or ``Gref_umd`` for RefCOCOg with the UMD partition."""
    return "Gref_umd" if dataset == "Gref" and split_by == "umd" else dataset


def is_train_split(split):
    """The original's rule: resize-and-pad exactly when the substring 'train' occurs in the split name."""
    return "train" in split


def read_image(path):
    """``util.image.read_image`` at the stored size (uint8 [H, W] for one-channel files, [H, W, 3] otherwise; 16-bit,
    float, alpha and palette files mapped to 8 bits as documented there). Raises BadSample('missing image' /
    'unreadable image' / 'image too large')."""
    try:
        return im_proc.read_image(path)[0]
    except im_proc.ImageReadError as e:
        raise BadSample(e.reason, e.detail) from None


def process_pair(im, mask, train, size, resize="skimage013", pad=True):
    """The original's per-sample processing: (uint8 [H, W, 3] image, bool [H, W] mask).

    ``pad`` False (``--family sag``): ``util.sag_batches.process_pair_nopad`` (fit inside size×size, no padding).

    Train: ``img_as_ubyte(resize_and_pad(im))`` and ``resize_and_pad(mask) > 0`` at size×size, with the
    ``resize_and_pad`` of ``resize`` (``util.image.RESIZE_AND_PAD``: 'skimage013' or 'skimage019'; ``img_as_ubyte``
    is the same in both versions); otherwise the inputs unchanged (mask > 0). A 2-D image is tiled to 3 channels
    afterwards.
    """
    if not pad:
        from util.sag_batches import process_pair_nopad

        return process_pair_nopad(im, mask, train, size)
    if train:
        resize_and_pad = im_proc.RESIZE_AND_PAD[resize]
        im = im_proc.img_as_ubyte(resize_and_pad(im, size, size))
        mask = resize_and_pad(mask, size, size)
    if im.ndim == 2:
        im = np.tile(im[:, :, np.newaxis], (1, 1, 3))
    return im, mask > 0


def save_npz_atomic(path, **arrays):
    """``np.savez``-compatible uncompressed archive with fixed member timestamps, written to a temporary file in
    the same folder and renamed onto ``path``; the temporary file is removed on any error."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key, val in arrays.items():
                info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = 0o600 << 16
                with zf.open(info, "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asanyarray(val), allow_pickle=False)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), path) from None
        raise


def _load_unit_pair(unit):
    """(image, float32 mask) of a work unit; BadSample on unusable files."""
    im = read_image(unit["image"])
    kind, src = unit["mask"]
    try:
        if kind == "coco":
            mask = ann_to_mask(src, im.shape[0], im.shape[1])
        else:
            mask = load_referit_gt_mask(src)
    except FileNotFoundError:
        raise BadSample("missing mask", src) from None
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise BadSample("unreadable mask", f"{src if kind != 'coco' else unit['image']} ({type(e).__name__}: {e})") from None
    if mask.shape != im.shape[:2]:
        raise BadSample("mask size mismatch", f"mask {mask.shape} vs image {im.shape[:2]} for {unit['image']}")
    return im, mask


def existing_sample_problem(path, ids, sentence, size, im_name=None, pad=True):
    """None when ``path`` is a complete sample of this plan, else why it must be rewritten (a short phrase).

    Complete: a readable archive (every member read, so zip CRCs are checked) with exactly the four keys, plus
    ``im_name_batch`` when ``im_name`` is given; ``text_batch`` int64 equal to ``ids``; ``sent_batch`` one element
    equal to ``sentence``; ``im_name_batch`` one str equal to ``im_name``; ``im_batch`` uint8 [H, W, 3]
    (H = W = ``size`` when ``size`` is given, i.e. training splits; max(H, W) = ``size`` when ``pad`` is False);
    ``mask_batch`` bool [H, W].
    """
    keys = ["im_batch", "mask_batch", "sent_batch", "text_batch"] + (["im_name_batch"] if im_name is not None else [])
    try:
        with np.load(path, allow_pickle=False) as npz:
            if sorted(npz.files) != sorted(keys):
                return f"keys {sorted(npz.files)}"
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        return f"unreadable ({type(e).__name__})"
    im, mask, text, sent = (arrays[k] for k in ("im_batch", "mask_batch", "text_batch", "sent_batch"))
    if text.dtype != np.int64 or text.tolist() != list(ids):
        return "other token ids (vocabulary or annotations changed?)"
    stored = sent.ravel()[0] if sent.size == 1 else None
    if isinstance(stored, bytes):
        stored = stored.decode("utf-8", "replace")
    if stored is None or str(stored) != sentence:
        return "another sentence"
    if im_name is not None:
        name = arrays["im_name_batch"]
        if name.dtype.kind != "U" or name.size != 1 or str(name.ravel()[0]) != im_name:
            return "another im_name_batch"
    wrong_size = size and (im.shape[:2] != (size, size) if pad else max(im.shape[:2]) != size)
    if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3 or wrong_size:
        return f"image {im.dtype} {list(im.shape)}"
    if mask.dtype != np.bool_ or mask.shape != im.shape[:2]:
        return f"mask {mask.dtype} {list(mask.shape)}"
    return None


def process_unit(unit, train, size, resize="skimage013", with_im_name=False, pad=True):
    """Write the missing or invalid files of one unit (one image + mask, several sentences).

    ``unit``: dict(image=path, im_name=ReSTR's image name, mask=('coco', segmentation) | ('referit', mat_path),
    samples=[(out_path, ids, sentence)]). ``resize``, ``pad``: see ``process_pair``; ``with_im_name``: also write
    ``im_name_batch`` = ``unit['im_name']`` (0-d str array, as ReSTR's ``np.savez(im_name_batch=im_name)``). A file
    already there counts as present only if ``existing_sample_problem`` finds none (size checked for training
    splits); otherwise it is rewritten. Returns (written, already_present, (reason, message)
    or None, n_bad, [(path, why) of the rewritten files]).
    """
    todo, replaced = [], []
    for sample in unit["samples"]:
        if os.path.exists(sample[0]):
            why = existing_sample_problem(sample[0], sample[1], sample[2], size if train else None,
                                          unit["im_name"] if with_im_name else None, pad)
            if why is None:
                continue
            replaced.append((sample[0], why))
        todo.append(sample)
    present = len(unit["samples"]) - len(todo)
    if not todo:
        return 0, present, None, 0, replaced
    try:
        im, mask = process_pair(*_load_unit_pair(unit), train, size, resize, pad)
    except BadSample as e:
        return 0, present, (e.reason, str(e)), len(todo), replaced
    extra = {"im_name_batch": np.array(unit["im_name"])} if with_im_name else {}
    for out_path, ids, sent in todo:
        save_npz_atomic(out_path, text_batch=np.array(ids, dtype=np.int64), im_batch=im, mask_batch=mask,
                        sent_batch=np.array([sent]), **extra)
    return len(todo), present, None, 0, replaced


def _process_unit_star(args):
    return process_unit(*args)


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


def _worker_init():
    """Pool workers unwind on SIGTERM (``Pool.terminate``) like on an exception, so a temporary file being written is
    removed. (They ignore Ctrl-C from the start: the parent creates them with SIGINT ignored, which a new Python
    process keeps.)"""
    signal.signal(signal.SIGTERM, _exit_on_signal)


def _tokenize_or_skip(sent, vocab, where, skipped):
    """Token ids of ``sent`` or None (counted in ``skipped`` and logged) when it has no token."""
    try:
        return text_proc.preprocess_sentence(sent, vocab, T)
    except ValueError:
        skipped["empty sentence"] += 1
        log.warning("skipping empty sentence (%s)", where)
        return None


def _report_problems(problems, skipped, reason, n_left_out):
    """Warn each annotation problem (one line each) and count the ``n_left_out`` entries under ``reason``."""
    for problem in problems:
        log.warning("%s", problem)
    if n_left_out:
        skipped[reason] += n_left_out


def plan_coco(args, out_folder, prefix, vocab, skipped):
    """Work units of a COCO dataset split: one per ref in ascending ref_id (``--family restr``: refs-file order),
    numbered over its valid sentences.
    Annotation entries that ``Refer`` left out are warned and counted ('bad annotation entry'); the sentences of a
    ref whose annotation is absent or unusable are counted and take no number (no gap)."""
    refer = Refer(args.refer_root, COCO_SOURCES[args.d], args.split_by)
    _report_problems(refer.problems, skipped, "bad annotation entry", len(refer.problems))
    units, n = [], 0
    if FAMILIES[args.family]["file_order"]:
        ref_ids = [ref_id for ref_id, ref in refer.refs.items() if ref["split"] == args.t]
    else:
        ref_ids = refer.ref_ids(args.t)
    for ref_id in ref_ids:
        ref = refer.refs[ref_id]
        ann = refer.anns.get(ref["ann_id"])
        tokenized = []
        for sentence in ref["sentences"]:
            ids = _tokenize_or_skip(sentence["sent"], vocab, f"ref_id {ref_id}, sent_id {sentence.get('sent_id')}",
                                    skipped)
            if ids is not None:
                tokenized.append((ids, sentence["sent"]))
        if ann is None:
            where = "unusable" if ref["ann_id"] in refer.bad_ann_ids else "not"
            skipped[f"annotation {ref['ann_id']} {where} in instances.json"] += len(tokenized)
            continue
        samples = []
        for ids, sent in tokenized:
            samples.append((os.path.join(out_folder, f"{prefix}_{n}.npz"), ids, sent))
            n += 1
        if samples:
            image_name = coco_image_name(ref["image_id"])
            units.append({"image": os.path.join(args.image_root, image_name),
                          "im_name": os.path.splitext(image_name)[0],
                          "mask": ("coco", ann["segmentation"]), "samples": samples})
    return units


def referit_query_file(data_root, split):
    """The ReferIt query file of ``split``: ``<data_root>/data/referit/referit_query_<split>.json`` (RMI's layout)
    if it exists, else ``<data_root>/data/referit_query_<split>.json`` (CMPC's and RRN's); AnnotationError naming
    both when neither exists."""
    candidates = [os.path.join(data_root, "data", "referit", f"referit_query_{split}.json"),
                  os.path.join(data_root, "data", f"referit_query_{split}.json")]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise AnnotationError(f"ReferIt query file not found: looked for {candidates[0]} (RMI's layout) and "
                          f"{candidates[1]} (CMPC's and RRN's)")


def plan_referit(args, out_folder, prefix, vocab, skipped):
    """Work units of a ReferIt split: one per region key in sorted order (``--family restr``: the JSON's order),
    numbered over its valid queries (a key holding a single string is one query; other malformed values are warned
    and counted, ``load_referit_queries``)."""
    query_dict, problems, n_bad = load_referit_queries(referit_query_file(args.data_root, args.t))
    _report_problems(problems, skipped, "bad query entry", n_bad)
    mask_dir = os.path.join(args.data_root, "data", "referit", "mask")
    units, n = [], 0
    for key in (list if FAMILIES[args.family]["file_order"] else sorted)(query_dict):
        samples = []
        for sent in query_dict[key]:
            ids = _tokenize_or_skip(sent, vocab, f"region {key}", skipped)
            if ids is None:
                continue
            samples.append((os.path.join(out_folder, f"{prefix}_{n}.npz"), ids, sent))
            n += 1
        if samples:
            image_name = key.split("_", 1)[0] + ".jpg"
            units.append({"image": os.path.join(args.image_root, image_name), "im_name": image_name,
                          "mask": ("referit", os.path.join(mask_dir, key + ".mat")), "samples": samples})
    return units


def parse_args(argv):
    """Command line → argparse namespace with every default path resolved (see ``--help``)."""
    p = argparse.ArgumentParser(
        description="Build one .npz per (referring expression, sentence) under "
                    "<output-dir>/<name>/<split>_batch/<name>_<split>_<n>.npz.",
        epilog="Output name: the dataset, except Gref_umd for '-d Gref --split-by umd' (Gref = the Google split).")
    p.add_argument("-d", default="referit", help="dataset: unc, unc+, Gref or referit (default referit)")
    p.add_argument("-t", default="trainval",
                   help="split: unc/unc+ train|val|testA|testB; Gref google train|val, umd train|val|test; "
                        "referit trainval|test (default trainval)")
    p.add_argument("--split-by", default=None,
                   help="REFER partition: unc for unc/unc+; google (default) or umd for Gref")
    p.add_argument("--family", default="tf1", choices=tuple(FAMILIES),
                   help="model family whose build_batches.py to reproduce: tf1 (RMI, RRN, CMPC, LSTM; default) = "
                        "--img-size 320 --resize skimage013, four keys; restr (ReSTR) = --img-size 480 "
                        "--resize skimage019, plus im_name_batch; sag (SaG) = restr's without padding (longer side "
                        "--img-size)")
    p.add_argument("--img-size", type=int, default=None,
                   help="side of the padded training images (default: the family's, 320 or 480)")
    p.add_argument("--resize", default=None, choices=tuple(im_proc.RESIZE_AND_PAD),
                   help="resize semantics of training splits: skimage013 (no anti-aliasing; what the TF1 models "
                        "trained on) or skimage019 (Gaussian anti-aliasing when shrinking; ReSTR's scikit-image "
                        "0.19.3) (default: the family's)")
    p.add_argument("--data-root", default=".",
                   help="folder holding data/ and external/refer/data (default: current folder)")
    p.add_argument("--image-root", default=None,
                   help="image folder (default <data-root>/data/coco/images/train2014, or "
                        "<data-root>/data/referit/images for referit)")
    p.add_argument("--output-dir", default=".",
                   help="where <name>/<split>_batch/ is created (default: current folder)")
    p.add_argument("-j", "--jobs", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--format", default="npz", choices=("npz", "tfrecord"),
                   help="npz (default): one .npz per sample; tfrecord: also pack them, in order, into "
                        "<output-dir>/<name>/<split>_tfrecord/<name>_<split>-NNNNN-of-NNNNN.tfrecord (needs TensorFlow)")
    p.add_argument("--shard-size", type=int, default=1024, help="tfrecord: samples per shard (default 1024)")
    p.add_argument("--make-sample", metavar="DIR", default=None,
                   help="only write the deterministic sample dataset (util/sample_data.py) under DIR and exit")
    args = p.parse_args(argv)
    if args.make_sample:
        return args
    family = FAMILIES[args.family]
    args.img_size = family["img_size"] if args.img_size is None else args.img_size
    args.resize = args.resize or family["resize"]
    args.with_im_name = family["im_name"]
    args.pad = family["pad"]
    if not args.pad and args.resize != "skimage019":
        raise UsageError(f"--family {args.family} resizes with skimage019 (no padding, as its original); "
                         f"--resize {args.resize} applies to the padded families")
    if args.d not in DATASETS:
        raise UsageError(f"unknown dataset {args.d!r} (choose from {', '.join(DATASETS)})")
    if args.d == "referit":
        if args.split_by is not None:
            raise UsageError("--split-by applies to unc, unc+ and Gref only")
        if args.t not in REFERIT_SPLITS:
            raise UsageError(f"unknown split {args.t!r} for referit (choose from {', '.join(REFERIT_SPLITS)})")
        args.image_root = args.image_root or os.path.join(args.data_root, "data", "referit", "images")
    else:
        args.split_by = args.split_by or DEFAULT_SPLIT_BY[args.d]
        key = (COCO_SOURCES[args.d], args.split_by)
        if key not in SPLITS:
            raise UsageError(f"unknown --split-by {args.split_by!r} for {args.d}")
        if args.t not in SPLITS[key]:
            raise UsageError(f"unknown split {args.t!r} for {args.d} ({args.split_by}) "
                             f"(choose from {', '.join(SPLITS[key])})")
        args.image_root = args.image_root or os.path.join(args.data_root, "data", "coco", "images", "train2014")
        args.refer_root = os.path.join(args.data_root, "external", "refer", "data")
    if args.img_size < 1 or args.jobs < 1 or args.shard_size < 1:
        raise UsageError("--img-size, -j and --shard-size must be positive")
    return args


def run(args):
    """Plan, process (in ``args.jobs`` processes) and summarise; returns the summary Counter."""
    name = output_name(args.d, args.split_by)
    out_folder = os.path.join(args.output_dir, name, f"{args.t}_batch")
    prefix = f"{name}_{args.t}"
    vocab_name = "referit" if args.d == "referit" else "Gref"
    vocab_path = os.path.join(args.data_root, "data", f"vocabulary_{vocab_name}.txt")
    if not os.path.isfile(vocab_path):
        what = "is a folder, not a file" if os.path.isdir(vocab_path) else "not found"
        raise AnnotationError(f"vocabulary file {what}: {vocab_path}")
    try:
        vocab = text_proc.load_vocab_dict_from_file(vocab_path)
    except ValueError as e:
        raise AnnotationError(str(e)) from None
    skipped = Counter()
    plan = plan_referit if args.d == "referit" else plan_coco
    units = plan(args, out_folder, prefix, vocab, skipped)
    os.makedirs(out_folder, exist_ok=True)
    train = is_train_split(args.t)
    total = sum(len(u["samples"]) for u in units)
    stats = Counter()
    if train:
        log.info("--family %s: training images resized %s %d×%d with --resize %s%s", args.family,
                 "and padded to" if args.pad else "to fit inside (no padding)", args.img_size, args.img_size,
                 args.resize, ", with im_name_batch" if args.with_im_name else "")
    tasks = [(u, train, args.img_size, args.resize, args.with_im_name, args.pad) for u in units]
    first_replaced = []
    start = time.perf_counter()
    from tqdm import tqdm
    with tqdm(total=total, unit="sample", disable=not sys.stderr.isatty(), file=sys.stderr) as bar:
        if args.jobs == 1:
            results = map(_process_unit_star, tasks)
            pool = None
        else:
            handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                pool = multiprocessing.get_context("spawn").Pool(args.jobs, initializer=_worker_init)
            finally:
                signal.signal(signal.SIGINT, handler)
            results = pool.imap(_process_unit_star, tasks)
        try:
            for unit, (written, present, bad, n_bad, replaced) in zip(units, results):
                stats["written"] += written
                stats["present"] += present
                stats["replaced"] += len(replaced)
                if replaced and not first_replaced:
                    first_replaced.extend(replaced[0])
                if bad:
                    log.warning("skipping %d sample(s): %s", n_bad, bad[1])
                    skipped[bad[0]] += n_bad
                    stats["gaps"] += n_bad
                bar.update(written + present + n_bad)
        except BaseException:
            if pool is not None:
                pool.terminate()
                pool.join()
            raise
        if pool is not None:
            pool.close()
            pool.join()
    elapsed = time.perf_counter() - start
    n_skipped = sum(skipped.values())
    reasons = ", ".join(f"{v} {k}" for k, v in sorted(skipped.items()))
    log.info("%s %s: %d samples written, %d already present, %d skipped%s in %.1f s (%.1f samples/s) -> %s",
             name, args.t, stats["written"], stats["present"], n_skipped, f" ({reasons})" if reasons else "",
             elapsed, stats["written"] / elapsed if elapsed > 0 else 0.0, out_folder)
    if stats["replaced"]:
        log.warning("rewrote %d existing file(s) that were incomplete or of another build (first: %s: %s)",
                    stats["replaced"], *first_replaced)
    if stats["gaps"]:
        log.warning("%d sample numbers are unused because of bad images/masks; DataReader stops at the first gap: "
                    "fix the files and re-run (existing files are kept)", stats["gaps"])
    stats["skipped"] = n_skipped
    if args.format == "tfrecord":
        from util import data  # imports TensorFlow when writing

        try:
            files = data.batch_files(out_folder, prefix)
            for f in files:
                data.load_sample(f)
            data.write_tfrecords(files, data.tfrecord_folder(out_folder), prefix, args.shard_size)
        except data.BadSample as e:
            raise CorruptBatch(f"not packing TFRecords: {e}; delete that file and re-run build_batches.py") from None
    return stats


def main(argv=None):
    """CLI entry point: 0 on success (skipped samples included), 1 when the annotations cannot be read, an OS error
    (permission denied, read-only or full disk, a file where a folder is expected; the path named) stops the run, or
    ``--format tfrecord`` meets a corrupt ``.npz``; 2 on a bad command line; 130 on Ctrl-C (workers stop, no temporary
    file is left). Messages go to stderr through logging,
    one line each; every file is written under a temporary name and renamed, so an error leaves no partial file."""
    logging.basicConfig(level=logging.INFO, format="build_batches: %(levelname)s: %(message)s", stream=sys.stderr)
    try:
        args = parse_args(argv)
    except UsageError as e:
        log.error("%s", e)
        return 2
    try:
        if args.make_sample:
            from util.sample_data import make_sample
            make_sample(args.make_sample)
            log.info("sample dataset written under %s (use --data-root %s)", args.make_sample, args.make_sample)
        else:
            run(args)
    except (AnnotationError, CorruptBatch) as e:
        log.error("%s", e)
        return 1
    except OSError as e:
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        log.error("%s%s", e.strerror or e, f": {where}" if where else "")
        return 1
    except KeyboardInterrupt:
        log.error("interrupted: every .npz written so far is complete; run the same command again to continue")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
