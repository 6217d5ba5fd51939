"""``trainval_model.py -m test -n TRIS_stage1 --data-root DIR``: TRIS's evaluation (``validate.validate``) straight
from the sample set's refer files (``models.tris_train.ReferEvalSet`` through ``TRISSpec.test_source``), against
the same model evaluated from the ``.npz`` val batches (``build_batches.py``) and against numpy.

The models: ``tests/test_tris_cli.py``'s (the golden's reduced stage 1 as ``stage1_refcoco.pth``, 96×96) and the
golden's reduced stage 2 the same way (``stage2_refcoco.pth``; refer path only).

What may differ between the two paths, and why they agree here: the refer path builds the gt mask as TRIS's
``REFER.getMask`` + ``annot[mask == 1] = 1`` (polygons SUMMED, a pixel covered by two polygons of the annotation is
background), the ``.npz`` batches as the TF1 originals (the polygons' union); the sample set's two-polygon objects
do not overlap (asserted), so the masks, the network outputs, I, U and every figure are equal. The ``.npz``
samples carry no box, so that run reports no Hit (one log line says why).

The golden check of Hit itself (the original's per-sentence hit / hitm with its boxes) is
``tests/test_tris.py::test_evaluation`` (``tris.evaluate_sentence``); here the predictor is checked to pass the
boxes on (``test_predictor_reports_the_golden_hit``).
"""
import json
import logging
import os
import pickle

import numpy as np
import pytest

from tests import test_tris_cli, test_tris_spec

SIZE = test_tris_cli.SIZE
tris_folder = test_tris_cli.tris_folder        # module fixtures, shared
golden = test_tris_spec.golden


def run(argv, caplog):
    """``trainval_model.main(argv)`` in this process → (exit status, log text)."""
    import trainval_model

    caplog.clear()
    with caplog.at_level(logging.INFO):
        status = trainval_model.main(argv)
    return status, caplog.text


def command(sample, folder, *extra):
    return ["-m", "test", "-t", "val", "-d", "unc", "-n", "TRIS_stage1", "-f", str(folder), "-i", "0", "--img-size",
            str(SIZE), "--batch-root", str(sample), "--data-dir", str(sample / "data"), *extra]


def recorded_run(argv, caplog, monkeypatch, json_path):
    """Run ``argv`` recording every ``tris.evaluate_sentence`` call (network map, gt, boxes, normalised map,
    result) → (records, the JSON written, log text)."""
    from models import tris

    records, evaluate_sentence = [], tris.evaluate_sentence

    def recording(output, gt_mask, boxes):
        result = evaluate_sentence(output, gt_mask, boxes)
        records.append({"output": output, "gt": np.asarray(gt_mask), "boxes": np.asarray(boxes), **result})
        return result

    monkeypatch.setattr(tris, "evaluate_sentence", recording)
    status, out = run(argv, caplog)
    assert status == 0, out[-3000:]
    monkeypatch.setattr(tris, "evaluate_sentence", evaluate_sentence)
    return records, json.loads(json_path.read_text()), out


def val_annotations(sample):
    """[(sentences, annotation, image entry)] of the val refs, ascending ref_id, read with pickle / json."""
    root = sample / "external" / "refer" / "data" / "refcoco"
    with open(root / "refs(unc).p", "rb") as f:
        refs = pickle.load(f)
    instances = json.loads((root / "instances.json").read_text())
    anns = {a["id"]: a for a in instances["annotations"]}
    images = {i["id"]: i for i in instances["images"]}
    return [([s["sent"] for s in r["sentences"]], anns[r["ann_id"]], images[r["image_id"]])
            for r in sorted(refs, key=lambda r: r["ref_id"]) if r["split"] == "val" and r["sentences"]]


def test_refer_evaluation_reports_hit_and_matches_the_npz_path(sample, tris_folder, caplog, monkeypatch):
    from pycocotools import mask as cocomask

    json_path = tris_folder / "stage1_refcoco.pth.unc_val.json"
    refer, result, out = recorded_run(command(sample, tris_folder, "--data-root", str(sample)), caplog,
                                      monkeypatch, json_path)
    refs = val_annotations(sample)
    n_sentences = sum(len(sentences) for sentences, _, _ in refs)
    assert len(refer) == n_sentences == result["without_dcrf"]["samples"] and result["skipped_unreadable"] == []
    assert f"TRIS_stage1: {n_sentences} sentences of {len(refs)} val refs from " in out

    # ground truth as ReferDataset builds it, from the files; Hit / PointM recomputed from the recorded maps
    expected = [(ann, image) for sentences, ann, image in refs for _ in sentences]
    hits, hitms = [], []
    for record, (ann, image) in zip(refer, expected):
        polygons = cocomask.decode(cocomask.frPyObjects(ann["segmentation"], image["height"], image["width"]))
        assert polygons.sum(axis=2).max() == 1                 # no overlapping polygons in the sample set
        np.testing.assert_array_equal(record["gt"], polygons.sum(axis=2) == 1)
        x, y, w, h = (int(v) for v in ann["bbox"])
        np.testing.assert_array_equal(record["boxes"], [[x, y, x + w, y + h]])
        row, col = np.unravel_index(np.argmax(record["norm_pred"]), record["norm_pred"].shape)
        hits.append(x <= col <= x + w and y <= row <= y + h)
        hitms.append(bool(record["gt"][row, col]))
    own = result["original_metrics"]
    assert own["Hit"] == pytest.approx(100 * np.mean(hits), abs=1e-12)
    assert own["PointM"] == pytest.approx(100 * np.mean(hitms), abs=1e-12)
    assert own["mIoU"] == pytest.approx(100 * np.mean([r["I"] / r["U"] for r in refer]), rel=1e-12)
    assert own["oIoU"] == pytest.approx(100 * sum(r["I"] for r in refer) / sum(r["U"] for r in refer), rel=1e-12)
    assert f"TRIS validate(): mIoU = {own['mIoU']:f}; oIoU = {own['oIoU']:f}; Hit = {own['Hit']:f}; " \
           f"PointM = {own['PointM']:f}" in out

    npz, npz_result, npz_out = recorded_run(command(sample, tris_folder), caplog, monkeypatch, json_path)
    n_files = len([f for f in os.listdir(sample / "unc" / "val_batch") if f.endswith(".npz")])
    assert len(npz) == n_files == n_sentences
    for a, b in zip(refer, npz):
        np.testing.assert_array_equal(a["gt"], b["gt"])
        np.testing.assert_array_equal(a["output"], b["output"])
        np.testing.assert_array_equal(a["hard_pred"], b["hard_pred"])
        assert (a["I"], a["U"], a["hitm"]) == (b["I"], b["U"], b["hitm"])
    assert npz_result["without_dcrf"] == result["without_dcrf"]
    assert "Hit" not in npz_result["original_metrics"]
    assert {k: v for k, v in own.items() if k != "Hit"} == npz_result["original_metrics"]
    assert f"TRIS Hit not available: {n_files} of {n_files} samples have no ground-truth box" in npz_out


@pytest.fixture(scope="module")
def stage2_folder(golden_dir, tmp_path_factory):
    """The golden's stage-2 checkpoint as ``stage2_refcoco.pth``, its token embedding extended as ``tris_folder``."""
    from models import tris
    from tests.test_restr_cli import write_state_dict_pth
    from tests.test_tris_train import extended
    from util.pth import load_pth

    path = golden_dir / "tris" / "tris_stage2_checkpoint.pth"
    folder = tmp_path_factory.mktemp("tris2")
    write_state_dict_pth(folder / "stage2_refcoco.pth", extended(tris.model_state_dict(load_pth(str(path)), str(path)),
                                                                 "backbone.token_embedding.weight", 0))
    return folder


def test_stage2_refer_evaluation_reports_hit(sample, stage2_folder, caplog, monkeypatch):
    """``-n TRIS_stage2`` through the same path: every val sentence, Hit and PointM from the recorded maps."""
    argv = command(sample, stage2_folder, "--data-root", str(sample))
    argv[argv.index("TRIS_stage1")] = "TRIS_stage2"
    records, result, _ = recorded_run(argv, caplog, monkeypatch, stage2_folder / "stage2_refcoco.pth.unc_val.json")
    n_sentences = sum(len(sentences) for sentences, _, _ in val_annotations(sample))
    assert result["model"] == "TRIS_stage2" and result["without_dcrf"]["samples"] == len(records) == n_sentences
    hits, hitms = [], []
    for record in records:
        row, col = np.unravel_index(np.argmax(record["norm_pred"]), record["norm_pred"].shape)
        (x1, y1, x2, y2), = record["boxes"]
        hits.append(x1 <= col <= x2 and y1 <= row <= y2)
        hitms.append(bool(record["gt"][row, col]))
    own = result["original_metrics"]
    assert own["Hit"] == pytest.approx(100 * np.mean(hits), abs=1e-12)
    assert own["PointM"] == pytest.approx(100 * np.mean(hitms), abs=1e-12)
    assert own["oIoU"] == pytest.approx(100 * result["without_dcrf"]["overall_iou"], rel=1e-9)


@pytest.mark.parametrize("extra, message", [
    (lambda tmp: ["--data-root", str(tmp)], "--data-root {tmp}: {tmp}/external/refer/data/refcoco/refs(unc).p not "
                                            "found"),
    (lambda tmp: ["--data-root", str(tmp), "-d", "referit"],
     "-m test -n TRIS_stage1 --data-root {tmp}: {tmp}/data/referit/annotations/val.pickle not found (TRIS's ReferIt "
     "annotations"),
])
def test_refer_evaluation_problems_are_one_line(sample, tris_folder, tmp_path, caplog, extra, message):
    status, out = run(command(sample, tris_folder, *extra(tmp_path)), caplog)
    errors = [line for line in out.splitlines() if "error:" in line]
    assert status == 1 and len(errors) == 1 and message.format(tmp=tmp_path) in errors[0], out[-2000:]
    assert "Traceback" not in out


def test_gt_mask_and_box_follow_referdataset():
    """``annot[mask == 1] = 1`` over the polygons' sum: the overlap of two polygons is background (the union
    rule of ``util.refer.ann_to_mask`` keeps it); the box is cast to int before x2 = x + w."""
    from models.tris_train import refer_box, refer_gt_mask
    from util.refer import ann_to_mask

    squares = [[2.0, 2.0, 12.0, 2.0, 12.0, 12.0, 2.0, 12.0], [8.0, 8.0, 18.0, 8.0, 18.0, 18.0, 8.0, 18.0]]
    first, second = (ann_to_mask([square], 20, 20) > 0 for square in squares)
    gt = refer_gt_mask(squares, 20, 20)
    assert gt.dtype == bool and (first & second).any() and not gt[10, 10]
    np.testing.assert_array_equal(gt, first ^ second)
    np.testing.assert_array_equal(ann_to_mask(squares, 20, 20) > 0, first | second)
    np.testing.assert_array_equal(refer_box([1.7, 2.9, 10.2, 5.5]), [[1, 2, 11, 7]])


def test_predictor_reports_the_golden_hit(golden, monkeypatch):
    """The golden's validation samples with their boxes through the predictor: per-sentence hit / hitm and the
    summary's Hit as the original computed them."""
    import types

    from models import tris
    from models.tris_spec import TRISSpec

    npz = golden["npz"]
    state = {k[len("s1_init__"):]: v for k, v in npz.items() if k.startswith("s1_init__")}
    model = tris.TRISStage1.from_state_dict(state, "golden init")
    spec = TRISSpec("TRIS_stage1", None, 1)
    monkeypatch.setattr(spec, "tokenizer",
                        types.MethodType(lambda self, path=None: test_tris_spec._GoldenIds(golden), spec))
    samples = [{"im_batch": npz[f"input__image_uint8__{c}"], "mask_batch": npz[f"input__target_orig__{c}"],
                "sent_batch": np.array([sentence]), "boxes": npz[f"input__boxes__{c}"][None]}
               for c, ref in enumerate(golden["manifest"]["val_refs"]) for sentence in ref["sentences"]]
    predict = spec.predictor(model, 96, False)
    predict(samples)
    for j, r in enumerate(predict.tris_results):
        assert (r["hit"], r["hitm"]) == (npz[f"s1_val__hit__{j}"], npz[f"s1_val__hitm__{j}"])
    metrics = spec.original_metrics()
    assert metrics["Hit"] == pytest.approx(float(npz["s1_val__hit"]), abs=1e-12)
    assert metrics["PointM"] == pytest.approx(float(npz["s1_val__hitm"]), abs=1e-12)
