"""Write TRIS's PRMS response maps of the train split for IRNet, as ``validate.py --prms --save_cam`` does
(``validate.validate_same_sentence``, README step 2), without torch.

Usage: ``python external/tris_prms.py WEIGHTS -d unc --data-root ROOT --data-dir DATA [--img-size 320]
[--out-dir DIR] [--skip-existing | --overwrite]``

- WEIGHTS: a TRIS stage-1 ``.pth`` (released ``stage1_<dataset>.pth`` or one TRIS's training wrote) or our TF2
  stage-1 snapshot prefix (``trainval_model.py -m train -n TRIS_stage1``).
- Data: the train refs of ``-d`` (unc → refcoco/unc, unc+ → refcoco+/unc, Gref → refcocog/google) read as
  ``-m train -n TRIS_stage1`` reads them (``<ROOT>/external/refer/data``, ``<ROOT>/data/coco/images/train2014``;
  ``models.tris_train``), the BPE merges file and the frozen CLIP ViT-B/32 from ``--data-dir``: OpenAI's TorchScript
  ``<DATA>/weights/ViT-B-32.pt`` (read without torch, ``util.torchscript``), else its state_dict
  ``<DATA>/weights/ViT-B-32.pth`` (``tris_train.vit_path``).
- Per ref (``ReferDataset(split='train', eval_mode=True)``: all its sentences, batch 1, refs in the split's order),
  the image stretched to S×S (PIL bilinear, ImageNet normalisation): for each sentence j the stage-1 map, its CLIP
  score Σ_k cos(ViT(224-resize of the raw map · 224-resize of the image), text_k) (``models.tris.prms_scores``);
  the first map with the largest score is kept (``tris.prms_select``), resized to the original H×W (bilinear,
  align_corners True) and divided by (its max + 1e-5) (``tris.evaluate_sentence``'s ``norm_pred``).
- Output, as the original's: ``<DIR>/cam/<index>_<image id>.npy`` — ``np.save`` of that map, float32 [H, W],
  values in [0, 1) (index = the ref's position in the split's ref list, image id = the integer after the last
  ``_`` of the image's file name); ``<DIR>/<dataset>_train_names.json`` — the JSON list of those names without
  ``.npy`` (``json.dumps``), in order. DIR defaults to ``<ROOT>/output/<refcoco|refcoco+|refcocog>_<unc|google>``
  (TRIS's README: ``output/refcocog_umd``), which is where ``-m train -n TRIS_stage2`` later finds IRNet's
  ``ins_seg`` folder. Every file is written to a temporary name and renamed. Files already there are never
  replaced silently: the run stops in one line unless ``--skip-existing`` (keep the maps there, write the missing
  ones: an interrupted export continues) or ``--overwrite``.
- Logged at the end: ``validate_same_sentence``'s figures over the refs computed in this run (mIoU, oIoU, Hit,
  HitM ×100, each ref's map weighted by its number of sentences; ground truth from the COCO polygons).
Exit codes: 0 written; 2 bad input (missing file, refused checkpoint, existing outputs); 1 write or TensorFlow
error; 130 interrupted.
"""
import argparse
import json
import logging
import os
import pathlib
import sys
import types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported, as trainval_model.py
if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from models import model_spec, tris, tris_train  # noqa: E402
from util.config import run_converter  # noqa: E402
from util.files import atomic_output  # noqa: E402

log = logging.getLogger("tris_prms")
SPLIT = "train"       # validate.py --test_split train (README step 2); the names file says "train" whatever the split


def image_id_of(file_name):
    """``ReferDataset``'s ``img_path``: ``int(file_name.split('.')[0].split('_')[-1])``."""
    return int(file_name.split(".")[0].split("_")[-1])


class PrmsRefs:
    """The train refs as ``ReferDataset(split='train', eval_mode=True)`` gives them: ``names[i]`` =
    ``<index>_<image id>``, ``ids[i]`` int32 [k_i, 20], ``image_paths[i]``, and for the metrics the COCO
    segmentation, size and box (x1, y1, x2, y2 as ints) of the ref's annotation."""

    def __init__(self, data_root, dataset, tokenizer):
        from util.refer import Refer, coco_image_name

        train_set = tris_train.ReferTrainSet(data_root, dataset, SPLIT, tokenizer, size=0, negatives=0)
        source, split_by = tris_train.COCO_SOURCES[dataset]
        refer = Refer(tris_train.refer_root(data_root), source, split_by)
        self.ids, self.image_paths = train_set.ids, train_set.image_paths
        self.names, self.annotations = [], []
        for index, ref_id, image_id in zip(train_set.split_index, train_set.ref_ids, train_set.image_ids):
            image, ann = refer.imgs.get(image_id, {}), refer.anns.get(refer.refs[ref_id]["ann_id"])
            if ann is None:
                raise ValueError(f"{tris_train.refer_root(data_root)}/{source}/instances.json: train ref_id {ref_id}'s "
                                 f"annotation {refer.refs[ref_id]['ann_id']} is missing or unreadable")
            self.names.append(f"{index}_{image_id_of(image.get('file_name') or coco_image_name(image_id))}")
            self.annotations.append(ann)

    def __len__(self):
        return len(self.names)

    def ground_truth(self, index, height, width):
        """(gt mask [H, W], boxes [1, 4]) of ref ``index`` as ``validate`` builds them (``tris_train.refer_gt_mask``:
        a pixel under two polygons is background; ``tris_train.refer_box``: int-cast, x2 = x + w)."""
        ann = self.annotations[index]
        return tris_train.refer_gt_mask(ann["segmentation"], height, width), tris_train.refer_box(ann["bbox"])


def save_npy(path, array):
    """``np.save(path, array)`` through a temporary file renamed over ``path``."""
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def export(weights, dataset, data_root, data_dir, image_size, out_dir, existing):
    """Write the maps and the names file (module docstring); ``existing``: 'refuse', 'skip' or 'overwrite'.
    Returns (maps written, maps kept, summary of the computed refs or None)."""
    from PIL import Image

    from models.tris_spec import stretch_rgb

    spec = model_spec("TRIS_stage1")
    cfg = types.SimpleNamespace(data_dir=data_dir, seed=0)
    if not os.path.isfile(spec.bpe_path(cfg)):
        raise FileNotFoundError(f"{spec.bpe_path(cfg)}: no such file (CLIP's BPE merges; see data/README.md)")
    vit_missing = tris_train.vit_problem(cfg)
    if vit_missing:
        raise FileNotFoundError(vit_missing)
    refs = PrmsRefs(data_root, dataset, spec.tokenizer(spec.bpe_path(cfg)))
    cam_dir = os.path.join(out_dir, tris_train.CAM_FOLDER)
    names_path = os.path.join(out_dir, f"{tris_train.COCO_SOURCES[dataset][0]}_train_names.json")
    names_text = json.dumps(refs.names)
    present = [n for n in refs.names if os.path.exists(os.path.join(cam_dir, f"{n}.npy"))]
    if existing == "refuse" and (present or os.path.exists(names_path)):
        first = os.path.join(cam_dir, f"{present[0]}.npy") if present else names_path
        raise ValueError(f"{first}: exists ({len(present)} of {len(refs)} maps already in {cam_dir}); pass "
                         f"--skip-existing to keep them and write the rest, or --overwrite")
    if existing == "skip" and os.path.exists(names_path):
        with open(names_path) as f:
            if f.read() != names_text:
                raise ValueError(f"{names_path}: exists with other names than this export's; pass --overwrite")
    keep = set(present) if existing == "skip" else set()
    model = spec.load_trained(weights, cfg)
    if model.stage != 1:
        raise ValueError(f"{weights}: PRMS needs a TRIS stage-1 model")
    vit = tris_train.load_frozen_vit(tris_train.vit_path(cfg))
    forward = tf.function(lambda images, ids: model(images, ids), autograph=False)
    os.makedirs(cam_dir, exist_ok=True)
    log.info("PRMS over %d %s refs of %s (%d maps kept) → %s", len(refs), SPLIT, dataset, len(keep), cam_dir)
    results, counts, written = [], [], 0
    for i, name in enumerate(refs.names):
        if name in keep:
            continue
        with Image.open(refs.image_paths[i]) as img:
            rgb = np.asarray(img.convert("RGB"))
        image = tris.preprocess(stretch_rgb(rgb, image_size)[None])
        outputs = [forward(image, tf.constant(ids[None])) for ids in refs.ids[i]]
        words = tf.constant(refs.ids[i])
        chosen = tris.prms_select([tris.prms_scores(out, image, words, vit) for out in outputs])
        gt, boxes = refs.ground_truth(i, rgb.shape[0], rgb.shape[1])
        result = tris.evaluate_sentence(outputs[chosen].numpy()[0, :, :, 0], gt, boxes)
        save_npy(os.path.join(cam_dir, f"{name}.npy"), result["norm_pred"].astype(np.float32))
        results.append(result)
        counts.append(len(refs.ids[i]))
        written += 1
        if written % 100 == 0:
            log.info("%d / %d refs", i + 1, len(refs))
    with atomic_output(names_path) as tmp:
        with open(tmp, "w") as f:
            f.write(names_text)
    return written, len(keep), (tris.summarize(results, counts) if results else None), cam_dir, names_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", help="TRIS stage-1 .pth or our TF2 stage-1 snapshot prefix")
    parser.add_argument("-d", required=True, choices=sorted(tris_train.COCO_SOURCES),
                        help="dataset: unc (refcoco), unc+ (refcoco+), Gref (refcocog google)")
    parser.add_argument("--data-root", default=".",
                        help="folder holding data/coco/images/train2014 and external/refer/data (default .)")
    parser.add_argument("--data-dir", default="data",
                        help="folder of bpe_simple_vocab_16e6.txt.gz and weights/ViT-B-32.pt (OpenAI's) or "
                             "weights/ViT-B-32.pth (its state_dict) (default data)")
    parser.add_argument("--img-size", type=int, default=tris.IMAGE_SIZE, help="network input size (320, --size)")
    parser.add_argument("--out-dir", default=None,
                        help="output folder (default <data-root>/output/<refcoco|refcoco+|refcocog>_<unc|google>): "
                             "maps in cam/, names in <dataset>_train_names.json")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--skip-existing", action="store_true",
                       help="keep the maps already in cam/ and write the missing ones (continue an interrupted run)")
    group.add_argument("--overwrite", action="store_true", help="replace the maps and the names file there")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    out_dir = args.out_dir or tris_train.output_root(args.data_root, args.d)
    existing = "skip" if args.skip_existing else "overwrite" if args.overwrite else "refuse"
    code, result = run_converter(lambda: export(args.weights, args.d, args.data_root, args.data_dir, args.img_size,
                                                out_dir, existing), out_dir, log)
    if code:
        return code
    written, kept, summary, cam_dir, names_path = result
    if summary:
        log.info("PRMS on the %d refs computed: mIoU %.3f, oIoU %.3f, Hit %.3f, HitM %.3f", written,
                 summary["mIoU"], summary["oIoU"], summary["hit"], summary["hitm"])
    log.info("wrote %d maps to %s (%d kept) and %s", written, cam_dir, kept, names_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
