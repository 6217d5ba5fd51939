"""util/sample_data.py: layout, formats, the deliberate hard cases, determinism."""
import filecmp
import json
import os

import numpy as np
import pytest
from PIL import Image

from util.refer import Refer
from util.sample_data import make_sample
from util.text import load_vocab_dict_from_file, tokenize


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return make_sample(str(tmp_path_factory.mktemp("sample")))


def test_layout(sample):
    for rel in ["data/vocabulary_Gref.txt", "data/vocabulary_referit.txt", "data/Gref_emb.npy",
                "data/referit_emb.npy", "data/referit_query_trainval.json", "data/referit_query_test.json",
                "external/refer/data/refcoco/refs(unc).p", "external/refer/data/refcoco+/refs(unc).p",
                "external/refer/data/refcocog/refs(google).p", "external/refer/data/refcocog/refs(umd).p",
                "external/refer/data/refcocog/instances.json"]:
        assert os.path.isfile(os.path.join(sample, rel)), rel
    n_img = len(os.listdir(os.path.join(sample, "data/coco/images/train2014")))
    n_ref = len(os.listdir(os.path.join(sample, "data/referit/images")))
    assert 40 <= n_img + n_ref <= 60


def test_coco_content(sample):
    root = os.path.join(sample, "external/refer/data")
    splits = {("refcoco", "unc"): {"train", "val", "testA", "testB"}, ("refcoco+", "unc"): {"train", "val", "testA", "testB"},
              ("refcocog", "google"): {"train", "val"}, ("refcocog", "umd"): {"train", "val", "test"}}
    vocab = load_vocab_dict_from_file(os.path.join(sample, "data/vocabulary_Gref.txt"))
    lengths, sizes, grays, multi = [], [], 0, 0
    for (ds, by), want in splits.items():
        r = Refer(root, ds, by)
        assert {ref["split"] for ref in r.refs.values()} == want
        for ref in r.refs.values():
            for s in ref["sentences"]:
                assert set(s) >= {"sent", "sent_id", "tokens", "raw"}
                lengths.append(len(tokenize(s["sent"])))
                assert all(w.strip() in vocab for w in tokenize(s["sent"]))
        for ann in r.anns.values():
            multi += len(ann["segmentation"]) > 1
    for name in os.listdir(os.path.join(sample, "data/coco/images/train2014")):
        im = np.asarray(Image.open(os.path.join(sample, "data/coco/images/train2014", name)))
        sizes.append(im.shape[:2])
        grays += im.ndim == 2
    assert max(lengths) > 20 and multi > 0 and grays > 0
    assert any(h > w for h, w in sizes) and any(w > h for h, w in sizes)
    assert all(64 <= min(s) and max(s) <= 160 for s in sizes)
    anns = Refer(root, "refcoco", "unc").anns.values()
    assert any(a["area"] < 10 for a in anns), "no tiny object"


def test_referit_content(sample):
    q = json.load(open(os.path.join(sample, "data/referit_query_trainval.json")))
    key = sorted(q)[0]
    seg = __import__("scipy.io").io.loadmat(os.path.join(sample, "data/referit/mask", key + ".mat"))["segimg_t"]
    im = np.asarray(Image.open(os.path.join(sample, "data/referit/images", key.split("_")[0] + ".jpg")))
    assert seg.shape == im.shape[:2] and (seg == 0).any() and (seg != 0).any()
    emb = np.load(os.path.join(sample, "data/referit_emb.npy"))
    n_lines = len(open(os.path.join(sample, "data/vocabulary_referit.txt")).read().splitlines())
    assert emb.dtype == np.float32 and emb.shape == (n_lines, 300) and not emb[0].any()


def test_deterministic_via_cli(sample, tmp_path):
    import build_batches
    again = str(tmp_path / "again")
    assert build_batches.main(["--make-sample", again]) == 0
    cmp = filecmp.dircmp(sample, again)
    def check(c):
        assert not c.left_only and not c.right_only and not c.diff_files, (c.left, c.diff_files)
        _, mismatch, errors = filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)
        assert not mismatch and not errors
        for sub in c.subdirs.values():
            check(sub)
    check(cmp)
