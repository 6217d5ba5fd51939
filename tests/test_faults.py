"""Fault suite: bad inputs, untrusted files, divergence and interrupted runs.

Each case asserts the exact message or behaviour users see (README, "Errors you may see").
"""
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from models import build_model
from tests.conftest import REPO, SAMPLE_TRAIN_SIZE
from util import data
from util.checkpoints import CheckpointMismatch, checkpoint_exists
from util.config import RunConfig
from util.metrics import SegmentationMetrics
from util.refer import AnnotationError, safe_load_pickle
from util.snapshots import FAULT_PAUSE_ENV, restore_model, write_checkpoint_atomic
from util.text import load_vocab_dict_from_file, preprocess_sentence

TRAINVAL = str(REPO / "trainval_model.py")


def trainval(args, env=None, check=False):
    proc = subprocess.run([sys.executable, TRAINVAL, *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **(env or {})}, timeout=600)
    assert not check or proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def common(sample, model, folder):
    return ["-d", "unc", "-n", model, "-f", str(folder), "--img-size", str(SAMPLE_TRAIN_SIZE),
            "--batch-root", str(sample), "--data-dir", str(sample / "data")]


def losses_of(text):
    return {int(m.group(1)): float(m.group(2))
            for m in re.finditer(r"iter = (\d+), loss \(cur\) = ([0-9.e+-]+|nan|inf)", text)}


# ----------------------------------------------------------------------------------------------------------------
# Input files


def test_truncated_and_wrong_key_npz_are_named(sample, tmp_path):
    good = sample / "unc" / "train_batch" / "unc_train_0.npz"
    truncated = tmp_path / "t.npz"
    truncated.write_bytes(good.read_bytes()[:500])
    with pytest.raises(data.BadSample, match=rf"{re.escape(str(truncated))}: unreadable \.npz"):
        data.load_sample(truncated)
    wrong = tmp_path / "w.npz"
    np.savez(wrong, im_batch=np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(data.BadSample, match=r"w\.npz: missing key text_batch"):
        data.load_sample(wrong)
    pickled = tmp_path / "p.npz"
    np.savez(pickled, text_batch=np.array([object()]), im_batch=0, mask_batch=0, sent_batch=0)
    with pytest.raises(data.BadSample, match=r"p\.npz: unreadable"):
        data.load_sample(pickled)


def test_missing_batches_say_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"batch folder .* not found: create it with build_batches.py"):
        data.batch_files(str(tmp_path / "nope"), "unc_train")
    with pytest.raises(FileNotFoundError, match=r'no batches found under .* with prefix "unc_train"'):
        data.batch_files(str(tmp_path), "unc_train")


def test_vocabulary_missing_empty_or_not_original(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_vocab_dict_from_file(tmp_path / "none.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"vocabulary file .*empty.txt is empty"):
        load_vocab_dict_from_file(empty)
    other = tmp_path / "other.txt"
    other.write_text("a\nb\nc\nd\n")
    with pytest.raises(ValueError, match=r"must start with <pad>, <go>, <eos>, <unk>"):
        load_vocab_dict_from_file(other)


def cmpc_config(tmp_path, **kw):
    return RunConfig(mode="train", model="CMPC_model", dataset="unc", split="train", folder=str(tmp_path),
                     data_dir=str(tmp_path), **kw)


def test_embedding_missing_pickled_or_misshapen(tmp_path):
    cfg = cmpc_config(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"Gref_emb.npy not found: .*external/glove_to_npy.py"):
        cfg.load_embedding()
    with open(tmp_path / "Gref_emb.npy", "wb") as f:
        np.save(f, np.array([{"payload": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"Gref_emb.npy: not a plain .npy array"):
        cfg.load_embedding()
    np.save(tmp_path / "Gref_emb.npy", np.zeros(300, np.float32))
    with pytest.raises(ValueError, match=r"expected a 2-D \[vocabulary, dim\] array, got shape \(300,\)"):
        cfg.load_embedding()


def test_embedding_of_the_wrong_size_for_the_checkpoint_is_named(tmp_path):
    model = build_model("CMPC_model", embedding=np.zeros((30, 300), np.float32), image_size=64)
    write_checkpoint_atomic(tf.train.Checkpoint(model=model), str(tmp_path / "unc_iter_1"))
    other = build_model("CMPC_model", embedding=np.zeros((31, 300), np.float32), image_size=64)
    with pytest.raises(CheckpointMismatch, match=r"is not a snapshot of this CMPC_model"):
        restore_model(other, str(tmp_path / "unc_iter_1"))


def test_checkpoint_of_another_model_is_refused(tmp_path):
    rrn = build_model("RRN_model", vocab_size=30, image_size=64)
    write_checkpoint_atomic(tf.train.Checkpoint(model=rrn), str(tmp_path / "unc_iter_1"))
    lstm = build_model("LSTM_model", vocab_size=30, image_size=64)
    with pytest.raises(CheckpointMismatch, match=r"unc_iter_1 is not a snapshot of this LSTM_model"):
        restore_model(lstm, str(tmp_path / "unc_iter_1"))


def test_refs_pickle_with_a_payload_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 1, "x": Payload()}], protocol=2))
    with pytest.raises(AnnotationError, match=r"refs\(unc\)\.p"):
        safe_load_pickle(path)


# ----------------------------------------------------------------------------------------------------------------
# Odd sentences and masks


@pytest.mark.parametrize("sentence,expected", [
    (".", [0] * 20),                      # only punctuation: the final '.' is dropped → 20 pads
    ("?!", [0] * 19 + ["?!"]),            # one delimiter token
    ("zzz qqq", [0] * 18 + [3, 3]),       # only unknown words
])
def test_odd_sentences_tokenize(shared_dir, sentence, expected):
    vocab = load_vocab_dict_from_file(shared_dir / "data" / "vocabulary_Gref.txt")
    expected = [vocab.get(t, 3) if isinstance(t, str) else t for t in expected]
    assert preprocess_sentence(sentence, vocab) == expected
    long_ids = preprocess_sentence(" ".join(["man"] * 100), vocab)
    assert long_ids == [vocab["man"]] * 20


@pytest.mark.parametrize("name", ["CMPC_model", "RRN_model", "RMI_model", "LSTM_model"])
def test_all_pad_and_unknown_sentences_give_finite_outputs(name):
    """An all-pad sentence ("." tokenizes to 20 pads) crashed RRN's original; ours predicts something finite."""
    model = build_model(name, vocab_size=30, embedding=np.ones((30, 300), np.float32), image_size=32)
    features = {k: tf.random.uniform([2, 4, 4, c], seed=1) for k, c in
                (("res5c_relu", 2048), ("res4b22_relu", 1024), ("res3b3_relu", 512))}
    words = tf.constant([[0] * 20, [0] * 18 + [3, 3]], tf.int32)
    outputs = model.head({k: features[k] for k in model.head.FEATURES}, words)
    for key in ("pred", "up", "sigm"):
        assert np.isfinite(outputs[key].numpy()).all(), key
    target = np.zeros((2, 32, 32, 1), np.float32)
    for mask in (target, np.ones_like(target)):
        losses = model.head.losses(outputs, tf.constant(mask))
        assert all(np.isfinite(float(v)) for v in losses.values())


def test_empty_and_full_masks_in_metrics():
    m = SegmentationMetrics()
    m.add(np.zeros((5, 5)), np.zeros((5, 5), bool))
    m.add(np.ones((5, 5)), np.ones((5, 5), bool))
    s = m.summary()
    assert s["overall_iou"] == 1.0 and s["mean_iou"] == 0.5 and s["samples"] == 2


# ----------------------------------------------------------------------------------------------------------------
# Command line


@pytest.mark.parametrize("flag,value", [("-n", "FOO_model"), ("-d", "coco"), ("-t", "minival"), ("-m", "fit")])
def test_wrong_flags_get_one_line(flag, value, capsys):
    import trainval_model

    args = {"-m": "test", "-t": "val", "-n": "RRN_model", "-d": "unc"}
    args[flag] = value
    with pytest.raises(SystemExit) as exit_info:
        trainval_model.parse_args([x for kv in args.items() for x in kv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("trainval_model.py: error: argument ") and f"'{value}'" in err[-1]


def test_test_with_a_bad_sample_skips_and_counts_it(sample, tmp_path):
    folder = tmp_path / "ckpt"
    model = build_model("LSTM_model", image_size=SAMPLE_TRAIN_SIZE)
    write_checkpoint_atomic(tf.train.Checkpoint(model=model), str(folder / "unc_deeplab_LSTM_iter_1"))
    val = tmp_path / "unc" / "val_batch"
    val.mkdir(parents=True)
    for i in range(3):
        os.symlink(sample / "unc" / "val_batch" / f"unc_val_{i}.npz", val / f"unc_val_{i}.npz")
    (val / "unc_val_3.npz").write_bytes(b"PK\x03\x04 truncated")
    proc = trainval(["-m", "test", "-t", "val", *common(tmp_path, "LSTM_model", folder)[:-2], "-i", "1",
                     "--data-dir", str(sample / "data")], check=True)
    assert "skipping unreadable sample: " in proc.stdout and "unc_val_3.npz" in proc.stdout
    assert "1 unreadable sample(s) skipped (listed in the JSON)" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------------------------------------------
# Divergence and interruption


def test_nan_loss_stops_and_keeps_the_last_good_snapshot(sample, tmp_path):
    proc = trainval(["-m", "train", "-t", "train", *common(sample, "LSTM_model", tmp_path), "-i", "40", "-s", "1",
                     "-lr", "1e30", "--init-weights", "random", "--log-every", "1"])
    assert proc.returncode == 1
    m = re.search(r"error: loss is (nan|inf) at iteration (\d+): stopping; the last good snapshot is (\S+)",
                  proc.stdout)
    assert m, proc.stdout[-2000:]
    bad_iter, snapshot = int(m.group(2)), m.group(3)
    assert snapshot.endswith(f"unc_deeplab_LSTM_iter_{bad_iter}") and checkpoint_exists(snapshot)
    assert not checkpoint_exists(str(tmp_path / f"unc_deeplab_LSTM_iter_{bad_iter + 1}"))
    assert "Traceback" not in proc.stdout + proc.stderr


def complete_snapshots(folder):
    return sorted(int(f.split("_")[-1][:-len(".index")]) for f in os.listdir(folder)
                  if f.startswith("unc_deeplab_LSTM_iter_") and f.endswith(".index"))


def temporaries(folder):
    return {f for f in os.listdir(folder) if ".tmp" in f} if folder.exists() else set()


def wait_for(proc, condition, timeout=120):
    """Poll ``condition()`` until it holds; fails if ``proc`` exits or ``timeout`` seconds pass first."""
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None and time.time() < deadline, "the run ended before the moment to kill it"
        time.sleep(0.02)


def test_sigkill_at_five_moments_resumes_with_the_same_losses(sample, tmp_path):
    """Five SIGKILLs, each followed by a restart: four at random moments of training (a random fraction of a step
    after a random iteration is logged: mid-step, mid-snapshot or between them), one inside a snapshot write. Every
    restart resumes from the newest complete snapshot, no snapshot is ever half-written, and every logged loss
    equals the uninterrupted run's (fixed seed)."""
    args = ["-m", "train", "-t", "train", "--init-weights", "random", "--log-every", "1", "-i", "15", "-s", "3"]
    whole = losses_of(trainval([*args, *common(sample, "LSTM_model", tmp_path / "whole")], check=True).stdout)
    folder = tmp_path / "killed"
    cmd = [sys.executable, TRAINVAL, *args, *common(sample, "LSTM_model", folder)]
    rng = random.Random(1234)
    targets = iter([rng.randint(2, 4), rng.randint(5, 7), rng.randint(8, 10), rng.randint(11, 13)])
    seen, resumes = {}, []
    for kill in range(5):
        log_path = tmp_path / f"run{kill}.log"
        in_write = kill == 3
        env = {**os.environ, **({FAULT_PAUSE_ENV: "5"} if in_write else {})}
        stale = temporaries(folder)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
            if in_write:
                wait_for(proc, lambda: temporaries(folder) - stale)
            else:
                target = f"iter = {next(targets)}, cur time"
                wait_for(proc, lambda: target in log_path.read_text())
                time.sleep(rng.uniform(0.0, 0.5))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        text = log_path.read_text()
        seen.update(losses_of(text))
        resumed = re.search(r"resuming from \S+_iter_(\d+) \(iteration (\d+)\)", text)
        if resumed:
            assert resumed.group(1) == resumed.group(2)
            resumes.append(int(resumed.group(1)))
        present = complete_snapshots(folder) if folder.exists() else []
        for it in present:
            tf.train.load_checkpoint(str(folder / f"unc_deeplab_LSTM_iter_{it}"))
        if in_write:
            assert temporaries(folder) - stale, "the kill was meant to land inside a write"
    assert len(resumes) >= 3 and resumes == sorted(resumes), resumes
    final = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert final.returncode == 0, final.stdout[-2000:]
    assert not temporaries(folder)
    seen.update(losses_of(final.stdout))
    assert complete_snapshots(folder)[-1] == 15
    assert seen, "no losses logged"
    for it, loss in seen.items():
        assert loss == pytest.approx(whole[it], rel=1e-6), it
