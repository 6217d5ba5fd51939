"""demo.py: one image + one sentence → mask PNG (the image's size) and overlay PNG (title band above the image; the
image region differs from the input exactly where the mask is on), from a snapshot or a SavedModel; one-line errors."""
import logging
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import demo
from tests.conftest import REPO, SAMPLE_TRAIN_SIZE as SIZE
from tests.test_export import TRAIN_STEPS, snapshots


@pytest.fixture(scope="module")
def folders(sample, tmp_path_factory):
    return snapshots(sample, tmp_path_factory)


@pytest.fixture(scope="module")
def image_path(sample):
    return next((sample / "data" / "coco" / "images").rglob("*.jpg"))


def check_outputs(prefix, image_path):
    """Both PNGs exist, the mask has the image's shape, the overlay's image region differs exactly on the mask."""
    image = np.asarray(Image.open(image_path).convert("RGB"))
    mask = np.asarray(Image.open(f"{prefix}_mask.png"))
    overlay = np.asarray(Image.open(f"{prefix}_overlay.png"))
    assert mask.shape == image.shape[:2] and set(np.unique(mask)) <= {0, 255}
    band = overlay.shape[0] - image.shape[0]
    assert band > 0 and overlay.shape[1:] == image.shape[1:]
    assert (overlay[:band] != 255).any()                 # the title is drawn on the band
    changed = (overlay[band:] != image).any(axis=-1)
    assert np.array_equal(changed, mask == 255)
    return mask == 255


def common(sample, image_path, prefix):
    return ["--img", str(image_path), "--img-size", str(SIZE), "--data-dir", str(sample / "data"),
            "--out", str(prefix)]


def test_demo_cli_with_the_briefly_trained_snapshot_and_crf(sample, folders, image_path, tmp_path):
    prefix = tmp_path / "out" / "trained"
    proc = subprocess.run([sys.executable, str(REPO / "demo.py"), "--text", "the bigger red square", "-n", "RRN_model",
                           "-f", str(folders["trained"]), "-i", str(TRAIN_STEPS), "--crf",
                           *common(sample, image_path, prefix)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"wrote {prefix}_mask.png and {prefix}_overlay.png" in proc.stdout
    check_outputs(prefix, image_path)


def test_demo_with_a_nonempty_mask_changes_exactly_the_mask(sample, folders, image_path, tmp_path):
    prefix = tmp_path / "seeded"
    sentence = "the smaller blue square on the right of the big red circle, next to the yellow triangle"
    assert demo.main(["--text", sentence, "-n", "RRN_model", "-f", str(folders["seeded"]), "-i", "0",
                      *common(sample, image_path, prefix)]) == 0
    mask = check_outputs(prefix, image_path)
    assert 0 < mask.sum() < mask.size


def test_overlay_changes_pure_red_pixels_too():
    image = np.array([[[255, 0, 0], [0, 0, 0], [255, 255, 255]], [[255, 0, 0], [0, 255, 255], [7, 8, 9]]], np.uint8)
    mask = np.array([[True, True, True], [False, True, False]])
    out = demo.overlay(image, mask, "a very long sentence that has to be wrapped onto several lines of the band")
    band = out.shape[0] - image.shape[0]
    assert np.array_equal((out[band:] != image).any(axis=-1), mask)


@pytest.mark.parametrize("case", ["image", "snapshot", "vocabulary", "saved_model", "sentence"])
def test_missing_inputs_give_one_line_errors(sample, folders, image_path, tmp_path, caplog, case):
    args = {"image": ["--img", str(tmp_path / "none.jpg"), "-f", str(folders["trained"]), "-i", "20"],
            "snapshot": ["--img", str(image_path), "-f", str(folders["trained"]), "-i", "999"],
            "vocabulary": ["--img", str(image_path), "-f", str(folders["trained"]), "-i", "20",
                           "--vocab-file", str(tmp_path / "none.txt")],
            "saved_model": ["--img", str(image_path), "--saved-model", str(tmp_path / "none")],
            "sentence": ["--img", str(image_path), "--saved-model", str(tmp_path / "none"), "--text", " \t"]}[case]
    text = [] if case == "sentence" else ["--text", "man"]
    with caplog.at_level(logging.ERROR, logger="demo"):
        assert demo.main([*args, *text, "-n", "RRN_model", "--img-size", str(SIZE),
                          "--data-dir", str(sample / "data"), "--out", str(tmp_path / "x")]) == 1
    message = caplog.records[-1].getMessage()
    assert "\n" not in message
    expected = {"image": r"image .*none\.jpg not found", "snapshot": "snapshot not found",
                "vocabulary": r"vocabulary file .*none\.txt not found", "saved_model": "SavedModel .* not found",
                "sentence": "empty sentence"}[case]
    assert re.search(f"^error: {expected}", message), message
    assert not list(tmp_path.glob("x_*.png"))
