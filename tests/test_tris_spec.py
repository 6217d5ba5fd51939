"""models/tris_spec.py (the TRIS registry entry, not yet registered): the original evaluation through the spec's
predictor on the golden's validation samples (PIL stretch, ImageNet normalisation, sentence → ids, masks, I/U), the
.pth loading rules of ``load_trained``, and the stretch against the golden's network input."""
import json
import types

import numpy as np
import pytest

from models import tris
from models.tris_spec import TRISSpec, stretch_rgb


@pytest.fixture(scope="module")
def golden(golden_dir):
    folder = golden_dir / "tris"
    with open(folder / "manifest.json") as f:
        manifest = json.load(f)
    data = np.load(folder / "golden_tris.npz")
    return {"folder": folder, "manifest": manifest, "npz": {k: data[k] for k in data.files}}


def test_stretch_matches_the_original_input(golden):
    npz = golden["npz"]
    for c in range(2):
        x = tris.preprocess(stretch_rgb(npz[f"input__image_uint8__{c}"], 96)[None]).numpy()[0]
        np.testing.assert_array_equal(x, np.transpose(npz["input__image"][c], (1, 2, 0)))


class _GoldenIds:
    """Stands for the BPE tokenizer (the golden has no merges file): each validation sentence → its stored ids,
    77 long as ``clip.tokenize`` returns them (the reduced vocabulary the golden model was built with)."""

    def __init__(self, golden):
        npz, self.ids = golden["npz"], {}
        for c, ref in enumerate(golden["manifest"]["val_refs"]):
            for k, sentence in enumerate(ref["sentences"]):
                self.ids[sentence] = list(npz[f"input__val_word_ids__{c}"][:, k]) + [0] * 57

    def tokenize(self, sentence):
        return self.ids[sentence]


def test_predictor_gives_the_original_evaluation(golden, monkeypatch):
    npz = golden["npz"]
    state = {k[len("s1_init__"):]: v for k, v in npz.items() if k.startswith("s1_init__")}
    model = tris.TRISStage1.from_state_dict(state, "golden init")
    spec = TRISSpec("TRIS_stage1", None, 1)
    monkeypatch.setattr(spec, "tokenizer", types.MethodType(lambda self, path=None: _GoldenIds(golden), spec))
    samples = [{"im_batch": npz[f"input__image_uint8__{c}"], "mask_batch": npz[f"input__target_orig__{c}"],
                "sent_batch": np.array([sentence])}
               for c, ref in enumerate(golden["manifest"]["val_refs"]) for sentence in ref["sentences"]]
    predict = spec.predictor(model, 96, False)
    masks = predict(samples)
    for j, (mask, refined) in enumerate(masks):
        assert refined is None
        np.testing.assert_array_equal(mask, npz[f"s1_val__hard_pred__{j}"].astype(bool))
        assert predict.tris_results[j]["I"] == npz[f"s1_val__I__{j}"]
        assert predict.tris_results[j]["U"] == npz[f"s1_val__U__{j}"]
        assert predict.tris_results[j]["hitm"] == npz[f"s1_val__hitm__{j}"]
    assert spec.last_results is predict.tris_results
    summary = tris.summarize(spec.last_results)
    assert abs(summary["mIoU"] - npz["s1_val__mIoU"]) <= 1e-4 * abs(npz["s1_val__mIoU"])


def test_load_trained_from_pth_is_strict_per_stage(golden):
    path = str(golden["folder"] / "tris_stage2_checkpoint.pth")
    model = TRISSpec("TRIS_stage2", None, 2).load_trained(path, None)
    assert model.stage == 2 and model.model_name == "TRIS_stage2"
    with pytest.raises(ValueError) as info:
        TRISSpec("TRIS_stage1", None, 1).load_trained(path, None)
    message = str(info.value)
    assert message.startswith(f"{path}: not a TRIS stage-1 state_dict: missing keys logit_scale, vis_project.weight")
    assert "unexpected keys attention2.Wk.weight" in message and "\n" not in message
    candidates = TRISSpec("TRIS_stage2", None, 2).snapshot_candidates("weights", "unc", None, 0)
    assert candidates == ["weights/unc_iter_0", "weights/stage2_refcoco.pth"]


def test_serving_path_matches_the_evaluation(golden):
    """The export path (graph ops only): the stretch within 1 grey level of PIL's, and the same mask as the
    evaluation when given the same network input."""
    import tensorflow as tf

    npz = golden["npz"]
    state = {k[len("s1_init__"):]: v for k, v in npz.items() if k.startswith("s1_init__")}
    model = tris.TRISStage1.from_state_dict(state, "golden init")
    spec = TRISSpec("TRIS_stage1", None, 1)
    image = npz["input__image_uint8__0"]
    network_input, display = spec.serving_input(tf.constant(image), 96)
    assert np.max(np.abs(display.numpy().astype(int) - stretch_rgb(image, 96).astype(int))) <= 1
    exact_input = tris.preprocess(stretch_rgb(image, 96)[None])
    output = spec.forward(model, exact_input, tf.constant(npz["input__val_word_ids__0"][:, :1].T))
    mask, prob = spec.serving_output(output, *image.shape[:2])
    np.testing.assert_array_equal(mask.numpy(), npz["s1_val__hard_pred__0"])
    assert prob.shape == (96, 96) and float(tf.reduce_max(prob)) < 1.0
    assert network_input.shape == (1, 96, 96, 3)
