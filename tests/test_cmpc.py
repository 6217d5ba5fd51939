"""CMPC head (models/cmpc.py) against the golden run of the original ``CMPC_model.LSTM_model`` (golden/cmpc_head):
variable names/shapes, eval outputs, one Adam step, and batch > 1 equal to per-sample batch-1 runs."""
import json
import logging

import numpy as np
import pytest
import tensorflow as tf

from models.cmpc import CMPCHead, first_word_mask, masked_softmax
from tests.golden_check import check_after_step, check_small_gradient_entries
from util.checkpoints import load_tf1_variables
from util.optim import TF1Adam, l2_regularization
from util.train import make_train_step

log = logging.getLogger(__name__)

OUTPUTS = ("pred", "up", "sigm", "up_c3", "up_c4", "up_c5")
LOSSES = ("cls_loss", "cls_loss_c3", "cls_loss_c4", "cls_loss_c5", "cls_loss_all", "reg_loss", "cost", "learning_rate")
REL_TOL = 1e-5
START_LR = 2.5e-4


@pytest.fixture(scope="module")
def golden(golden_dir):
    folder = golden_dir / "cmpc_head"
    with open(folder / "manifest_eval.json") as f:
        manifest = json.load(f)
    with open(folder / "step_tolerances.json") as f:
        tolerances = json.load(f)
    data = np.load(folder / "golden_CMPC.npz")
    return {"prefix": folder / "golden_CMPC_init.tfmodel", "manifest": manifest, "tol": tolerances,
            "npz": {k: data[k] for k in data.files}}


def build_head(golden):
    """The reduced golden head (vocab 50, C 24, M 16, 8×8 maps, 64×64 output) with the golden init loaded."""
    head = CMPCHead(np.zeros(golden["manifest"]["glove_npy_shape"], np.float32),
                    **golden["manifest"]["constructor_kwargs"])
    result = load_tf1_variables(head.tf1_variables(), golden["prefix"])
    assert not result["missing"] and not result["unexpected"], result
    return head


@pytest.fixture(scope="module")
def head(golden):
    return build_head(golden)


def case_inputs(npz, k):
    return {name: npz[f"case{k}_{name}"] for name in CMPCHead.FEATURES}, npz[f"case{k}_words"]


def rel_diff(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), np.finfo(np.float64).tiny))


def test_variables_match_manifest_in_creation_order(golden, head):
    ours = {name: var.shape.as_list() for name, var in head.tf1_variables().items()}
    assert ours == {name: shape for name, shape, _, _ in golden["manifest"]["variables"]}
    assert all(var.trainable and var.dtype == tf.float32 for var in head.tf1_variables().values())
    names = list(head.tf1_variables())
    assert names[:5] == ["text_objseg/Variable", "text_objseg/RNN/multi_rnn_cell/cell_0/basic_lstm_cell/kernel",
                         "text_objseg/RNN/multi_rnn_cell/cell_0/basic_lstm_cell/bias",
                         "text_objseg/c5_lateral/DW", "text_objseg/c5_lateral/biases"]
    order = [names.index(f"text_objseg/{scope}/DW") for scope in (
        "words_parse_2", "vis_trans_c5_head1", "lang_trans_c5_head1", "vis_trans_c5_head2", "fusion_c5",
        "vis_trans_c4_head1", "fusion_c3", "score_c5", "score_c3", "spa_graph_key_c3gv_f1", "lang_query_c3gv_f1",
        "gv_lang_c3gv_f1", "lang_feat_c3_f1", "trans_feat_c3_f1", "lang_feat_c3_f2", "spa_graph_key_c4gv_f1",
        "spa_graph_key_c3_2gv_f1", "trans_feat_c5_2_f2")]
    assert order == sorted(order)
    assert names.index("text_objseg/rnn/conv_lstm_cell/kernel") > order[-1]
    assert names[-2:] == ["text_objseg/score/DW", "text_objseg/score/biases"]


@pytest.mark.parametrize("k", [0, 1])
def test_golden_eval(golden, head, k):
    npz = golden["npz"]
    outputs = head(*case_inputs(npz, k))
    for name in OUTPUTS:
        diff = rel_diff(outputs[name], npz[f"case{k}_{name}"])
        log.info("eval case%d %s: max rel diff %.3g", k, name, diff)
        assert outputs[name].shape == npz[f"case{k}_{name}"].shape
        assert diff <= REL_TOL, (name, diff)


def test_golden_train_step(golden):
    npz, tol = golden["npz"], golden["tol"]
    head = build_head(golden)
    before = {name: var.numpy() for name, var in head.tf1_variables().items()}
    opt = TF1Adam(head.tf1_variables(), start_lr=START_LR, decay_steps=CMPCHead.LR_DECAY_STEPS,
                  step_name=CMPCHead.STEP_NAME)
    step = make_train_step(lambda inp: head(*inp), head.losses, CMPCHead.OBJECTIVE, head.tf1_variables(), opt)
    features, words = case_inputs(npz, 0)
    losses, _ = step((features, words), npz["train_target_fine"])
    for name in LOSSES:
        diff = rel_diff(losses[name], npz[f"train_step0_{name}"])
        log.info("train step0 %s: rel diff %.3g", name, diff)
        assert diff <= REL_TOL, (name, diff)

    state = {**head.tf1_variables(), **opt.tf1_variables()}
    golden_keys = sorted(k for k in npz if k.startswith("after_step1__"))
    assert sorted(f"after_step1__{name.replace('/', '__')}" for name in state) == golden_keys
    diffs = {}
    for name, var in state.items():
        variable = name in before
        m_ref = npz[f"after_step1__{opt.scope}__{name.replace('/', '__')}__Adam"] if variable else None
        diffs[name] = check_after_step(name, var.numpy(), npz[f"after_step1__{name.replace('/', '__')}"],
                                       before.get(name), tol, START_LR, m_ref=m_ref, variable=variable)
    exempt = set(tol["cancellation"]["tensors"]) | {
        f"{prefix}{v}{suffix}" for v in tol["zero_gradient"]["variables"]
        for prefix, suffix in (("", ""), ("text_objseg/", "/Adam"), ("text_objseg/", "/Adam_1"))}
    worst = max((d, n) for n, d in diffs.items() if n not in exempt)
    log.info("after step1: worst default-tolerance tensor %s %.3g", worst[1], worst[0])

    outputs = head(features, words)
    after = dict(head.losses(outputs, npz["train_target_fine"]))
    after["reg_loss"] = l2_regularization(head.tf1_variables())
    after["cost"] = after["cls_loss_all"] + after["reg_loss"]
    after["learning_rate"] = opt.learning_rate()
    for name in LOSSES:
        diff = rel_diff(after[name], npz[f"train_step1_{name}"])
        log.info("train step1 %s: rel diff %.3g", name, diff)
        assert diff <= REL_TOL, (name, diff)


def third_case(npz):
    """Another pad count (7): case 1's first 13 words, case-0/1 feature maps mixed."""
    features = {name: (0.6 * npz[f"case0_{name}"] + 0.4 * npz[f"case1_{name}"][:, ::-1]).astype(np.float32)
                for name in CMPCHead.FEATURES}
    words = np.concatenate([np.zeros((1, 7), np.int32), npz["case1_words"][:, 3:16]], axis=1)
    return features, words


def test_batch_equals_per_sample(golden, head):
    npz = golden["npz"]
    cases = [case_inputs(npz, 0), case_inputs(npz, 1), third_case(npz)]
    # One trace for every batch size, no AutoGraph: the forward has no Python branching on tensor values.
    spec = {name: tf.TensorSpec([None, *value.shape[1:]], tf.float32) for name, value in cases[0][0].items()}
    forward = tf.function(head.__call__, autograph=False,
                          input_signature=[spec, tf.TensorSpec([None, head.num_steps], tf.int32)])
    batched = forward({name: np.concatenate([c[0][name] for c in cases]) for name in CMPCHead.FEATURES},
                      np.concatenate([c[1] for c in cases]))
    for i, (features, words) in enumerate(cases):
        single = forward(features, words)
        for name in OUTPUTS:
            diff = rel_diff(batched[name][i:i + 1], single[name])
            log.info("batch-3 sample %d %s: max rel diff %.3g", i, name, diff)
            assert diff <= REL_TOL, (i, name, diff)


def test_first_word_mask():
    words = tf.constant([[0, 0, 5, 0, 7], [3, 4, 0, 0, 1], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(first_word_mask(words).numpy(),
                                  [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]])


def test_masked_softmax_never_nan():
    logits = tf.constant([[1.0, 2.0, 3.0], [1e30, -1e30, 0.0], [4.0, 5.0, 6.0]])
    mask = tf.constant([[False, True, True], [True, False, True], [False, False, False]])
    with tf.GradientTape() as tape:
        tape.watch(logits)
        probs = masked_softmax(logits, mask, axis=1)
        loss = tf.reduce_sum(probs * [[1.0, 2.0, 3.0]])
    grad = tape.gradient(loss, logits)
    np.testing.assert_allclose(probs[0], [0.0, *tf.nn.softmax([2.0, 3.0]).numpy()], rtol=1e-6)
    np.testing.assert_array_equal(probs[2], [0.0, 0.0, 0.0])
    assert np.isfinite(probs.numpy()).all() and np.isfinite(grad.numpy()).all()


def test_degenerate_sentences_are_finite(golden, head):
    """An all-pad sentence (valid_idx 0: twenty zero word features) and a one-word sentence."""
    features, _ = case_inputs(golden["npz"], 0)
    features = {name: np.concatenate([value, value]) for name, value in features.items()}
    words = np.zeros((2, 20), np.int32)
    words[1, -1] = 9
    outputs = head(features, words)
    assert all(np.isfinite(outputs[name].numpy()).all() for name in OUTPUTS)


def test_small_gradient_rule_catches_a_wrong_update_on_a_large_gradient_entry(golden):
    """``small_gradient_entries`` as step_tolerances.json states it: entries whose reference gradient (Adam m /
    (1 − β1)) is under rel_to_max of the tensor's largest may be up to the learning rate off; every other entry keeps
    1e-5 · max|ref|, so a wrong update on a large-gradient entry fails."""
    tol = golden["tol"]
    ref = np.linspace(-1.0, 1.0, 64).reshape(8, 8)
    m_ref = np.full((8, 8), 1e-2)
    m_ref[0, 0], m_ref[3, 3] = 1.0, 1e-4                # the largest gradient; one a 1e-4 fraction of it
    name = "text_objseg/c4_lateral/DW"

    noisy = ref.copy()
    noisy[3, 3] += 1.14e-4                              # 10× the measured noise, still under the learning rate
    assert check_after_step(name, noisy, ref, ref, tol, START_LR, m_ref=m_ref) == 0.0
    for entry, delta in (((0, 0), 2e-5), ((5, 5), 2e-5), ((3, 3), 2 * START_LR)):
        wrong = ref.copy()
        wrong[entry] += delta
        with pytest.raises(AssertionError):
            check_after_step(name, wrong, ref, ref, tol, START_LR, m_ref=m_ref)
    with pytest.raises(AssertionError):
        check_small_gradient_entries(name, noisy, ref, m_ref, dict(tol["small_gradient_entries"], rel_to_max=1e-5),
                                     START_LR)
