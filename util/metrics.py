"""Evaluation metrics and the printed block of the originals (``util/eval_tools.py``, ``test()`` of the mains)."""
import json

import numpy as np

from util.files import atomic_output

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def compute_mask_IU(masks, target):
    """Intersection and union pixel counts; ANY nonzero value is foreground (inputs may be float maps)."""
    if masks.shape[-2:] != target.shape[-2:]:
        raise ValueError(f"prediction shape {masks.shape} does not match the mask shape {target.shape}")
    intersection = int(np.sum(np.logical_and(masks, target)))
    union = int(np.sum(np.logical_or(masks, target)))
    return intersection, union


def compute_accuracy(scores, labels):
    """Training-log accuracies (all, pos, neg): predicted positive ⇔ score ≥ 0; the positive denominator is
    num_pos + 1, as the original ``processing_tools.compute_accuracy``."""
    is_pos = labels != 0
    is_correct = np.logical_xor(scores < 0, is_pos)
    accuracy_all = is_correct.sum() / is_correct.size
    accuracy_pos = np.sum(is_correct[is_pos]) / (is_pos.sum() + 1)
    accuracy_neg = np.sum(is_correct[~is_pos]) / max(np.sum(~is_pos), 1)
    return float(accuracy_all), float(accuracy_pos), float(accuracy_neg)


class SegmentationMetrics:
    """Accumulates overall IoU (ΣI/ΣU), mean IoU (mean of per-sample I/U) and precision@{0.5..0.9}.

    A sample whose union is 0 (empty mask and empty prediction) counts in the total but adds nothing to mean IoU or
    precision (the originals divide 0/0 → nan, which compares false; we count it as IoU 0 and keep mean IoU finite).
    """

    def __init__(self):
        self.cum_I = 0
        self.cum_U = 0
        self.iou_sum = 0.0
        self.correct = [0] * len(THRESHOLDS)
        self.total = 0

    def add(self, prediction, mask):
        I, U = compute_mask_IU(prediction, mask)
        iou = I / U if U > 0 else 0.0
        self.cum_I += I
        self.cum_U += U
        self.iou_sum += iou
        for k, threshold in enumerate(THRESHOLDS):
            self.correct[k] += int(U > 0 and iou >= threshold)
        self.total += 1
        return iou

    def summary(self):
        total = max(self.total, 1)
        return {
            "samples": self.total,
            "precision": {str(t): c / total for t, c in zip(THRESHOLDS, self.correct)},
            "overall_iou": self.cum_I / self.cum_U if self.cum_U else 0.0,
            "mean_iou": self.iou_sum / total,
        }

    def report(self, title):
        """The originals' printed block (CMPC/RRN form: ``overall IoU = %f; mean IoU = %f``)."""
        s = self.summary()
        lines = [f"Segmentation evaluation ({title}):"]
        lines += [f"precision@{t} = {s['precision'][t]:f}" for t in s["precision"]]
        lines.append(f"overall IoU = {s['overall_iou']:f}; mean IoU = {s['mean_iou']:f}")
        return "\n".join(lines) + "\n"


def write_json_atomic(obj, path):
    """Write ``obj`` as JSON to ``path`` through ``util.files.atomic_output`` (temporary file, then rename)."""
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
