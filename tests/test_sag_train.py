"""SaG training through ``trainval_model.py -m train`` on the generated sample dataset: ``build_batches.py --family
sag`` at 64 (no padding), ``-n SaG_tiny`` from its seeded weights (``--init-weights random``), batch 4, ``-lr 1e-2``
(SaG's cosine starts at iteration 5000 and its warm-up scales the loss, which AdamW's normalisation undoes, so the
rate is constant here). The run is SIGKILLed once its snapshot of iteration 10 is complete; the same command then
resumes from the newest complete snapshot (AdamW state and the slot-noise generator restored) and finishes."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import build_batches
from tests.conftest import REPO
from tests.test_trainval import logged_losses, run

SIZE = 64


@pytest.fixture(scope="module")
def sag_batches(sample, tmp_path_factory):
    root = tmp_path_factory.mktemp("sag_batches")
    assert build_batches.main(["-d", "unc", "-t", "train", "--data-root", str(sample), "--output-dir", str(root),
                               "--family", "sag", "--img-size", str(SIZE)]) == 0
    return root


def test_killed_training_resumes_and_lowers_the_loss(sample, sag_batches, tmp_path):
    import tensorflow as tf

    folder = tmp_path / "ckpt"
    args = ["-m", "train", "-t", "train", "-d", "unc", "-n", "SaG_tiny", "-f", str(folder), "--img-size", str(SIZE),
            "--batch-root", str(sag_batches), "--data-dir", str(sample / "data"), "--init-weights", "random",
            "-i", "20", "-s", "5", "-bs", "4", "-lr", "1e-2", "--log-every", "5"]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(REPO / "trainval_model.py"), *args], stdout=log,
                                stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not (folder / "unc_iter_10.index").exists():
            time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    first = logged_losses((tmp_path / "killed.log").read_text())
    newest = max(int(f[len("unc_iter_"):-len(".index")]) for f in os.listdir(folder) if f.endswith(".index"))
    second = run(args).stdout
    assert f"resuming from {folder / f'unc_iter_{newest}'} (iteration {newest})" in second, second[-2000:]
    assert second.rstrip().endswith("Optimization done.") and "loss_cm = " in second
    losses = {**first, **logged_losses(second)}
    assert sorted(losses) == list(range(0, 20, 5)), losses
    assert np.mean([losses[10], losses[15]]) < 0.985 * losses[0], losses      # measured 0.973
    reader = tf.train.load_checkpoint(str(folder / "unc_iter_20"))
    assert reader.get_tensor("optimizer/step/.ATTRIBUTES/VARIABLE_VALUE") == 20
    assert any(k.startswith("model/noise_generator/") for k in reader.get_variable_to_shape_map())
    assert not [f for f in os.listdir(folder) if ".tmp" in f]


def test_missing_inputs_are_one_line_before_any_work(sample, sag_batches, tmp_path):
    common = ["-m", "train", "-t", "train", "-d", "unc", "-n", "SaG_tiny", "-f", str(tmp_path / "f"),
              "--img-size", str(SIZE), "--batch-root", str(sag_batches)]
    proc = run([*common, "--data-dir", str(tmp_path)], check=False)
    assert proc.returncode == 2 and "BERT vocabulary" in proc.stderr and "vocab.txt" in proc.stderr
    proc = run([*common, "--data-dir", str(sample / "data"), "--init-weights", str(tmp_path / "vit.npz")],
               check=False)
    assert proc.returncode == 2 and f"{tmp_path / 'vit.npz'} not found" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
