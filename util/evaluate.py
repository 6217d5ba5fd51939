"""Evaluation: the originals' ``test()`` — preprocessing, threshold, DenseCRF, metrics, visualisation.

Per sample (the TF1 models; ``models.TF1Spec.predictor``): proc_im = img_as_ubyte(resize_and_pad(im, S, S)); the
network sees float32(proc_im)[..., ::-1] − mu; prediction = (upsampled logits ≥ 1e-9), mapped back with
resize_and_crop to the original size (any nonzero value is foreground); DenseCRF on the padded S×S frame with the
uint8 RGB image. Samples are evaluated in file order, in batches of ``-bs`` (every padded image is S×S), which changes
no number. Other models bring their own network input and post-processing through their registry entry's
``predictor`` (ReSTR: ``models.ReSTRSpec.predictor``); the metrics, printed block and JSON are the same for all.
"""
import logging
import os

import numpy as np
from PIL import Image
from tqdm import tqdm

from models import model_spec
from util import data
from util.crf import dense_crf
from util.files import atomic_output
from util.image import img_as_ubyte, resize_and_crop, resize_and_pad
from util.metrics import SegmentationMetrics, write_json_atomic
from util.summaries import write_test_scalars

SCORE_THRESHOLD = 1e-9
log = logging.getLogger("test")


def prepare(sample, image_size, mu=data.MU):
    """(words int32 [T], network input float32 [S,S,3], padded RGB uint8 [S,S,3]) of one eval sample."""
    proc_im = img_as_ubyte(resize_and_pad(sample["im_batch"], image_size, image_size))
    return sample["text_batch"].astype(np.int32), data.to_network_input(proc_im, mu), proc_im


def predict_masks(up, sigm, proc_im, shape, dcrf):
    """Binary predictions at the original ``shape`` (float64, nonzero = foreground): plain, and DenseCRF or None."""
    pred_raw = (up >= SCORE_THRESHOLD).astype(np.float32)
    plain = resize_and_crop(pred_raw, *shape)
    refined = resize_and_crop(dense_crf(sigm, proc_im), *shape) if dcrf else None
    return plain, refined


def save_visualization(folder, index, sample, prediction, suffix=""):
    """``<folder>/<index>_im.png`` (image), ``_gt.png`` (red object on blue), ``_pred<suffix>.png`` (im/2 plus 100 in
    the red channel where ``uint8(prediction)`` is 1), as CMPC's ``visualize_seg`` draws them, in one folder per
    run instead of one per sentence; the sentence goes to ``_sent.txt``. Each file is written atomically
    (``util.files.atomic_output``): an interrupted run leaves whole files or none."""
    os.makedirs(folder, exist_ok=True)
    im = sample["im_batch"]
    mask = sample["mask_batch"].astype(bool)
    base = os.path.join(folder, f"{index:06d}")
    gt = np.zeros_like(im)
    gt[..., 2] = 170
    gt[mask, 0] = 170
    gt[mask, 2] = 0
    pred = im / 2.0
    pred[..., 0] += 100 * prediction.astype(np.uint8)
    for path, array in ((base + "_im.png", im), (base + "_gt.png", gt), (base + f"_pred{suffix}.png", pred)):
        with atomic_output(path) as tmp:
            Image.fromarray(array.astype(np.uint8)).save(tmp, format="PNG")
    with atomic_output(base + "_sent.txt") as tmp, open(tmp, "w") as f:
        f.write(data.sentence_of(sample) + "\n")


def evaluate(model, files, image_size, batch_size=1, dcrf=False, vis_folder=None, progress=True, spec=None,
             load=data.load_sample):
    """Evaluate ``model`` on the samples ``files`` with its registry entry's ``predictor`` (``spec``, default
    the entry of ``model.model_name``). Each name in ``files`` is read with ``load`` (default: an eval ``.npz``
    path, ``data.load_sample``; a registry entry's ``test_source`` brings its own names and reader).

    Returns (metrics, metrics with DenseCRF or None, names of unreadable samples). An unreadable sample (``load``
    raises ``BadSample``) is skipped with a warning and listed, not counted in the metrics.
    """
    predict = (spec or model_spec(model.model_name)).predictor(model, image_size, dcrf)
    metrics, metrics_crf = SegmentationMetrics(), (SegmentationMetrics() if dcrf else None)
    bar = tqdm(total=len(files), desc="test", unit="sample", disable=not progress)
    skipped = []
    for start in range(0, len(files), batch_size):
        samples = []
        for path in files[start:start + batch_size]:
            try:
                samples.append(load(path))
            except data.BadSample as e:
                log.warning("skipping unreadable sample: %s", e)
                skipped.append(path)
        bar.update(len(files[start:start + batch_size]) - len(samples))
        if not samples:
            continue
        for k, (sample, (plain, refined)) in enumerate(zip(samples, predict(samples))):
            metrics.add(plain, sample["mask_batch"])
            if dcrf:
                metrics_crf.add(refined, sample["mask_batch"])
            if vis_folder:
                save_visualization(vis_folder, start + k, sample, plain)
                if dcrf:
                    save_visualization(vis_folder, start + k, sample, refined, suffix="_dcrf")
        bar.update(len(samples))
    bar.close()
    return metrics, metrics_crf, skipped


def test(cfg):
    """The originals' ``test()``: restore ``-i`` of ``-f``, evaluate ``-d``/``-t``, print the block, write JSON
    (atomically). A run that could read no sample at all raises ``BadSample`` and writes no JSON, so an earlier
    result is never replaced by a zero-sample one.

    The samples are the ``.npz`` batches of ``-d``/``-t``, unless the registry entry has a ``test_source(cfg)``
    that returns (names, load, where) (TRIS with ``--data-root``: the refer files); it returns None to keep the
    batches."""
    spec = cfg.spec
    source = getattr(spec, "test_source", None)
    source = source(cfg) if source else None
    files, load, where = source or (data.batch_files(cfg.batch_folder, cfg.batch_prefix), data.load_sample,
                                    cfg.batch_folder)
    prefix = spec.find_snapshot(cfg.snapshot_candidates(cfg.iteration))
    log.info("Loading trained weights from %s", prefix)
    model = spec.load_trained(prefix, cfg)
    metrics, metrics_crf, skipped = evaluate(model, files, cfg.image_size, cfg.batch_size, cfg.dcrf,
                                    cfg.vis_folder if cfg.visualize else None, progress=cfg.progress, spec=spec,
                                    load=load)
    json_path = f"{prefix}.{cfg.dataset}_{cfg.split}.json"
    if metrics.total == 0:
        raise data.BadSample(f"none of the {len(files)} samples under {where} could be read (all skipped, "
                             f"see the warnings); {json_path} not written")
    log.info("%s", metrics.report("without DenseCRF"))
    results = {"model": cfg.model, "dataset": cfg.dataset, "split": cfg.split, "iteration": cfg.iteration,
               "snapshot": prefix, "without_dcrf": metrics.summary(), "skipped_unreadable": skipped}
    if skipped:
        log.warning("%d unreadable sample(s) skipped (listed in the JSON)", len(skipped))
    if metrics_crf is not None:
        log.info("%s", metrics_crf.report("with DenseCRF"))
        results["with_dcrf"] = metrics_crf.summary()
    original = spec.original_metrics()
    if original:
        log.info("%s: %s", original["title"], "; ".join(f"{k} = {v:f}" for k, v in original.items() if k != "title"))
        results["original_metrics"] = original
    if cfg.logdir:
        write_test_scalars(cfg.logdir, results, cfg.iteration)
    write_json_atomic(results, json_path)
    log.info("metrics written to %s", json_path)
    return results
