"""SaG's SavedModel (``-m export -n SaG_tiny``): the in-graph WordPiece gives ``util.wordpiece``'s ids, and the
exported model's mask equals the test loop's (``SaGSpec.predictor``, the same ``--seed``) on the sample set's val
images — PIL's resize, the normalisation, the fixed slot noise (the first draw of the seed's generator) and
``eval_seg``'s ``avg_cm`` mask are exact in the graph."""
import json

import numpy as np
import pytest
import tensorflow as tf

from models import sag
from tests.test_trainval import run
from util import data
from util.config import RunConfig
from util.export import EXPORT_MARKER, WordPieceTokenizer, export
from util.wordpiece import WordPiece, basic_tokens

MODEL, SIZE = "SaG_tiny", 64
SENTENCES = [
    "man on the right", "The man's hat, on the LEFT!!", "", "   \t ", "café ÉCOLE naïve Ærø İstanbul straße",
    "红色的 杯子 on the left", "x_y 3rd 1.5m a-b a--b __init__", "a" * 101, "b" * 100, "smallest tallest bigger",
    "\u00a0non-breaking\u3000ideographic\u2003em\x1cfs\x85nel ", "e\u0301 \u0301 ﬁsh Ω Å Ǆ ŉ",
    "what?! ... -- no way ;-)",
    "tab\tnew\nline\u2028sep\u2029par", "\ufffd\x00zero\u200bwidth", "emoji 😀 here «quoted» „low“ — dash",
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ", "über-smallest,tallest;bigger", "unknownword qqqq blorf smallish", "Ⅻ ½ ² ﬀ ǅ",
    "ΑΘΗΝΑ αθηνα", "Москва москва", "ümlaut Ümlaut", "the man on the left of the red car near the tree " * 3,
]


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    """A vocab.txt in bert-base-uncased's layout: the words of every other sentence whole, and 1–3 character
    pieces of all words (prefixes and "##" continuations, every third left out), so greedy matching, [UNK] and
    punctuation are all exercised."""
    words = sorted({w for s in SENTENCES for w in basic_tokens(s)})
    whole = sorted({w for s in SENTENCES[::2] for w in basic_tokens(s)})
    pieces = set()
    for w in words:
        for k in range(1, 4):
            pieces.add(w[:k])
            pieces.update("##" + w[i:i + k] for i in range(1, len(w)))
    pieces = sorted(pieces)
    pieces = [p for i, p in enumerate(pieces) if i % 3]
    path = tmp_path_factory.mktemp("bert") / "vocab.txt"
    lines = ["[PAD]"] + [f"[unused{k}]" for k in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    path.write_text("\n".join(lines + whole + pieces) + "\n", encoding="utf-8")
    return path


def test_in_graph_wordpiece_equals_util_wordpiece(vocab_file, sample):
    for path in (vocab_file, sample / "data" / "weights" / "bert-base-uncased" / "vocab.txt"):
        reference = WordPiece(path)
        tokenize = tf.function(WordPieceTokenizer(str(path)).__call__, input_signature=[tf.TensorSpec([], tf.string)])
        sentences = SENTENCES + [data.sentence_of(data.load_sample(f))
                                 for f in data.batch_files(str(sample / "unc" / "val_batch"), "unc_val")]
        hits = 0
        for sentence in sentences:
            expected = reference.caption_ids(sentence)
            assert tokenize(tf.constant(sentence)).numpy().tolist() == expected, sentence
            hits += sum(i not in (reference.unk_id, reference.cls_id, reference.sep_id) for i in expected)
        assert hits > 50                      # real vocabulary hits, not only [UNK]


@pytest.fixture(scope="module")
def exported(sample, tmp_path_factory):
    """(loaded SavedModel, the model it was exported from, the spec) for -n SaG_tiny's seeded weights at 64."""
    from models import model_spec

    spec = model_spec(MODEL)
    folder = tmp_path_factory.mktemp("sag_export")
    model = spec.build(image_size=SIZE, seed=0)
    tf.train.Checkpoint(model=model).write(str(folder / "unc_iter_0"))
    out = folder / "sm"
    cfg = RunConfig(mode="export", model=MODEL, dataset="unc", iteration=0, folder=str(folder), image_size=SIZE,
                    data_dir=str(sample / "data"), export_dir=str(out), seed=0)
    export(cfg)
    model.vocab_file = spec.vocab_path(cfg)
    return tf.saved_model.load(str(out)), model, spec, out


def test_saved_model_mask_equals_the_test_loop(exported, sample):
    loaded, model, spec, out = exported
    serve = loaded.signatures["serving_default"]
    files = data.batch_files(str(sample / "unc" / "val_batch"), "unc_val")
    samples = [data.load_sample(f) for f in files]
    first_of_run = spec.predictor(model, SIZE, False)(samples[:2])[0][0]
    tokenizer = spec.tokenizer(model.vocab_file)
    foreground = total = 0
    for s in samples[::4]:       # every 4th val sample: each needs a fresh predictor (a new trace), ~5 s apiece
        expected = spec.predictor(model, SIZE, False)([s])[0][0]     # a fresh predictor: the seed's first noise
        got = serve(image=tf.constant(s["im_batch"]), sentence=tf.constant(data.sentence_of(s)))
        assert got["mask"].dtype == tf.uint8 and got["mask"].shape == s["mask_batch"].shape
        assert np.array_equal(got["mask"].numpy() != 0, expected)
        assert got["words"].numpy().tolist() == tokenizer.caption_ids(data.sentence_of(s))
        assert np.array_equal(got["padded_image"].numpy(),
                              np.round((sag.input_image(s["im_batch"], SIZE) * 0.5 + 0.5) * 255).astype(np.uint8))
        foreground += int(expected.sum())
        total += expected.size
    assert 0.02 < foreground / total < 0.98           # masks are not trivially empty or full
    first = serve(image=tf.constant(samples[0]["im_batch"]), sentence=tf.constant(data.sentence_of(samples[0])))
    assert np.array_equal(first["mask"].numpy() != 0, first_of_run)          # -m test's first sample, same seed
    again = serve(image=tf.constant(samples[0]["im_batch"]), sentence=tf.constant(data.sentence_of(samples[0])))
    assert np.array_equal(again["probability"].numpy(), first["probability"].numpy())    # deterministic
    marker = json.loads((out / EXPORT_MARKER).read_text())
    assert marker["model"] == MODEL and marker["seed"] == 0 and marker["vocabulary"].endswith("vocab.txt")


def test_cli_export(exported, sample, tmp_path):
    _, _, _, out = exported
    target = tmp_path / "cli_sm"
    proc = run(["-m", "export", "-d", "unc", "-n", MODEL, "-f", str(out.parent), "-i", "0", "--img-size", str(SIZE),
                "--data-dir", str(sample / "data"), "--export-dir", str(target)])
    assert f"wrote SavedModel {target}" in proc.stdout
    assert (target / "saved_model.pb").is_file()
