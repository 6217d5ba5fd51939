"""Golden tests of the RRN head against the original TF1 code (golden/rrn_head).

The goldens are a reduced-size head (see its README) run by the unmodified liruiyu/referseg_rrn class: eval outputs
for two sentences, and one Adam step (losses before and after it, every variable and optimizer slot afterwards).
Tolerance: max|diff| ≤ 1e-5 · max|ref| per tensor, 1e-5 relative on losses.
"""
import json
import logging

import numpy as np
import pytest
import tensorflow as tf

from models.rrn import RRNHead
from tests.golden_check import assert_close, relative_diff
from util.checkpoints import load_tf1_variables
from util.optim import TF1Adam, l2_regularization
from util.train import make_train_step

log = logging.getLogger(__name__)

TOL = 1e-5
START_LR = 2.5e-4
OUTPUTS = ("pred", "up", "sigm")
STEP_LOSSES = ("cls_loss", "reg_loss", "cost", "learning_rate")
CONVLSTM = "text_objseg/rnn/conv_lstm_cell"
CREATION_ORDER = (
    ["text_objseg/mlp0/DW", "text_objseg/mlp0/biases", "text_objseg/embedding",
     "text_objseg/RNN/multi_rnn_cell/cell_0/basic_lstm_cell/kernel",
     "text_objseg/RNN/multi_rnn_cell/cell_0/basic_lstm_cell/bias"]
    + [f"text_objseg/{s}/{v}" for s in ("fusion", "c5_lateral", "c4_lateral", "c3_lateral") for v in ("DW", "biases")]
    + [f"{CONVLSTM}/{v}" for v in ("kernel", "W_ci", "W_cf")]
    + [f"{CONVLSTM}/LayerNorm{s}/{v}" for s in ("", "_1", "_2") for v in ("beta", "gamma")]
    + [f"{CONVLSTM}/W_co"]
    + [f"{CONVLSTM}/LayerNorm{s}/{v}" for s in ("_3", "_4") for v in ("beta", "gamma")]
    + ["text_objseg/score/DW", "text_objseg/score/biases"])


@pytest.fixture(scope="module")
def rrn_dir(golden_dir):
    return golden_dir / "rrn_head"


@pytest.fixture(scope="module")
def manifest(rrn_dir):
    return {kind: json.loads((rrn_dir / f"manifest_{kind}.json").read_text()) for kind in ("eval", "train")}


@pytest.fixture(scope="module")
def golden(rrn_dir):
    return dict(np.load(rrn_dir / "golden_RRN.npz"))


@pytest.fixture
def head(rrn_dir, manifest):
    """The reduced-size head with the golden initial weights loaded (all 29 tensors, nothing else in the file)."""
    head = RRNHead(**manifest["eval"]["constructor_kwargs"])
    result = load_tf1_variables(head.tf1_variables(), rrn_dir / "golden_RRN_init.tfmodel")
    assert not result["missing"] and not result["unexpected"]
    return head


def case_inputs(golden, case):
    features = {name: tf.constant(golden[f"case{case}_{name}"]) for name in RRNHead.FEATURES}
    return features, tf.constant(golden[f"case{case}_words"])


def make_optimizer(head):
    return TF1Adam(head.tf1_variables(), start_lr=START_LR, decay_steps=RRNHead.LR_DECAY_STEPS,
                             step_name=RRNHead.STEP_NAME)


def after_step_key(name):
    return "after_step1__" + name.replace("/", "__")


def shapes(variables):
    return sorted((name, var.shape.as_list()) for name, var in variables.items())


def test_variable_names_shapes_and_order(manifest):
    head = RRNHead(**manifest["eval"]["constructor_kwargs"])
    assert list(head.tf1_variables()) == CREATION_ORDER
    assert shapes(head.tf1_variables()) == sorted((n, s) for n, s, _, _ in manifest["eval"]["variables"])
    state = dict(head.tf1_variables(), **make_optimizer(head).tf1_variables())
    assert shapes(state) == sorted((n, s) for n, s, _, _ in manifest["train"]["variables"])


@pytest.mark.parametrize("case", [0, 1])
def test_golden_eval(head, golden, case):
    outputs = head(*case_inputs(golden, case))
    for key in OUTPUTS:
        assert_close(f"RRN case{case} {key}", outputs[key].numpy(), golden[f"case{case}_{key}"])


def test_golden_train_step(head, golden):
    opt = make_optimizer(head)
    inputs, target_fine = case_inputs(golden, 0), tf.constant(golden["train_target_fine"])
    step = make_train_step(lambda inp: head(*inp), head.losses, RRNHead.OBJECTIVE, head.tf1_variables(), opt)
    losses, _ = step(inputs, target_fine)
    for key in STEP_LOSSES:
        assert losses[key].dtype == tf.float32
        assert_close(f"RRN train_step0_{key}", losses[key].numpy(), golden[f"train_step0_{key}"])

    state = dict(head.tf1_variables(), **opt.tf1_variables())
    assert {after_step_key(n) for n in state} == {k for k in golden if k.startswith("after_step1__")}
    worst = max(relative_diff(var.numpy(), golden[after_step_key(n)]) for n, var in state.items())
    log.info("RRN after_step1 (%d tensors): worst max rel diff %.3g", len(state), worst)
    for name, var in state.items():
        assert_close(f"RRN after_step1 {name}", var.numpy(), golden[after_step_key(name)])

    after = head.losses(head(*inputs), target_fine)
    after["reg_loss"] = l2_regularization(head.tf1_variables())
    after["cost"] = after["cls_loss"] + after["reg_loss"]
    after["learning_rate"] = opt.learning_rate()
    for key in STEP_LOSSES:
        assert_close(f"RRN train_step1_{key}", after[key].numpy(), golden[f"train_step1_{key}"])


def test_batch_equals_single_samples(head, golden):
    """Each sample of a batch gets what batch 1 gives (the original runs its ConvLSTM on sample 0 only)."""
    rng = np.random.default_rng(11)
    words = np.concatenate([golden["case0_words"], golden["case1_words"], np.zeros((1, 20), np.int32)])
    words[2, 6:] = rng.integers(1, 50, 14)
    words[2, 10] = 0
    features = {}
    for name in RRNHead.FEATURES:
        ref = golden[f"case0_{name}"]
        extra = rng.uniform(0, 1, (1,) + ref.shape[1:]).astype(np.float32)
        features[name] = np.concatenate([ref, golden[f"case1_{name}"], extra])
    batch = head({n: tf.constant(v) for n, v in features.items()}, tf.constant(words))
    for b in range(3):
        single = head({n: tf.constant(v[b:b + 1]) for n, v in features.items()}, tf.constant(words[b:b + 1]))
        for key in OUTPUTS:
            assert_close(f"RRN batch sample {b} {key}", batch[key][b:b + 1].numpy(), single[key].numpy())
    for case in (0, 1):
        assert_close(f"RRN batch sample {case} pred vs golden", batch["pred"][case:case + 1].numpy(),
                     golden[f"case{case}_pred"])
