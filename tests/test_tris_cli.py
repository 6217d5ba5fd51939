"""TRIS through ``trainval_model.py -m test`` and ``demo.py`` on the generated sample dataset, straight from a TRIS
``.pth`` named as the authors release them (``stage1_refcoco.pth`` for ``-d unc``), with the sample set's CLIP BPE
merges file (``data/bpe_simple_vocab_16e6.txt.gz``, real format, ids up to 49407).

The checkpoint is the golden's stage-1 one (reduced CLIP RN50, 64 wide) with its 512-row token embedding extended to
CLIP's 49408 rows (seeded rows appended; the golden's vocabulary was reduced), written in torch's zip format by the
crafted-pickle helpers of ``test_weights_io``.
"""
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from tests.test_restr_cli import write_state_dict_pth
from tests.test_trainval import metric_block, run

SIZE = 96          # the golden's TRIS input size (any size runs; the attention pool is not used)
N_TOKENS = 49408


def extended(state, key, seed):
    """``state`` with its token-embedding table ``key`` extended to CLIP's N_TOKENS rows (seeded rows × 0.02)."""
    table = state[key]
    extra = np.random.default_rng(seed).standard_normal((N_TOKENS - len(table), table.shape[1])).astype(np.float32)
    return dict(state, **{key: np.concatenate([table, 0.02 * extra])})


@pytest.fixture(scope="module")
def tris_folder(golden_dir, tmp_path_factory):
    from models import tris
    from util.pth import load_pth

    path = golden_dir / "tris" / "tris_stage1_checkpoint.pth"
    state = extended(tris.model_state_dict(load_pth(str(path)), str(path)), "backbone.token_embedding.weight", 0)
    folder = tmp_path_factory.mktemp("tris")
    write_state_dict_pth(folder / "stage1_refcoco.pth", state)
    return folder


def common(sample, folder):
    return ["-d", "unc", "-n", "TRIS_stage1", "-f", str(folder), "--img-size", str(SIZE), "--batch-root",
            str(sample), "--data-dir", str(sample / "data")]


def test_test_mode_from_the_released_checkpoint_name(sample, tris_folder):
    out = run(["-m", "test", "-t", "val", *common(sample, tris_folder), "-i", "0"]).stdout
    assert f"Loading trained weights from {tris_folder / 'stage1_refcoco.pth'}" in out
    block = metric_block(out, "without DenseCRF")
    assert [line.split(" = ")[0] for line in block[1:6]] == [f"precision@{t}" for t in (0.5, 0.6, 0.7, 0.8, 0.9)]
    assert re.fullmatch(r"overall IoU = \d\.\d{6}; mean IoU = \d\.\d{6}", block[6])
    result = json.loads((tris_folder / "stage1_refcoco.pth.unc_val.json").read_text())
    n_val = len([f for f in os.listdir(sample / "unc" / "val_batch") if f.endswith(".npz")])
    assert result["model"] == "TRIS_stage1" and result["without_dcrf"]["samples"] == n_val
    assert 0 < result["without_dcrf"]["overall_iou"] < 1
    own = result["original_metrics"]
    assert re.search(r"TRIS validate\(\): mIoU = [0-9.]+; oIoU = [0-9.]+; PointM = [0-9.]+", out)
    assert own["oIoU"] == pytest.approx(100 * result["without_dcrf"]["overall_iou"], rel=1e-9)
    assert own["mIoU"] == pytest.approx(100 * result["without_dcrf"]["mean_iou"], rel=1e-9)


def test_demo_from_the_checkpoint_writes_mask_and_overlay(sample, tris_folder, tmp_path):
    import demo

    image = next((sample / "data" / "coco" / "images").rglob("*.jpg"))
    prefix = tmp_path / "tris"
    assert demo.main(["--img", str(image), "--text", "the red square on the left", "-n", "TRIS_stage1", "-f",
                      str(tris_folder), "-i", "0", "--img-size", str(SIZE), "--data-dir",
                      str(tmp_path / "no_vocabulary_needed"), "--out", str(prefix)]) == 1
    assert demo.main(["--img", str(image), "--text", "the red square on the left", "-n", "TRIS_stage1", "-f",
                      str(tris_folder), "-i", "0", "--img-size", str(SIZE), "--data-dir", str(sample / "data"),
                      "--out", str(prefix)]) == 0
    mask = np.asarray(Image.open(f"{prefix}_mask.png"))
    assert mask.shape == np.asarray(Image.open(image)).shape[:2] and set(np.unique(mask)) <= {0, 255}
    assert (mask == 255).any() and Image.open(f"{prefix}_overlay.png").size[0] == mask.shape[1]


def test_tris_command_line_errors_are_one_line(sample, tris_folder, tmp_path):
    proc = run(["-m", "test", "-t", "val", *common(sample, tris_folder), "-i", "0", "--data-dir",
                str(tmp_path)], check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
    assert len(lines) == 1 and "bpe_simple_vocab_16e6.txt.gz: no such file" in lines[0], proc.stdout[-2000:]
    proc = run(["-m", "test", "-t", "val", *common(sample, tris_folder), "-i", "0", "-c"], check=False)
    assert proc.returncode == 2 and "-c (DenseCRF) is not available for -n TRIS_stage1" in proc.stderr
