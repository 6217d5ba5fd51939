"""util/summaries.py: the test-mode metrics land in an event file that TensorFlow's and TensorBoard's readers parse."""
import glob

import pytest
import tensorflow as tf

from util.summaries import write_test_scalars

THRESHOLDS = ("0.5", "0.6", "0.7", "0.8", "0.9")


def summary(offset):
    return {"samples": 4, "precision": {t: offset + 0.1 * k for k, t in enumerate(THRESHOLDS)},
            "overall_iou": offset + 0.05, "mean_iou": offset + 0.04}


RESULTS = {"model": "RRN_model", "dataset": "unc", "split": "val", "iteration": 150, "snapshot": "x",
           "without_dcrf": summary(0.1), "with_dcrf": summary(0.2), "skipped_unreadable": []}


def expected(results):
    out = {}
    for variant in ("without_dcrf", "with_dcrf"):
        if variant in results:
            s = results[variant]
            out[f"test/unc_val/{variant}/overall_iou"] = s["overall_iou"]
            out[f"test/unc_val/{variant}/mean_iou"] = s["mean_iou"]
            out.update({f"test/unc_val/{variant}/precision@{t}": s["precision"][t] for t in THRESHOLDS})
    return out


def read_events(logdir):
    """{tag: (step, value, plugin)} from every event file in ``logdir`` via tf.compat.v1.train.summary_iterator."""
    found = {}
    for path in glob.glob(str(logdir / "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                found[v.tag] = (event.step, float(tf.make_ndarray(v.tensor)), v.metadata.plugin_data.plugin_name)
    return found


@pytest.mark.parametrize("with_crf", [True, False])
def test_summary_iterator_finds_every_named_scalar(tmp_path, with_crf):
    results = dict(RESULTS) if with_crf else {k: v for k, v in RESULTS.items() if k != "with_dcrf"}
    written = write_test_scalars(str(tmp_path), results, step=150)
    want = expected(results)
    assert written == pytest.approx(want)
    assert len(want) == (14 if with_crf else 7)
    found = read_events(tmp_path)
    assert set(found) == set(want)
    for tag, value in want.items():
        step, got, plugin = found[tag]
        assert step == 150 and plugin == "scalars"
        assert got == pytest.approx(value, abs=1e-7)

