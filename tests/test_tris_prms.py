"""``external/tris_prms.py`` (``validate.py --prms --save_cam``) on the generated sample dataset's unc train refs, at
96×96 with the golden's reduced stage-1 checkpoint and frozen ViT-B/32 (both with CLIP's 49408-row token embedding,
the ``test_tris_train`` fixture).

The files are the original's: ``cam/<index>_<image id>.npy`` (float32 [H, W] at the image's size, values in
[0, 1)) and ``refcoco_train_names.json`` (the names in order); the maps equal ``models.tris``'s PRMS (the golden-
checked ``prms_scores`` / ``prms_select`` / ``evaluate_sentence``) computed here on the same inputs; existing
outputs are refused in one line, ``--skip-existing`` writes only what is missing.
"""
import json
import logging
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.test_tris_train import SIZE, weights  # noqa: F401  (the fixture)


def run_prms(sample, weights, out_dir, *extra):  # noqa: F811
    from external import tris_prms

    init, data_dir = weights
    return tris_prms.main([str(init), "-d", "unc", "--data-root", str(sample), "--data-dir", str(data_dir),
                           "--img-size", str(SIZE), "--out-dir", str(out_dir), *extra])


def expected_refs(sample):
    """[(name, image path, ann)] of the unc train refs in the split's order."""
    from models import tris_train
    from util.refer import Refer

    refer = Refer(tris_train.refer_root(str(sample)), "refcoco", "unc")
    out = []
    for index, ref_id in enumerate(refer.ref_ids("train")):
        ref = refer.refs[ref_id]
        file_name = refer.imgs[ref["image_id"]]["file_name"]
        out.append((f"{index}_{int(file_name.split('.')[0].split('_')[-1])}",
                    os.path.join(tris_train.image_root(str(sample)), file_name), ref))
    return out


@pytest.fixture(scope="module")
def exported(sample, weights, tmp_path_factory):  # noqa: F811
    out_dir = tmp_path_factory.mktemp("prms")
    assert run_prms(sample, weights, out_dir) == 0
    return out_dir


def test_files_and_format_are_the_originals(sample, exported):
    refs = expected_refs(sample)
    names = json.loads((exported / "refcoco_train_names.json").read_text())
    assert names == [name for name, _, _ in refs]
    assert sorted(os.listdir(exported)) == ["cam", "refcoco_train_names.json"]
    assert sorted(os.listdir(exported / "cam")) == sorted(f"{n}.npy" for n in names)
    peaks = []
    for name, image_path, _ in refs:
        cam = np.load(exported / "cam" / f"{name}.npy", allow_pickle=False)
        with Image.open(image_path) as img:
            assert cam.dtype == np.float32 and cam.shape == (img.height, img.width), name
        assert cam.min() >= 0 and cam.max() < 1, name
        peaks.append(float(cam.max()))
    assert all(p == 0 or p > 0.99 for p in peaks) and sum(p > 0.99 for p in peaks) >= len(peaks) // 2, peaks


def test_maps_equal_models_tris_prms(sample, weights, exported):  # noqa: F811
    """The first 6 refs recomputed with models.tris: stage-1 eval forward per sentence, CLIP scores over all the
    ref's sentences, the first best map, resized to the original size and max-normalised."""
    from models import model_spec, tris, tris_train
    from models.tris_spec import stretch_rgb
    from util import clip_bpe
    from util.pth import load_pth

    init, data_dir = weights
    model = tris.TRISStage1.from_state_dict(tris.model_state_dict(load_pth(str(init)), str(init)), str(init))
    vit = tris_train.load_frozen_vit(str(data_dir / "weights" / "ViT-B-32.pth"))
    tokenizer = model_spec("TRIS_stage1").tokenizer(str(data_dir / "bpe_simple_vocab_16e6.txt.gz"))
    chosen_other_than_first = 0
    for name, image_path, ref in expected_refs(sample)[:6]:
        with Image.open(image_path) as img:
            rgb = np.asarray(img.convert("RGB"))
        image = tris.preprocess(stretch_rgb(rgb, SIZE)[None])
        ids = np.array([clip_bpe.tris_ids(tokenizer.tokenize(s["sent"])) for s in ref["sentences"]], np.int32)
        outputs = [model(image, tf.constant(row[None])) for row in ids]
        chosen = tris.prms_select([tris.prms_scores(out, image, tf.constant(ids), vit) for out in outputs])
        chosen_other_than_first += chosen > 0
        expected = tris.evaluate_sentence(outputs[chosen].numpy()[0, :, :, 0], np.zeros(rgb.shape[:2]),
                                          np.zeros((0, 4)))["norm_pred"]
        ours = np.load(exported / "cam" / f"{name}.npy")
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4, err_msg=name)   # graph vs eager float32
    logging.getLogger(__name__).info("PRMS chose another than the first sentence for %d of 6 refs",
                                     chosen_other_than_first)


def test_existing_outputs_are_never_replaced_silently(sample, weights, exported, tmp_path, caplog):  # noqa: F811
    out_dir = tmp_path / "again"
    (out_dir / "cam").mkdir(parents=True)
    names = json.loads((exported / "refcoco_train_names.json").read_text())
    for name in names[1:]:
        (out_dir / "cam" / f"{name}.npy").write_bytes((exported / "cam" / f"{name}.npy").read_bytes())
    marker = out_dir / "cam" / f"{names[2]}.npy"
    os.utime(marker, (1, 1))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert run_prms(sample, weights, out_dir) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"error: {out_dir / 'cam' / (names[1] + '.npy')}: exists ({len(names) - 1} of {len(names)} "
                      f"maps already in {out_dir / 'cam'}); pass --skip-existing to keep them and write the rest, "
                      f"or --overwrite"], errors
    assert not (out_dir / "cam" / f"{names[0]}.npy").exists()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert run_prms(sample, weights, out_dir, "--skip-existing") == 0
    assert f"wrote 1 maps to {out_dir / 'cam'} ({len(names) - 1} kept)" in caplog.text
    assert os.stat(marker).st_mtime == 1
    np.testing.assert_array_equal(np.load(out_dir / "cam" / f"{names[0]}.npy"),
                                  np.load(exported / "cam" / f"{names[0]}.npy"))
    assert (out_dir / "refcoco_train_names.json").read_text() == (exported / "refcoco_train_names.json").read_text()
    assert not [p for p in out_dir.rglob("*") if p.name.endswith(".tmp")]
