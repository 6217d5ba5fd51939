"""TRIS's SavedModel (``-m export -n TRIS_stage1``): the in-graph CLIP BPE (``util.clip_bpe_graph``) gives
``util.clip_bpe``'s 20 ids — on the sample set's merges file and, when ``$REFSEG_CLIP_BPE`` names it, CLIP's real
``bpe_simple_vocab_16e6.txt.gz`` — and the exported model's mask equals the test loop's (``TRISSpec.predictor``) on
the sample set's val images: Pillow's resize, the normalisation, the tokenizer and the mask rule are exact in the
graph. The model is the golden's reduced stage-1 checkpoint as ``tests/test_tris_cli.py`` builds it."""
import os

import numpy as np
import pytest
import tensorflow as tf

from models.tris_spec import stretch_rgb
from tests.test_tris_cli import SIZE, tris_folder  # noqa: F401 (the fixture)
from tests.test_trainval import run
from util import clip_bpe, data
from util.clip_bpe_graph import ClipBPETokenizer
from util.config import RunConfig
from util.export import EXPORT_MARKER, export

SENTENCES = [
    "man on the right", "The man's hat, on the LEFT!!", "", "   \t ", "café ÉCOLE naïve Ærø straße",
    "it's they're we've I'm you'll he'd 'st 'S", "x_y 3rd 1.5m a-b a--b __init__", "a" * 60,
    "red &amp;amp; blue &lt;3 &quot;x&quot; &gt; &#39;", "&amp;lt; &amp;amp;lt; &lt3 &ampx &#39s &#039; &#39;5",
    "&#x27;s &#X27x &apos;s &aposx &nbsp;x &quot &amp", "“quoted” ‘single’ ﬁsh ﬂ", "emoji 😀 here — dash … ",
    "tab\tnew\nline  \u00a0spaces\u3000", "1234567 numbers 42nd ½ Ⅻ", "!!!'s '''re ?!'ll", "Москва 红色的杯子 ΑΘΗΝΑ",
    "e\u0301cole A\u030a \u212b o\u0302\u0301 \u1100\u1161\u11a8 \u0958 \uf900 \u0340 n\u0303o",
    "the man on the left of the red car near the tree", "the man on the left of the red car near the tree " * 4,
]


def sentences(sample):
    return SENTENCES + [data.sentence_of(data.load_sample(f))
                        for f in data.batch_files(str(sample / "unc" / "val_batch"), "unc_val")]


def check_tokenizer(path, texts):
    reference = clip_bpe.ClipTokenizer(path)
    tokenize = tf.function(ClipBPETokenizer(str(path)).__call__, input_signature=[tf.TensorSpec([], tf.string)])
    for text in texts:
        expected = clip_bpe.tris_ids(reference.tokenize(text))
        assert tokenize(tf.constant(text)).numpy().tolist() == expected, text


def test_in_graph_bpe_equals_util_clip_bpe_on_the_sample_merges(sample):
    check_tokenizer(sample / "data" / "bpe_simple_vocab_16e6.txt.gz", sentences(sample))


def test_in_graph_bpe_equals_util_clip_bpe_on_clips_merges(sample):
    path = os.environ.get("REFSEG_CLIP_BPE")
    if not path or not os.path.isfile(path):
        pytest.skip("REFSEG_CLIP_BPE does not name CLIP's bpe_simple_vocab_16e6.txt.gz "
                    "(python external/fetch_clip_bpe.py writes it)")
    check_tokenizer(path, sentences(sample))


@pytest.fixture(scope="module")
def stage2_folder(golden_dir, tmp_path_factory):
    """The golden's reduced stage-2 checkpoint as ``stage2_refcoco.pth``, its token embedding extended to CLIP's
    49408 rows as ``tests/test_tris_cli.py`` does for stage 1."""
    from models import tris
    from tests.test_restr_cli import write_state_dict_pth
    from tests.test_tris_cli import extended
    from util.pth import load_pth

    path = golden_dir / "tris" / "tris_stage2_checkpoint.pth"
    state = extended(tris.model_state_dict(load_pth(str(path)), str(path)), "backbone.token_embedding.weight", 0)
    folder = tmp_path_factory.mktemp("tris2")
    write_state_dict_pth(folder / "stage2_refcoco.pth", state)
    return folder


@pytest.fixture(scope="module", params=[1, 2])
def exported(request, sample, tmp_path_factory):
    """(loaded SavedModel, the model the test loop runs, its spec, the SavedModel folder) for stage 1 and 2."""
    from models import model_spec

    stage = request.param
    folder = request.getfixturevalue("tris_folder" if stage == 1 else "stage2_folder")
    name = f"TRIS_stage{stage}"
    spec = model_spec(name)
    out = tmp_path_factory.mktemp("tris_export") / "sm"
    cfg = RunConfig(mode="export", model=name, dataset="unc", iteration=0, folder=str(folder), image_size=SIZE,
                    data_dir=str(sample / "data"), export_dir=str(out))
    export(cfg)
    model = spec.load_trained(str(folder / f"stage{stage}_refcoco.pth"), cfg)
    return tf.saved_model.load(str(out)), model, spec, out


def test_saved_model_mask_equals_the_test_loop(exported, sample, monkeypatch):
    loaded, model, spec, out = exported
    serve = loaded.signatures["serving_default"]
    samples = [data.load_sample(f) for f in data.batch_files(str(sample / "unc" / "val_batch"), "unc_val")]
    expected = spec.predictor(model, SIZE, False)(samples)
    tokenizer = clip_bpe.ClipTokenizer(model.bpe_file)
    foreground = total = 0
    for s, (mask, _) in zip(samples, expected):
        got = serve(image=tf.constant(s["im_batch"]), sentence=tf.constant(data.sentence_of(s)))
        assert got["mask"].dtype == tf.uint8 and got["mask"].shape == s["mask_batch"].shape
        assert np.array_equal(got["mask"].numpy() != 0, mask)
        assert got["words"].numpy().tolist() == clip_bpe.tris_ids(tokenizer.tokenize(data.sentence_of(s)))
        assert np.array_equal(got["padded_image"].numpy(), stretch_rgb(s["im_batch"], SIZE))
        foreground += int(mask.sum())
        total += mask.size
    assert 0.02 < foreground / total < 0.98
    assert (out / EXPORT_MARKER).is_file()
    monkeypatch.setenv("REFSEG_CLIP_BPE", "/nonexistent/bpe.txt.gz")    # the tables are in the SavedModel
    again = tf.saved_model.load(str(out)).signatures["serving_default"]
    got = again(image=tf.constant(samples[0]["im_batch"]), sentence=tf.constant("the red square"))
    assert got["words"].numpy()[0] == clip_bpe.SOT_ID


def test_cli_export(sample, tris_folder, tmp_path):  # noqa: F811
    target = tmp_path / "cli_sm"
    proc = run(["-m", "export", "-d", "unc", "-n", "TRIS_stage1", "-f", str(tris_folder), "-i", "0", "--img-size",
                str(SIZE), "--data-dir", str(sample / "data"), "--export-dir", str(target)])
    assert f"wrote SavedModel {target}" in proc.stdout and (target / "saved_model.pb").is_file()
