"""Hostile input for trainval_model.py and the converters (issue 16): flags checked before any work, SavedModel
export that replaces only its own folders, snapshots that are good (complete and finite), zero-sample results that
never replace a real one, corrupt training samples found before training, OS errors and Ctrl-C as one line.

Every case asserts the exit status and that no "Traceback" reaches the output. Most run ``main(argv)`` in-process
with a 32×32 synthetic training set; subprocesses only where a real signal or a fresh interpreter is the point.
"""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import types

import numpy as np
import pytest
import tensorflow as tf

import trainval_model
from external import convert_backbone, convert_snapshot, glove_to_npy
from models import build_model
from tests.conftest import REPO
from util import data
from util.checkpoints import save_backbone_checkpoint, save_tf1_checkpoint
from util.export import EXPORT_MARKER, check_export_dir, save_atomic
from util.metrics import write_json_atomic
from util.optim import TF1Adam
from util.snapshots import NonFiniteWeights, Snapshots, snapshot_problem, write_checkpoint_atomic

SIZE = 32
NAME = "unc_deeplab_LSTM_iter"
TF_INFO_LINES = ("cpu_feature_guard", "oneDNN custom operations", "To enable the following instructions")


def write_sample(path, size=SIZE, steps=20, mask_shape=None, seed=0):
    rng = np.random.RandomState(seed)
    np.savez(path, text_batch=np.array([0] * (steps - 2) + [5, 6], np.int64),
             im_batch=rng.randint(0, 255, (size, size, 3)).astype(np.uint8),
             mask_batch=rng.rand(*(mask_shape or (size, size))) > 0.5, sent_batch=np.array(["a b"]))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A batch root with 4 unc training samples at 32×32."""
    base = tmp_path_factory.mktemp("hardening")
    (base / "unc" / "train_batch").mkdir(parents=True)
    for i in range(4):
        write_sample(base / "unc" / "train_batch" / f"unc_train_{i}.npz", seed=i)
    return base


@pytest.fixture(scope="module")
def trained(root):
    """``root`` plus a snapshot folder ``ckpt`` holding a good LSTM snapshot ``unc_deeplab_LSTM_iter_1`` (model and
    optimizer at step 1, as training writes them), its TF1-named copy ``tf1/…tfmodel`` and a converted backbone
    ``backbone``."""
    model = build_model("LSTM_model", image_size=SIZE)
    optimizer = TF1Adam(model.train_variables(), 2.5e-4, model.head.LR_DECAY_STEPS, model.head.STEP_NAME)
    optimizer.step.assign(1.0)
    write_checkpoint_atomic(tf.train.Checkpoint(model=model, optimizer=optimizer), str(root / "ckpt" / f"{NAME}_1"))
    (root / "tf1").mkdir()
    save_tf1_checkpoint({n: v.numpy() for n, v in model.tf1_variables().items()}, root / "tf1" / f"{NAME}_1.tfmodel")
    save_backbone_checkpoint(model.backbone, root / "backbone")
    return root


def cli(main, argv, capfd, caplog):
    """(exit status, everything printed or logged) of ``main(argv)``; asserts no traceback was printed."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capfd.readouterr()
    text = out + err + caplog.text
    caplog.clear()
    assert "Traceback" not in text, text[-3000:]
    return rc, text


def error_lines(text):
    return [line for line in text.splitlines() if "error:" in line]


def train_args(root, *extra, folder=None):
    return ["-m", "train", "-t", "train", "-d", "unc", "-n", "LSTM_model", "-f", str(folder or root / "out"),
            "--img-size", str(SIZE), "--batch-root", str(root), "--init-weights", "random", *extra]


# ----------------------------------------------------------------------------------------------------------------
# Class 1: the command line, checked before any work (exit 2, one line naming the flag)


@pytest.mark.parametrize("extra,expected", [
    (["-lr", "nan"], "argument -lr: expected a finite learning rate > 0, got nan"),
    (["-lr", "inf"], "argument -lr: expected a finite learning rate > 0, got inf"),
    (["-lr", "-0.001"], "argument -lr: expected a finite learning rate > 0"),
    (["-lr", "1e39"], "argument -lr: expected a finite learning rate > 0, got 1e39"),
    (["-i", "-5"], "argument -i: expected an integer ≥ 0, got -5"),
    (["-s", "0"], "argument -s: expected a positive integer, got 0"),
    (["-bs", "two"], "argument -bs: expected a positive integer, got 'two'"),
    (["--log-every", "0"], "argument --log-every: expected a positive integer, got 0"),
    (["--summary-every", "-1"], "argument --summary-every: expected a positive integer, got -1"),
    (["--img-size", "0"], "argument --img-size: expected a positive integer, got 0"),
    (["--seed", "-1"], "argument --seed: expected an integer ≥ 0, got -1"),
    (["--img-size", "64"], "--img-size 64 does not match the training batches: "),
])
def test_bad_training_flags_exit_2_before_any_work(root, capfd, caplog, extra, expected):
    rc, text = cli(trainval_model.main, train_args(root, *extra), capfd, caplog)
    assert rc == 2
    assert len(error_lines(text)) == 1 and expected in error_lines(text)[0]
    if "does not match" in expected:
        assert "unc_train_0.npz is 32×32 (built with build_batches.py --img-size 32)" in text
    assert not (root / "out").exists()


@pytest.mark.parametrize("bs", ["-1", "0"])
def test_test_mode_refuses_a_non_positive_batch(root, capfd, caplog, bs):
    rc, text = cli(trainval_model.main, ["-m", "test", "-t", "val", "-d", "unc", "-n", "LSTM_model", "-f",
                                         str(root / "ckpt"), "-i", "1", "-bs", bs], capfd, caplog)
    assert rc == 2 and f"argument -bs: expected a positive integer, got {bs}" in text


def test_bad_paths_and_missing_flags_exit_2(root, tmp_path, capfd, caplog):
    a_file = tmp_path / "a_file"
    a_file.write_text("user data")
    cases = [
        (train_args(root, folder=a_file), f"-f {a_file} exists and is not a folder"),
        (train_args(root, folder=a_file / "sub"), f"cannot be created: {a_file} is a file, not a folder"),
        (train_args(root, folder="/sys/refseg_snapshots"), "cannot write in /sys (Permission denied)"),
        (train_args(root, "--logdir", str(a_file)), f"--logdir {a_file} exists and is not a folder"),
        (["-m", "bench", "-n", "LSTM_model", "--bench-json", str(tmp_path)], "is a folder, expected a file name"),
        (["-m", "bench", "-n", "LSTM_model", "--bench-json", "/sys/x/b.json"], "cannot write in /sys"),
        (["-m", "bench", "-n", "LSTM_model", "--bench-batch-sizes", "1,x"],
         "argument --bench-batch-sizes: expected a positive integer, got 'x'"),
        (["-m", "bench", "-n", "LSTM_model", "--bench-repeats", "0"], "argument --bench-repeats: expected a positive"),
        (["-m", "export", "-n", "LSTM_model", "-d", "unc", "-f", str(root / "ckpt"), "-i", "1", "--export-dir",
          str(a_file / "exp")], f"--export-dir {a_file / 'exp'}: its folder {a_file} exists and is not a folder"),
        (["-m", "export", "-n", "LSTM_model", "-d", "unc", "-f", str(root / "ckpt"), "-i", "1"],
         "-m export needs --export-dir DIR"),
        (["-m", "train", "-t", "train", "-d", "unc", "-n", "CMPC_model"], "-f (snapshot folder) is required for -n"),
        (["-m", "test", "-d", "unc", "-n", "RRN_model", "-f", str(tmp_path)], "-t (split) is required with -m test"),
        (["-m", "test", "-t", "val", "-d", "unc", "-n", "RRN_model", "-f", str(a_file)], "is not a folder"),
    ]
    for argv, expected in cases:
        rc, text = cli(trainval_model.main, argv, capfd, caplog)
        assert rc == 2, (argv, text[-500:])
        assert len(error_lines(text)) == 1 and expected in error_lines(text)[0], (argv, text[-500:])
    assert a_file.read_text() == "user data" and sorted(os.listdir(tmp_path)) == ["a_file"]


# ----------------------------------------------------------------------------------------------------------------
# Worst item 1: -m export --export-dir replaces only a SavedModel of ours


def export_argv(root, export_dir, folder=None):
    return ["-m", "export", "-n", "LSTM_model", "-d", "unc", "-f", str(folder or root / "ckpt"), "-i", "1",
            "--export-dir", str(export_dir)]


def test_export_refuses_folders_that_are_not_its_own(root, tmp_path, capfd, caplog, monkeypatch):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"precious")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("notes")
    snapshots = tmp_path / "models" / "ckpt"
    snapshots.mkdir(parents=True)
    (snapshots / f"{NAME}_1.index").write_bytes(b"weeks of training")
    cases = [
        (export_argv(root, foreign, snapshots), "is a non-empty folder that is not a SavedModel of ours"),
        (export_argv(root, snapshots, snapshots), f"is or contains the snapshot folder {snapshots}"),
        (export_argv(root, snapshots.parent, snapshots), "is or contains the snapshot folder"),
        (export_argv(root, a_file, snapshots), "exists and is not a folder"),
    ]
    for argv, expected in cases:
        rc, text = cli(trainval_model.main, argv, capfd, caplog)
        assert rc == 2 and len(error_lines(text)) == 1 and expected in error_lines(text)[0], text[-500:]
    monkeypatch.chdir(tmp_path)
    rc, text = cli(trainval_model.main, export_argv(root, "."), capfd, caplog)
    assert rc == 2 and "--export-dir . is or contains the current folder; refusing to replace it" in text
    assert (foreign / "holiday.jpg").read_bytes() == b"precious" and a_file.read_text() == "notes"
    assert os.listdir(snapshots) == [f"{NAME}_1.index"] and os.listdir(snapshots.parent) == ["ckpt"]


def test_export_replaces_its_own_savedmodel_and_a_failed_write_keeps_it(tmp_path, monkeypatch):
    ours, empty = tmp_path / "ours", tmp_path / "empty"
    ours.mkdir()
    empty.mkdir()
    (ours / "saved_model.pb").write_bytes(b"old")
    (ours / EXPORT_MARKER).write_text("{}")
    check_export_dir(str(ours))
    check_export_dir(str(empty))
    check_export_dir(str(tmp_path / "new"))

    def full_disk(module, path, signatures):
        os.makedirs(os.path.join(path, "variables"))
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(path, "variables", "variables.data"))

    monkeypatch.setattr(tf.saved_model, "save", full_disk)
    module = types.SimpleNamespace(serve=types.SimpleNamespace(get_concrete_function=lambda: None))
    with pytest.raises(OSError, match="No space left"):
        save_atomic(module, str(ours), {"model": "LSTM_model"})
    assert (ours / "saved_model.pb").read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["empty", "ours"]

    def fake_save(module, path, signatures):
        os.makedirs(path)
        (open(os.path.join(path, "saved_model.pb"), "wb")).close()

    monkeypatch.setattr(tf.saved_model, "save", fake_save)
    save_atomic(module, str(ours), {"model": "LSTM_model"})
    assert json.loads((ours / EXPORT_MARKER).read_text()) == {"model": "LSTM_model"}
    assert (ours / "saved_model.pb").read_bytes() == b""


# ----------------------------------------------------------------------------------------------------------------
# Worst item 2 and class 4: only good snapshots (complete, finite) are written, named or resumed from


def small_checkpoint(value):
    module = tf.Module()
    module.w = tf.Variable(np.full((64, 64), value, np.float32), name="w")
    module.b = tf.Variable(np.zeros(8, np.float32), name="b")
    return module, tf.train.Checkpoint(model=module)


def test_snapshots_with_non_finite_weights_are_not_written(tmp_path):
    snapshots = Snapshots(str(tmp_path), "unc_iter")
    module, checkpoint = small_checkpoint(1.0)
    snapshots.save(checkpoint, 1, (module,))
    for bad in (np.nan, np.inf):
        module.w.assign(np.full((64, 64), bad, np.float32))
        with pytest.raises(NonFiniteWeights, match=r"variable w is not finite \(NaN or inf\); snapshot .*unc_iter_2 "
                                                   r"not written"):
            snapshots.save(checkpoint, 2, (module,))
    assert snapshots.iterations() == [1] and not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_latest_good_skips_non_finite_truncated_and_incomplete_snapshots(tmp_path, caplog):
    snapshots = Snapshots(str(tmp_path), "unc_iter")
    _, good = small_checkpoint(1.0)
    write_checkpoint_atomic(good, snapshots.path(1))
    _, nan = small_checkpoint(np.nan)
    write_checkpoint_atomic(nan, snapshots.path(2))
    write_checkpoint_atomic(good, snapshots.path(3))
    data_file = snapshots.path(3) + ".data-00000-of-00001"
    size = os.path.getsize(data_file)
    with open(data_file, "r+b") as f:
        f.truncate(size // 2)
    write_checkpoint_atomic(good, snapshots.path(4))
    os.remove(snapshots.path(4) + ".data-00000-of-00001")
    assert snapshots.latest_good() == (1, snapshots.path(1))
    assert f"skipping snapshot {snapshots.path(4)}: its data file" in caplog.text
    assert (f"skipping snapshot {snapshots.path(3)}: truncated: unc_iter_3.data-00000-of-00001 has {size // 2} "
            f"bytes, its index needs at least") in caplog.text
    assert f"skipping snapshot {snapshots.path(2)}: tensor model/w/.ATTRIBUTES/VARIABLE_VALUE is not finite" \
        in caplog.text
    assert snapshot_problem(snapshots.path(1)) is None
    assert snapshots.iterations() == [1, 2, 3, 4]


def test_a_failed_snapshot_write_leaves_no_temporaries(tmp_path, monkeypatch):
    snapshots = Snapshots(str(tmp_path), "unc_iter")
    module, checkpoint = small_checkpoint(1.0)
    snapshots.save(checkpoint, 1, (module,))
    real_replace = os.replace

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", dst)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        snapshots.save(checkpoint, 2, (module,))
    monkeypatch.setattr(os, "replace", real_replace)
    assert sorted(os.listdir(tmp_path)) == ["unc_iter_1.data-00000-of-00001", "unc_iter_1.index"]


def test_training_resumes_from_the_newest_good_snapshot_and_ctrl_c_is_one_line(trained, tmp_path):
    """A real SIGINT once training has resumed: the truncated (3) and non-finite (2) snapshots are skipped with a
    reason, training resumes from 1, and Ctrl-C prints one line naming snapshot 1 and exits 130; 2 and 3 stay."""
    folder = tmp_path / "ckpt"
    shutil.copytree(trained / "ckpt", folder)
    for suffix in (".index", ".data-00000-of-00001"):
        shutil.copy(folder / f"{NAME}_1{suffix}", folder / f"{NAME}_3{suffix}")
    with open(folder / f"{NAME}_3.data-00000-of-00001", "r+b") as f:
        f.truncate(1000)
    reader = tf.train.load_checkpoint(str(folder / f"{NAME}_1"))
    tensors = {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map()}
    poisoned = sorted(n for n in tensors if n.startswith("model/backbone/"))[0]
    tensors[poisoned] = np.full_like(tensors[poisoned], np.nan)
    save_tf1_checkpoint(tensors, folder / f"{NAME}_2")
    proc = subprocess.Popen([sys.executable, str(REPO / "trainval_model.py"), *train_args(trained, "-i", "9", "-s", "1",
                                                                                         folder=folder)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("resuming from"):
            proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=300)
    text = "".join(lines)
    assert rc == 130, text[-3000:]
    assert "Traceback" not in text
    assert f"resuming from {folder / NAME}_1 (iteration 1)" in text
    assert f"skipping snapshot {folder / NAME}_3: truncated: {NAME}_3.data-00000-of-00001 has 1000 bytes" in text
    assert f"skipping snapshot {folder / NAME}_2: tensor {poisoned} is not finite (NaN or inf)" in text
    assert text.strip().splitlines()[-1] == f"interrupted; the last complete snapshot is {folder / NAME}_1"
    assert Snapshots(str(folder), NAME).iterations() == [1, 2, 3]


# ----------------------------------------------------------------------------------------------------------------
# Worst item 3: test mode never replaces a result with a zero-sample one; JSON writes are atomic


def test_test_mode_with_no_readable_sample_keeps_the_existing_json(trained, tmp_path, capfd, caplog):
    val = tmp_path / "unc" / "val_batch"
    val.mkdir(parents=True)
    (val / "unc_val_0.npz").write_bytes(b"PK\x03\x04 truncated")
    (val / "unc_val_1.npz").write_text("not a zip")
    folder = tmp_path / "ckpt"
    shutil.copytree(trained / "ckpt", folder)
    json_path = folder / f"{NAME}_1.unc_val.json"
    json_path.write_text('{"without_dcrf": {"samples": 5000}}')
    rc, text = cli(trainval_model.main, ["-m", "test", "-t", "val", "-d", "unc", "-n", "LSTM_model", "-f", str(folder),
                                         "-i", "1", "--img-size", str(SIZE), "--batch-root", str(tmp_path)],
                   capfd, caplog)
    assert rc == 1
    assert f"error: none of the 2 samples under {val} could be read (all skipped, see the warnings); {json_path} not " \
           "written" in error_lines(text)[-1]
    assert json_path.read_text() == '{"without_dcrf": {"samples": 5000}}'


def test_a_failed_json_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "m.json"
    write_json_atomic({"samples": 3}, str(path))

    def full_disk(obj, f, **kw):
        f.write("{")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", full_disk)
    with pytest.raises(OSError):
        write_json_atomic({"samples": 0}, str(path))
    assert os.listdir(tmp_path) == ["m.json"] and json.loads(path.read_text()) == {"samples": 3}


# ----------------------------------------------------------------------------------------------------------------
# Class 4: corrupt or misshapen training samples are found before training starts


def test_bad_training_samples_are_named_before_training(root, tmp_path, capfd, caplog):
    good = root / "unc" / "train_batch" / "unc_train_0.npz"
    cases = {
        "truncated": lambda p: p.write_bytes(good.read_bytes()[:-200]),
        "foreign": lambda p: p.write_text("hello"),
        "mask": lambda p: write_sample(p, mask_shape=(SIZE, SIZE + 1)),
        "size": lambda p: write_sample(p, size=40),
        "text": lambda p: write_sample(p, steps=15),
        "pickle": lambda p: np.savez(p, text_batch=np.array([object()]), im_batch=0, mask_batch=0, sent_batch=0),
        "keys": lambda p: np.savez(p, im_batch=np.zeros((SIZE, SIZE, 3), np.uint8)),
    }
    expected = {"truncated": "unreadable .npz", "foreign": "unreadable .npz", "mask": "mask_batch (32, 33)",
                "size": "im_batch (40, 40, 3)", "text": "text_batch (15,) int64, expected [20] integers",
                "pickle": "is an object array (pickled data is refused)", "keys": "missing key text_batch"}
    for kind, make in cases.items():
        folder = tmp_path / kind / "unc" / "train_batch"
        folder.mkdir(parents=True)
        for i in range(3):
            shutil.copy(root / "unc" / "train_batch" / f"unc_train_{i}.npz", folder / f"unc_train_{i}.npz")
        make(folder / "unc_train_3.npz")
        with pytest.raises(data.BadSample, match=r"1 of 4 training samples are unusable, first .*unc_train_3\.npz: "):
            data.check_training_files(data.batch_files(str(folder), "unc_train"), SIZE)
        try:
            data.check_training_files([str(folder / "unc_train_3.npz")], SIZE)
        except data.BadSample as e:
            assert expected[kind] in str(e), (kind, str(e))
    rc, text = cli(trainval_model.main, train_args(tmp_path / "mask", folder=tmp_path / "out"), capfd, caplog)
    assert rc == 1 and "error: 1 of 4 training samples are unusable, first " in text and "unc_train_3.npz" in text
    assert "Initialising the backbone" not in text and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# Class 3 and 5: OS errors and Ctrl-C are one line (exit 1 / 130), in trainval_model.py and the converters


def test_os_errors_and_ctrl_c_in_trainval_are_one_line(root, tmp_path, capfd, caplog, monkeypatch):
    import util.bench
    import util.evaluate
    import util.export

    def raising(exc):
        def fn(cfg):
            raise exc
        return fn

    test_argv = ["-m", "test", "-t", "val", "-d", "unc", "-n", "LSTM_model", "-f", str(root / "ckpt"), "-i", "1"]
    cases = [
        (util.evaluate, "test", test_argv,
         OSError(errno.EROFS, "Read-only file system", "/mnt/ro/m.json"), 1,
         "error: /mnt/ro/m.json: Read-only file system"),
        (util.evaluate, "test", test_argv,
         IsADirectoryError(errno.EISDIR, "Is a directory", "/x/vis/000000_im.png"), 1,
         "error: /x/vis/000000_im.png: Is a directory"),
        (util.export, "export", export_argv(root, tmp_path / "exp"),
         OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".exp.tmp1")), 1,
         f"error: {tmp_path / '.exp.tmp1'}: No space left on device"),
        (util.bench, "bench", ["-m", "bench", "-n", "LSTM_model"],
         tf.errors.PermissionDeniedError(None, None, "/sys/b.json; Permission denied\nmore"), 1,
         "error: /sys/b.json; Permission denied"),
        (util.evaluate, "test", test_argv, KeyboardInterrupt(), 130, "interrupted; no metrics written"),
        (util.export, "export", export_argv(root, tmp_path / "exp"), KeyboardInterrupt(), 130,
         "interrupted; no SavedModel written"),
    ]
    for module, name, argv, exc, status, expected in cases:
        monkeypatch.setattr(module, name, raising(exc))
        rc, text = cli(trainval_model.main, argv, capfd, caplog)
        assert rc == status and expected in text, (expected, text[-500:])
        assert text.count(expected) == 1 and "more" not in text


def test_converter_os_errors_are_one_line(trained, tmp_path, capfd, caplog):
    vocab, glove = tmp_path / "vocab.txt", tmp_path / "glove.txt"
    vocab.write_text("<pad>\n<go>\n<eos>\n<unk>\nman\n")
    glove.write_text("man 0.1 0.2\n")
    out_dir = tmp_path / "out_is_a_folder.npy"
    out_dir.mkdir()
    cases = [
        (glove_to_npy.main, [str(glove), str(vocab), str(out_dir)], 1, "Is a directory"),
        (glove_to_npy.main, [str(glove), str(tmp_path), str(tmp_path / "e.npy")], 1, f"{tmp_path}: Is a directory"),
        (glove_to_npy.main, [str(glove), str(vocab), "/sys/e.npy"], 1, "/sys/e.npy.tmp: Permission denied"),
        (convert_snapshot.main, [str(trained / "tf1" / f"{NAME}_1.tfmodel"), "/sys/refseg/out", "-n", "LSTM_model"], 1,
         "error: /sys/refseg: Operation not permitted"),
        (convert_backbone.main, [str(trained / "tf1" / f"{NAME}_1.tfmodel"), "/sys/refseg/bb"], 1,
         "convert_backbone: error: /sys/refseg: Operation not permitted"),
    ]
    for main, argv, status, expected in cases:
        rc, text = cli(main, argv, capfd, caplog)
        assert rc == status and expected in text, (argv, text[-800:])
    assert sorted(os.listdir(tmp_path)) == ["glove.txt", "out_is_a_folder.npy", "vocab.txt"]
    assert os.listdir(out_dir) == []


# ----------------------------------------------------------------------------------------------------------------
# Class 7: the converters quiet TensorFlow's C++ log and recognise our own TF2 files


@pytest.mark.parametrize("script,argv,expected", [
    ("convert_snapshot.py", ["ckpt/" + NAME + "_1", "converted", "-n", "LSTM_model"],
     "ckpt/" + NAME + "_1 is already a TF2 snapshot of ours: nothing to convert"),
    ("convert_backbone.py", ["backbone", "converted"],
     "backbone is already a TF2 snapshot of ours (a converted backbone): nothing to convert"),
])
def test_converters_refuse_our_own_tf2_files_quietly(trained, script, argv, expected):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run([sys.executable, str(REPO / "external" / script), *[str(trained / a) for a in argv[:2]],
                           *argv[2:]], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2 and expected in text and "Traceback" not in text
    assert not any(marker in text for marker in TF_INFO_LINES), text
    assert len(text.strip().splitlines()) == 1 and not (trained / "converted.index").exists()
