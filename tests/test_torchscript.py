"""``util.torchscript`` (TorchScript archives read without torch) on archives written by ``tests/torchscript_writer``
(the layout torch 2.13's ``torch.jit.save`` writes; the reader was also checked against torch 2.13 itself on traced
and scripted CLIP RN50 / ViT-B/32 modules, outside the repository), and TRIS starting from them: OpenAI's
``RN50.pt`` as ``--init-weights`` for stage 1 and stage 2, the frozen ViT-B/32 as ``<--data-dir>/weights/
ViT-B-32.pt`` for training and PRMS. The CLIP archives hold the golden's reduced CLIP (token embedding extended to
49408 rows as in ``test_tris_train``) with the weights ``clip.model.convert_weights`` halves stored as float16, and
OpenAI's ``input_resolution`` / ``context_length`` / ``vocab_size`` buffers.
"""
import zipfile

import numpy as np
import pytest

from tests.test_restr_cli import write_state_dict_pth
from tests.test_tris_stage2_train import data_root, logged_stage2  # noqa: F401
from tests.test_tris_train import SIZE, command, extended, logged, train, weights  # noqa: F401
from tests.torchscript_writer import Call, Module, module_tree, write_archive


def hand_tree():
    """A scripted-CLIP-like tree: a buffer registered before the parameters, a float16 parameter, a plain tensor
    attribute (``attn_mask``), an unset optional parameter, an int list, a module list, an int64 buffer."""
    rng = np.random.default_rng(0)
    conv = Module("__torch__.torch.nn.modules.conv.___torch_mangle_3.Conv2d", [
        ("weight", rng.standard_normal((4, 3, 1, 1)).astype(np.float16), "parameter"),
        ("bias", None, "parameter"),
        ("kernel_size", Call("torch.jit._pickle", "build_intlist", [1, 1]), "attribute")])
    bn = Module("__torch__.torch.nn.modules.batchnorm.BatchNorm2d", [
        ("weight", rng.standard_normal(4).astype(np.float32), "parameter"),
        ("bias", rng.standard_normal(4).astype(np.float32), "parameter"),
        ("running_mean", rng.standard_normal(4).astype(np.float32), "buffer"),
        ("running_var", rng.uniform(0.5, 2, 4).astype(np.float32), "buffer"),
        ("num_batches_tracked", np.array(7, np.int64), "buffer")])
    layers = Module("__torch__.torch.nn.modules.container.ModuleList", [("0", conv, "attribute"),
                                                                        ("1", bn, "attribute")])
    block = Module("__torch__.clip.model.ResidualAttentionBlock", [
        ("attn_mask", np.triu(np.full((3, 3), -np.inf, np.float32), 1), "attribute"),
        ("scale", rng.standard_normal((2, 2)).astype(np.float64), "parameter")])
    return Module("__torch__.clip.model.CLIP", [
        ("input_resolution", np.array(224, np.int64), "buffer"),
        ("positional_embedding", rng.standard_normal((5, 4)).astype(np.float16), "parameter"),
        ("logit_scale", np.array(4.6052, np.float32), "parameter"),
        ("layers", layers, "attribute"),
        ("block", block, "attribute")])


def test_state_dict_is_torchs_with_floats_widened(tmp_path):
    from util.torchscript import load_torchscript_state_dict

    tree = hand_tree()
    write_archive(tmp_path / "clip.pt", tree)
    state = load_torchscript_state_dict(tmp_path / "clip.pt")
    # Module.state_dict(): own parameters, own buffers (slot order), then submodules; None and attn_mask left out
    assert list(state) == ["positional_embedding", "logit_scale", "input_resolution", "layers.0.weight",
                           "layers.1.weight", "layers.1.bias", "layers.1.running_mean", "layers.1.running_var",
                           "layers.1.num_batches_tracked", "block.scale"]
    entries = {n: v for n, v, _ in tree.entries}
    conv, bn = (v for _, v, _ in entries["layers"].entries)
    expected = {"positional_embedding": entries["positional_embedding"], "logit_scale": entries["logit_scale"],
                "input_resolution": entries["input_resolution"], "layers.0.weight": conv.entries[0][1],
                **{f"layers.1.{n}": v for n, v, _ in bn.entries},
                "block.scale": entries["block"].entries[1][1]}
    for key, value in expected.items():
        want = value.astype(np.float32) if value.dtype.kind == "f" else value
        assert state[key].dtype == want.dtype and state[key].shape == want.shape, key
        np.testing.assert_array_equal(state[key], want, err_msg=key)
    assert state["layers.0.weight"].dtype == np.float32 and state["layers.1.num_batches_tracked"].dtype == np.int64
    assert float(state["block.scale"][0, 0]) == float(np.float32(entries["block"].entries[1][1][0, 0]))


def test_module_tree_round_trip_and_top_folder_name(tmp_path):
    from util.torchscript import is_torchscript, load_torchscript_state_dict

    rng = np.random.default_rng(1)
    state = {"a.weight": rng.standard_normal((2, 3)).astype(np.float16), "a.b.running_var": np.ones(2, np.float32),
             "c.0.weight": rng.standard_normal(3).astype(np.float32)}
    write_archive(tmp_path / "RN50.pt", module_tree(state), name="some_other_name")
    assert is_torchscript(tmp_path / "RN50.pt")
    got = load_torchscript_state_dict(tmp_path / "RN50.pt")
    assert list(got) == list(state)
    for key, value in state.items():
        np.testing.assert_array_equal(got[key], value.astype(np.float32))


def rewrite(path, change):
    """Copy the archive at ``path`` with ``change(name, data)`` → new data (None drops the entry)."""
    with zipfile.ZipFile(path) as zf:
        entries = [(i.filename, zf.read(i.filename)) for i in zf.infolist()]
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries:
            data = change(name, data)
            if data is not None:
                zf.writestr(name, data)


@pytest.mark.parametrize("damage, message", [
    (lambda name, data: None if name == "clip/data/2" else data, "storage data/2 is missing from the archive"),
    (lambda name, data: data[:3] if name == "clip/data/2" else data, "truncated storage data/2: 3 bytes"),
    (lambda name, data: None if "batchnorm" in name else data,
     "class __torch__.torch.nn.modules.batchnorm.BatchNorm2d has no code entry"),
])
def test_damaged_archives_are_one_line(tmp_path, damage, message):
    from util.torchscript import TorchScriptError, load_torchscript_state_dict

    path = tmp_path / "clip.pt"
    write_archive(path, hand_tree())
    rewrite(path, damage)
    with pytest.raises(TorchScriptError) as info:
        load_torchscript_state_dict(path)
    assert str(info.value).startswith(f"{path}: {message}") and "\n" not in str(info.value), info.value


def test_refused_global_is_one_line(tmp_path):
    from util.torchscript import TorchScriptError, load_torchscript_state_dict

    path = tmp_path / "evil.pt"
    write_archive(path, Module("__torch__.M", [("x", Call("os", "system", "echo owned"), "attribute")]))
    with pytest.raises(TorchScriptError) as info:
        load_torchscript_state_dict(path)
    assert str(info.value) == f"{path}: refusing to unpickle os.system (only tensors and containers are allowed)"


def test_missing_file_torch_save_file_and_load_weights(tmp_path):
    from util.torchscript import TorchScriptError, is_torchscript, load_torchscript_state_dict, load_weights

    with pytest.raises(FileNotFoundError) as info:
        load_torchscript_state_dict(tmp_path / "RN50.pt", "OpenAI's CLIP RN50: https://example/RN50.pt")
    assert str(info.value) == f"{tmp_path / 'RN50.pt'}: no such file; OpenAI's CLIP RN50: https://example/RN50.pt"
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    write_state_dict_pth(tmp_path / "sd.pt", state)
    assert not is_torchscript(tmp_path / "sd.pt")
    with pytest.raises(TorchScriptError) as info:
        load_torchscript_state_dict(tmp_path / "sd.pt")
    assert "a torch.save file, not a TorchScript archive" in str(info.value) and "\n" not in str(info.value)
    np.testing.assert_array_equal(load_weights(tmp_path / "sd.pt")["w"], state["w"])
    write_archive(tmp_path / "ts.pt", module_tree({"w": state["w"].astype(np.float16)}))
    np.testing.assert_array_equal(load_weights(tmp_path / "ts.pt")["w"], state["w"])


# ------------------------------------------------------------------------------------------------- TRIS wiring
def as_openai(state):
    """``state`` (a CLIP state_dict) as OpenAI's archive holds it: the tensors ``convert_weights`` halves (conv
    kernels and matrices, MHA in-proj biases, projections) in float16, plus the three int64 buffers."""
    half = {k: v.astype(np.float16) if v.ndim >= 2 or k.endswith("in_proj_bias") else v for k, v in state.items()}
    return {**half, "input_resolution": np.array(96, np.int64), "context_length": np.array(77, np.int64),
            "vocab_size": np.array(49408, np.int64)}


@pytest.fixture(scope="module")
def archives(golden_dir, sample, tmp_path_factory):
    """(RN50.pt, data dir with the BPE file and weights/ViT-B-32.pt only, the RN50 state written, the ViT's)."""
    import shutil

    from models import tris
    from util.pth import load_pth

    golden = golden_dir / "tris"
    path = str(golden / "tris_stage1_checkpoint.pth")
    stage1 = tris.model_state_dict(load_pth(path), path)
    rn50 = as_openai(extended({k[len("backbone."):]: v for k, v in stage1.items() if k.startswith("backbone.")},
                              "token_embedding.weight", 0))
    with np.load(golden / "golden_tris.npz") as npz:
        vit = as_openai(extended({k[len("vitb32__"):]: npz[k] for k in npz.files if k.startswith("vitb32__")},
                                 "token_embedding.weight", 1))
    folder = tmp_path_factory.mktemp("torchscript_tris")
    write_archive(folder / "RN50.pt", module_tree(rn50, "__torch__.multimodal.model.multimodal_transformer.Multimodal"))
    data_dir = folder / "data"
    (data_dir / "weights").mkdir(parents=True)
    shutil.copy(sample / "data" / "bpe_simple_vocab_16e6.txt.gz", data_dir)
    write_archive(data_dir / "weights" / "ViT-B-32.pt", module_tree(vit))
    return folder / "RN50.pt", data_dir, rn50, vit


def assert_backbone_is(model, rn50):
    variables = {k[len("backbone."):]: v for k, v in model.state_dict_variables().items() if k.startswith("backbone.")}
    assert sorted(variables) == sorted(k for k in rn50 if k not in ("input_resolution", "context_length",
                                                                    "vocab_size"))
    for key, var in variables.items():
        np.testing.assert_array_equal(var.numpy(), rn50[key].astype(var.dtype.as_numpy_dtype), err_msg=key)
    assert rn50["visual.layer1.0.conv1.weight"].dtype == np.float16        # the values really were widened


def test_stage1_and_stage2_start_from_rn50_pt(archives):
    from models import tris, tris_train

    rn50_pt, _, rn50, _ = archives
    first, again, other = (tris_train.initial_stage1_model(str(rn50_pt), seed) for seed in (3, 3, 4))
    assert_backbone_is(first, rn50)
    assert first.state_dict_variables()["vis_project.weight"].shape[0] == tris.HIDDEN_DIM
    # the text positional embedding keeps its 77 rows (build_model does not cut it; txt_length sizes the mask)
    assert rn50["positional_embedding"].shape[0] == 77
    assert first.state_dict_variables()["backbone.positional_embedding"].shape[0] == 77
    heads = ("vis_project.weight", "lan_project.weight", "attn_fusion.t_proj1.0.weight")
    for key in heads:
        np.testing.assert_array_equal(first.state_dict_variables()[key].numpy(),
                                      again.state_dict_variables()[key].numpy())
        assert np.any(first.state_dict_variables()[key].numpy() != other.state_dict_variables()[key].numpy())
    stage2 = tris_train.initial_stage2_model(str(rn50_pt), 3)
    assert_backbone_is(stage2, rn50)
    assert tuple(stage2.state_dict_variables()["reduced_c1.conv.weight"].shape)[0] == 64


def test_frozen_vit_from_vit_pt_or_pth(archives, tmp_path):
    import types

    from models import tris_train

    _, data_dir, _, vit = archives
    cfg = types.SimpleNamespace(data_dir=str(data_dir))
    assert tris_train.vit_path(cfg) == str(data_dir / "weights" / "ViT-B-32.pt") and not tris_train.vit_problem(cfg)
    from_pt = tris_train.load_frozen_vit(tris_train.vit_path(cfg))
    write_state_dict_pth(tmp_path / "ViT-B-32.pth", {k: v.astype(np.float32) if v.dtype == np.float16 else v
                                                     for k, v in vit.items()})
    from_pth = tris_train.load_frozen_vit(str(tmp_path / "ViT-B-32.pth"))
    for key, var in from_pt.state_dict_variables().items():
        np.testing.assert_array_equal(var.numpy(), from_pth.state_dict_variables()[key].numpy(), err_msg=key)
    empty = types.SimpleNamespace(data_dir=str(tmp_path / "none"))
    assert tris_train.vit_problem(empty).startswith(f"{tmp_path}/none/weights/ViT-B-32.pt or {tmp_path}/none/weights/"
                                                    f"ViT-B-32.pth: no such file (the frozen CLIP ViT-B/32")
    assert "openaipublic.azureedge.net/clip/models/40d36571" in tris_train.vit_problem(empty)


def test_stage1_training_step_from_rn50_pt_and_vit_pt(sample, archives, tmp_path, caplog):
    rn50_pt, data_dir, _, _ = archives
    out = train(command(sample, (rn50_pt, data_dir), tmp_path / "snapshots", "-i", "1", "-s", "1"), caplog)
    assert f"Loading the initial weights from {rn50_pt}" in out
    losses = logged(out)
    assert list(losses) == [0] and np.all(np.isfinite(losses[0])), out[-2000:]
    assert (tmp_path / "snapshots" / "unc_iter_1.index").exists()


def test_stage2_training_step_from_rn50_pt(data_root, archives, tmp_path, caplog):  # noqa: F811
    rn50_pt, data_dir, _, _ = archives
    out = train(command(data_root, (rn50_pt, data_dir), tmp_path / "snapshots", "-i", "1", "-s", "1",
                        name="TRIS_stage2"), caplog)
    losses = logged_stage2(out)
    assert list(losses) == [0] and np.all(np.isfinite(losses[0])), out[-2000:]
    assert (tmp_path / "snapshots" / "unc_iter_1.index").exists()


def test_prms_reads_vit_pt(sample, weights, archives, tmp_path, monkeypatch):  # noqa: F811
    """``external/tris_prms.py`` with a data dir holding only ``ViT-B-32.pt``: that archive is the frozen ViT it
    loads (read for real; the run is stopped right after, the maps are ``test_tris_prms``'s business)."""
    from external import tris_prms
    from models import tris_train

    _, data_dir, _, vit = archives
    real_loader, loaded = tris_train.load_frozen_vit, []

    def load_then_stop(path):
        loaded.append(real_loader(path))
        raise KeyboardInterrupt

    monkeypatch.setattr(tris_train, "load_frozen_vit", load_then_stop)
    status = tris_prms.main([str(weights[0]), "-d", "unc", "--data-root", str(sample), "--data-dir", str(data_dir),
                             "--img-size", str(SIZE), "--out-dir", str(tmp_path / "out")])
    assert status == 130 and len(loaded) == 1
    np.testing.assert_array_equal(loaded[0].state_dict_variables()["visual.proj"].numpy(),
                                  vit["visual.proj"].astype(np.float32))
