"""Metrics, the printed block, DenseCRF clipping, the LR schedule and TF1 Adam arithmetic."""
import numpy as np
import pytest
import tensorflow as tf

from util.crf import dense_crf
from util.metrics import SegmentationMetrics, compute_accuracy, compute_mask_IU
from util.optim import TF1Adam, gradient_multiplier, is_regularized, polynomial_decay


def test_mask_iu_counts_any_nonzero_value_as_foreground():
    pred = np.array([[0.0, 0.2], [1.0, 0.0]])
    target = np.array([[0, 0], [1, 1]], dtype=bool)
    assert compute_mask_IU(pred, target) == (1, 3)


def test_metric_block_matches_the_original_format():
    m = SegmentationMetrics()
    a = np.zeros((4, 4), bool)
    a[:2] = True
    m.add(a, a)                       # IoU 1
    b = np.zeros((4, 4), bool)
    b[:1] = True
    m.add(b, a)                       # IoU 0.5
    block = m.report("without DenseCRF").splitlines()
    assert block[0] == "Segmentation evaluation (without DenseCRF):"
    assert block[1] == "precision@0.5 = 1.000000"
    assert block[2] == "precision@0.6 = 0.500000"
    assert block[6] == "overall IoU = 0.750000; mean IoU = 0.750000"


def test_empty_union_counts_but_keeps_mean_finite():
    m = SegmentationMetrics()
    z = np.zeros((3, 3), bool)
    m.add(z, z)
    s = m.summary()
    assert s["samples"] == 1 and s["mean_iou"] == 0.0 and s["precision"]["0.5"] == 0.0


def test_training_accuracy_uses_num_pos_plus_one():
    scores = np.array([1.0, -1.0, 1.0, -1.0])
    labels = np.array([1.0, 1.0, 0.0, 0.0])
    assert compute_accuracy(scores, labels) == (0.5, 1 / 3, 0.5)


def test_dense_crf_survives_saturated_probabilities():
    probs = np.zeros((24, 24), np.float32)
    probs[6:18, 6:18] = 1.0
    image = np.full((24, 24, 3), 128, np.uint8)
    out = dense_crf(probs, image)
    assert np.isfinite(out).all() and out[12, 12] == 1 and out[0, 0] == 0


@pytest.mark.parametrize("step,expected", [(0, 2.5e-4), (1, 2.4999972e-4), (800000, 1e-5), (900000, 1e-5)])
def test_polynomial_decay(step, expected):
    assert float(polynomial_decay(2.5e-4, step, 800000)) == pytest.approx(expected, rel=1e-6)


def test_name_rules():
    assert is_regularized("text_objseg/fusion/DW") and is_regularized("res5a_branch2b/weights")
    assert not is_regularized("text_objseg/embedding") and not is_regularized("text_objseg/rnn/conv_lstm_cell/kernel")
    assert gradient_multiplier("text_objseg/score/biases") == 2.0
    assert gradient_multiplier("text_objseg/RNN/multi_rnn_cell/cell_0/basic_lstm_cell/bias") == 1.0


def test_tf1_adam_two_steps_match_the_formula():
    w = tf.Variable([1.0, -2.0], name="text_objseg/w/DW")
    opt = TF1Adam({"text_objseg/w/DW": w}, start_lr=0.1, decay_steps=10, step_name="text_objseg/Variable")
    theta, m, v = np.array([1.0, -2.0]), np.zeros(2), np.zeros(2)
    for t, g in enumerate([np.array([0.5, -1.0]), np.array([0.25, 3.0])], start=1):
        lr = (0.1 - 1e-5) * (1 - (t - 1) / 10) ** 0.9 + 1e-5
        opt.apply_gradients({"text_objseg/w/DW": tf.constant(g, tf.float32)})
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        theta = theta - lr * np.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t) * m / (np.sqrt(v) + 1e-8)
    np.testing.assert_allclose(w.numpy(), theta, rtol=1e-5)  # float32 arithmetic vs a float64 reference
    names = set(opt.tf1_variables())
    assert {"text_objseg/text_objseg/w/DW/Adam", "text_objseg/text_objseg/w/DW/Adam_1",
            "text_objseg/beta1_power", "text_objseg/Variable"} <= names
    assert float(opt.step) == 2.0 and float(opt.beta1_power) == pytest.approx(0.9 ** 3)
