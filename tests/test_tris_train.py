"""TRIS stage-1 training through ``trainval_model.py -m train -n TRIS_stage1`` on the generated sample dataset
(the refer pickle, instances.json and COCO-named JPEGs read directly, ``--data-root``), at 96×96 with the golden's
reduced model: its stage-1 checkpoint as ``--init-weights`` and its frozen "ViT-B/32" as
``<--data-dir>/weights/ViT-B-32.pth``, both with the token embedding extended to CLIP's 49408 rows (seeded rows
appended; the golden's vocabulary was reduced, the sample sentences have real BPE ids).

A short run lowers the logged loss, writes snapshots with the optimizer state, and a second command resumes from the
newest one; the command line is refused in one line when a file is missing.
"""
import logging
import re
import shutil

import numpy as np
import pytest

from tests.test_restr_cli import write_state_dict_pth
from tests.test_tris_cli import extended

SIZE = 96
BATCH = 40                # the 40 train refs of the sample set: every iteration sees them all (1 per epoch)


@pytest.fixture(scope="module")
def weights(golden_dir, sample, tmp_path_factory):
    """(init .pth, data dir holding the BPE file and weights/ViT-B-32.pth)."""
    from models import tris
    from util.pth import load_pth

    golden = golden_dir / "tris"
    path = golden / "tris_stage1_checkpoint.pth"
    folder = tmp_path_factory.mktemp("tris_train")
    init = folder / "stage1_init.pth"
    write_state_dict_pth(init, extended(tris.model_state_dict(load_pth(str(path)), str(path)),
                                        "backbone.token_embedding.weight", 0))
    with np.load(golden / "golden_tris.npz") as npz:
        vit = {k[len("vitb32__"):]: npz[k] for k in npz.files if k.startswith("vitb32__")}
    data_dir = folder / "data"
    (data_dir / "weights").mkdir(parents=True)
    shutil.copy(sample / "data" / "bpe_simple_vocab_16e6.txt.gz", data_dir)
    write_state_dict_pth(data_dir / "weights" / "ViT-B-32.pth", extended(vit, "token_embedding.weight", 1))
    return init, data_dir


def command(data_root, weights, folder, *extra, name="TRIS_stage1"):
    """A ``-m train -n name`` command line on ``data_root`` with ``weights`` = (init .pth, data dir)."""
    init, data_dir = weights
    return ["-m", "train", "-n", name, "-d", "unc", "-t", "train", "-f", str(folder), "--img-size",
            str(SIZE), "-bs", str(BATCH), "--data-root", str(data_root), "--data-dir", str(data_dir),
            "--init-weights", str(init), "--log-every", "1", *extra]


def logged(out):
    """{iteration: (loss, l4)} from the loop's two log lines."""
    def found(pattern):
        return {int(m.group(1)): float(m.group(2)) for m in re.finditer(pattern, out)}

    loss = found(r"iter = (\d+), loss \(cur\) = ([-0-9.e]+)")
    l4 = found(r"iter = (\d+), l1 = [-0-9.e]+, l4 = ([-0-9.e]+)")
    assert sorted(loss) == sorted(l4), out[-2000:]
    return {i: (loss[i], l4[i]) for i in loss}


def mean_loss(losses, iterations):
    return np.mean([losses[i][0] for i in iterations])


def train(argv, caplog):
    """``trainval_model.main(argv)`` in this process (one TensorFlow start for both runs) → its log text."""
    import trainval_model

    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert trainval_model.main(argv) == 0, caplog.text[-3000:]
    return caplog.text


def test_short_stage1_training_lowers_the_loss_and_resumes(sample, weights, tmp_path, caplog):
    folder = tmp_path / "snapshots"
    out = train(command(sample, weights, folder, "-i", "12", "-s", "4", "-st", "8", "-lr", "5e-4"), caplog)
    losses = logged(out)
    assert sorted(losses) == list(range(8)), out[-2000:]
    assert np.all(np.isfinite(list(losses.values())))
    first = mean_loss(losses, (0, 1))
    assert mean_loss(losses, (6, 7)) < first - 0.5, losses
    assert losses[7][1] < 0.5 * losses[0][1], losses          # the localisation term (w4 = 5)
    assert "stop training at iter 8" in out
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".index") == ["unc_iter_4.index",
                                                                               "unc_iter_8.index"]
    out = train(command(sample, weights, folder, "-i", "12", "-s", "4", "-lr", "5e-4"), caplog)
    assert f"resuming from {folder / 'unc_iter_8'} (iteration 8)" in out
    resumed = logged(out)
    assert sorted(resumed) == list(range(8, 12)), out[-2000:]
    assert mean_loss(resumed, range(8, 12)) < first - 0.5, resumed
    assert (folder / "unc_iter_12.index").exists()


@pytest.mark.parametrize("change, message", [
    (lambda tmp, data_dir: ["--data-dir", str(tmp)], "{tmp}/bpe_simple_vocab_16e6.txt.gz: no such file"),
    (lambda tmp, data_dir: ["--data-dir", str(without_vit(tmp, data_dir))],
     "{tmp}/no_vit/weights/ViT-B-32.pth: no such file (the frozen CLIP ViT-B/32"),
    (lambda tmp, data_dir: ["--init-weights", "random"], "--init-weights random: expected an existing TRIS stage-1"),
    (lambda tmp, data_dir: ["--data-root", str(tmp)], "refcoco/refs(unc).p not found"),
    (lambda tmp, data_dir: ["-d", "referit"], "reads RefCOCO-style refer files: -d unc, unc+ or Gref"),
    (lambda tmp, data_dir: ["-n", "TRIS_stage2"], "/output/refcoco_unc/ins_seg not found (IRNet's ins_seg output"),
])
def test_training_command_line_problems_are_one_line(sample, weights, tmp_path, capsys, change, message):
    import trainval_model

    with pytest.raises(SystemExit) as exit_info:
        trainval_model.parse_args(command(sample, weights, tmp_path / "f", *change(tmp_path, weights[1])))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message.format(tmp=tmp_path) in err.splitlines()[-1], err


def without_vit(tmp, data_dir):
    folder = tmp / "no_vit"
    folder.mkdir()
    shutil.copy(data_dir / "bpe_simple_vocab_16e6.txt.gz", folder)
    return folder
