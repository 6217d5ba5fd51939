"""Weights in without torch: the restricted ``.pth`` reader (util/pth.py) and the AugReg ViT ``.npz`` reader with
torch's bicubic position-embedding resize (util/vit_weights.py), against the goldens of the original code."""
import json
import logging
import struct
import zipfile
from fractions import Fraction

import numpy as np
import pytest

from util.pth import PthError, load_pth, load_state_dict
from util.vit_weights import (AUGREG_B16_384_URL, _fma32, augreg_state_dict, resize_pos_embed,
                              torch_bicubic_resize)


def _same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ---------------------------------------------------------------- golden .pth files

def test_restr_state_dict_pth_gives_every_init_array_bitwise(golden_dir):
    sd = load_state_dict(golden_dir / "restr" / "restr_init_state_dict.pth")
    golden = np.load(golden_dir / "restr" / "golden_restr.npz")
    init = {k[len("init__"):]: golden[k] for k in golden.files if k.startswith("init__")}
    assert len(sd) == len(init) == 123
    assert list(sd) == list(init)  # state_dict order
    assert [k for k in init if not _same_bits(sd[k], init[k])] == []


def test_tris_checkpoints_load_with_their_training_state(golden_dir):
    golden = np.load(golden_dir / "tris" / "golden_tris.npz")
    for stage in (1, 2):
        ckpt = load_pth(golden_dir / "tris" / f"tris_stage{stage}_checkpoint.pth")
        assert list(ckpt) == ["model", "optimizer", "lr_scheduler", "epoch"]
        assert ckpt["epoch"] == 0 and set(ckpt["optimizer"]) == {"state", "param_groups"}
        model = ckpt["model"]
        assert len(model) == (200, 307)[stage - 1]
        for key, value in model.items():  # after the step; untouched tensors keep their (stage-1) init
            ref = next(golden[p + key] for p in (f"s{stage}_after__param__", f"s{stage}_after__buffer__",
                                                 f"s{stage}_init__", "s1_init__") if p + key in golden.files)
            assert _same_bits(value, ref), key
        assert {v.dtype for v in model.values()} == {np.dtype(np.float32), np.dtype(np.int64)}


def test_sag_checkpoint_with_namespace_and_numpy_scalar_loads(golden_dir):
    ckpt = load_pth(golden_dir / "sag" / "ckpt_epoch0.pth.tar")
    assert list(ckpt) == ["args", "epoch", "iou", "loss", "model"]
    assert ckpt["args"].data_name == "coco" and ckpt["epoch"] == 0
    assert isinstance(ckpt["iou"], np.float64) and ckpt["loss"].shape == ()
    golden = np.load(golden_dir / "sag" / "golden_sag.npz")
    manifest = json.loads((golden_dir / "sag" / "manifest.json").read_text())
    assert len(ckpt["model"]) == len(manifest["state_dict"]) == 278
    for key, _shape, _dtype, alias in manifest["state_dict"]:  # tied weights: one storage, several keys
        ref = golden[f"after_step1__param__{alias}"] if f"after_step1__param__{alias}" in golden.files \
            else golden[f"init__{alias}"]
        assert _same_bits(ckpt["model"][key], ref), key


# ---------------------------------------------------------------- crafted .pth files (pickle opcodes by hand)

def _s(text):
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _i(value):
    return b"J" + struct.pack("<i", value)


def _t(*items):
    return b"(" + b"".join(items) + b"t"


def _g(module, name):
    return f"c{module}\n{name}\n".encode()


def _tensor(storage, key, numel, offset, size, stride, rebuild="_rebuild_tensor_v2"):
    pid = _t(_s("storage"), _g("torch", storage), _s(key), _s("cpu"), _i(numel)) + b"Q"
    args = _t(pid, _i(offset), _t(*map(_i, size)), _t(*map(_i, stride)), b"\x89", _g("collections", "OrderedDict")
              + b")R")
    return _g("torch._utils", rebuild) + args + b"R"


def _dict(items):
    return b"}(" + b"".join(_s(k) + v for k, v in items) + b"u"


def _write_pth(path, body, storages, byteorder="little", name="archive"):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{name}/data.pkl", b"\x80\x02" + body + b".")
        zf.writestr(f"{name}/byteorder", byteorder)
        for key, raw in storages.items():
            zf.writestr(f"{name}/data/{key}", raw)
        zf.writestr(f"{name}/version", "3\n")
    return path


def test_crafted_layouts_and_dtypes(tmp_path):
    base = np.arange(12, dtype=np.float32)
    half = np.array([1.5, -2.25, 65504.0], np.float16)
    bf16 = np.array([1.0, -3.5, 1e-3], np.float32)
    bf16_bits = (bf16.view(np.uint32) >> 16).astype(np.uint16)
    body = _dict([
        ("matrix", _tensor("FloatStorage", "0", 12, 0, (3, 4), (4, 1))),
        ("transposed", _tensor("FloatStorage", "0", 12, 0, (4, 3), (1, 4))),  # shares storage "0"
        ("strided", _tensor("FloatStorage", "0", 12, 1, (2, 2), (6, 2))),  # offset 1, non-contiguous
        ("scalar", _tensor("FloatStorage", "0", 12, 5, (), ())),
        ("empty", _tensor("FloatStorage", "0", 12, 0, (0, 4), (4, 1))),
        ("half", _tensor("HalfStorage", "1", 3, 0, (3,), (1,))),
        ("bf16", _tensor("BFloat16Storage", "2", 3, 0, (3,), (1,))),
        ("long", _tensor("LongStorage", "3", 2, 0, (2,), (1,))),
        ("mask", _tensor("BoolStorage", "4", 3, 0, (3,), (1,))),
        ("param", _g("torch._utils", "_rebuild_parameter")
         + _t(_tensor("FloatStorage", "0", 12, 0, (2,), (1,)), b"\x88", _g("collections", "OrderedDict") + b")R")
         + b"R"),
        ("meta", _dict([("epoch", _i(7)), ("name", _s("run")), ("lr", b"G" + struct.pack(">d", 0.25)),
                        ("ids", b"](" + _i(1) + _i(2) + b"e"), ("none", b"N")])),
    ])
    storages = {"0": base.tobytes(), "1": half.tobytes(), "2": bf16_bits.tobytes(),
                "3": np.array([-5, 2 ** 40], np.int64).tobytes(), "4": np.array([1, 0, 1], np.uint8).tobytes()}
    got = load_pth(_write_pth(tmp_path / "x.pth", body, storages))
    m = base.reshape(3, 4)
    assert _same_bits(got["matrix"], m) and _same_bits(got["transposed"], np.ascontiguousarray(m.T))
    assert _same_bits(got["strided"], np.array([[1, 3], [7, 9]], np.float32))
    assert got["scalar"].shape == () and got["scalar"] == 5 and got["empty"].shape == (0, 4)
    assert _same_bits(got["half"], half)
    assert _same_bits(got["bf16"], np.array([1.0, -3.5, 0.00099945068359375], np.float32))  # the high 16 bits
    assert _same_bits(got["long"], np.array([-5, 2 ** 40], np.int64))
    assert _same_bits(got["mask"], np.array([True, False, True]))
    assert _same_bits(got["param"], np.array([0, 1], np.float32))
    assert got["meta"] == {"epoch": 7, "name": "run", "lr": 0.25, "ids": [1, 2], "none": None}
    got["transposed"][0, 0] = 99  # fresh arrays, not views of one buffer
    assert got["matrix"][0, 0] == 0
    big = load_pth(_write_pth(tmp_path / "big.pth", _dict([("w", _tensor("FloatStorage", "0", 12, 0, (12,), (1,)))]),
                              {"0": base.astype(">f4").tobytes()}, byteorder="big"))
    assert _same_bits(big["w"], base)


@pytest.mark.parametrize("module,name", [("os", "system"), ("builtins", "eval"), ("subprocess", "Popen")])
def test_pth_with_another_pickled_object_is_refused_by_name(tmp_path, module, name):
    marker = tmp_path / "pwned"
    body = _dict([("w", _tensor("FloatStorage", "0", 1, 0, (1,), (1,))),
                  ("x", _g(module, name) + _t(_s(f"touch {marker}")) + b"R")])
    path = _write_pth(tmp_path / "x.pth", body, {"0": np.zeros(1, np.float32).tobytes()})
    with pytest.raises(PthError) as err:
        load_pth(path)
    assert str(err.value) == f"{path}: refusing to unpickle {module}.{name} (only tensors and containers are allowed)"
    assert not marker.exists()


def test_restricted_numpy_and_codecs_entries(tmp_path):
    obj_dtype = _g("numpy", "dtype") + _t(_s("O8"), b"\x89", b"\x88") + b"R"
    path = _write_pth(tmp_path / "o.pth", _dict([("d", obj_dtype)]), {})
    with pytest.raises(PthError, match=r"o\.pth: refusing to unpickle numpy\.dtype\('O8'\)"):
        load_pth(path)
    rot13 = _g("_codecs", "encode") + _t(_s("abc"), _s("rot13")) + b"R"
    with pytest.raises(PthError, match=r"c\.pth: refusing to unpickle _codecs\.encode with 'rot13'"):
        load_pth(_write_pth(tmp_path / "c.pth", _dict([("b", rot13)]), {}))


def test_pth_errors_are_one_line_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_pth(tmp_path / "gone.pth", get_from="written by training as weights/<exp>/<dataset>_<iter>.pth")
    assert str(err.value) == (f"{tmp_path / 'gone.pth'}: no such file; written by training as "
                              "weights/<exp>/<dataset>_<iter>.pth")
    legacy = tmp_path / "legacy.pth"
    legacy.write_bytes(b"\x80\x02\x8a\x0all\xfc\x9cF\xf9 j\xa8P\x19.")  # torch < 1.6: pickled magic number first
    tensor = _dict([("w", _tensor("FloatStorage", "0", 4, 0, (4,), (1,)))])
    short = _write_pth(tmp_path / "short.pth", tensor, {"0": np.zeros(3, np.float32).tobytes()})
    beyond = _write_pth(tmp_path / "beyond.pth", _dict([("w", _tensor("FloatStorage", "0", 4, 2, (3,), (1,)))]),
                        {"0": np.zeros(4, np.float32).tobytes()})
    missing = _write_pth(tmp_path / "missing.pth", tensor, {})
    cut = tmp_path / "cut.pth"
    cut.write_bytes(short.read_bytes()[:60])
    cases = {legacy: "not a zip-format .pth", short: "truncated storage data/0: 12 bytes, 4 elements",
             beyond: "truncated storage: a tensor (offset 2, size (3,), stride (1,)) needs element 4",
             missing: "storage data/0 is missing", cut: "not a zip-format .pth"}
    for path, text in cases.items():
        with pytest.raises(PthError) as err:
            load_pth(path)
        assert str(err.value).startswith(f"{path}: ") and text in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(PthError, match="not a plain state_dict of tensors"):
        load_state_dict(_write_pth(tmp_path / "nested.pth", _dict([("model", tensor)]),
                                   {"0": np.zeros(4, np.float32).tobytes()}))


# ---------------------------------------------------------------- AugReg .npz and the bicubic resize

def test_fake_augreg_npz_gives_the_golden_vit_weights_bitwise(golden_dir):
    sd = augreg_state_dict(golden_dir / "restr" / "fake_augreg_vit.npz", n_layers=2, grid_hw=(4, 4),
                           key_prefix="encoder_v.")
    golden = np.load(golden_dir / "restr" / "golden_restr.npz")
    ref = {k[len("init__"):]: golden[k] for k in golden.files if k.startswith("init__encoder_v.")}
    assert sorted(sd) == sorted(ref) and len(ref) == 32
    assert [k for k in ref if not _same_bits(sd[k], ref[k])] == []  # pos_embed: 3×3 → 4×4 torch bicubic, bitwise


def _reference_bicubic(grid, out_hw):
    """Straightforward float64 Keys cubic (A = −0.75), half-pixel source coordinates, border-clamped taps; only the
    source coordinate is float32, as torch's (its rounding moves the weights by up to ~1e-6 at a 24 → 30 resize)."""
    def matrix(n_in, n_out):
        m = np.zeros((n_out, n_in))
        scale = np.float64(np.float32(n_in) / np.float32(n_out))
        for o in range(n_out):
            x = float(np.float32(scale * (o + 0.5) - 0.5))
            i0 = int(np.floor(x))
            for k in range(i0 - 1, i0 + 3):
                s = abs(x - k)
                w = (1.25 * s - 2.25) * s * s + 1 if s <= 1 else ((-0.75 * s + 3.75) * s - 6) * s + 3
                m[o, min(max(k, 0), n_in - 1)] += w
        return m
    return np.einsum("ah,hwc,bw->abc", matrix(grid.shape[0], out_hw[0]), grid, matrix(grid.shape[1], out_hw[1]))


def test_bicubic_resize_general_sizes():
    rng = np.random.default_rng(0)
    for (h, w), out in [((24, 24), (30, 30)), ((24, 24), (40, 20)), ((7, 5), (3, 2)), ((1, 3), (4, 6))]:
        grid = rng.normal(size=(h, w, 8)).astype(np.float32)
        got = torch_bicubic_resize(grid, out)
        assert got.dtype == np.float32 and got.shape == out + (8,)
        assert np.abs(got - _reference_bicubic(grid.astype(np.float64), out)).max() < 2e-6
    grid = rng.normal(size=(6, 6, 4)).astype(np.float32)
    assert _same_bits(torch_bicubic_resize(grid, (6, 6)), grid)  # same size: weights (0, 1, 0, 0)
    pos = rng.normal(size=(1, 1 + 9, 4)).astype(np.float32)
    resized = resize_pos_embed(pos, (2, 5))
    assert resized.shape == (1, 11, 4) and _same_bits(resized[:, :1], pos[:, :1])
    with pytest.raises(ValueError, match="not square"):
        resize_pos_embed(pos[:, :9], (2, 2))


def test_fma32_rounds_once():
    # 1 + 2^-23 + (2^-24 − 2^-70): float64 rounds to the float32 midpoint 1 + 3·2^-24 and then ties to even (wrong);
    # one rounding gives 1 + 2^-23.
    a, b, c = np.float32(1 + 2 ** -23), np.float32(2 ** -24 - 2 ** -47), np.float32(1 + 2 ** -23)
    assert _fma32(a, b, c) == np.float32(1 + 2 ** -23)
    rng = np.random.default_rng(1)
    x, y, z = (rng.normal(size=200).astype(np.float32) for _ in range(3))
    got = _fma32(x, y, z)
    for xi, yi, zi, gi in zip(x, y, z, got):
        exact = Fraction(float(xi)) * Fraction(float(yi)) + Fraction(float(zi))
        for neighbour in (np.nextafter(gi, np.float32(np.inf)), np.nextafter(gi, np.float32(-np.inf))):
            assert abs(Fraction(float(gi)) - exact) <= abs(Fraction(float(neighbour)) - exact)


def test_augreg_names_and_shapes_of_the_full_size_model(golden_dir, tmp_path):
    """A ViT-B/16-shaped npz (12 blocks, 24×24 grid, 1000 classes) at width 8 instead of 768 (heads 2 × 4) gives the
    encoder_v keys of the original's full-size state_dict, in its shapes with 768 → 8 (qkv 2304 → 24, MLP 3072 → 32)."""
    rng = np.random.default_rng(2)
    d, heads, ff = 8, 2, 32
    arrays = {"embedding/kernel": (16, 16, 3, d), "embedding/bias": (d,), "cls": (1, 1, d),
              "Transformer/posembed_input/pos_embedding": (1, 577, d), "Transformer/encoder_norm/scale": (d,),
              "Transformer/encoder_norm/bias": (d,), "head/kernel": (d, 1000), "head/bias": (1000,)}
    for i in range(12):
        b, m = f"Transformer/encoderblock_{i}/", f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/"
        arrays.update({b + "LayerNorm_0/scale": (d,), b + "LayerNorm_0/bias": (d,), b + "LayerNorm_2/scale": (d,),
                       b + "LayerNorm_2/bias": (d,), m + "out/kernel": (heads, d // heads, d), m + "out/bias": (d,),
                       b + "MlpBlock_3/Dense_0/kernel": (d, ff), b + "MlpBlock_3/Dense_0/bias": (ff,),
                       b + "MlpBlock_3/Dense_1/kernel": (ff, d), b + "MlpBlock_3/Dense_1/bias": (d,)})
        for n in ("query", "key", "value"):
            arrays.update({f"{m}{n}/kernel": (d, heads, d // heads), f"{m}{n}/bias": (heads, d // heads)})
    np.savez(tmp_path / "b16.npz", **{k: rng.normal(size=s).astype(np.float32) for k, s in arrays.items()})
    sd = augreg_state_dict(tmp_path / "b16.npz", n_layers=12, grid_hw=(30, 30), key_prefix="encoder_v.")
    scale = {768: d, 2304: 3 * d, 3072: ff}
    expected = {}
    for line in (golden_dir / "restr" / "full_size_state_dict.txt").read_text().splitlines():
        if line.startswith("encoder_v."):
            key, shape = line.split()
            expected[key] = tuple(scale.get(int(n), int(n)) for n in shape.split("x"))
    assert len(expected) == 152 and {k: v.shape for k, v in sd.items()} == expected


def test_augreg_prefix_head_and_same_grid(golden_dir, tmp_path):
    with np.load(golden_dir / "restr" / "fake_augreg_vit.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    prefixed = tmp_path / "opt.npz"
    np.savez(prefixed, **{"opt/target/" + k: v for k, v in arrays.items()})
    plain = augreg_state_dict(golden_dir / "restr" / "fake_augreg_vit.npz", 2, (3, 3))
    other = augreg_state_dict(prefixed, 2, (3, 3), num_classes=10)
    assert "head.weight" in plain and "head.weight" not in other and "head.bias" not in other
    assert _same_bits(plain["pos_embed"], arrays["Transformer/posembed_input/pos_embedding"])  # grid kept
    assert all(_same_bits(other[k], plain[k]) for k in other)
    assert plain["head.weight"].shape == (1000, 64) and plain["blocks.1.attn.qkv.weight"].shape == (192, 64)
    with pytest.raises(ValueError, match=r"key Transformer/encoderblock_2/LayerNorm_0/scale missing"):
        augreg_state_dict(golden_dir / "restr" / "fake_augreg_vit.npz", 3, (4, 4))
    with pytest.raises(FileNotFoundError) as err:
        augreg_state_dict(tmp_path / "B_16.npz", 12, (30, 30))
    assert str(err.value).startswith(f"{tmp_path / 'B_16.npz'}: no such file") and AUGREG_B16_384_URL in str(err.value)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="bad.npz: not a readable .npz"):
        augreg_state_dict(bad, 2, (4, 4))


# ---------------------------------------------------------------- external/convert_restr.py

def test_convert_restr_pth_to_tf2_checkpoint_runs_the_golden(golden_dir, tmp_path, caplog):
    import tensorflow as tf

    from external.convert_restr import main, restr_sizes
    from models.restr import ReSTR

    caplog.set_level(logging.INFO)
    out = tmp_path / "ckpt" / "unc_0"
    assert main([str(golden_dir / "restr" / "restr_init_state_dict.pth"), str(out), "--heads", "4"]) == 0
    assert "123 tensors, 472240 parameters" in caplog.messages
    golden = np.load(golden_dir / "restr" / "golden_restr.npz")
    init = {k[len("init__"):]: golden[k] for k in golden.files if k.startswith("init__")}
    sizes = restr_sizes(init, n_heads=4)
    assert sizes == {"image_size": (64, 64), "patch_size": 16, "d_model": 64, "n_heads": 4, "vit_layers": 2,
                     "text_layers": 2, "fusion_layers": 2, "n_up": 4, "n_cls": 1000}
    model = ReSTR(np.zeros((50, 32), np.float32), seed=3, **sizes)
    tf.train.Checkpoint(model=model).read(str(out)).assert_existing_objects_matched()
    variables = model.state_dict_variables()
    assert [k for k in init if not _same_bits(variables[k].numpy(), init[k])] == []
    outputs = model(np.transpose(golden["input__image"], (0, 2, 3, 1)), golden["input__words"])
    for key, tol in (("patch_pred", 1e-5), ("pixel_pred", 1e-4)):
        ref = np.transpose(golden[f"eval__{key}"], (0, 2, 3, 1))
        assert np.abs(outputs[key].numpy() - ref).max() <= tol * np.abs(ref).max()


def test_convert_restr_errors_are_one_line(golden_dir, tmp_path, caplog):
    from external.convert_restr import main

    evil = _write_pth(tmp_path / "evil.pth", _dict([("x", _g("os", "system") + _t(_s("true")) + b"R")]), {})
    cases = {str(tmp_path / "none.pth"): "no such file; ReSTR's train_restr.py writes",
             str(evil): "refusing to unpickle os.system",
             str(golden_dir / "tris" / "tris_stage1_checkpoint.pth"): "not a plain state_dict of tensors"}
    for src, text in cases.items():
        caplog.clear()
        assert main([src, str(tmp_path / "out")]) == 2
        assert len(caplog.messages) == 1 and "\n" not in caplog.messages[0]
        assert caplog.messages[0].startswith(f"error: {src}: ") and text in caplog.messages[0]
    caplog.clear()
    assert main([str(golden_dir / "restr" / "restr_init_state_dict.pth"), str(tmp_path / "out"), "--heads", "5"]) == 2
    assert "width 64 is not divisible by --heads 5" in caplog.messages[0]
    assert not list(tmp_path.glob("out*"))
