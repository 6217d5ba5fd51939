"""TRIS stage-2 training through ``trainval_model.py -m train -n TRIS_stage2`` on the generated sample dataset, at
96×96 with the golden's reduced stage-2 checkpoint (token embedding extended to CLIP's 49408 rows, as in
``test_tris_train``) as ``--init-weights``.

The pseudo masks stand in for IRNet's: each train ref's ground-truth mask written as ``make_ins_seg_labels`` writes
its output (``np.save`` of {'score', 'mask' bool [1, H, W], 'class', 'cam'}) under the original's name
``<index>_<image id>.npy`` in ``<--data-root>/output/refcoco_unc/ins_seg`` (the refer files and images are links to
the sample set's).

A short run lowers the logged loss and a second command resumes from its snapshot; one iteration of the loop equals
``models.tris.stage2_losses`` + AdamW (the original's groups, written out here) on the same batch, whose targets are
the ground-truth masks stretched with PIL nearest; a missing folder or file is refused in one line.
"""
import logging
import os
import pickle
import shutil

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.test_restr_cli import write_state_dict_pth
from tests.test_tris_train import SIZE, extended, train
from tests.test_tris_train import command as tris_train_command

BATCH = 40                # the 40 train refs of the sample set: one iteration per epoch
LR = 1e-3


def gt_masks(root):
    """[(split index, image id, float32 ground-truth mask at the original size)] of the sample's unc train refs."""
    from models import tris_train
    from util.refer import Refer, ann_to_mask

    refer = Refer(tris_train.refer_root(root), "refcoco", "unc")
    out = []
    for index, ref_id in enumerate(refer.ref_ids("train")):
        ref = refer.refs[ref_id]
        image = refer.imgs[ref["image_id"]]
        out.append((index, ref["image_id"],
                    ann_to_mask(refer.anns[ref["ann_id"]]["segmentation"], image["height"], image["width"])))
    return out


def write_irnet_npy(path, mask):
    """``make_ins_seg_labels``'s file for one instance ``mask``."""
    np.save(path, {"score": np.array([1.0]), "mask": (mask > 0)[None], "class": np.array([0]),
                   "cam": mask[None].astype(np.float32)})


@pytest.fixture(scope="module")
def data_root(sample, tmp_path_factory):
    """A --data-root linking the sample's refer files and images, with pseudo masks from the ground truth."""
    root = tmp_path_factory.mktemp("tris_stage2_root")
    for name in ("external", "data"):
        os.symlink(sample / name, root / name)
    folder = root / "output" / "refcoco_unc" / "ins_seg"
    folder.mkdir(parents=True)
    for index, image_id, mask in gt_masks(root):
        write_irnet_npy(folder / f"{index}_{image_id}.npy", mask)
    return root


@pytest.fixture(scope="module")
def weights(golden_dir, sample, tmp_path_factory):
    """(stage-2 init .pth, data dir holding the BPE file)."""
    from models import tris
    from util.pth import load_pth

    path = golden_dir / "tris" / "tris_stage2_checkpoint.pth"
    folder = tmp_path_factory.mktemp("tris_stage2_weights")
    init = folder / "stage2_init.pth"
    write_state_dict_pth(init, extended(tris.model_state_dict(load_pth(str(path)), str(path)),
                                        "backbone.token_embedding.weight", 0))
    shutil.copy(sample / "data" / "bpe_simple_vocab_16e6.txt.gz", folder)
    return init, folder


def command(root, weights, folder, *extra):
    return tris_train_command(root, weights, folder, *extra, name="TRIS_stage2")


def test_short_stage2_training_lowers_the_loss_and_resumes(data_root, weights, tmp_path, caplog):
    folder = tmp_path / "snapshots"
    out = train(command(data_root, weights, folder, "-i", "12", "-s", "4", "-st", "8", "-lr", str(LR)), caplog)
    assert "40 train refs with pseudo masks from" in out
    terms = logged_stage2(out)
    losses = {i: v[0] for i, v in terms.items()}
    assert sorted(losses) == list(range(8)), out[-2000:]
    assert np.all(np.isfinite(list(losses.values())))
    first = np.mean([losses[0], losses[1]])
    assert np.mean([losses[6], losses[7]]) < first - 0.3, losses
    assert terms[7][1] < 0.7 * terms[0][1], terms                  # the final output's BCE
    assert "stop training at iter 8" in out
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".index") == ["unc_iter_4.index",
                                                                               "unc_iter_8.index"]
    out = train(command(data_root, weights, folder, "-i", "12", "-s", "4", "-lr", str(LR)), caplog)
    assert f"resuming from {folder / 'unc_iter_8'} (iteration 8)" in out
    resumed = {i: v[0] for i, v in logged_stage2(out).items()}
    assert sorted(resumed) == list(range(8, 12)), out[-2000:]
    assert np.mean([resumed[i] for i in range(8, 12)]) < first - 0.3, resumed
    assert (folder / "unc_iter_12.index").exists()
    logging.getLogger(__name__).info("stage-2 sample losses %s / resumed %s", losses, resumed)


def logged_stage2(out):
    """{iteration: (loss, l1)} from the loop's two log lines (l1: the final output's BCE)."""
    import re

    loss = {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"iter = (\d+), loss \(cur\) = ([-0-9.e]+)", out)}
    l1 = {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"iter = (\d+), l1 = ([-0-9.e]+), l2 = ", out)}
    assert sorted(loss) == sorted(l1), out[-2000:]
    return {i: (loss[i], l1[i]) for i in loss}


def test_one_loop_step_is_stage2_loss_plus_adamw(data_root, weights, tmp_path, caplog):
    """Our loop's first iteration (snapshot after 1 step) = the reference step written out here: the batch of
    iteration 0 (targets checked against the ground truth stretched with PIL nearest), the golden-checked
    ``tris.stage2_losses`` on a training forward, AdamW with the original's groups at lr·0.1 / lr, wd 0.01."""
    from models import model_spec, tris, tris_train
    from util import adamw, clip_bpe
    from util.pth import load_pth

    folder = tmp_path / "one"
    out = train(command(data_root, weights, folder, "-i", "1", "-s", "1", "-lr", str(LR)), caplog)
    loop_loss = logged_stage2(out)[0][0]

    init, data_dir = weights
    tokenizer = clip_bpe.ClipTokenizer(str(data_dir / "bpe_simple_vocab_16e6.txt.gz"))
    data = tris_train.PseudoMaskTrainSet(str(data_root), "unc", "train", tokenizer, SIZE,
                                         str(tris_train.pseudo_folder(str(data_root), "unc")))
    images, ids, targets = data.batch(0, BATCH, 0)
    order = np.random.default_rng([0, 0]).permutation(len(data))
    masks = {(index, image_id): mask for index, image_id, mask in gt_masks(data_root)}
    for row, k in enumerate(order):
        mask = masks[(data.split_index[k], data.image_ids[k])]
        expected = np.asarray(Image.fromarray(mask.astype(np.float64)).resize((SIZE, SIZE), Image.NEAREST))
        np.testing.assert_array_equal(targets[row, :, :, 0], expected.astype(np.int64))
    assert 0 < targets.mean() < 1

    model = tris.TRISStage2.from_state_dict(tris.model_state_dict(load_pth(str(init)), str(init)), str(init))
    params = {k: v for k, v in model.state_dict_variables().items() if v.trainable}
    backbone = {k: v for k, v in params.items() if k.startswith("backbone.") and "positional_embedding" not in k}
    heads = {k: v for k, v in params.items() if k not in backbone}
    assert "backbone.positional_embedding" in heads and "attention2.Wq.weight" in heads
    optimizer = adamw.AdamW([(backbone, 0.1), (heads, 1.0)], [LR], 0.01)
    variables = {**backbone, **heads}
    with tf.GradientTape() as tape:
        losses = tris.stage2_losses(model(tf.constant(images), tf.constant(ids), training=True), targets)
    optimizer.apply_gradients(tape.gradient(losses["loss"], variables))
    assert abs(loop_loss - float(losses["loss"])) <= 1e-5 * float(losses["loss"]), (loop_loss, losses["loss"])

    spec = model_spec("TRIS_stage2")
    trained = tris.TRISStage2.from_state_dict(tris.model_state_dict(load_pth(str(init)), str(init)), str(init))
    trained_optimizer = tris_train.make_stage2_optimizer(trained, LR, 1, 1)
    spec.restore(trained, str(folder / "unc_iter_1"), trained_optimizer)
    assert int(trained_optimizer.step.numpy()) == 1
    ours = trained.state_dict_variables()
    before = tris.model_state_dict(load_pth(str(init)), str(init))
    changed = 0
    floor = 1e-5 * max(float(np.max(np.abs(v.numpy()))) for v in optimizer.exp_avg.values())
    for key, var in model.state_dict_variables().items():
        if key not in variables:
            np.testing.assert_allclose(ours[key].numpy(), var.numpy(), rtol=1e-5, atol=1e-7, err_msg=key)
            continue
        ref_avg = optimizer.exp_avg[key].numpy()          # gradients: float32 sums in another order
        level = max(1e-2 * float(np.max(np.abs(ref_avg))), floor)
        np.testing.assert_allclose(trained_optimizer.exp_avg[key].numpy(), ref_avg, rtol=1e-3, atol=level,
                                   err_msg=key)
        # AdamW's first step moves an element by about ±lr whatever its gradient's size: where the gradient is at
        # the noise level (the attention's key bias, ln_final.bias: ignored by softmax / InstanceNorm) the two may
        # step in opposite directions
        lr = LR * (0.1 if key in backbone else 1.0)
        noise = np.abs(ref_avg) <= level
        diff = np.abs(ours[key].numpy() - var.numpy())
        assert np.all(diff[noise] <= 2.01 * lr), key
        np.testing.assert_allclose(ours[key].numpy()[~noise], var.numpy()[~noise], rtol=1e-5, atol=1e-7,
                                   err_msg=key)
        changed += bool(np.any(var.numpy() != before[key]))
    assert changed > 100


def test_stage2_initial_weights_from_clip_or_a_stage1_checkpoint(golden_dir, tmp_path):
    """A stage-1 .pth or a plain CLIP state_dict (``torch.save(clip_model.state_dict())``, with the
    ``input_resolution`` / ``context_length`` / ``vocab_size`` entries OpenAI's archives carry) gives the backbone;
    the heads are drawn from the seed (the same for the same seed)."""
    from models import tris, tris_train
    from util.pth import load_pth

    path = str(golden_dir / "tris" / "tris_stage1_checkpoint.pth")
    state = tris.model_state_dict(load_pth(path), path)
    clip_path = tmp_path / "RN50.pth"
    write_state_dict_pth(clip_path, {**{k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")},
                                     "input_resolution": np.array(64), "context_length": np.array(77),
                                     "vocab_size": np.array(512)})
    first, again = tris_train.initial_stage2_model(path, 3), tris_train.initial_stage2_model(str(clip_path), 3)
    other = tris_train.initial_stage2_model(path, 4)
    variables = first.state_dict_variables()
    for key, var in variables.items():
        if key.startswith("backbone."):
            np.testing.assert_array_equal(var.numpy(), state[key], err_msg=key)
            np.testing.assert_array_equal(again.state_dict_variables()[key].numpy(), state[key], err_msg=key)
    np.testing.assert_array_equal(variables["attention2.Wq.weight"].numpy(),
                                  again.state_dict_variables()["attention2.Wq.weight"].numpy())
    assert np.any(variables["attention2.Wq.weight"].numpy()
                  != other.state_dict_variables()["attention2.Wq.weight"].numpy())
    assert tuple(variables["reduced_c1.conv.weight"].shape)[0] == 64          # the full-size decoder


def test_missing_pseudo_mask_folder_is_one_line(data_root, weights, tmp_path, capsys):
    import trainval_model

    root = tmp_path / "no_pseudo"
    root.mkdir()
    for name in ("external", "data"):
        os.symlink(data_root / name, root / name)
    with pytest.raises(SystemExit) as exit_info:
        trainval_model.parse_args(command(root, weights, tmp_path / "f"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert f"pseudo-mask folder {root}/output/refcoco_unc/ins_seg not found" in err.splitlines()[-1], err


def test_missing_pseudo_mask_file_is_one_line(data_root, weights, tmp_path, caplog):
    import trainval_model

    root = tmp_path / "partial"
    folder = root / "output" / "refcoco_unc" / "ins_seg"
    shutil.copytree(data_root / "output" / "refcoco_unc" / "ins_seg", folder)
    for name in ("external", "data"):
        os.symlink(data_root / name, root / name)
    missing = sorted(folder.iterdir())[0]
    missing.unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert trainval_model.main(command(root, weights, tmp_path / "f", "-i", "1")) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert errors[0].startswith(f"error: {missing}: no such file (the pseudo mask of train ref_id "), errors
    assert "1 of 40 missing" in errors[0], errors


class _Evil:
    def __reduce__(self):
        return os.system, ("true",)


def test_pseudo_mask_reader_refuses_other_pickles(tmp_path):
    from models import tris_train

    path = tmp_path / "0_1.npy"
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": ()})
        pickle.dump(np.array({"mask": _Evil()}, dtype=object), f, protocol=3)
    with pytest.raises(ValueError, match=r"0_1.npy: not an IRNet pseudo-mask .npy \(refused global "):
        tris_train.load_pseudo_mask(str(path))
    np.save(path, np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="expected np.save of a dict with 'mask'"):
        tris_train.load_pseudo_mask(str(path))
    write_irnet_npy(path, np.eye(4, 5))
    np.testing.assert_array_equal(tris_train.load_pseudo_mask(str(path)), np.eye(4, 5))
