"""ReSTR through ``trainval_model.py`` on the generated sample dataset (64×64 training batches), with
``-n ReSTR_tiny`` (the registry's 64-wide ReSTR: the same code and recipe as ``-n ReSTR`` at the golden data's width).

The run trains from the seeded initial weights with ``-lr 0.5``: ReSTR's warm-up lasts 40000 iterations whatever
``-i`` is (as the original), so 40 iterations at its default 1e-5 would not move the weights; 0.5 × t/40000 gives
learning rates up to 5e-4. It stops at 20 and a second run resumes from that snapshot (AdamW step, schedule and
DropPath generator restored); ``-m test`` runs the original evaluation from our snapshot and from a ``.pth`` state_dict
of the same weights (written in torch's zip format by the crafted-pickle helpers of ``test_weights_io``).
"""
import json
import os
import re

import numpy as np
import pytest

from tests.conftest import SAMPLE_TRAIN_SIZE as SIZE
from tests.test_trainval import common, logged_losses, metric_block, run
from tests.test_weights_io import _dict, _tensor, _write_pth

MODEL = "ReSTR_tiny"
TRAIN = ["-i", "40", "-s", "20", "-bs", "4", "-lr", "0.5", "--init-weights", "random", "--log-every", "5"]


@pytest.fixture(scope="module")
def restr_run(sample, tmp_path_factory):
    """40 iterations in two runs: the first stops at 20 (``-st``), the second resumes from its snapshot."""
    folder = tmp_path_factory.mktemp("restr")
    args = ["-m", "train", "-t", "train", *common(sample, MODEL, folder), *TRAIN]
    return folder, run([*args, "-st", "20"]).stdout, run(args).stdout


def _learning_rates(stdout):
    return {int(m.group(1)): float(m.group(2))
            for m in re.finditer(r"iter = (\d+), loss \(cur\) = [0-9.e+-]+, loss \(avg\) = [0-9.e+-]+, lr = ([0-9.e+-]+)",
                                 stdout)}


def test_training_lowers_the_loss_with_restr_recipe(restr_run):
    folder, first, second = restr_run
    losses = {**logged_losses(first), **logged_losses(second)}
    assert sorted(losses) == list(range(0, 40, 5))
    assert np.mean([losses[30], losses[35]]) < 0.75 * losses[0], losses
    lrs = {**_learning_rates(first), **_learning_rates(second)}
    for it, lr in lrs.items():
        assert lr == pytest.approx(0.5 * it / 40000, abs=6e-7), (it, lrs)
    assert "Collecting variables for regularization" not in first
    assert (folder / "unc_iter_20.index").is_file() and (folder / "unc_iter_40.index").is_file()
    assert not [f for f in os.listdir(folder) if ".tmp" in f]


def test_stopped_run_resumes_from_its_snapshot_at_its_step(restr_run):
    import tensorflow as tf

    folder, first, second = restr_run
    assert "stop training at iter 20" in first and sorted(logged_losses(first)) == [0, 5, 10, 15]
    assert f"resuming from {folder / 'unc_iter_20'} (iteration 20)" in second
    assert sorted(logged_losses(second)) == [20, 25, 30, 35] and second.rstrip().endswith("Optimization done.")
    for it in (20, 40):
        reader = tf.train.load_checkpoint(str(folder / f"unc_iter_{it}"))
        assert reader.get_tensor("optimizer/step/.ATTRIBUTES/VARIABLE_VALUE") == it
        assert reader.has_tensor("model/generator/_state_var/.ATTRIBUTES/VARIABLE_VALUE")


def test_killed_run_resumes_with_the_same_losses(sample, restr_run, tmp_path):
    """SIGKILL once the snapshot of iteration 10 is complete (snapshots every 5), then the same command again: it
    resumes from the newest complete snapshot and every logged loss equals the uninterrupted runs' (same seed;
    AdamW state, schedule step and DropPath generator restored)."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    expected = {**logged_losses(restr_run[1]), **logged_losses(restr_run[2])}
    folder = tmp_path / "killed"
    cmd = [sys.executable, str(REPO / "trainval_model.py"), "-m", "train", "-t", "train",
           *common(sample, MODEL, folder), *TRAIN, "-s", "5"]
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not (folder / "unc_iter_10.index").exists():
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    seen = logged_losses((tmp_path / "killed.log").read_text())
    newest = max(int(f[len("unc_iter_"):-len(".index")]) for f in os.listdir(folder) if f.endswith(".index"))
    second = run(cmd[2:]).stdout
    assert f"resuming from {folder / f'unc_iter_{newest}'} (iteration {newest})" in second, second[-2000:]
    assert newest >= 10 and second.rstrip().endswith("Optimization done.")
    seen.update(logged_losses(second))
    assert sorted(seen) == sorted(expected)
    for it, loss in seen.items():
        assert loss == pytest.approx(expected[it], rel=1e-6), (it, loss, expected[it])
    assert not [f for f in os.listdir(folder) if ".tmp" in f]


def _state_dict(sample, folder):
    from models import model_spec
    from util.config import RunConfig

    cfg = RunConfig(mode="test", model=MODEL, dataset="unc", folder=str(folder), image_size=SIZE,
                    data_dir=str(sample / "data"))
    model = cfg.spec.load_trained(str(folder / "unc_iter_40"), cfg)
    assert model_spec(MODEL) is cfg.spec
    return {k: v.numpy() for k, v in model.state_dict_variables().items()}


def write_state_dict_pth(path, state_dict):
    """``torch.save(state_dict)`` layout (zip, pickle protocol 2, one storage per tensor: int64 arrays as
    ``LongStorage``, everything else float32), without torch."""
    items, storages = [], {}
    for n, (key, value) in enumerate(state_dict.items()):
        storage, dtype = ("LongStorage", "<i8") if np.asarray(value).dtype == np.int64 else ("FloatStorage", "<f4")
        value = np.array(value, dtype, order="C")           # (ascontiguousarray makes 0-d arrays 1-d)
        stride = [int(np.prod(value.shape[k + 1:])) for k in range(value.ndim)]
        items.append((key, _tensor(storage, str(n), value.size, 0, value.shape, stride)))
        storages[str(n)] = value.tobytes()
    return _write_pth(path, _dict(items), storages)


def test_test_mode_from_snapshot_and_from_pth(sample, restr_run, tmp_path):
    folder = restr_run[0]
    out = run(["-m", "test", "-t", "val", *common(sample, MODEL, folder), "-i", "40"]).stdout
    block = metric_block(out, "without DenseCRF")
    assert [line.split(" = ")[0] for line in block[1:6]] == [f"precision@{t}" for t in (0.5, 0.6, 0.7, 0.8, 0.9)]
    assert re.fullmatch(r"overall IoU = \d\.\d{6}; mean IoU = \d\.\d{6}", block[6])
    ours = json.loads((folder / "unc_iter_40.unc_val.json").read_text())
    n_val = len([f for f in os.listdir(sample / "unc" / "val_batch") if f.endswith(".npz")])
    assert ours["model"] == MODEL and ours["without_dcrf"]["samples"] == n_val and "with_dcrf" not in ours
    assert ours["without_dcrf"]["overall_iou"] > 0

    write_state_dict_pth(tmp_path / "unc_40.pth", _state_dict(sample, folder))
    out = run(["-m", "test", "-t", "val", *common(sample, MODEL, tmp_path), "-i", "40",
               "--data-dir", str(tmp_path / "no_glove_needed")]).stdout
    assert f"Loading trained weights from {tmp_path / 'unc_40.pth'}" in out
    theirs = json.loads((tmp_path / "unc_40.pth.unc_val.json").read_text())
    assert theirs["without_dcrf"] == ours["without_dcrf"]


def test_export_and_demo_give_the_test_loop_masks(sample, restr_run, tmp_path):
    """``-m export`` of the ReSTR snapshot: the SavedModel's masks equal the test loop's (``predictor``) on every val
    sample; ``demo.py`` from the snapshot and from the SavedModel writes the same mask."""
    import tensorflow as tf
    from PIL import Image

    import demo
    from models import model_spec
    from util import data
    from util.config import RunConfig
    from util.export import EXPORT_MARKER

    folder, export_dir = restr_run[0], tmp_path / "restr_savedmodel"
    run(["-m", "export", *common(sample, MODEL, folder), "-i", "40", "--export-dir", str(export_dir)])
    assert json.loads((export_dir / EXPORT_MARKER).read_text())["model"] == MODEL
    serve = tf.saved_model.load(str(export_dir)).signatures["serving_default"]
    spec = model_spec(MODEL)
    cfg = RunConfig(mode="test", model=MODEL, dataset="unc", iteration=40, folder=str(folder), image_size=SIZE,
                    data_dir=str(sample / "data"))
    predict = spec.predictor(spec.load_trained(spec.find_snapshot(cfg.snapshot_candidates(40)), cfg), SIZE, False)
    foreground = total = 0
    for path in data.batch_files(str(sample / "unc" / "val_batch"), "unc_val"):
        s = data.load_sample(path)
        got = serve(image=tf.constant(s["im_batch"]), sentence=tf.constant(data.sentence_of(s)))
        [(expected, _)] = predict([s])
        assert got["words"].numpy().tolist() == s["text_batch"].astype(int).tolist()
        np.testing.assert_array_equal(got["mask"].numpy() != 0, expected != 0)
        foreground, total = foreground + int(expected.sum()), total + expected.size
    assert 0 < foreground < total

    image = next((sample / "data" / "coco" / "images").rglob("*.jpg"))
    masks = []
    for source, tag in ((["-n", MODEL, "-f", str(folder), "-i", "40"], "snapshot"),
                        (["--saved-model", str(export_dir)], "savedmodel")):
        prefix = tmp_path / tag
        assert demo.main(["--img", str(image), "--text", "the red square on the left", "--img-size", str(SIZE),
                          "--data-dir", str(sample / "data"), "--out", str(prefix), *source]) == 0
        masks.append(np.asarray(Image.open(f"{prefix}_mask.png")))
        assert (tmp_path / f"{tag}_overlay.png").is_file()
    assert masks[0].shape == np.asarray(Image.open(image)).shape[:2]
    np.testing.assert_array_equal(masks[0], masks[1])


def test_restr_command_line_errors_are_one_line(sample, tmp_path):
    proc = run(["-m", "test", "-t", "val", *common(sample, MODEL, tmp_path), "-i", "40", "-c"], check=False)
    assert proc.returncode == 2 and "-c (DenseCRF) is not available for -n ReSTR_tiny" in proc.stderr
    proc = run(["-m", "test", "-t", "val", *common(sample, MODEL, tmp_path), "-i", "7"], check=False)
    assert proc.returncode == 1 and "snapshot not found" in proc.stdout and "unc_7.pth" in proc.stdout
    missing = tmp_path / "augreg.npz"
    proc = run(["-m", "train", "-t", "train", *common(sample, MODEL, tmp_path), "-i", "2", "--init-weights",
                str(missing)], check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
    assert len(lines) == 1 and str(missing) in lines[0] and "storage.googleapis.com/vit_models/augreg" in lines[0]


def test_registry_defaults_and_augreg_initialisation(golden_dir):
    """``-n ReSTR`` takes the original's defaults; the entry's initialisation loads an AugReg ``.npz`` into the ViT
    exactly as timm did for the golden (the golden's fake AugReg file has the tiny model's sizes)."""
    from models import model_spec
    from util.config import RunConfig

    cfg = RunConfig(mode="train", model="ReSTR", dataset="unc", folder="f")
    assert (cfg.max_iter, cfg.batch_size, cfg.image_size, cfg.lr) == (400000, 8, 480, 1e-5)
    assert cfg.init_weights.endswith("res_384.npz") and cfg.embedding_path.endswith("Gref_emb.npy")
    assert cfg.snapshot_candidates(5000) == ["f/unc_iter_5000", "f/unc_5000.pth"]
    spec = model_spec(MODEL)
    golden = np.load(golden_dir / "restr" / "golden_restr.npz")
    model = spec.build(embedding=golden["input__glove_npy"], image_size=SIZE, seed=1)
    spec.initialize(model, str(golden_dir / "restr" / "fake_augreg_vit.npz"), 1)
    variables = model.state_dict_variables()
    for key in (k for k in variables if k.startswith("encoder_v.")):
        np.testing.assert_array_equal(variables[key].numpy(), golden[f"init__{key}"], err_msg=key)
    optimizer = spec.make_optimizer(model, spec.train_variables(model), 1e-5, 400000)
    assert "encoder_v.head.weight" not in spec.train_variables(model)
    assert [m for _, m in optimizer.groups] == [1.0, 0.1]


def test_bench_runs_restr(tmp_path):
    from util.bench import bench
    from util.config import RunConfig

    cfg = RunConfig(mode="bench", model=MODEL, image_size=SIZE, bench_batch_sizes=(1,),
                    bench_json=str(tmp_path / "bench.json"))
    cfg.bench_repeats, cfg.bench_xla = 1, (False,)
    result = bench(cfg)
    flops = result["flops_per_image"]
    assert 0 < flops["backbone"] < flops["eval"] < flops["train_step"]
    assert [(r["kind"], r["batch"]) for r in result["runs"]] == [("eval", 1), ("train", 1)]
    assert json.loads((tmp_path / "bench.json").read_text())["model"] == MODEL
