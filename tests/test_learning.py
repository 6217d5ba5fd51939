"""A short training must make the model segment what it was taught, not only run.

RRN trains from the seeded stand-in backbone on four samples of the sample set (four different shapes: "blue square
on the right", "two yellow squares on the left", "purple square on the right", "red triangle on the middle"), and the
real ``-m test`` path scores it on the same four samples. Within the suite's time this is memorisation, not
generalisation to the val split (see README, "Two commands on a fresh machine"), but it needs the loss, the
gradients, the optimizer and the pairing of image, sentence and mask all right: a mask learnt for the wrong image or
sentence is scored against the right one.

Measured on these four samples: all background 0, all foreground 0.052, the best constant mask (the same mask for
every sample, what a model that ignores its inputs can learn at best) 0.257; the trained model 0.457 (seed 0, 60
iterations; its first positive predictions come at about iteration 50).
"""
import json
import shutil

import numpy as np
import pytest

from tests.conftest import SAMPLE_TRAIN_SIZE as SIZE
from tests.test_trainval import run
from util import data

SAMPLES = (0, 2, 4, 6)
ITERATIONS, BATCH, LR = 60, 4, 0.001
FLOOR = 0.35


def overall_iou(predictions, masks):
    inter = sum(int(np.logical_and(p, m).sum()) for p, m in zip(predictions, masks))
    union = sum(int(np.logical_or(p, m).sum()) for p, m in zip(predictions, masks))
    return inter / union


def best_constant_mask_iou(masks):
    """The highest overall IoU of one mask used for every sample (a threshold of the mean mask)."""
    mean = np.mean(masks, axis=0)
    return max(overall_iou([mean >= t] * len(masks), masks) for t in np.unique(mean) if t > 0)


@pytest.fixture
def four_samples(sample, tmp_path):
    """``unc`` train and val batch folders holding the same four 64×64 training samples; their masks."""
    root = tmp_path / "four"
    for split in ("train", "val"):
        (root / "unc" / f"{split}_batch").mkdir(parents=True)
        for k, n in enumerate(SAMPLES):
            shutil.copy(sample / "unc" / "train_batch" / f"unc_train_{n}.npz",
                        root / "unc" / f"{split}_batch" / f"unc_{split}_{k}.npz")
    masks = [data.load_sample(str(root / "unc" / "val_batch" / f"unc_val_{k}.npz"))["mask_batch"].astype(bool)
             for k in range(len(SAMPLES))]
    return root, masks


@pytest.mark.slow
def test_short_training_beats_the_iou_floor(sample, four_samples, tmp_path):
    root, masks = four_samples
    assert FLOOR > best_constant_mask_iou(masks) + 0.05
    assert FLOOR > overall_iou([np.ones_like(m) for m in masks], masks)
    common = ["-d", "unc", "-n", "RRN_model", "-f", str(tmp_path / "ckpt"), "--img-size", str(SIZE),
              "--batch-root", str(root), "--data-dir", str(sample / "data"), "--seed", "0"]
    run(["-m", "train", "-t", "train", *common, "-i", str(ITERATIONS), "-s", str(ITERATIONS), "-bs", str(BATCH),
         "-lr", str(LR), "--init-weights", "random", "--log-every", "20"])
    run(["-m", "test", "-t", "val", *common, "-i", str(ITERATIONS)])
    results = json.loads((tmp_path / "ckpt" / f"unc_iter_{ITERATIONS}.unc_val.json").read_text())["without_dcrf"]
    assert results["samples"] == len(SAMPLES)
    assert results["overall_iou"] >= FLOOR, results
