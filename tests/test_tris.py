"""TRIS (models/tris.py, models/clip.py, util/clip_bpe.py) against the golden run of the original fawnliu/TRIS code
(golden/tris, reduced size): every stored eval stage of both stages, the attention pool, a 4-head text block, the
evaluation's per-sentence tensors and metrics, the stage-1 and stage-2 training forwards and losses (the frozen
CLIP ViT-B/32 term included), one AdamW step with every parameter and moment, both checkpoints as the original's
``save_checkpoint`` wrote them (read without torch, strict), the full-size variable tables, and the tokenizer.

Tolerances are those of golden/tris/step_tolerances.json (max|ours − ref| ≤ tol · max|ref| per tensor, the first
matching class wins); every test starts from the golden's ``s{1,2}_init__*`` weights.
"""
import fnmatch
import json
import logging
import os
import pickle
import zipfile

import numpy as np
import pytest
import tensorflow as tf

from models import clip, tris
from util import adamw, clip_bpe
from util.pth import load_pth

log = logging.getLogger(__name__)

FULL_SIZE_PARAMETERS = {1: 113_559_906, 2: 142_085_869}


@pytest.fixture(scope="module")
def golden(golden_dir):
    folder = golden_dir / "tris"
    with open(folder / "manifest.json") as f:
        manifest = json.load(f)
    with open(folder / "step_tolerances.json") as f:
        tolerances = json.load(f)
    data = np.load(folder / "golden_tris.npz")
    return {"folder": folder, "manifest": manifest, "tol": tolerances, "npz": {k: data[k] for k in data.files}}


def entries(npz, prefix):
    return {k[len(prefix):]: v for k, v in npz.items() if k.startswith(prefix)}


def init_state(golden, stage):
    state = entries(golden["npz"], "s1_init__")
    if stage == 2:
        state = {k: v for k, v in state.items() if k.startswith("backbone.")}
        state.update(entries(golden["npz"], "s2_init__"))
    return state


def build(golden, stage):
    cls = tris.TRISStage1 if stage == 1 else tris.TRISStage2
    return cls.from_state_dict(init_state(golden, stage), f"golden stage-{stage} init")


@pytest.fixture(scope="module")
def stage1(golden):
    return build(golden, 1)


@pytest.fixture(scope="module")
def stage2(golden):
    return build(golden, 2)


def nhwc(x):
    return np.transpose(x, (0, 2, 3, 1)) if np.ndim(x) == 4 else x


def tolerance(golden, key):
    for cls in golden["tol"]["classes"]:
        if any(fnmatch.fnmatchcase(key, pattern) for pattern in cls["keys"]):
            return cls["tol"]
    raise AssertionError(f"no tolerance class for {key}")


def check(golden, key, ours, ref=None):
    """max|ours − ref| ≤ tol·max|ref| with the tolerance class of ``key``; returns the relative error."""
    ref = golden["npz"][key] if ref is None else ref
    ours = np.asarray(ours, np.float64)
    assert ours.shape == np.shape(ref), f"{key}: shape {ours.shape} vs {np.shape(ref)}"
    scale = max(float(np.max(np.abs(ref))), 1e-30)
    err = float(np.max(np.abs(ours - ref))) / scale
    assert err <= tolerance(golden, key), f"{key}: relative error {err:.3g} > {tolerance(golden, key)}"
    return err


def inputs(golden):
    npz = golden["npz"]
    return tf.constant(nhwc(npz["input__image"])), tf.constant(npz["input__words"])


# --------------------------------------------------------------------------------------------- stage 1 eval
def test_stage1_eval_stages(golden, stage1):
    images, ids = inputs(golden)
    taps = {}
    out = stage1(images, ids, taps=taps)
    layout = {"norm_lan_T": ("norm_lan", (0, 2, 1)), "fused_lan": ("fused_lan", (0, 2, 1))}
    worst, checked = 0.0, 0
    for key in golden["npz"]:
        if not key.startswith("s1_eval__") or "attnpool" in key:
            continue
        name = key[len("s1_eval__"):]
        if name == "output":
            ours = out
        elif name.endswith("_LND"):
            ours = np.transpose(taps[name[:-len("_LND")]], (1, 0, 2))
        elif name in layout:
            ours = np.transpose(taps[layout[name][0]], layout[name][1])
        else:
            ours = taps[name]
        ref = golden["npz"][key]
        if name == "txt.eot_index":
            np.testing.assert_array_equal(ours, ref)
            continue
        worst = max(worst, check(golden, key, ours, nhwc(ref)))
        checked += 1
    assert checked == 35
    assert float(taps["logit_scale_exp"]) == np.float32(np.exp(np.float32(np.log(1 / 0.07))))
    log.info("stage-1 eval: %d stages, worst relative error %.3g", checked, worst)


def test_attnpool(golden, stage1):
    images, _ = inputs(golden)
    *_, (global_feat, feature_map) = stage1.backbone.encode_image(images)
    check(golden, "s1_eval__img.attnpool_global", global_feat)
    check(golden, "s1_eval__img.attnpool_map", feature_map, nhwc(golden["npz"]["s1_eval__img.attnpool_map"]))


def test_text_block_four_heads(golden):
    params = entries(golden["npz"], "extra_mha4__param__")
    block = clip.ResidualAttentionBlock("", 64, 4)
    for key, var in block.state_dict_variables().items():
        var.assign(params[key])
    x = np.transpose(golden["npz"]["extra_mha4__x_LND"], (1, 0, 2))
    out = block(tf.constant(x), clip.causal_mask(20))
    check(golden, "extra_mha4__out_LND", np.transpose(out, (1, 0, 2)))


def test_text_length_must_match_the_causal_mask(stage1):
    with pytest.raises(ValueError, match="19 tokens, the causal mask has 20"):
        stage1.backbone.encode_text(tf.zeros([1, 19], tf.int64))


# --------------------------------------------------------------------------------------------- stage 2 eval
def test_stage2_eval_stages(golden, stage2):
    images, ids = inputs(golden)
    taps = {}
    out = stage2(images, ids, taps=taps)
    checked = 0
    for key in golden["npz"]:
        if not key.startswith("s2_eval__"):
            continue
        name = key[len("s2_eval__"):]
        ref = golden["npz"][key]
        if name.endswith((".Wk", ".Wv")):
            ref = np.transpose(ref, (0, 2, 1))
        check(golden, key, out if name == "output" else taps[name], nhwc(ref))
        checked += 1
    assert checked == 43


# --------------------------------------------------------------------------------------------- evaluation
def val_cases(golden):
    """(sentence index j, case c, word ids [1, 20]) in validate's order."""
    npz, j = golden["npz"], 0
    for c in range(2):
        words = npz[f"input__val_word_ids__{c}"]
        for k in range(words.shape[1]):
            yield j, c, words[:, k][None]
            j += 1


@pytest.mark.parametrize("stage", [1, 2])
def test_evaluation(golden, stage, stage1, stage2):
    model = stage1 if stage == 1 else stage2
    npz, prefix = golden["npz"], f"s{stage}_val__"
    image_of = {c: tf.constant(nhwc(npz["input__image"][c:c + 1])) for c in range(2)}
    results = []
    for j, c, words in val_cases(golden):
        output = model(image_of[c], tf.constant(words))
        check(golden, f"{prefix}model_output__{j}", output, nhwc(npz[f"{prefix}model_output__{j}"]))
        r = tris.evaluate_sentence(np.asarray(output)[0, :, :, 0], npz[f"input__target_orig__{c}"],
                                   npz[f"input__boxes__{c}"])
        check(golden, f"{prefix}norm_pred__{j}", r["norm_pred"])
        np.testing.assert_array_equal(r["hard_pred"], npz[f"{prefix}hard_pred__{j}"])
        for name in ("I", "U", "hit", "hitm"):
            assert r[name] == npz[f"{prefix}{name}__{j}"], (name, j)
        assert r["max_loc"] == tuple(npz[f"{prefix}max_loc__{j}"])
        results.append(r)
    summary = tris.summarize(results)
    for name in ("oIoU", "mIoU", "hit", "hitm"):
        check(golden, f"{prefix}{name}", summary[name])


# --------------------------------------------------------------------------------------------- training
def test_prms(golden, stage1):
    """PRMS (``validate_same_sentence``): every CLIP score, the chosen maps saved as CAMs, and its metrics."""
    npz, vit = golden["npz"], vitb32(golden)
    scores, results, counts, hitm_x_nsent = [], [], [], []
    for c in range(2):
        image = tf.constant(nhwc(npz["input__image"][c:c + 1]))
        words = npz[f"input__val_word_ids__{c}"].T                                  # [k, 20]
        outputs = [stage1(image, tf.constant(w[None])) for w in words]
        rows = [tris.prms_scores(out, image, tf.constant(words), vit) for out in outputs]
        scores.extend(np.concatenate(rows))
        chosen = tris.prms_select(rows)
        r = tris.evaluate_sentence(np.asarray(outputs[chosen])[0, :, :, 0], npz[f"input__target_orig__{c}"],
                                   npz[f"input__boxes__{c}"])
        check(golden, f"s1_prms__cam__{c}", r["norm_pred"])
        results.append(r)
        counts.append(len(words))
        hitm_x_nsent.append(r["hitm"] * len(words))
    check(golden, "s1_prms__clip_scores", scores)
    np.testing.assert_array_equal(hitm_x_nsent, npz["s1_prms__hitm_x_nsent"])
    summary = tris.summarize(results, counts)
    for name in ("oIoU", "mIoU", "hit"):
        check(golden, f"s1_prms__{name}", summary[name])


def test_schedules(golden):
    """LambdaLR (1 − t/(len·epochs))^0.9: stage 1 after its first iteration; stage 2 stepped per epoch (not in the
    step: the golden's one batch ran at the full rate)."""
    args = golden["manifest"]["stage1_train"]
    lrs = golden["npz"]["s1_train__lr_step1_groups"]
    after = lrs * tris.lr_factor(1, args["n_batches_per_epoch"], args["epoch"])
    np.testing.assert_array_equal(after, golden["npz"]["s1_train__lr_after_scheduler_step_groups"])
    assert tris.lr_factor(0, 2, 15) == 1.0


def vitb32(golden):
    state = entries(golden["npz"], "vitb32__")
    config = tris.clip_config_from_state_dict(state, prefix="")
    model = clip.CLIP("", **config)
    tris.load_state_dict_strict(model, state, "golden vitb32", "CLIP ViT")
    return model


def stage1_loss(golden, model, vit, taps):
    npz = golden["npz"]
    images = tf.constant(nhwc(npz["s1_train__batch_img"]))
    ids = tf.constant(npz["s1_train__batch_word_ids"][:, 0])
    outputs = model(images, ids, training=True)
    taps.update(outputs)
    losses = tris.stage1_losses(outputs, images, ids, tf.constant(npz["s1_train__batch_neg_word_ids"]), vit)
    taps.update(losses)
    return losses["loss"]


def stage2_loss(golden, model, taps):
    npz = golden["npz"]
    outputs = model(tf.constant(nhwc(npz["s2_train__batch_img"])), tf.constant(npz["s2_train__batch_word_ids"][:, 0]),
                    training=True)
    taps.update({f"out{k + 1}": out for k, out in enumerate(outputs)})
    losses = tris.stage2_losses(outputs, nhwc(npz["s2_train__batch_pseudo_gt"]))
    taps.update(losses)
    return losses["loss"]


STAGE1_TRAIN_TAPS = {"score_t_with_bg": (0, 3, 1, 2), "softmax_masks": (0, 3, 1, 2), "focal_in": None,
                     "focal_out": None, "cls_out": None, "cls_fg": None, "relu_seg": (0, 3, 1, 2),
                     "sig_seg": (0, 3, 1, 2), "fg_224": (0, 3, 1, 2), "vit_image_features_fg": None,
                     "vit_text_hidden_pos": None, "fg_loss_l1": None, "cls_loss_l4": None, "cbs_loss_l5": None,
                     "loss": None}


def optimizer_for(model, stage, golden):
    """The original's param groups (train_stage1.main / train_stage2.main) over our variables, keys checked
    against the golden's; AdamW with the schedule's first value (LambdaLR: full lr at t = 0)."""
    params = {k: v for k, v in model.state_dict_variables().items() if v.trainable}
    if stage == 1:
        groups = [{k: v for k, v in params.items() if k.startswith("backbone.")},
                  {k: v for k, v in params.items() if not k.startswith("backbone.") and k != "logit_scale"}]
    else:
        groups = [{k: v for k, v in params.items() if k.startswith("backbone.") and "positional_embedding" not in k},
                  {k: v for k, v in params.items() if not (k.startswith("backbone.")
                                                           and "positional_embedding" not in k)}]
    ref_groups = golden["manifest"][f"stage{stage}_param_groups"]
    assert [list(g) for g in groups] == [list(g) for g in ref_groups]
    args = golden["manifest"][f"stage{stage}_train"]
    lrs = golden["npz"][f"s{stage}_train__lr_step1_groups"]
    assert list(lrs) == [args["lr"] * args["lr_multi"], args["lr"]]
    return adamw.AdamW([(groups[0], args["lr_multi"]), (groups[1], 1.0)], [args["lr"]], args["weight_decay"])


def check_step(golden, stage, model, optimizer):
    npz, tol = golden["npz"], golden["tol"]
    prefix = f"s{stage}_after__"
    untouched = set(golden["manifest"][f"s{stage}_untouched_by_step"])
    init = init_state(golden, stage)
    lr_of = {k: lr for (group, _), lr in zip(optimizer.groups, npz[f"s{stage}_train__lr_step1_groups"])
             for k in group}
    zero_grad = [p for p in tol["zero_gradient"]["tensors"]]
    moments = {"exp_avg": optimizer.exp_avg, "exp_avg_sq": optimizer.exp_avg_sq}
    max_moment = {m: max(float(np.max(np.abs(v))) for k, v in npz.items() if k.startswith(f"{prefix}{m}__"))
                  for m in moments}
    worst = {}
    for key, var in model.state_dict_variables().items():
        ours = var.numpy()
        if key in untouched:
            np.testing.assert_array_equal(ours, init[key], err_msg=key)
            assert key not in optimizer.exp_avg or not np.any(optimizer.exp_avg[key].numpy()), key
            continue
        if not var.trainable:
            ref = npz[f"{prefix}buffer__{key}"]
            if key.endswith("num_batches_tracked"):
                assert ours == ref, key
            else:
                worst["buffer"] = max(worst.get("buffer", 0), check(golden, f"{prefix}buffer__{key}", ours))
            continue
        zero = any(fnmatch.fnmatchcase(f"{prefix}param__{key}", p) for p in zero_grad)
        exp_avg_ref = npz[f"{prefix}exp_avg__{key}"]
        ref = npz[f"{prefix}param__{key}"]
        limit = 2 * lr_of[key] + 1e-7 * np.abs(ref)
        if zero:
            assert np.all(np.abs(ours - ref) <= limit), key
            assert np.max(np.abs(optimizer.exp_avg[key].numpy())) <= 1e-5 * max_moment["exp_avg"], key
            assert np.max(optimizer.exp_avg_sq[key].numpy()) <= 1e-10 * max_moment["exp_avg_sq"], key
            continue
        noise = np.abs(exp_avg_ref) <= 1e-4 * np.max(np.abs(exp_avg_ref))
        assert np.all((np.abs(ours - ref) <= limit)[noise]), key
        quiet = np.where(noise, ref, ours)                     # noise-level elements checked above
        worst["param"] = max(worst.get("param", 0), check(golden, f"{prefix}param__{key}", quiet))
        update, ref_update = np.where(noise, 0.0, ours - init[key]), np.where(noise, 0.0, ref - init[key])
        if np.max(np.abs(ref_update)) > 0:
            assert np.max(np.abs(update - ref_update)) <= 1e-2 * np.max(np.abs(ref_update)), key
        for name, state in moments.items():
            worst[name] = max(worst.get(name, 0), check(golden, f"{prefix}{name}__{key}", state[key].numpy()))
    assert int(optimizer.step.numpy()) == golden["manifest"][f"s{stage}_adam_step"][0]
    return worst


def test_stage1_training_step(golden):
    model, vit = build(golden, 1), vitb32(golden)
    taps = {}
    with tf.GradientTape() as tape:
        loss = stage1_loss(golden, model, vit, taps)
    for name, perm in STAGE1_TRAIN_TAPS.items():
        ours = taps[name] if perm is None else np.transpose(taps[name], perm)
        check(golden, f"s1_train__{name}", ours)
    check(golden, "s1_train__clip_similarity", np.reshape(taps["clip_similarity"], (-1, 1, 1)))
    neg_ids = golden["npz"]["s1_train__batch_neg_word_ids"]
    for i in range(neg_ids.shape[0]):
        check(golden, f"s1_train__vit_text_hidden_neg__{i}", vit.encode_text(tf.constant(neg_ids[i]))[1])
    log.info("stage-1 loss %.6f (golden %.6f)", float(loss), float(golden["npz"]["s1_train__loss"]))
    optimizer = optimizer_for(model, 1, golden)
    variables = {k: v for group, _ in optimizer.groups for k, v in group.items()}
    grads = tape.gradient(loss, variables)
    optimizer.apply_gradients(grads)
    log.info("stage-1 step, worst relative errors %s", check_step(golden, 1, model, optimizer))


def test_stage2_training_step(golden):
    model = build(golden, 2)
    taps = {}
    with tf.GradientTape() as tape:
        loss = stage2_loss(golden, model, taps)
    for name in ("out1", "out2", "out3", "out4"):
        check(golden, f"s2_train__{name}", taps[name], nhwc(golden["npz"][f"s2_train__{name}"]))
    for name in ("l1", "l2", "l3", "l4", "loss"):
        check(golden, f"s2_train__{name}", taps[name])
    optimizer = optimizer_for(model, 2, golden)
    variables = {k: v for group, _ in optimizer.groups for k, v in group.items()}
    optimizer.apply_gradients(tape.gradient(loss, variables))
    log.info("stage-2 step, worst relative errors %s", check_step(golden, 2, model, optimizer))


# --------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("stage", [1, 2])
def test_checkpoint_loads_without_torch(golden, stage):
    path = golden["folder"] / f"tris_stage{stage}_checkpoint.pth"
    checkpoint = load_pth(path)
    assert sorted(checkpoint) == ["epoch", "lr_scheduler", "model", "optimizer"]
    model = tris.from_state_dict(checkpoint["model"], str(path))
    assert model.stage == stage
    npz, init = golden["npz"], init_state(golden, stage)
    for key, var in model.state_dict_variables().items():
        kind = "param" if var.trainable else "buffer"
        ref = npz.get(f"s{stage}_after__{kind}__{key}", init[key])
        np.testing.assert_array_equal(var.numpy(), ref, err_msg=key)
    images, ids = inputs(golden)
    check(golden, f"s{stage}_ckpt_eval__output", model(images, ids),
          nhwc(npz[f"s{stage}_ckpt_eval__output"]))


def test_strict_loading_names_missing_and_unexpected_keys(golden, stage1):
    state = load_pth(golden["folder"] / "tris_stage2_checkpoint.pth")["model"]
    with pytest.raises(ValueError) as info:
        stage1.load_state_dict(state, "stage2.pth")
    message = str(info.value)
    assert "\n" not in message and message.startswith("stage2.pth: not a TRIS stage-1 state_dict")
    assert "missing keys logit_scale, vis_project.weight" in message and "unexpected keys attention2." in message


@pytest.mark.parametrize("stage", [1, 2])
def test_full_size_variables(golden, stage):
    """The full-size models (RN50, h 1024) build (zeros, no forward) with exactly the original's state_dict:
    keys in order, shapes, dtypes, parameter/buffer."""
    with open(golden["folder"] / f"full_size_state_dict_stage{stage}.txt") as f:
        ref = [line.rstrip("\n").split("\t")[:4] for line in f if not line.startswith("#")]
    model = tris.TRISStage1() if stage == 1 else tris.TRISStage2()
    ours = [[k, str(list(v.shape)), v.dtype.name, "param" if v.trainable else "buffer"]
            for k, v in model.state_dict_variables().items()]
    assert ours == ref
    assert sum(v.shape.num_elements() for v in model.state_dict_variables().values() if v.trainable) \
        == FULL_SIZE_PARAMETERS[stage]


# --------------------------------------------------------------------------------------------- tokenizer
def bpe_file(shared_dir):
    """The user-supplied merges file: $REFSEG_CLIP_BPE, else ../shared/data/bpe_simple_vocab_16e6.txt.gz."""
    path = os.environ.get("REFSEG_CLIP_BPE", str(shared_dir / "data" / "bpe_simple_vocab_16e6.txt.gz"))
    if not os.path.isfile(path):
        pytest.skip(f"CLIP BPE merges file {path} not present (set REFSEG_CLIP_BPE; the golden has none)")
    return path


def test_tokenizer_ids(golden, shared_dir):
    tokenizer = clip_bpe.ClipTokenizer(bpe_file(shared_dir))
    for sentence in golden["manifest"]["tokenizer"]["sentences"]:
        i = sentence["i"]
        ids77 = tokenizer.tokenize(sentence["sentence"])
        np.testing.assert_array_equal(ids77, golden["npz"][f"tok__ids77__{i}"])
        np.testing.assert_array_equal(clip_bpe.tris_ids(ids77), golden["npz"][f"tok__ids20__{i}"])
        assert tokenizer.decode(tokenizer.encode(sentence["sentence"])) == sentence["decoded_bpe"]
    with pytest.raises(clip_bpe.BPEError, match="too long for context length 77"):
        tokenizer.tokenize("word " * 80)


def test_tokenizer_split_and_truncation_from_stored_ids(golden):
    """Without the merges file: the cleanup + split reproduce the golden's word pieces (its BPE decodings are the
    pieces joined by spaces), and the stored ids follow the SOT/EOT/pad layout and TRIS's plain cut to 20."""
    npz = golden["npz"]
    for sentence in golden["manifest"]["tokenizer"]["sentences"]:
        i = sentence["i"]
        assert clip_bpe.split_words(clip_bpe.clean_text(sentence["sentence"])) == sentence["decoded_bpe"].split()
        ids77 = npz[f"tok__ids77__{i}"]
        n = sentence["n_bpe"]
        assert ids77[0] == clip_bpe.SOT_ID and ids77[n + 1] == clip_bpe.EOT_ID and not ids77[n + 2:].any()
        assert ids77.dtype == np.int32
        np.testing.assert_array_equal(clip_bpe.tris_ids(ids77), npz[f"tok__ids20__{i}"])
        assert (clip_bpe.EOT_ID in npz[f"tok__ids20__{i}"]) == sentence["eot_kept"]
        reduced = [0 if t == 0 else 510 if t == clip_bpe.SOT_ID else 511 if t == clip_bpe.EOT_ID else 1 + t % 509
                   for t in npz[f"tok__ids20__{i}"]]
        np.testing.assert_array_equal(reduced, npz[f"tok__ids20_reduced__{i}"])


def test_head_initialisers_are_torch_defaults(golden):
    """Heads built with an ``rng`` draw torch's defaults: conv/linear weights and biases U(±1/√fan_in), norms 1/0,
    PReLU 0.25; the CLIP backbone stays zero until loaded."""
    config = tris.clip_config_from_state_dict(init_state(golden, 1))
    rng = np.random.default_rng(0)
    for model in (tris.TRISStage1(config, hidden_dim=32, rng=rng), tris.TRISStage2(config, decoder_div=16, rng=rng)):
        for key, var in model.state_dict_variables().items():
            value = var.numpy()
            if key.startswith("backbone.") or not var.trainable:
                continue
            if key.endswith("relu.weight"):
                assert np.all(value == 0.25), key
            elif value.ndim == 1 and any(n in key for n in (".ins_", ".bn.", "_proj1.1", "_proj2.1", "_proj3.1",
                                                             "v_output.1")):
                assert np.all(value == (1.0 if key.endswith("weight") else 0.0)), key
            elif key != "logit_scale":
                weight = model.state_dict_variables()[key.rsplit(".", 1)[0] + ".weight"].numpy()
                bound = 1.0 / np.sqrt(np.prod(weight.shape[1:]))
                assert 0 < np.max(np.abs(value)) <= bound, key


# --------------------------------------------------------------------------------------------- converter
def test_converter_writes_a_checkpoint_that_restores(golden, tmp_path):
    from external import convert_tris
    src = golden["folder"] / "tris_stage1_checkpoint.pth"
    assert convert_tris.main([str(src), str(tmp_path / "s1")]) == 0
    state = tris.model_state_dict(load_pth(src))
    model = tris.TRISStage1(tris.clip_config_from_state_dict(state), hidden_dim=state["vis_project.weight"].shape[0])
    tf.train.Checkpoint(model=model).read(str(tmp_path / "s1")).assert_existing_objects_matched()
    for key, var in model.state_dict_variables().items():
        np.testing.assert_array_equal(var.numpy(), state[key], err_msg=key)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s1.data-00000-of-00001", "s1.index"]


def test_converter_refuses_bad_input_in_one_line(golden, tmp_path, caplog):
    from external import convert_tris
    malicious, other = tmp_path / "evil.pth", tmp_path / "other.pth"
    with zipfile.ZipFile(malicious, "w") as zf:
        zf.writestr("evil/data.pkl", pickle.dumps(os.system, protocol=2))
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("other/data.pkl", pickle.dumps({"epoch": 3}, protocol=2))
    cases = {malicious: f"{malicious}: refusing to unpickle posix.system", tmp_path / "none.pth": "no such file",
             golden["folder"] / "README.md": "not a zip-format .pth",
             other: f"{other}: not a TRIS checkpoint (a dict with 'model', or a state_dict); top level: ['epoch']"}
    for src, message in cases.items():
        caplog.clear()
        assert convert_tris.main([str(src), str(tmp_path / "out")]) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0], errors
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())
