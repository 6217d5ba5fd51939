"""SaG through ``trainval_model.py -m test`` and ``demo.py`` on the generated sample dataset, with the sample set's
BERT WordPiece vocabulary (``data/weights/bert-base-uncased/vocab.txt``, real format): ``-n SaG_tiny`` (the golden's
reduced sizes) from its seeded initial weights saved as our snapshot. ``--seed`` fixes the slot noise: the same seed
gives the same figures, another seed other ones (the original draws unseeded noise at every evaluation)."""
import json
import re

import numpy as np
import pytest
from PIL import Image

from tests.test_trainval import metric_block, run

MODEL, SIZE = "SaG_tiny", 64


@pytest.fixture(scope="module")
def sag_folder(tmp_path_factory):
    import tensorflow as tf

    from models import model_spec

    folder = tmp_path_factory.mktemp("sag")
    model = model_spec(MODEL).build(image_size=SIZE, seed=0)
    tf.train.Checkpoint(model=model).write(str(folder / "unc_iter_0"))
    return folder


def common(sample, folder):
    return ["-d", "unc", "-n", MODEL, "-f", str(folder), "--img-size", str(SIZE), "--batch-root", str(sample),
            "--data-dir", str(sample / "data")]


def test_test_mode_block_json_and_seeded_noise(sample, sag_folder):
    figures = {}
    for seed in (0, 0, 1):
        out = run(["-m", "test", "-t", "val", *common(sample, sag_folder), "-i", "0", "--seed", str(seed)]).stdout
        block = metric_block(out, "without DenseCRF")
        assert [line.split(" = ")[0] for line in block[1:6]] == [f"precision@{t}" for t in (0.5, 0.6, 0.7, 0.8, 0.9)]
        assert re.search(r"SaG eval_seg\(\): max_cIoU = [0-9.]+; max_mIoU = ", out)
        result = json.loads((sag_folder / "unc_iter_0.unc_val.json").read_text())
        assert result["model"] == MODEL and 0 < result["without_dcrf"]["overall_iou"] < 1
        own = result["original_metrics"]
        assert own["avg_cIoU"] == pytest.approx(100 * result["without_dcrf"]["overall_iou"], rel=1e-9)
        figures.setdefault(seed, []).append((result["without_dcrf"], own))
    assert figures[0][0] == figures[0][1]
    assert figures[1][0] != figures[0][0]


def test_demo_writes_mask_and_overlay(sample, sag_folder, tmp_path):
    import demo

    image = next((sample / "data" / "coco" / "images").rglob("*.jpg"))
    prefix = tmp_path / "sag"
    assert demo.main(["--img", str(image), "--text", "the red square on the left", *common(sample, sag_folder)[2:6],
                      "-i", "0", "--img-size", str(SIZE), "--data-dir", str(sample / "data"),
                      "--out", str(prefix)]) == 0
    mask = np.asarray(Image.open(f"{prefix}_mask.png"))
    assert mask.shape == np.asarray(Image.open(image)).shape[:2] and set(np.unique(mask)) <= {0, 255}
    assert (mask == 255).any() and (mask == 0).any()
