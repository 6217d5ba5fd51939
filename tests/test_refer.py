"""util/refer.py: restricted unpickling (py2 and py3 data pickles load, code-carrying ones are refused)."""
import json
import os
import pickle

import numpy as np
import pytest
import scipy.io

from util.refer import AnnotationError, Refer, ann_to_mask, load_referit_gt_mask, safe_load_pickle

# A Python 2 `cPickle.dumps([{'ref_id': 7, 'sent': 'red'}], 2)`: py2 str as SHORT_BINSTRING ('U'), int as BININT1.
PY2_PICKLE = b"\x80\x02]q\x00}q\x01(U\x06ref_idq\x02K\x07U\x04sentq\x03U\x03redq\x04ua."


class _Evil:
    def __reduce__(self):
        return os.system, ("echo pwned",)


def test_py2_pickle_loads(tmp_path):
    p = tmp_path / "refs(unc).p"
    p.write_bytes(PY2_PICKLE)
    assert safe_load_pickle(p) == [{"ref_id": 7, "sent": "red"}]


def test_containers_load(tmp_path):
    p = tmp_path / "ok.p"
    data = [{"a": (1, 2.5, None, True), "b": {3, 4}, "c": "x", "d": frozenset([1])}]
    p.write_bytes(pickle.dumps(data, protocol=2))
    assert safe_load_pickle(p) == data


def test_code_pickle_refused(tmp_path):
    p = tmp_path / "evil.p"
    p.write_bytes(pickle.dumps([_Evil()], protocol=2))
    with pytest.raises(AnnotationError, match=r"evil\.p: refusing to load global posix\.system"):
        safe_load_pickle(p)


def test_missing_and_garbage(tmp_path):
    with pytest.raises(AnnotationError, match="annotation file not found"):
        safe_load_pickle(tmp_path / "nope.p")
    p = tmp_path / "garbage.p"
    p.write_bytes(b"\x80\x02garbage")
    with pytest.raises(AnnotationError, match="garbage.p"):
        safe_load_pickle(p)


def test_refer_index_and_masks(tmp_path):
    folder = tmp_path / "refcoco"
    folder.mkdir()
    refs = [{"ref_id": 5, "ann_id": 1, "image_id": 9, "category_id": 1, "split": "val", "sentences": []},
            {"ref_id": 2, "ann_id": 2, "image_id": 9, "category_id": 1, "split": "val", "sentences": []}]
    (folder / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    square = [1.0, 1.0, 5.0, 1.0, 5.0, 5.0, 1.0, 5.0]
    inst = {"images": [{"id": 9, "height": 8, "width": 10}], "categories": [{"id": 1, "name": "square"}],
            "annotations": [{"id": 1, "segmentation": [square], "image_id": 9},
                            {"id": 2, "segmentation": [square, [6.0, 6.0, 9.0, 6.0, 9.0, 7.0]], "image_id": 9}]}
    (folder / "instances.json").write_text(json.dumps(inst))
    r = Refer(tmp_path, "refcoco", "unc")
    assert r.ref_ids("val") == [2, 5] and r.ref_ids("train") == []
    one = ann_to_mask(r.anns[1]["segmentation"], 8, 10)
    two = ann_to_mask(r.anns[2]["segmentation"], 8, 10)
    assert one.dtype == np.float32 and one.shape == (8, 10) and one.max() == 1
    assert two.sum() > one.sum() and np.all(two >= one)
    seg = np.ones((4, 6), np.uint8)
    seg[1:3, 2:4] = 0
    scipy.io.savemat(tmp_path / "m.mat", {"segimg_t": seg})
    np.testing.assert_array_equal(load_referit_gt_mask(tmp_path / "m.mat"), (seg == 0).astype(np.float32))
