"""build_batches.py end to end on the generated sample dataset (in-process runs, and subprocesses for bad input)."""
import filecmp
import logging
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

import build_batches
from util.refer import Refer
from util.sample_data import make_sample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [("unc", None, s) for s in ("train", "val", "testA", "testB")] + \
        [("unc+", None, s) for s in ("train", "val", "testA", "testB")] + \
        [("Gref", None, s) for s in ("train", "val")] + [("Gref", "umd", s) for s in ("train", "val", "test")] + \
        [("referit", None, s) for s in ("trainval", "test")]


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory):
    return make_sample(str(tmp_path_factory.mktemp("sample_bb")))


def _argv(root, out, d, split_by, t, *extra):
    return ["-d", d, "-t", t, "--data-root", root, "--output-dir", out] + \
           (["--split-by", split_by] if split_by else []) + list(extra)


def _expected_pairs(root, d, split_by, t):
    if d == "referit":
        import json
        q = json.load(open(os.path.join(root, "data", f"referit_query_{t}.json")))
        return sum(len(v) for v in q.values())
    ds = {"unc": "refcoco", "unc+": "refcoco+", "Gref": "refcocog"}[d]
    r = Refer(os.path.join(root, "external/refer/data"), ds, split_by or ("google" if d == "Gref" else "unc"))
    return sum(len(r.refs[i]["sentences"]) for i in r.ref_ids(t))


@pytest.mark.parametrize("d,split_by,t", CASES)
def test_keys_dtypes_counts(sample_root, tmp_path, d, split_by, t):
    assert build_batches.main(_argv(sample_root, str(tmp_path), d, split_by, t)) == 0
    name = "Gref_umd" if split_by == "umd" else d
    folder = tmp_path / name / f"{t}_batch"
    files = os.listdir(folder)
    n = _expected_pairs(sample_root, d, split_by, t)
    assert n > 0 and sorted(files) == sorted(f"{name}_{t}_{i}.npz" for i in range(n))
    for f in sorted(files)[:4]:
        z = np.load(folder / f)
        assert sorted(z.files) == ["im_batch", "mask_batch", "sent_batch", "text_batch"]
        assert z["text_batch"].dtype == np.int64 and z["text_batch"].shape == (20,)
        assert z["im_batch"].dtype == np.uint8 and z["im_batch"].ndim == 3 and z["im_batch"].shape[2] == 3
        assert z["mask_batch"].dtype == np.bool_ and z["mask_batch"].shape == z["im_batch"].shape[:2]
        assert z["sent_batch"].shape == (1,) and z["sent_batch"].dtype.kind == "U"
        if "train" in t:
            assert z["im_batch"].shape == (320, 320, 3)


def test_jobs_identical_and_rerun(sample_root, tmp_path, caplog):
    one, two = tmp_path / "j1", tmp_path / "j2"
    assert build_batches.main(_argv(sample_root, str(one), "unc", None, "train", "-j", "1")) == 0
    assert build_batches.main(_argv(sample_root, str(two), "unc", None, "train", "-j", "2")) == 0
    folder = "unc/train_batch"
    names = sorted(os.listdir(one / folder))
    _, mismatch, errors = filecmp.cmpfiles(one / folder, two / folder, names, shallow=False)
    assert sorted(os.listdir(two / folder)) == names and not mismatch and not errors
    mtimes = {n: os.stat(one / folder / n).st_mtime_ns for n in names}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="build_batches"):
        assert build_batches.main(_argv(sample_root, str(one), "unc", None, "train")) == 0
    assert f"0 samples written, {len(names)} already present" in caplog.text
    assert {n: os.stat(one / folder / n).st_mtime_ns for n in names} == mtimes


def test_img_size(sample_root, tmp_path):
    assert build_batches.main(_argv(sample_root, str(tmp_path), "referit", None, "trainval", "--img-size", "64")) == 0
    z = np.load(tmp_path / "referit/trainval_batch/referit_trainval_0.npz")
    assert z["im_batch"].shape == (64, 64, 3) and z["mask_batch"].shape == (64, 64)


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, os.path.join(REPO, "build_batches.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def _one_line_errors(stderr):
    assert "Traceback" not in stderr
    return [l for l in stderr.splitlines() if ": ERROR: " in l or ": WARNING: " in l]


def test_usage_errors(tmp_path):
    r = _cli("-d", "nope", "-t", "train", "--output-dir", str(tmp_path))
    assert r.returncode == 2 and _one_line_errors(r.stderr) == [
        "build_batches: ERROR: unknown dataset 'nope' (choose from unc, unc+, Gref, referit)"]
    r = _cli("-d", "unc", "-t", "test", "--output-dir", str(tmp_path))
    assert r.returncode == 2 and len(_one_line_errors(r.stderr)) == 1 and "unknown split 'test'" in r.stderr
    r = _cli("-d", "unc", "-t", "val", "--data-root", str(tmp_path), "--output-dir", str(tmp_path))
    assert r.returncode == 1 and "vocabulary file not found" in r.stderr and len(_one_line_errors(r.stderr)) == 1
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "vocabulary_Gref.txt").write_text("<pad>\n<go>\n<eos>\n<unk>\n")
    r = _cli("-d", "unc", "-t", "val", "--data-root", str(tmp_path), "--output-dir", str(tmp_path))
    assert r.returncode == 1 and _one_line_errors(r.stderr) == [
        f"build_batches: ERROR: annotation file not found: "
        f"{os.path.join(str(tmp_path), 'external', 'refer', 'data', 'refcoco', 'refs(unc).p')}"]


def test_bad_inputs(tmp_path):
    """Missing and corrupt images, an empty sentence and a code-carrying pickle, on a copy of the sample set."""
    root = make_sample(str(tmp_path / "root"))
    refs_path = os.path.join(root, "external/refer/data/refcoco/refs(unc).p")
    with open(refs_path, "rb") as f:
        refs = pickle.load(f)
    val = sorted((r for r in refs if r["split"] == "val"), key=lambda r: r["ref_id"])
    val[0]["sentences"][0]["sent"] = "  "
    img_dir = os.path.join(root, "data/coco/images/train2014")
    img = lambda r: os.path.join(img_dir, f"COCO_train2014_{r['image_id']:012d}.jpg")
    others = [r for r in val if r["image_id"] != val[0]["image_id"]]
    os.remove(img(others[0]))
    bad = [r for r in others if r["image_id"] != others[0]["image_id"]][0]
    with open(img(bad), "r+b") as f:
        f.truncate(300)
    with open(refs_path, "wb") as f:
        pickle.dump(refs, f, protocol=2)
    out = tmp_path / "out"
    r = _cli("-d", "unc", "-t", "val", "--data-root", root, "--output-dir", str(out))
    lines = _one_line_errors(r.stderr)
    assert r.returncode == 0, r.stderr
    assert any("skipping empty sentence" in l for l in lines)
    assert any("missing image" in l for l in lines) and any("unreadable image" in l for l in lines)
    assert "1 empty sentence" in r.stderr and "missing image" in r.stderr and "unreadable image" in r.stderr
    assert not [f for f in os.listdir(out / "unc/val_batch") if not f.endswith(".npz")]
    for f in os.listdir(out / "unc/val_batch"):
        np.load(out / "unc/val_batch" / f)["im_batch"]

    class Evil:
        def __reduce__(self):
            return os.system, ("touch " + str(tmp_path / "pwned"),)
    with open(os.path.join(root, "external/refer/data/refcoco+/refs(unc).p"), "wb") as f:
        pickle.dump([Evil()], f, protocol=2)
    r = _cli("-d", "unc+", "-t", "val", "--data-root", root, "--output-dir", str(out))
    assert r.returncode == 1 and not (tmp_path / "pwned").exists()
    assert len(_one_line_errors(r.stderr)) == 1 and "refusing to load global posix.system" in r.stderr


@pytest.mark.parametrize("layout", ["cmpc_rrn", "rmi"])
def test_referit_query_file_in_either_layout(sample_root, tmp_path, layout):
    """``-d referit`` reads ``data/referit_query_<split>.json`` (CMPC/RRN) or ``data/referit/referit_query_<split>.json``
    (RMI), whichever exists; both give the same samples."""
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (root / "data" / "referit").mkdir()
    for name in ("vocabulary_referit.txt",):
        shutil.copy2(os.path.join(sample_root, "data", name), root / "data" / name)
    for name in ("images", "mask"):
        (root / "data" / "referit" / name).symlink_to(os.path.join(sample_root, "data", "referit", name))
    query = os.path.join(sample_root, "data", "referit_query_test.json")
    target = root / "data" / ("referit" if layout == "rmi" else "") / "referit_query_test.json"
    shutil.copy2(query, target)
    out = tmp_path / "out"
    assert build_batches.main(_argv(str(root), str(out), "referit", None, "test")) == 0
    written = sorted(os.listdir(out / "referit" / "test_batch"))
    assert len(written) == _expected_pairs(sample_root, "referit", None, "test")


def test_referit_query_file_missing_names_both_paths(sample_root, tmp_path):
    root = tmp_path / "root"
    (root / "data" / "referit").mkdir(parents=True)
    shutil.copy2(os.path.join(sample_root, "data", "vocabulary_referit.txt"), root / "data")
    r = _cli("-d", "referit", "-t", "test", "--data-root", str(root), "--output-dir", str(tmp_path / "out"))
    assert r.returncode == 1
    errors = _one_line_errors(r.stderr)
    assert len(errors) == 1
    assert (f"looked for {root}/data/referit/referit_query_test.json (RMI's layout) and "
            f"{root}/data/referit_query_test.json (CMPC's and RRN's)") in errors[0]
