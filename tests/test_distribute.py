"""``--strategy mirrored`` (two logical CPU devices) and ``--strategy multiworker`` (two local worker processes)
train to the same losses and weights as one device with the same global batch (1e-5 relative after 3 steps), and
only the chief writes snapshots."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import REPO, SAMPLE_TRAIN_SIZE as SIZE
from tests.test_train_summaries import read_scalars

STEPS, GLOBAL_BATCH, MODEL = 3, 2, "LSTM_model"
TOL = 1e-5
# Split the CPU into two logical devices before TensorFlow initialises them, then run the CLI.
TWO_CPUS = ("import sys, tensorflow as tf; cpu = tf.config.list_physical_devices('CPU')[0]; "
            "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2); "
            "import trainval_model; sys.exit(trainval_model.main(sys.argv[1:]))")


def train_args(sample, folder, strategy):
    return ["-m", "train", "-d", "unc", "-t", "train", "-n", MODEL, "-f", str(folder), "--img-size", str(SIZE),
            "--batch-root", str(sample), "--data-dir", str(sample / "data"), "--init-weights", "random",
            "-bs", str(GLOBAL_BATCH), "-i", str(STEPS), "-s", str(STEPS), "--log-every", "1",
            "--strategy", strategy, "--logdir", str(folder / "logs"), "--summary-every", "1"]


def run_cli(args, prefix=(), env=None, timeout=300):
    cmd = [sys.executable, *prefix, *([] if prefix else [str(REPO / "trainval_model.py")]), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def snapshot(folder):
    reader = tf.train.load_checkpoint(str(folder / f"unc_deeplab_LSTM_iter_{STEPS}"))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map() if "OBJECT_GRAPH" not in k}


def assert_same_run(folder, reference):
    costs, ref_costs = read_scalars(folder / "logs")["loss/cost"], read_scalars(reference / "logs")["loss/cost"]
    assert sorted(costs) == list(range(STEPS))
    for step in range(STEPS):
        assert abs(costs[step] - ref_costs[step]) <= TOL * abs(ref_costs[step]), (step, costs, ref_costs)
    got, want = snapshot(folder), snapshot(reference)
    assert got.keys() == want.keys()
    # Per variable (weights and Adam slots), ‖a − b‖ / ‖b‖. Not element-wise: the first Adam updates are
    # ±lr · g / (|g| + ε), so an element whose gradient is nearly cancelled (|g| ~ rounding of the batch sum) moves
    # by a different fraction of lr when the batch sum is re-associated across replicas (a handful of elements of
    # the 1M-element conv1/DW differ by up to ~2e-5 absolute while the variable agrees to ~1e-6 in norm).
    worst = max(float(np.linalg.norm((got[k] - want[k]).ravel()) / max(float(np.linalg.norm(want[k].ravel())), 1e-30))
                for k in want if want[k].dtype.kind == "f")
    assert worst <= TOL, worst
    return worst


@pytest.fixture(scope="module")
def single(sample, tmp_path_factory):
    folder = tmp_path_factory.mktemp("single")
    run_cli(train_args(sample, folder, "none"))
    return folder


@pytest.mark.slow
def test_mirrored_two_logical_cpus_equals_one_device(sample, single, tmp_path):
    out = run_cli(train_args(sample, tmp_path, "mirrored"), prefix=("-c", TWO_CPUS))
    assert "mirrored: 2 replicas, 1 samples each per step" in out
    assert_same_run(tmp_path, single)


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow
def test_multiworker_two_local_workers_equals_one_device(sample, single, tmp_path):
    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    procs = []
    for task in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": {"worker": workers},
                                                     "task": {"type": "worker", "index": task}}))
        procs.append(subprocess.Popen([sys.executable, str(REPO / "trainval_model.py"),
                                       *train_args(sample, tmp_path, "multiworker")],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env))
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "chief: True" in outs[0] and "chief: False" in outs[1]
    assert outs[0].count("snapshot saved to") == 1 and "snapshot saved to" not in outs[1]
    assert_same_run(tmp_path, single)
