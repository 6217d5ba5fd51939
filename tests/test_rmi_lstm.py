"""Golden tests of the RMI and LSTM-baseline heads against the original TF1 code (golden/rmi_lstm_head).

The goldens are a reduced-size head (see its README) run by the unmodified chenxi116/TF-phrasecut-public classes:
eval outputs, one Adam step (losses, learning rate, every variable and optimizer slot afterwards) and the loss after a
second step resumed from the after-step state. Tolerance: max|diff| ≤ 1e-5 · max|ref| per tensor, 1e-5 relative on
losses.
"""
import ast
import logging

import numpy as np
import pytest
import tensorflow as tf

from models import layers
from models.layers import resize_bilinear_legacy
from models.lstm_baseline import LSTMHead
from models.rmi import RMIHead
from tests.golden_check import assert_close, relative_diff
from util.checkpoints import load_tf1_variables
from util.optim import TF1Adam
from util.train import make_train_step

log = logging.getLogger(__name__)

TOL = 1e-5
START_LR = 2.5e-4
HEADS = {"RMI": RMIHead, "LSTM": LSTMHead}
OUTPUTS = {"RMI": ("pred", "up", "sigm", "mult_state"), "LSTM": ("pred", "up", "sigm")}
OPTIMIZER_STATE = ("/Adam", "/Adam_1", "/beta1_power", "/beta2_power", "/Variable")


def golden_config(golden_dir, model):
    """(constructor kwargs, [(name, shape)] in the train graph's creation order) of golden_<model>_config.txt."""
    lines = (golden_dir / "rmi_lstm_head" / f"golden_{model}_config.txt").read_text().splitlines()
    kwargs = ast.literal_eval(lines[0].split("kwargs=", 1)[1])
    variables = []
    for line in lines[2:]:
        name, shape = line.split("\t")
        variables.append((name, [int(s) for s in shape.strip("[]").split(",") if s.strip()]))
    return kwargs, variables


@pytest.fixture(params=sorted(HEADS))
def model(request):
    return request.param


@pytest.fixture
def golden(golden_dir, model):
    return dict(np.load(golden_dir / "rmi_lstm_head" / f"golden_{model}.npz"))


@pytest.fixture
def head(golden_dir, model):
    """The reduced-size head with the golden initial weights loaded."""
    kwargs, _ = golden_config(golden_dir, model)
    head = HEADS[model](**kwargs)
    result = load_tf1_variables(head.tf1_variables(), golden_dir / "rmi_lstm_head" / f"golden_{model}_init.tfmodel")
    assert not result["missing"]
    assert all(name.endswith(OPTIMIZER_STATE) for name in result["unexpected"]), result["unexpected"]
    return head



def make_optimizer(head, model):
    cls = HEADS[model]
    return TF1Adam(head.tf1_variables(), start_lr=START_LR, decay_steps=cls.LR_DECAY_STEPS,
                             step_name=cls.STEP_NAME)


def make_step(head, model, opt):
    return make_train_step(lambda inp: head(*inp), head.losses, HEADS[model].OBJECTIVE, head.tf1_variables(), opt)


def golden_inputs(golden):
    return ({"res5c_relu": tf.constant(golden["visual_res5c"])}, tf.constant(golden["words"])), \
        tf.constant(golden["target_fine"])


def all_state(head, opt):
    """{TF1 name: tf.Variable} of the model and the optimizer (what a TF1 training snapshot holds)."""
    state = head.tf1_variables()
    state.update(opt.tf1_variables())
    return state


def after_step_key(name):
    return "after_step1__" + name.replace("/", "__")


def test_variable_names_shapes_and_order(golden_dir, model):
    kwargs, variables = golden_config(golden_dir, model)
    head = HEADS[model](**kwargs)
    model_vars = [(n, s) for n, s in variables if not n.endswith(OPTIMIZER_STATE)]
    assert [(n, v.shape.as_list()) for n, v in head.tf1_variables().items()] == model_vars
    opt = make_optimizer(head, model)
    assert sorted((n, v.shape.as_list()) for n, v in all_state(head, opt).items()) == sorted(variables)


def test_initialisers_seeded(golden_dir, model):
    kwargs, _ = golden_config(golden_dir, model)
    a, b = HEADS[model](seed=3, **kwargs), HEADS[model](seed=3, **kwargs)
    for name, var in a.tf1_variables().items():
        np.testing.assert_array_equal(var.numpy(), b.tf1[name].numpy())
    embedding = a.tf1["text_objseg/embedding"].numpy()
    assert np.abs(embedding).max() <= 0.08 and np.abs(embedding).max() > 0.07


def test_golden_eval(head, golden, model):
    (features, words), target_fine = golden_inputs(golden)
    outputs = head(features, words)
    for key in OUTPUTS[model]:
        assert_close(f"{model} {key}", outputs[key].numpy(), golden[key])
    assert_close(f"{model} target", resize_bilinear_legacy(target_fine, [head.vf_h, head.vf_w]).numpy(),
                 golden["target"])
    assert_close(f"{model} eval cls_loss", head.losses(outputs, target_fine)["cls_loss"].numpy(), golden["cls_loss"])


def test_golden_train_step(head, golden, model):
    opt = make_optimizer(head, model)
    inputs, target_fine = golden_inputs(golden)
    losses, _ = make_step(head, model, opt)(inputs, target_fine)
    for key in ("cls_loss", "reg_loss", "learning_rate"):
        assert losses[key].dtype == tf.float32
        assert_close(f"{model} {key}", losses[key].numpy(), golden[key])
    state = all_state(head, opt)
    assert {after_step_key(n) for n in state} == {k for k in golden if k.startswith("after_step1__")}
    worst = max(relative_diff(var.numpy(), golden[after_step_key(n)]) for n, var in state.items())
    log.info("%s after_step1 (%d tensors): worst max rel diff %.3g", model, len(state), worst)
    for name, var in state.items():
        assert_close(f"{model} after_step1 {name}", var.numpy(), golden[after_step_key(name)])


def test_golden_resume_second_step(head, golden, model):
    opt = make_optimizer(head, model)
    for name, var in all_state(head, opt).items():
        var.assign(golden[after_step_key(name)])
    inputs, target_fine = golden_inputs(golden)
    make_step(head, model, opt)(inputs, target_fine)
    cls_loss = head.losses(head(*inputs), target_fine)["cls_loss"]
    assert_close(f"{model} cls_loss_step2", cls_loss.numpy(), golden["cls_loss_step2"])
    assert_close(f"{model} learning_rate_step2", opt.learning_rate().numpy(), golden["learning_rate_step2"])


def test_batch_equals_single_samples(head, golden, model):
    rng = np.random.default_rng(7)
    words = np.zeros((3, 20), np.int32)
    words[0] = golden["words"][0]
    words[1, 2:] = rng.integers(1, 50, 18)
    words[1, 9] = 0
    words[2, :] = rng.integers(1, 50, 20)
    words[2, [4, 5, 17]] = 0
    visual = np.concatenate([golden["visual_res5c"],
                             rng.uniform(0, 1, (2,) + golden["visual_res5c"].shape[1:]).astype(np.float32)])
    batch = head({"res5c_relu": tf.constant(visual)}, tf.constant(words))
    for b in range(3):
        single = head({"res5c_relu": tf.constant(visual[b:b + 1])}, tf.constant(words[b:b + 1]))
        for key in OUTPUTS[model]:
            assert_close(f"{model} batch sample {b} {key}", batch[key][b:b + 1].numpy(), single[key].numpy())
    assert_close(f"{model} batch sample 0 pred vs golden", batch["pred"][:1].numpy(), golden["pred"])


def test_pad_in_the_middle_is_skipped(head, golden):
    """A pad at any position leaves every recurrent state unchanged (the original's tf.cond)."""
    words = golden["words"].copy()
    compact = words[words != 0]
    padded = np.zeros_like(words)
    padded[0, -len(compact) - 3:] = np.insert(compact, [2, 2, 5], 0)
    features = {"res5c_relu": tf.constant(golden["visual_res5c"])}
    assert_close("pad in the middle", head(features, tf.constant(padded))["pred"].numpy(), golden["pred"])


@pytest.mark.parametrize("model", ["RMI"])
def test_skipped_pad_steps_change_nothing(head, golden, model, monkeypatch):
    """RMI's word loop skips the leading steps where every sample has a pad (``layers.loop_over_words`` starts at
    ``first_word_step``): the outputs equal, bit for bit, the loop that runs every step and keeps the state with
    ``tf.where`` alone — for a batch whose samples have left pads of different lengths, a pad in the middle and no
    word at all."""
    words = np.zeros((3, 20), np.int32)
    words[0] = golden["words"][0]
    words[1, 15:] = [3, 0, 7, 9, 1]
    features = {"res5c_relu": tf.constant(np.repeat(golden["visual_res5c"], 3, axis=0))}
    skipping = tf.function(head)(features, tf.constant(words))
    monkeypatch.setattr(layers, "first_word_step", lambda is_word: tf.constant(0))
    every_step = tf.function(head)(features, tf.constant(words))
    for key in OUTPUTS[model]:
        np.testing.assert_array_equal(skipping[key].numpy(), every_step[key].numpy(), err_msg=key)


@pytest.mark.parametrize("weights", ["deeplab", "resnet"])
def test_full_size_variable_lists(golden_dir, model, weights):
    """Full-size heads (default kwargs, COCO vocabulary) hold exactly the ``text_objseg`` variables of the original
    eval graphs, in creation order; with ``weights='resnet'`` there is no ``conv0`` and fc1000 is the input."""
    listing = (golden_dir / "rmi_lstm_varlists" / f"vars_{model}_{weights}_eval.txt").read_text().splitlines()
    expected = [(name, ast.literal_eval(shape)) for name, shape, *_ in (line.split("\t") for line in listing)
                if name.startswith("text_objseg/")]
    head = HEADS[model](vocab_size=12112, weights=weights)
    assert [(n, v.shape.as_list()) for n, v in head.tf1_variables().items()] == expected
    assert head.FEATURES == {"deeplab": ("res5c_relu",), "resnet": ("fc1000",)}[weights]
