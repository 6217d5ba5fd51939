"""``--precision bf16`` against the fp32 goldens of the original: how far each output lands (README, "Speed and
scale"). bf16 keeps 8 mantissa bits (relative step 2⁻⁸ ≈ 3.9e-3), so these are bounds on an approximation, not
golden checks: the fp32 path is the one the golden tests hold to 1e-5.

Measured (max |bf16 − golden| / max |golden| per tensor, cases 0 / 1): backbone res3b3 1.0e-2 / 9.7e-3, res4b22
1.3e-2 / 1.4e-2, res5c 1.5e-2 / 1.2e-2; CMPC head pred 2.0e-2 / 1.2e-2, sigm 8.3e-3 / 9.3e-3; RRN head pred 1.1e-2 /
7.9e-3, sigm 7.7e-3 / 7.0e-3; the sign of the upsampled logits (the mask) agrees on ≥ 99.3 % of the pixels.
The bounds below leave 2× room for other CPUs' bf16 kernels.
"""
import json
import logging

import numpy as np
import pytest
import tensorflow as tf

from models.backbone import Backbone, seeded_weights
from models.cmpc import CMPCHead
from models.rrn import RRNHead
from util.checkpoints import load_backbone_weights, load_tf1_variables, save_tf1_checkpoint

log = logging.getLogger(__name__)
BF16_REL_BOUND = 4e-2          # max |diff| / max |ref| per output
MASK_AGREEMENT = 0.99          # fraction of pixels whose logit sign equals the golden's


def relative(ours, ref):
    ours = np.asarray(tf.cast(ours, tf.float32), np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def mask_agreement(logits, ref):
    return float(np.mean((np.asarray(tf.cast(logits, tf.float32)) > 0) == (np.asarray(ref) > 0)))


@pytest.mark.parametrize("case", [0, 1])
def test_backbone_bf16_within_bound(golden_dir, tmp_path, case):
    ref = np.load(golden_dir / "deeplab_backbone" / "golden_backbone.npz")
    prefix = tmp_path / "deeplab_resnet_init.ckpt"
    save_tf1_checkpoint(seeded_weights(0), prefix)
    backbone = Backbone()
    load_backbone_weights(backbone, prefix)
    out = tf.function(backbone)(tf.constant(ref[f"case{case}_input"], tf.bfloat16))
    for name in ("res3b3_relu", "res4b22_relu", "res5c_relu"):
        assert out[name].dtype == tf.bfloat16
        diff = relative(out[name], ref[f"case{case}_{name}"])
        log.info("bf16 backbone case%d %s: %.3g", case, name, diff)
        assert diff <= BF16_REL_BOUND, (name, diff)


@pytest.mark.parametrize("case", [0, 1])
def test_cmpc_head_bf16_within_bound(golden_dir, case):
    folder = golden_dir / "cmpc_head"
    manifest = json.loads((folder / "manifest_eval.json").read_text())
    npz = np.load(folder / "golden_CMPC.npz")
    head = CMPCHead(np.zeros(manifest["glove_npy_shape"], np.float32), **manifest["constructor_kwargs"])
    load_tf1_variables(head.tf1_variables(), folder / "golden_CMPC_init.tfmodel")
    features = {name: tf.constant(npz[f"case{case}_{name}"], tf.bfloat16) for name in CMPCHead.FEATURES}
    out = head(features, npz[f"case{case}_words"])
    for name in ("pred", "up", "sigm", "up_c3", "up_c4", "up_c5"):
        diff = relative(out[name], npz[f"case{case}_{name}"])
        log.info("bf16 CMPC case%d %s: %.3g", case, name, diff)
        assert diff <= BF16_REL_BOUND, (name, diff)
    assert mask_agreement(out["up"], npz[f"case{case}_up"]) >= MASK_AGREEMENT


@pytest.mark.parametrize("case", [0, 1])
def test_rrn_head_bf16_within_bound(golden_dir, case):
    folder = golden_dir / "rrn_head"
    manifest = json.loads((folder / "manifest_eval.json").read_text())
    npz = np.load(folder / "golden_RRN.npz")
    head = RRNHead(**manifest["constructor_kwargs"])
    load_tf1_variables(head.tf1_variables(), folder / "golden_RRN_init.tfmodel")
    features = {name: tf.constant(npz[f"case{case}_{name}"], tf.bfloat16) for name in RRNHead.FEATURES}
    out = head(features, tf.constant(npz[f"case{case}_words"]))
    for name in ("pred", "up", "sigm"):
        diff = relative(out[name], npz[f"case{case}_{name}"])
        log.info("bf16 RRN case%d %s: %.3g", case, name, diff)
        assert diff <= BF16_REL_BOUND, (name, diff)
    assert mask_agreement(out["up"], npz[f"case{case}_up"]) >= MASK_AGREEMENT
