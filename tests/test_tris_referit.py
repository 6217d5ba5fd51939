"""``trainval_model.py -m test -n TRIS_stage1 -d referit --data-root DIR``: TRIS's ReferIt evaluation
(``validate_referit.py``) from TRIS's pickled annotations (``models.tris_referit.ReferItEvalSet`` through
``TRISSpec.test_source``), on the sample set's ``data/referit/annotations/test.pickle`` (``util/sample_data.py``)
and on hand-made pickles; against the same model evaluated from the ``.npz`` test batches of the same images and
sentences (``build_batches.py -d referit``, the ``.mat`` masks).

The models are ``tests/test_tris_cli.py``'s (the golden's reduced stage 1, 96×96) saved as ``stage1_referit.pth``
and ``tests/test_tris_eval_refer.py``'s stage 2 as ``stage2_referit.pth``.
"""
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests import test_tris_cli, test_tris_eval_refer
from tests.test_tris_eval_refer import recorded_run, run

SIZE = test_tris_cli.SIZE
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
tris_folder = test_tris_cli.tris_folder        # module fixtures, shared
stage2_folder = test_tris_eval_refer.stage2_folder


@pytest.fixture(scope="module")
def referit_folder(tris_folder, tmp_path_factory):
    """The stage-1 test checkpoint under TRIS's ReferIt release name."""
    folder = tmp_path_factory.mktemp("tris_referit")
    shutil.copy(tris_folder / "stage1_refcoco.pth", folder / "stage1_referit.pth")
    return folder


def command(sample, folder, *extra):
    return ["-m", "test", "-t", "test", "-d", "referit", "-n", "TRIS_stage1", "-f", str(folder), "-i", "0",
            "--img-size", str(SIZE), "--batch-root", str(sample), "--data-dir", str(sample / "data"), *extra]


def one_error(out):
    """The single ``error:`` line of a failed run (asserts there is exactly one and no traceback)."""
    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in out, out[-2000:]
    return errors[0]


def rle(mask):
    """COCO RLE of a bool mask with a str ``counts`` (as json-read refclef annotations hold it)."""
    from pycocotools import mask as cocomask

    encoded = cocomask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(encoded["size"]), "counts": encoded["counts"].decode("ascii")}


def write_referit(root, content, images, protocol=2):
    """``<root>/data/referit/annotations/test.pickle`` = ``content`` and gray JPEGs of the given sizes
    {image key: (h, w)} under ``images/``; returns the pickle's path."""
    folder = root / "data" / "referit"
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    for key, (h, w) in images.items():
        Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(folder / "images" / f"{key}.jpg")
    path = folder / "annotations" / "test.pickle"
    path.write_bytes(pickle.dumps(content, protocol=protocol))
    return path


def hand_made(root):
    """Two images in NON-sorted key order, whose samples are worked out by hand in ``test_hand_made_pickle``:
    image "7" (10 × 20, 5 % = 10 px²; a numpy scalar id) with a box of area 20 (kept; two overlapping RLEs, a second
    box, numpy boxes: pickle protocol 2 stores them through ``_codecs.encode``), one of area exactly 10 (left out: the filter is >) and a float
    box (kept, not cast); image "3" (8 × 8, 5 % = 3.2) with a box of area 4 (kept)."""
    a, b, c = (np.zeros((10, 20), bool) for _ in range(3))
    a[0:5, 0:4] = True
    b[2:5, 2:6] = True
    c[1:9, 1:10] = True
    d = np.zeros((8, 8), bool)
    d[3:5, 3:5] = True
    content = {
        "7": {"image_id": np.int64(7), "size": (10, 20, 3), "annotations": [
            {"query": "left thing", "bbox": np.array([[0, 0, 4, 5], [10, 0, 19, 9]]), "segmentation": [rle(a), rle(b)],
             "category": {1}},
            {"query": "thin thing", "bbox": [[0, 0, 2, 5]], "segmentation": [rle(a)]},
            {"query": "float box", "bbox": [[1.5, 0.5, 9.5, 9.5]], "segmentation": [rle(c)]}]},
        "3": {"image_id": 3, "size": (8, 8, 3), "annotations": [
            {"query": "small square", "bbox": [[3, 3, 5, 5]], "segmentation": [rle(d)]}]},
    }
    return write_referit(root, content, {"7": (10, 20), "3": (8, 8)}), (a, b, c, d)


def test_hand_made_pickle(tmp_path):
    from models.tris_referit import ReferItEvalSet

    path, (a, b, c, d) = hand_made(tmp_path)
    images = ReferItEvalSet(str(tmp_path), "test")
    assert images.path == str(path) and images.image_keys == ["7", "3"]
    assert images.keys == [(0, 0), (0, 2), (1, 0)] and images.left_out == 1
    assert [images.name(*k) for k in images.keys][1] == f"{path} image 7 annotation 2"
    first, floats, square = (images.sample(*k) for k in images.keys)
    np.testing.assert_array_equal(first["target"], a.astype(np.uint8) + b.astype(np.uint8))
    assert first["target"].dtype == np.uint8 and first["target"][3, 3] == 2
    np.testing.assert_array_equal(first["mask_batch"], a | b)
    np.testing.assert_array_equal(first["boxes"], [[0, 0, 4, 5], [10, 0, 19, 9]])
    assert first["sent_batch"].tolist() == ["left thing"] and first["im_batch"].shape == (10, 20, 3)
    assert floats["boxes"].dtype == np.float64
    np.testing.assert_array_equal(floats["boxes"], [[1.5, 0.5, 9.5, 9.5]])
    np.testing.assert_array_equal(floats["target"], c)
    np.testing.assert_array_equal(square["target"], d)
    assert square["im_batch"].shape == (8, 8, 3)


def test_sample_pickles_read_as_the_original(sample):
    """The sample set's test.pickle read with plain pickle and pycocotools, the filter computed from the image
    files: the same samples in the same order; the tiny object and one 18×18 square on a 91×120 image (324 ≤ 546
    px²) are left out."""
    from pycocotools import mask as cocomask

    from models.tris_referit import ReferItEvalSet

    images = ReferItEvalSet(str(sample), "test")
    with open(sample / "data" / "referit" / "annotations" / "test.pickle", "rb") as f:
        content = pickle.load(f, encoding="latin1")
    expected, dropped = [], []
    for key, entry in content.items():
        with Image.open(sample / "data" / "referit" / "images" / f"{key}.jpg") as img:
            h, w = img.height, img.width
        for ann in entry["annotations"]:
            (x1, y1, x2, y2), = ann["bbox"]
            (expected if (x2 - x1) * (y2 - y1) > 0.05 * h * w else dropped).append((key, ann))
    assert len(images) == len(expected) == 11 and images.left_out == len(dropped) == 4
    assert {ann["query"] for _, ann in dropped} == {"tiny yellow square", "square on the left", "green square",
                                                     "square on the right"}
    for (i, a), (key, ann) in zip(images.keys, expected):
        s = images.sample(i, a)
        assert images.image_keys[i] == key and s["sent_batch"].tolist() == [ann["query"]]
        np.testing.assert_array_equal(s["target"], cocomask.decode(ann["segmentation"]).sum(axis=2))
        np.testing.assert_array_equal(s["boxes"], ann["bbox"])


def test_refused_global_is_one_line(tmp_path):
    import collections

    from models.tris_referit import ReferItEvalSet

    path = write_referit(tmp_path, {"1": {"annotations": [collections.OrderedDict(query="x")]}}, {"1": (8, 8)})
    with pytest.raises(ValueError) as e:
        ReferItEvalSet(str(tmp_path), "test")
    assert str(e.value) == f"{path}: not TRIS's ReferIt annotation pickle (refused global collections.OrderedDict)"


@pytest.mark.parametrize("ann, problem", [
    ({"query": 3, "bbox": [[0, 0, 8, 8]], "segmentation": []}, "'query' must be a str, got int"),
    ({"query": "x", "bbox": [0, 0, 8, 8], "segmentation": []}, "'bbox' must be [[x1, y1, x2, y2], ...]"),
    ({"query": "x", "bbox": [[0, 0, 8, 8]], "segmentation": [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]},
     "'segmentation' entries must be COCO RLEs"),
])
def test_malformed_annotation_is_one_line(tmp_path, ann, problem):
    from models.tris_referit import ReferItEvalSet

    path = write_referit(tmp_path, {"1": {"annotations": [ann]}}, {"1": (8, 8)})
    with pytest.raises(ValueError) as e:
        ReferItEvalSet(str(tmp_path), "test")
    assert str(e.value).startswith(f"{path} image '1' annotation 0: {problem}") and "\n" not in str(e.value)


def test_input_problems_are_one_line(sample, referit_folder, tmp_path, caplog):
    from models.tris_referit import ANNOTATIONS_URL

    status, out = run(command(sample, referit_folder, "--data-root", str(tmp_path)), caplog)
    missing = tmp_path / "data" / "referit" / "annotations" / "test.pickle"
    assert status == 1 and f"{missing} not found (TRIS's ReferIt annotations: unzip {ANNOTATIONS_URL}" \
        in one_error(out)
    argv = command(sample, referit_folder, "--data-root", str(sample))
    argv[argv.index("-t") + 1] = "val"
    status, out = run(argv, caplog)
    assert status == 1 and "annotations/val.pickle not found" in one_error(out) \
        and "the released annotations are train and test only" in one_error(out)
    write_referit(tmp_path, {"5": {"annotations": []}}, {})
    status, out = run(command(sample, referit_folder, "--data-root", str(tmp_path)), caplog)
    assert status == 1 and f"{tmp_path}/data/referit/images/5.jpg: no such file (the image of " \
        in one_error(out)


def test_training_on_referit_stays_refused(sample):
    from models.tris_spec import TRISSpec
    from models.tris_train import train_input_problem
    from util.config import RunConfig

    cfg = RunConfig(mode="train", model="TRIS_stage1", dataset="referit", split="train", data_root=str(sample),
                 data_dir=str(sample / "data"))
    assert train_input_problem(TRISSpec("TRIS_stage1", None, 1), cfg) == (
        "-m train -n TRIS_stage1 reads RefCOCO-style refer files: -d unc, unc+ or Gref (not referit: TRIS trains "
        "on RefCOCO/+/g only; ReferIt is evaluated with -m test --data-root)")


@pytest.fixture(scope="module")
def referit_batches(sample, tmp_path_factory):
    """``build_batches.py -d referit -t test`` of the sample set (original sizes) → the batch root."""
    root = tmp_path_factory.mktemp("referit_batches")
    subprocess.run([sys.executable, os.path.join(REPO, "build_batches.py"), "-d", "referit", "-t", "test",
                    "--data-root", str(sample), "--output-dir", str(root)], check=True, capture_output=True, cwd=REPO)
    return root


def test_referit_evaluation_reports_hit_and_matches_the_npz_path(sample, referit_folder, referit_batches, caplog,
                                                                   monkeypatch):
    json_path = referit_folder / "stage1_referit.pth.referit_test.json"
    records, result, out = recorded_run(command(sample, referit_folder, "--data-root", str(sample)), caplog,
                                        monkeypatch, json_path)
    pickle_path = sample / "data" / "referit" / "annotations" / "test.pickle"
    assert len(records) == result["without_dcrf"]["samples"] == 11 and result["skipped_unreadable"] == []
    assert f"TRIS_stage1: 11 sentences of 4 ReferIt test images from {pickle_path} (4 annotations" in out
    own = result["original_metrics"]
    assert set(own) == {"title", "mIoU", "oIoU", "Hit", "PointM"}
    hits = []
    for record in records:
        row, col = np.unravel_index(np.argmax(record["norm_pred"]), record["norm_pred"].shape)
        (x1, y1, x2, y2), = record["boxes"]
        hits.append(x1 <= col <= x2 and y1 <= row <= y2)
    assert own["Hit"] == pytest.approx(100 * np.mean(hits), abs=1e-12)
    assert own["mIoU"] == pytest.approx(100 * np.mean([r["I"] / r["U"] for r in records]), rel=1e-12)
    assert f"TRIS validate(): mIoU = {own['mIoU']:f}; oIoU = {own['oIoU']:f}; Hit = {own['Hit']:f}; " in out

    # the same images and sentences from the .npz batches (the .mat masks): equal masks, maps and figures; the
    # batches also hold the 4 annotations the filter leaves out
    from models.tris_referit import ReferItEvalSet

    argv = command(sample, referit_folder)
    argv[argv.index("--batch-root") + 1] = str(referit_batches)
    npz, npz_result, _ = recorded_run(argv, caplog, monkeypatch, json_path)
    batch = referit_batches / "referit" / "test_batch"
    batches = [np.load(batch / f"referit_test_{n}.npz") for n in range(len(npz))]
    assert len(npz) == 15 and "Hit" not in npz_result["original_metrics"]
    images = ReferItEvalSet(str(sample), "test")
    for (i, a), record in zip(images.keys, records):
        s = images.sample(i, a)
        same = [n for n, z in enumerate(batches) if str(z["sent_batch"][0]) == s["sent_batch"][0]
                and np.array_equal(z["im_batch"], s["im_batch"])]
        assert len(same) == 1, s["sent_batch"]
        b = npz[same[0]]
        np.testing.assert_array_equal(b["gt"], record["gt"] > 0)
        np.testing.assert_array_equal(b["output"], record["output"])
        np.testing.assert_array_equal(b["hard_pred"], record["hard_pred"])
        assert (b["I"], b["U"], b["hitm"]) == (record["I"], record["U"], record["hitm"])


def test_overlapping_rles_reach_the_metrics(sample, referit_folder, tmp_path, caplog, monkeypatch):
    """The hand-made pickle through ``-m test``: the gt the metrics get is the summed target (value 2 where the
    RLEs overlap), so PointM counts a peak there as a miss (``isCorrectHit``'s ``gt + 1 == 2``)."""
    hand_made(tmp_path)
    json_path = referit_folder / "stage1_referit.pth.referit_test.json"
    records, result, _ = recorded_run(command(sample, referit_folder, "--data-root", str(tmp_path)), caplog,
                                      monkeypatch, json_path)
    assert len(records) == 3 and result["without_dcrf"]["samples"] == 3
    assert records[0]["gt"].max() == 2 and records[0]["gt"].dtype == np.uint8
    for record in records:
        assert record["hitm"] == int(record["gt"][record["max_loc"]] == 1)
    np.testing.assert_array_equal(records[0]["boxes"], [[0, 0, 4, 5], [10, 0, 19, 9]])


def test_stage2_referit_evaluation_reports_hit(sample, stage2_folder, tmp_path, caplog, monkeypatch):
    """``-n TRIS_stage2`` through the same path: the 11 samples, Hit from the recorded maps and boxes."""
    shutil.copy(stage2_folder / "stage2_refcoco.pth", tmp_path / "stage2_referit.pth")
    argv = command(sample, tmp_path, "--data-root", str(sample))
    argv[argv.index("TRIS_stage1")] = "TRIS_stage2"
    records, result, _ = recorded_run(argv, caplog, monkeypatch, tmp_path / "stage2_referit.pth.referit_test.json")
    assert result["model"] == "TRIS_stage2" and result["without_dcrf"]["samples"] == len(records) == 11
    hits = []
    for record in records:
        row, col = record["max_loc"]
        (x1, y1, x2, y2), = record["boxes"]
        hits.append(x1 <= col <= x2 and y1 <= row <= y2)
    assert result["original_metrics"]["Hit"] == pytest.approx(100 * np.mean(hits), abs=1e-12)
