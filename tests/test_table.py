"""``trainval_model.py -m table`` (util/table.py) and the published figures (benchmarks/published.json).

CMPC and RMI are trained 2 steps on the sample set at 64×64 (once per session); each table test runs in its own
copy of the snapshot and of a batch root holding a 3-sample ``unc val`` (and for CMPC a 2-sample ``unc testA``: val
samples renumbered), so the runs stay short. Runs are in-process (``trainval_model.main``; the table is logged,
read with ``caplog``); a split evaluated anew logs ``<dataset> <split>: evaluating``, a reused one ``cached result
reused``.
"""
import json
import logging
import os
import shutil

import pytest

import trainval_model
from models import MODEL_NAMES, canonical_name
from tests.conftest import SAMPLE_TRAIN_SIZE as SIZE
from util.table import TABLE_SPLITS, coverage, load_published, published_problems

STEPS = 2
MODELS = {"CMPC_model": ["-emb"], "RMI": ["-w", "deeplab"]}


def cli(args, caplog):
    """Run ``trainval_model.py args`` in-process; returns the logged messages of that run (asserting exit status
    0)."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        status = trainval_model.main(args)
    assert status == 0, caplog.text[-3000:]
    return "\n".join(record.getMessage() for record in caplog.records)


@pytest.fixture(scope="session")
def table_snapshots(sample, tmp_path_factory):
    """{model: folder holding its snapshot of iteration STEPS}, trained once per session."""
    root = tmp_path_factory.getbasetemp() / "table_snapshots"
    folders = {model: root / model for model in MODELS}
    if not (root / "done").exists():
        for model, extra in MODELS.items():
            assert trainval_model.main(
                ["-m", "train", "-d", "unc", "-t", "train", "-n", model, "-f", str(folders[model]), *extra,
                 "--img-size", str(SIZE), "--batch-root", str(sample), "--data-dir", str(sample / "data"),
                 "--init-weights", "random", "-i", str(STEPS), "-s", str(STEPS), "--log-every", "1"]) == 0
        (root / "done").touch()
    return folders


def tiny_batches(sample, root, with_testA):
    """``root/unc/val_batch`` (the first 3 val samples) and, ``with_testA``, ``root/unc/testA_batch`` (val samples
    3, 4 as 0, 1)."""
    src = sample / "unc" / "val_batch"
    for split, picks in (("val", (0, 1, 2)), ("testA", (3, 4)))[:2 if with_testA else 1]:
        folder = root / "unc" / f"{split}_batch"
        folder.mkdir(parents=True)
        for n, k in enumerate(picks):
            shutil.copy2(src / f"unc_val_{k}.npz", folder / f"unc_{split}_{n}.npz")


def evaluated(log_text):
    return sorted(line.split(":")[0] for line in log_text.splitlines() if ": evaluating snapshot" in line)


def table_args(model, folder, batch_root, sample):
    return ["-m", "table", "-n", model, "-f", str(folder), "-i", str(STEPS), "-c", *MODELS[model],
            "--img-size", str(SIZE), "--batch-root", str(batch_root), "--data-dir", str(sample / "data")]


def check_first_table(out, folder, model, published, present):
    """The first run's table: both DenseCRF sections, the published figure beside ours, the missing splits with
    their commands, JSON and Markdown written with the ``present`` splits evaluated. Returns the JSON report."""
    assert evaluated(out) == sorted(f"{d} {s}" for d, s in present)
    assert "## without DenseCRF" in out and "## with DenseCRF" in out
    assert published in out
    assert "UNC+ val: batches" in out and "`python build_batches.py -d unc+ -t val`" in out
    assert "G-Ref (UMD) test: batches" in out and "`python build_batches.py -d Gref --split-by umd -t test`" in out
    name = canonical_name(model)
    report = json.loads((folder / f"table_{name}_iter_{STEPS}.json").read_text())
    markdown = (folder / f"table_{name}_iter_{STEPS}.md").read_text()
    assert "| overall IoU |" in markdown and "## missing" in markdown and published in markdown
    assert {(s["dataset"], s["split"]) for s in report["splits"] if "missing" not in s} == set(present)
    assert len(report["splits"]) == len(TABLE_SPLITS)
    return report


def test_cmpc_table_rerun_skips_done_splits_and_lists_a_deleted_one(sample, table_snapshots, tmp_path, caplog):
    folder = tmp_path / "ckpt"
    shutil.copytree(table_snapshots["CMPC_model"], folder)
    tiny_batches(sample, tmp_path, with_testA=True)
    args = table_args("CMPC_model", folder, tmp_path, sample)
    out = cli(args, caplog)
    report = check_first_table(out, folder, "CMPC_model", "pub 62.47, Δ", [("unc", "val"), ("unc", "testA")])
    assert "| metric | UNC val | UNC testA |" in out
    present = {(s["dataset"], s["split"]): s for s in report["splits"] if "missing" not in s}
    assert present["unc", "val"]["results"]["without_dcrf"]["samples"] == 3
    assert present["unc", "testA"]["results"]["with_dcrf"]["samples"] == 2

    out = cli(args, caplog)
    assert evaluated(out) == [] and out.count("cached result reused") == 2
    again = json.loads((folder / f"table_CMPC_model_iter_{STEPS}.json").read_text())
    assert [s.get("results") for s in again["splits"]] == [s.get("results") for s in report["splits"]]

    shutil.rmtree(tmp_path / "unc" / "testA_batch")
    out = cli(args, caplog)
    assert evaluated(out) == [] and out.count("cached result reused") == 1
    assert "UNC testA: batches" in out and "`python build_batches.py -d unc -t testA`" in out
    report = json.loads((folder / f"table_CMPC_model_iter_{STEPS}.json").read_text())
    testA = next(s for s in report["splits"] if (s["dataset"], s["split"]) == ("unc", "testA"))
    assert testA["command"] == "python build_batches.py -d unc -t testA"


def test_rmi_table_cache_is_invalidated_by_a_changed_snapshot(sample, table_snapshots, tmp_path, caplog):
    folder = tmp_path / "ckpt"
    shutil.copytree(table_snapshots["RMI"], folder)
    tiny_batches(sample, tmp_path, with_testA=False)
    args = table_args("RMI", folder, tmp_path, sample)
    check_first_table(cli(args, caplog), folder, "RMI", "(pub ?)", [("unc", "val")])
    out = cli(args, caplog)
    assert evaluated(out) == [] and "unc val: cached result reused" in out
    index = next(folder.glob("*.index"))
    os.utime(index, ns=(index.stat().st_atime_ns, index.stat().st_mtime_ns + 10 ** 9))
    assert evaluated(cli(args, caplog)) == ["unc val"]


def test_missing_snapshot_is_listed_with_the_training_command(sample, tmp_path, caplog):
    tiny_batches(sample, tmp_path, with_testA=False)
    out = cli(["-m", "table", "-n", "RRN_model", "-f", str(tmp_path / "none"), "-i", "5", "--img-size", str(SIZE),
               "--batch-root", str(tmp_path), "--data-dir", str(sample / "data")], caplog)
    assert evaluated(out) == []
    assert (f"`python trainval_model.py -m train -d unc -t train -n RRN_model -f {tmp_path / 'none'} -i 5`"
            in out)


def test_published_file_schema_and_coverage():
    doc = load_published()
    assert published_problems(doc) == []
    uncovered = [(model, dataset, split) for model in {canonical_name(n) for n in MODEL_NAMES}
                 for dataset, split in TABLE_SPLITS if coverage(doc, model, dataset, split) is None]
    assert uncovered == []
    cmpc = {(r["dataset"], r["split"]): r["value"] for r in doc["rows"]
            if r["model"] == "CMPC_model" and r["variant"] == "Ours-Updated"}
    assert cmpc["unc", "val"] == 62.47 and cmpc["referit", "test"] == 65.58
    assert all(r["status"] == "verified" for r in doc["rows"] if r["model"] == "CMPC_model")


def test_published_schema_check_names_bad_rows():
    doc = load_published()
    bad = dict(doc["rows"][0], value=None, status="verified")
    del bad["source"]
    doc = dict(doc, rows=[bad, dict(doc["rows"][1], value=None, status="verified")])
    problems = published_problems(doc)
    assert problems[0].startswith("rows[0]: keys ['source']")
    assert problems[1] == "rows[1]: a null value must be marked unverified"
