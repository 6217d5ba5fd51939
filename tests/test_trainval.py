"""End to end through ``trainval_model.py`` on the generated sample dataset (real formats, 64×64 training images).

Each model trains briefly from seeded stand-in backbone weights (``--init-weights random``), snapshots appear with
the originals' names, ``-m test -c -v`` prints the metric block and writes JSON and PNGs, an original-style TF1
snapshot of the same weights tests to the same figures (interruption: tests/test_faults.py).
"""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, SAMPLE_TRAIN_SIZE as SIZE
from util.checkpoints import save_tf1_checkpoint



def run(args, check=True, timeout=600):
    proc = subprocess.run([sys.executable, str(REPO / "trainval_model.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def common(sample, model, folder):
    return ["-d", "unc", "-n", model, "-f", str(folder), "--img-size", str(SIZE), "--batch-root", str(sample),
            "--data-dir", str(sample / "data")]


def logged_losses(stdout):
    return {int(m.group(1)): float(m.group(2))
            for m in re.finditer(r"iter = (\d+), loss \(cur\) = ([0-9.e+-]+)", stdout)}


def metric_block(stdout, title):
    start = stdout.index(f"Segmentation evaluation ({title}):")
    return stdout[start:].splitlines()[:7]


@pytest.fixture(scope="session")
def rrn_run(sample, tmp_path_factory):
    folder = tmp_path_factory.mktemp("rrn")
    out = run(["-m", "train", "-t", "train", *common(sample, "RRN_model", folder), "-i", "90", "-s", "30",
               "--init-weights", "random", "--log-every", "10"]).stdout
    return folder, out


def test_training_lowers_the_loss_and_writes_snapshots(rrn_run):
    folder, out = rrn_run
    losses = logged_losses(out)
    assert sorted(losses) == list(range(0, 90, 10))
    first, last = losses[0], np.mean([losses[i] for i in (60, 70, 80)])
    assert last < 0.5 * first, losses
    assert "snapshot saved to" in out and out.rstrip().endswith("Optimization done.")
    for it in (30, 60, 90):
        assert (folder / f"unc_iter_{it}.index").is_file()
    assert not [f for f in os.listdir(folder) if ".tmp" in f]


def test_test_mode_prints_block_writes_json_and_pngs(sample, rrn_run, tmp_path):
    folder, _ = rrn_run
    out = run(["-m", "test", "-t", "val", *common(sample, "RRN_model", folder), "-i", "90", "-c", "-v",
               "--vis-dir", str(tmp_path / "vis")]).stdout
    for title in ("without DenseCRF", "with DenseCRF"):
        block = metric_block(out, title)
        assert [line.split(" = ")[0] for line in block[1:6]] == [f"precision@{t}" for t in (0.5, 0.6, 0.7, 0.8, 0.9)]
        assert re.fullmatch(r"overall IoU = \d\.\d{6}; mean IoU = \d\.\d{6}", block[6])
    results = json.loads((folder / "unc_iter_90.unc_val.json").read_text())
    n_val = len([f for f in os.listdir(sample / "unc" / "val_batch") if f.endswith(".npz")])
    assert results["without_dcrf"]["samples"] == n_val and "with_dcrf" in results
    overall = float(re.search(r"overall IoU = ([0-9.]+)", out).group(1))
    assert results["without_dcrf"]["overall_iou"] == pytest.approx(overall, abs=1e-6)
    pngs = sorted(os.listdir(tmp_path / "vis"))
    assert "000000_im.png" in pngs and "000000_gt.png" in pngs and "000000_pred.png" in pngs
    assert "000000_pred_dcrf.png" in pngs


def test_original_tf1_snapshot_tests_to_the_same_figures(sample, rrn_run, tmp_path):
    """Write the trained weights under their TF1 names as ``unc_iter_90.tfmodel`` (what the original Saver wrote)
    and test it: the figures equal those of our snapshot."""
    from models import build_model
    from util.snapshots import restore_model

    folder, _ = rrn_run
    model = build_model("RRN_model", image_size=SIZE)
    restore_model(model, str(folder / "unc_iter_90"))
    tf1 = {name: var.numpy() for name, var in model.tf1_variables().items()}
    tf1["text_objseg/Variable"] = np.float32(90.0)
    save_tf1_checkpoint(tf1, tmp_path / "unc_iter_90.tfmodel")
    out = run(["-m", "test", "-t", "val", *common(sample, "RRN_model", tmp_path), "-i", "90"]).stdout
    assert f"Loading trained weights from {tmp_path / 'unc_iter_90.tfmodel'}" in out
    theirs = json.loads((tmp_path / "unc_iter_90.tfmodel.unc_val.json").read_text())
    ours_json = folder / "unc_iter_90.unc_val.json"
    if not ours_json.exists():
        run(["-m", "test", "-t", "val", *common(sample, "RRN_model", folder), "-i", "90"])
    assert theirs["without_dcrf"] == json.loads(ours_json.read_text())["without_dcrf"]


def test_tf1_snapshot_with_a_misshapen_tensor_names_it(sample, rrn_run, tmp_path):
    from models import build_model

    model = build_model("RRN_model", image_size=SIZE)
    tf1 = {name: var.numpy() for name, var in model.tf1_variables().items()}
    tf1["text_objseg/score/DW"] = np.zeros((1, 1, 3, 1), np.float32)
    del tf1["text_objseg/fusion/biases"]
    save_tf1_checkpoint(tf1, tmp_path / "unc_iter_7.tfmodel")
    proc = run(["-m", "test", "-t", "val", *common(sample, "RRN_model", tmp_path), "-i", "7"], check=False)
    assert proc.returncode == 1
    assert "text_objseg/score/DW has shape [1, 1, 3, 1], the model expects [3, 3, 500, 1]" in proc.stdout
    proc = run(["-m", "test", "-t", "val", *common(sample, "RRN_model", tmp_path), "-i", "8"], check=False)
    assert proc.returncode == 1 and "snapshot not found" in proc.stdout and "unc_iter_8.tfmodel.index" in proc.stdout


def test_cmpc_trains_and_tests(sample, tmp_path):
    out = run(["-m", "train", "-t", "train", *common(sample, "CMPC_model", tmp_path), "-emb", "-i", "40",
               "-s", "40", "--init-weights", "random", "--log-every", "10"]).stdout
    losses = logged_losses(out)
    assert np.mean([losses[20], losses[30]]) < 0.5 * losses[0], losses
    assert "Collecting variables for regularization:" in out and "\ttext_objseg/fusion_c5/DW" in out
    out = run(["-m", "test", "-t", "val", *common(sample, "CMPC_model", tmp_path), "-emb", "-i", "40", "-c", "-v",
               "--vis-dir", str(tmp_path / "vis")]).stdout
    assert metric_block(out, "with DenseCRF")[6].startswith("overall IoU = ")
    results = json.loads((tmp_path / "unc_iter_40.unc_val.json").read_text())
    assert set(results) >= {"without_dcrf", "with_dcrf"}
    assert (tmp_path / "vis" / "000000_pred_dcrf.png").is_file()


@pytest.mark.parametrize("model,short", [("RMI", "RMI"), ("LSTM_model", "LSTM")])
def test_rmi_and_lstm_keep_their_snapshot_names(sample, tmp_path, model, short):
    args = ["-d", "unc", "-n", model, "-w", "deeplab", "--img-size", str(SIZE), "--batch-root", str(sample),
            "--data-dir", str(sample / "data")]
    out = run(["-m", "train", "-t", "train", *args, "-f", str(tmp_path), "-i", "10", "-s", "10",
               "--init-weights", "random", "--log-every", "5"]).stdout
    losses = logged_losses(out)
    assert losses[5] < losses[0]
    assert (tmp_path / f"unc_deeplab_{short}_iter_10.index").is_file()
    out = run(["-m", "test", "-t", "val", *args, "-f", str(tmp_path), "-i", "10"]).stdout
    assert "overall IoU = " in out
