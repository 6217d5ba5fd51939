"""util/export.py: the SavedModel reproduces the Python test path — token ids exactly, the skimage-0.13 resize/pad
up to the documented round-off residual, the mask's resize_and_crop exactly — and is written atomically.

Snapshots (shared with tests/test_demo.py through ``snapshots``): RRN at 64×64 trained 20 steps on the sample set
(``trained``; it predicts background everywhere, as such a short run does) and the same model untrained with the
seeded backbone (``seeded``; about half its pixels are foreground, so mask agreement is not vacuous).
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import REPO, SAMPLE_TRAIN_SIZE as SIZE
from util import data
from util.config import RunConfig
from util.evaluate import predict_masks, prepare
from util.export import EXPORT_MARKER, export, in_graph_mask, in_graph_preprocess
from util.image import img_as_ubyte, resize_and_pad
from util.text import load_vocab_dict_from_file, preprocess_sentence

TRAIN_STEPS = 20
TRICKY = [
    "man on the right",
    "The man's hat, on the LEFT!!",
    "red .",
    "red.",
    ".",
    "what?! ... -- no way ;-)",
    "café ÉCOLE naïve Ærø İstanbul ΣΑΣ straße",
    "  leading and trailing whitespace\t\n",
    "\u00a0non-breaking\u3000ideographic\u2003em\x1cfs\x85nel ",
    "x_y 3rd 1.5m a-b a--b __init__",
    "zzzunknownword qqqq blorf",
    " ".join(f"w{k}" for k in range(25)) + " man on the left",
    "one , two , three , four , five , six , seven , eight , nine , ten , eleven .",
    "",
    "   \t ",
]


def snapshots(sample, tmp_path_factory):
    """{"trained": folder, "seeded": folder} of unc_iter_<N> RRN snapshots at 64×64, made once per session (cached
    in the session's base temp folder, so tests/test_demo.py reuses them)."""
    root = tmp_path_factory.getbasetemp() / "rrn_snapshots"
    trained, seeded = root / "trained", root / "seeded"
    if not (root / "done").exists():
        proc = subprocess.run(
            [sys.executable, str(REPO / "trainval_model.py"), "-m", "train", "-d", "unc", "-t", "train",
             "-n", "RRN_model", "-f", str(trained), "--img-size", str(SIZE), "--batch-root", str(sample),
             "--data-dir", str(sample / "data"), "--init-weights", "random", "-i", str(TRAIN_STEPS),
             "-s", str(TRAIN_STEPS), "--log-every", "10"], capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        from models import build_model
        from util.train import initialize_backbone
        model = build_model("RRN_model", image_size=SIZE)
        initialize_backbone(model.backbone, "random", 0)
        tf.train.Checkpoint(model=model).write(str(seeded / "unc_iter_0"))
        (root / "done").touch()
    return {"trained": trained, "seeded": seeded}


def export_config(sample, folder, iteration, export_dir):
    return RunConfig(mode="export", model="RRN_model", dataset="unc", iteration=iteration, folder=str(folder),
                     image_size=SIZE, data_dir=str(sample / "data"), export_dir=str(export_dir))


@pytest.fixture(scope="module")
def exported(sample, tmp_path_factory):
    """(SavedModel of the seeded snapshot reloaded with tf.saved_model.load, its folder, the Python-path model)."""
    from models import build_model
    from util.snapshots import restore_model
    folders = snapshots(sample, tmp_path_factory)
    out = tmp_path_factory.mktemp("export") / "rrn_seeded"
    export(export_config(sample, folders["seeded"], 0, out))
    model = build_model("RRN_model", image_size=SIZE)
    restore_model(model, str(folders["seeded"] / "unc_iter_0"))
    return tf.saved_model.load(str(out)), out, model


@pytest.fixture(scope="module")
def vocab(sample):
    return load_vocab_dict_from_file(sample / "data" / "vocabulary_Gref.txt")


def python_ids(sentence, vocab):
    """preprocess_sentence, or all pads where it raises (no tokens: the graph's documented behaviour)."""
    try:
        return preprocess_sentence(sentence, vocab)
    except ValueError:
        return [0] * 20


def test_in_graph_token_ids_equal_the_python_tokenizer(exported, vocab):
    loaded, _, _ = exported
    known = [w for w, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i > 3 and re.fullmatch(r"\w+", w, re.A)][:12]
    sentences = TRICKY + [" ".join(known), ", ".join(known).upper() + " ."]
    for sentence in sentences:
        got = loaded.tokenize(tf.constant(sentence)).numpy().tolist()
        assert got == python_ids(sentence, vocab), sentence
    ids = loaded.tokenize(tf.constant(" ".join(known))).numpy()
    assert (ids > 3).sum() == len(known)          # real vocabulary hits, not only <unk>
    assert loaded.tokenize(tf.constant(TRICKY[11])).numpy().tolist()[-1] == vocab.get("w19", 3)  # first 20 kept
    assert loaded.tokenize(tf.constant("")).numpy().tolist() == [0] * 20


def test_serving_matches_the_python_path_on_the_sample_images(exported, sample):
    loaded, _, model = exported
    serve = loaded.signatures["serving_default"]
    files = data.batch_files(str(sample / "unc" / "val_batch"), "unc_val")
    padded_diff = padded_total = mask_diff = mask_total = inter = union = 0
    for path in files:
        s = data.load_sample(path)
        words, net_input, proc_im = prepare(s, SIZE)
        outputs = model(tf.constant(net_input[None]), tf.constant(words[None]))
        up, sigm = outputs["up"].numpy()[0, :, :, 0], outputs["sigm"].numpy()[0, :, :, 0]
        plain, _ = predict_masks(up, sigm, proc_im, s["mask_batch"].shape, False)
        got = serve(image=tf.constant(s["im_batch"]), sentence=tf.constant(data.sentence_of(s)))
        assert got["words"].numpy().tolist() == words.tolist()
        assert got["mask"].shape == s["im_batch"].shape[:2] and got["mask"].dtype == tf.uint8
        padded = got["padded_image"].numpy()
        assert np.abs(padded.astype(int) - proc_im).max() <= 1
        padded_diff += int((padded != proc_im).sum())
        padded_total += padded.size
        # The mask rule itself (threshold + resize_and_crop) is exact on the same scores.
        assert np.array_equal(in_graph_mask(tf.constant(up), *s["mask_batch"].shape).numpy() != 0, plain != 0)
        mine, ref = got["mask"].numpy() != 0, plain != 0
        mask_diff += int((mine != ref).sum())
        mask_total += ref.size
        inter += int((mine & ref).sum())
        union += int((mine | ref).sum())
        np.testing.assert_allclose(got["probability"].numpy(), sigm, atol=1e-3)
    assert union > 0.1 * mask_total                    # the seeded model predicts real masks
    assert padded_diff / padded_total < 0.005, (padded_diff, padded_total)
    assert inter / union > 0.99 and mask_diff / mask_total < 0.005, (inter, union, mask_diff, mask_total)


@pytest.mark.parametrize("seed", range(3))
def test_in_graph_resize_and_pad_within_one_grey_level(seed):
    rs = np.random.RandomState(seed)
    fn = tf.function(lambda im: in_graph_preprocess(im, SIZE))
    differing = total = 0
    for _ in range(6):
        h, w = rs.randint(2, 300, size=2)
        blocks = rs.randint(0, 256, size=(4, 5, 3)).astype(np.uint8)   # flat regions: many exact .5 ties
        im = blocks[np.arange(h) * 4 // h][:, np.arange(w) * 5 // w]
        ref, got = img_as_ubyte(resize_and_pad(im, SIZE, SIZE)), fn(tf.constant(im)).numpy()
        assert np.abs(ref.astype(int) - got).max() <= 1
        differing += int((ref != got).sum())
        total += ref.size
    assert differing / total < 0.005


@pytest.mark.parametrize("seed", range(3))
def test_in_graph_mask_equals_resize_and_crop(seed):
    rs = np.random.RandomState(seed)
    for _ in range(8):
        h, w = rs.randint(2, 500, size=2)
        up = rs.standard_normal((SIZE, SIZE)).astype(np.float32)
        ref = predict_masks(up, None, None, (h, w), False)[0] != 0
        assert np.array_equal(in_graph_mask(tf.constant(up), h, w).numpy() != 0, ref)


def test_cli_export_of_the_trained_snapshot_reloads_and_runs(sample, tmp_path_factory, tmp_path):
    folders = snapshots(sample, tmp_path_factory)
    out = tmp_path / "sm"
    proc = subprocess.run([sys.executable, str(REPO / "trainval_model.py"), "-m", "export", "-d", "unc",
                           "-n", "RRN_model", "-f", str(folders["trained"]), "-i", str(TRAIN_STEPS),
                           "--img-size", str(SIZE), "--data-dir", str(sample / "data"), "--export-dir", str(out)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"wrote SavedModel {out}" in proc.stdout
    serve = tf.saved_model.load(str(out)).signatures["serving_default"]
    s = data.load_sample(data.batch_files(str(sample / "unc" / "val_batch"), "unc_val")[0])
    for sentence in (TRICKY[11], TRICKY[10], "", "."):   # > 20 tokens, unknown words, all pads
        got = serve(image=tf.constant(s["im_batch"]), sentence=tf.constant(sentence))
        assert got["mask"].shape == s["im_batch"].shape[:2]
        assert got["probability"].shape == (SIZE, SIZE) and np.isfinite(got["probability"].numpy()).all()


def test_export_replaces_atomically_and_names_missing_inputs(sample, tmp_path_factory, tmp_path):
    folders = snapshots(sample, tmp_path_factory)
    out = tmp_path / "sm"
    (out / "variables").mkdir(parents=True)
    (out / "stale.txt").write_text("old export")
    (out / EXPORT_MARKER).write_text("{}")               # a previous export of ours: only those are replaced
    export(export_config(sample, folders["seeded"], 0, out))
    assert sorted(os.listdir(tmp_path)) == ["sm"]        # no temporary or old folder left
    assert not (out / "stale.txt").exists() and (out / "saved_model.pb").is_file()

    cfg = export_config(sample, folders["seeded"], 0, tmp_path / "sm2")
    cfg.vocab_file = str(tmp_path / "none.txt")
    with pytest.raises(FileNotFoundError, match="vocabulary file .*none.txt not found"):
        export(cfg)
    with pytest.raises(FileNotFoundError, match="snapshot not found"):
        export(export_config(sample, folders["seeded"], 5, tmp_path / "sm2"))
    assert not (tmp_path / "sm2").exists()
