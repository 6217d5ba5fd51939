"""external/convert_snapshot.py: an original-style TF1 training snapshot → our TF2 snapshot, optimizer state included."""
import subprocess
import sys

import numpy as np
import tensorflow as tf

from models import build_model
from models.backbone import seeded_weights
from tests.conftest import REPO
from util.checkpoints import save_tf1_checkpoint
from util.optim import TF1Adam
from util.snapshots import restore_model


def trained_state(seed):
    """An RRN at 64×64 (its peepholes fix the size) with seeded weights and one Adam step of optimizer state."""
    model = build_model("RRN_model", vocab_size=40, image_size=64, seed=seed)
    for name, value in seeded_weights(seed).items():
        model.backbone.vars[name].assign(value)
    head = model.head
    opt = TF1Adam(model.train_variables(), 2.5e-4, head.LR_DECAY_STEPS, head.STEP_NAME)
    rng = np.random.default_rng(seed)
    opt.apply_gradients({n: tf.constant(rng.normal(size=v.shape), tf.float32) for n, v in opt.params.items()})
    return model, opt


def test_training_snapshot_converts_with_its_optimizer_state(tmp_path):
    model, opt = trained_state(seed=3)
    tensors = {n: v.numpy() for n, v in {**model.tf1_variables(), **opt.tf1_variables()}.items()}
    save_tf1_checkpoint(tensors, tmp_path / "unc_iter_1.tfmodel")
    proc = subprocess.run([sys.executable, str(REPO / "external" / "convert_snapshot.py"),
                           str(tmp_path / "unc_iter_1.tfmodel"), str(tmp_path / "unc_iter_1"), "-n", "RRN_model",
                           "--with-optimizer"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "wrote" in proc.stdout and "optimizer" in proc.stdout

    fresh, fresh_opt = trained_state(seed=4)
    assert restore_model(fresh, str(tmp_path / "unc_iter_1"), fresh_opt) == {"format": "tf2"}
    for name, var in {**fresh.tf1_variables(), **fresh_opt.tf1_variables()}.items():
        np.testing.assert_array_equal(var.numpy(), tensors[name], err_msg=name)
    assert float(fresh_opt.step) == 1.0


def test_missing_tensor_stops_the_conversion(tmp_path):
    model, _ = trained_state(seed=5)
    tensors = {n: v.numpy() for n, v in model.tf1_variables().items()}
    del tensors["text_objseg/score/biases"]
    save_tf1_checkpoint(tensors, tmp_path / "unc_iter_2.tfmodel")
    proc = subprocess.run([sys.executable, str(REPO / "external" / "convert_snapshot.py"),
                           str(tmp_path / "unc_iter_2.tfmodel"), str(tmp_path / "out"), "-n", "RRN_model"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert "tensor text_objseg/score/biases is missing" in proc.stdout
    assert not list(tmp_path.glob("out*"))
