"""models/sag_spec.py (SaG's registry entry, not yet registered) and util/sag_batches.py (SaG's no-pad batches):
the entry builds, tokenises, runs a training step and predicts masks on a golden-sized model; its BERT reader maps a
Hugging Face safetensors file; the no-pad resize equals the installed scikit-image's ``transform.resize``."""
import dataclasses
import json
import struct

import numpy as np
import pytest
import skimage
import skimage.transform

from models import sag
from models.sag_spec import SAG_DEFAULTS, SaGSpec, bert_state_dict, read_safetensors
from util.sag_batches import nopad_size, process_pair_nopad


@dataclasses.dataclass(frozen=True)
class _Defaults:
    max_iter: int
    snapshot: int
    stop: int
    keep: int
    lr: float
    batch_size: int
    image_size: int


GOLDEN_SIZES = dict(vit_dim=64, vit_heads=4, vit_layers=2, embed_dim=32, num_slots=9, cascade=3, cross_dim_head=16,
                    latent_dim_head=8, cma_dim_head=16, dropout=0.0, vit_drop_path_rate=0.0,
                    bert_config=dict(vocab_size=154, hidden=48, layers=2, heads=4, intermediate=96, max_positions=64,
                                     type_vocab_size=2, dropout_rate=0.0))


@pytest.fixture(scope="module")
def golden(golden_dir):
    folder = golden_dir / "sag"
    with open(folder / "manifest.json") as f:
        manifest = json.load(f)
    data = np.load(folder / "golden_sag.npz")
    return folder, manifest, {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def spec(golden, tmp_path_factory):
    _, manifest, _ = golden
    vocab = tmp_path_factory.mktemp("bert") / "vocab.txt"
    vocab.write_text("".join(t + "\n" for t in manifest["vocab"]), encoding="utf-8")
    defaults = _Defaults(**dict(SAG_DEFAULTS, image_size=64))
    return SaGSpec("SaG_golden", defaults, GOLDEN_SIZES, "random", vocab_file=str(vocab))


def test_spec_trains_and_predicts(golden, spec):
    """The golden's two val samples through the entry: text batch as the golden's, one training step lowers
    nothing it should not (finite, AdamW state), the predictor returns label-sized masks and ``--seed`` fixes them."""
    folder, manifest, npz = golden
    model = spec.build(image_size=64, seed=3)
    spec.initialize(model, "random", 3)
    records = sorted((r for r in manifest["tokenization"] if r["split"] == "val"), key=lambda r: r["index"])
    order, ids, _ = spec.text_batch([r["sentence"] for r in records])
    assert order == npz["input__ids"].tolist() and np.array_equal(ids, npz["input__txt"])
    images = np.stack([spec.input_numpy(npz[f"val{i}__image_uint8"]) for i in order])
    assert np.array_equal(images, np.transpose(npz["input__image"], (0, 2, 3, 1)))
    optimizer = spec.make_optimizer(model, spec.train_variables(model), 1e-4, 10)
    result = spec.train_step(model, optimizer)(images, ids, spec.slot_noise(model, 2))
    assert np.isfinite(float(result["loss"])) and int(optimizer.step.numpy()) == 1
    assert float(result["loss_backward"]) == pytest.approx(float(result["loss"]) / 5000, rel=1e-6)
    assert "encoders.img_enc.img_backbone.head.weight" not in spec.train_variables(model)
    samples = [{"im_batch": npz[f"val{i}__image_uint8"], "mask_batch": npz[f"val{i}__label"],
                "sent_batch": np.array([records[i]["sentence"]])} for i in (0, 1)]
    masks = spec.predictor(model, 64, False)(samples)
    assert [m.shape for m, _ in masks] == [(48, 80), (90, 70)] and all(m.dtype == bool for m, _ in masks)
    metrics = sag.seg_metrics(spec.last_records)
    assert sorted(metrics) == sorted(f"{v}_{m}" for v in ("max", "avg") for m in ("cIoU", "mIoU", "prec", "recall"))
    label_sum = [npz[f"val{i}__label"].sum() for i in (0, 1)]
    assert [r["avg_cm"][2] for r in spec.last_records] == [m.sum() for m, _ in masks]
    assert [r["avg_cm"][3] for r in spec.last_records] == label_sum
    again = spec.build(image_size=64, seed=3)              # same seed, fresh model: the same masks
    for key, var in again.distinct_variables().items():
        var.assign(model.distinct_variables()[key])
    assert all(np.array_equal(a, b) for (a, _), (b, _) in zip(masks, spec.predictor(again, 64, False)(samples)))


def test_original_checkpoint_through_the_entry(golden, spec, tmp_path):
    folder, _, npz = golden

    class Cfg:
        seed, image_size = 0, 64

    model = spec.load_trained(str(folder / "ckpt_epoch0.pth.tar"), Cfg)
    for key, var in model.distinct_variables().items():
        assert np.array_equal(var.numpy(), npz[f"after_step1__param__{key}"]), key
    assert spec.find_snapshot([str(tmp_path / "none_iter_5"), str(folder / "ckpt_epoch0.pth.tar")]).endswith(
        "ckpt_epoch0.pth.tar")


def _safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, (dtype, array) in tensors.items():
        raw = array.tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    return path


def test_bert_safetensors_reader(tmp_path):
    ln = np.arange(3, dtype=np.float32)
    bf16 = (np.array([1.0, -2.5], np.float32).view(np.uint32) >> 16).astype("<u2")
    path = _safetensors(tmp_path / "m.safetensors", {
        "bert.embeddings.LayerNorm.gamma": ("F32", ln), "bert.embeddings.LayerNorm.beta": ("F32", ln + 1),
        "bert.embeddings.position_ids": ("I64", np.arange(3, dtype="<i8")),
        "cls.predictions.bias": ("F32", ln), "bert.pooler.dense.bias": ("BF16", bf16)})
    out = bert_state_dict(read_safetensors(path))
    assert sorted(out) == ["encoders.txt_enc.bert.embeddings.LayerNorm.bias",
                           "encoders.txt_enc.bert.embeddings.LayerNorm.weight",
                           "encoders.txt_enc.bert.pooler.dense.bias"]
    assert np.array_equal(out["encoders.txt_enc.bert.embeddings.LayerNorm.bias"], ln + 1)
    assert np.array_equal(out["encoders.txt_enc.bert.pooler.dense.bias"], [1.0, -2.5])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00")
    with pytest.raises(ValueError, match=r"bad\.safetensors: not a \.safetensors file$"):
        read_safetensors(bad)


@pytest.mark.parametrize("shape", [(90, 70), (37, 120), (480, 300), (600, 800)])
def test_nopad_batches_equal_installed_skimage(shape):
    """SaG's build_batches: train images and masks resized by min(480/h, 480/w), no padding, with the installed
    scikit-image's default ``resize`` (anti-aliasing when shrinking); other splits unchanged."""
    rng = np.random.default_rng(sum(shape))
    im = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
    mask = np.zeros(shape, np.float32)
    mask[shape[0] // 4:shape[0] // 2, shape[1] // 3:] = 1
    size = nopad_size(*shape)
    assert max(size) == 480
    ours_im, ours_mask = process_pair_nopad(im, mask, train=True)
    assert np.array_equal(ours_im, skimage.img_as_ubyte(skimage.transform.resize(im, size)))
    assert np.array_equal(ours_mask, skimage.transform.resize(mask, size) > 0)
    same_im, same_mask = process_pair_nopad(im[:, :, 0], mask, train=False)
    assert same_im.shape == shape + (3,) and np.array_equal(same_mask, mask > 0)
    assert sag.CROP_SIZE == SAG_DEFAULTS["image_size"] == 384
