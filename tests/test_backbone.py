"""DeepLab-ResNet-101 backbone: golden outputs of the original DrSleep graph, every checkpoint naming scheme, errors,
and the converter CLI."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from models.backbone import FC1000, FEATURES, Backbone, seeded_weights, variable_shapes
from util.checkpoints import CheckpointMismatch, load_backbone_weights, save_tf1_checkpoint

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN_TOL = 1e-5  # × max|ref|, per feature map
LETTERS = "abc"


def chenxi_names():
    """{DrSleep scope: chenxi116 scope}, written out from RMI spec §5.3 independently of util/checkpoints.py."""
    pairs = {"conv1": "group_1/conv1", "bn_conv1": "group_1/bn_conv1"}
    for stage, units in ((2, 3), (3, 4), (4, 23), (5, 3)):
        for k in range(units):
            unit = f"{stage}{LETTERS[k]}" if units == 3 else (f"{stage}a" if k == 0 else f"{stage}b{k}")
            for branch, block in (("2a", "block_1"), ("2b", "block_2"), ("2c", "block_3"), ("1", "block_add")):
                pairs[f"res{unit}_branch{branch}"] = f"group_{stage}_{k}/{block}/conv"
                pairs[f"bn{unit}_branch{branch}"] = f"group_{stage}_{k}/{block}/bn"
    return pairs


def to_chenxi(weights, root, factor=None):
    """DrSleep-named weights → TF-deeplab (``factor``: store mean·factor, variance·factor and the factor) or
    TF-resnet names under ``root``."""
    scopes, leaves = chenxi_names(), {"weights": "DW", "moving_mean": "mean", "moving_variance": "variance"}
    out = {}
    for name, value in weights.items():
        scope, param = name.rsplit("/", 1)
        if scope not in scopes:
            continue  # a drop-out in the missing-tensor tests
        theirs = f"{root}{scopes[scope]}/{leaves.get(param, param)}"
        if factor is not None and param in ("moving_mean", "moving_variance"):
            value = value * np.float32(factor)
            out[f"{root}{scopes[scope]}/factor"] = np.array([factor], np.float32)
        out[theirs] = value
    return out


@pytest.fixture(scope="module")
def golden(golden_dir):
    folder = golden_dir / "deeplab_backbone"
    manifest = json.loads((folder / "manifest.json").read_text())["variables"]
    weights = seeded_weights(0)
    assert list(weights) == [n for n, _ in manifest]  # the README draws in sorted-name order
    return manifest, weights, np.load(folder / "golden_backbone.npz")


@pytest.fixture(scope="module")
def drsleep_ckpt(golden, tmp_path_factory):
    """The seeded weights as a name-based TF1 checkpoint in DrSleep naming, like deeplab_resnet_init.ckpt."""
    prefix = tmp_path_factory.mktemp("drsleep") / "deeplab_resnet_init.ckpt"
    extra = {"fc1_voc12_c0/weights": np.zeros([3, 3, 2048, 21], np.float32)}  # in DrSleep's file, never used
    save_tf1_checkpoint({**golden[1], **extra}, prefix)
    return prefix


@pytest.fixture(scope="module")
def loaded(drsleep_ckpt):
    backbone = Backbone()
    report = load_backbone_weights(backbone, drsleep_ckpt)
    return backbone, report


def features(backbone, image):
    return {k: v.numpy() for k, v in backbone(tf.constant(image)).items()}


def assert_same_variables(backbone, reference):
    ref = reference.tf1_variables()
    for name, var in backbone.tf1_variables().items():
        if name in ref:
            np.testing.assert_array_equal(var.numpy(), ref[name].numpy(), err_msg=name)


def test_variables_match_the_original_graph(golden):
    manifest = golden[0]
    assert len(manifest) == 520
    assert {n: tuple(s) for n, s in manifest} == variable_shapes()
    backbone = Backbone(fc1000=True)
    names = {v.name[:-2] for v in backbone.variables}
    assert names == set(variable_shapes(fc1000=True))
    assert {v.name[:-2] for v in backbone.trainable_variables} == set(FC1000)
    conv5 = [v.name[:-2] for v in backbone.conv5_variables()]
    assert len(conv5) == 93 and len(set(conv5)) == 93
    assert all(n.startswith(("res3", "res4", "res5")) and n.endswith("/weights") for n in conv5)
    assert {"res3a_branch1/weights", "res4b22_branch2c/weights", "res5c_branch2b/weights"} <= set(conv5)


def test_loader_report(loaded):
    _, report = loaded
    assert report["format"] == "drsleep"
    assert len(report["loaded"]) == 520 and report["missing"] == []
    assert report["unexpected"] == ["fc1_voc12_c0/weights"]


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf_function"])
@pytest.mark.parametrize("case", [0, 1])
def test_golden_drsleep_graph(golden, loaded, case, graph):
    """Eagerly and as the tf.function that training, test and bench run (where TF fuses Conv2D + batch norm + ReLU)."""
    ref = golden[2]
    forward = tf.function(loaded[0]) if graph else loaded[0]
    out = {k: v.numpy() for k, v in forward(tf.constant(ref[f"case{case}_input"])).items()}
    assert set(out) == set(FEATURES)
    worst = {}
    for name in FEATURES:
        want = ref[f"case{case}_{name}"]
        assert out[name].shape == want.shape, name
        worst[name] = float(np.abs(out[name] - want).max() / np.abs(want).max())
        assert worst[name] <= GOLDEN_TOL, (name, worst[name])
    print(f"case{case} graph={graph} max |diff| / max|ref|:", {k: f"{v:.2e}" for k, v in worst.items()})


def test_tf_function_and_xla_match_eager(golden, loaded):
    backbone, image = loaded[0], golden[2]["case1_input"][:, :20, :27]
    eager = backbone(tf.constant(image))["res5c_relu"].numpy()
    for jit in (False, True):
        out = tf.function(backbone, jit_compile=jit)(tf.constant(image))["res5c_relu"].numpy()
        assert np.abs(out - eager).max() <= 1e-5 * np.abs(eager).max(), jit


def test_bfloat16_input_computes_in_bfloat16(golden, loaded):
    backbone, image = loaded[0], golden[2]["case0_input"][:, :24, :24]
    ref = backbone(tf.constant(image))["res3b3_relu"].numpy()
    out = backbone(tf.constant(image, tf.bfloat16))["res3b3_relu"]
    assert out.dtype == tf.bfloat16
    assert np.abs(out.numpy().astype(np.float32) - ref).max() <= 0.1 * np.abs(ref).max()


@pytest.mark.parametrize("scheme", ["tf-deeplab", "tf-resnet", "npy-drsleep", "npy-chenxi", "v1-file"])
def test_every_naming_scheme_gives_identical_features(golden, loaded, tmp_path, scheme):
    weights, reference = golden[1], loaded[0]
    backbone = Backbone(fc1000=scheme == "tf-resnet")
    fc = {"ResNet/fc1000/DW": np.random.RandomState(1).standard_normal([1, 1, 2048, 1000]).astype(np.float32) * 0.02,
          "ResNet/fc1000/biases": np.linspace(-1, 1, 1000).astype(np.float32)}
    kwargs = {}
    if scheme == "tf-deeplab":
        path = tmp_path / "ResNet101_train.tfmodel"
        save_tf1_checkpoint(to_chenxi(weights, "DeepLab/", factor=4.0), path)
    elif scheme == "tf-resnet":
        path = tmp_path / "ResNet101_init.tfmodel"
        save_tf1_checkpoint({**to_chenxi(weights, "ResNet/"), **fc}, path)
    elif scheme == "npy-drsleep":  # DrSleep convert.py: {layer: {param: array}}, a pickled py2 dict
        path = tmp_path / "deeplab_resnet.npy"
        nested = {}
        for name, value in weights.items():
            layer, param = name.rsplit("/", 1)
            nested.setdefault(layer, {})[param] = value
        np.save(path, nested)
        with pytest.raises(ValueError, match="allow_pickle"):
            load_backbone_weights(backbone, path)
        kwargs["allow_pickle"] = True
    elif scheme == "npy-chenxi":  # chenxi116 caffemodel2npy: flat names, raw Caffe statistics and factor
        path = tmp_path / "ResNet101_init.npy"
        np.save(path, to_chenxi(weights, "", factor=0.5))
        kwargs["allow_pickle"] = True
    else:  # a V1 single-file checkpoint, as DrSleep's npy2ckpt.py writes (only a few tensors: loaded partially)
        path = tmp_path / "model.ckpt"
        subset = {n: v for n, v in weights.items() if n.startswith(("conv1/", "bn_conv1/"))}
        with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
            vs = [tf.compat.v1.Variable(v, name=n) for n, v in subset.items()]
            sess.run(tf.compat.v1.global_variables_initializer())
            tf.compat.v1.train.Saver(vs, write_version=tf.compat.v1.train.SaverDef.V1).save(
                sess, str(path), write_meta_graph=False)
        report = load_backbone_weights(backbone, path, allow_partial=True)
        assert report["format"] == "drsleep" and sorted(report["loaded"]) == sorted(subset)
        assert len(report["missing"]) == 515
        for name in subset:
            np.testing.assert_array_equal(backbone.vars[name].numpy(), weights[name])
        return
    report = load_backbone_weights(backbone, path, **kwargs)
    assert report["missing"] == [] and report["unexpected"] == []
    assert report["format"] == {"tf-deeplab": "tf-deeplab", "tf-resnet": "tf-resnet", "npy-drsleep": "drsleep",
                                "npy-chenxi": "tf-deeplab"}[scheme]
    assert_same_variables(backbone, reference)
    image = golden[2]["case0_input"]
    got, want = features(backbone, image), features(reference, image)
    for name in FEATURES:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    if scheme == "tf-resnet":
        expected = np.einsum("nhwc,cd->nhwd", want["res5c_relu"], fc["ResNet/fc1000/DW"][0, 0]) + fc[
            "ResNet/fc1000/biases"]
        assert np.abs(got["fc1000"] - expected).max() <= 1e-5 * np.abs(expected).max()


def test_missing_or_misshapen_tensor_is_named(golden, tmp_path):
    weights, backbone = golden[1], Backbone()
    without = {n: v for n, v in weights.items() if n != "bn4b7_branch2b/moving_variance"}
    save_tf1_checkpoint(without, tmp_path / "missing")
    with pytest.raises(CheckpointMismatch, match="bn4b7_branch2b/moving_variance is missing"):
        load_backbone_weights(backbone, tmp_path / "missing")
    assert not backbone.vars["conv1/weights"].numpy().any()  # nothing assigned
    wrong = {**weights, "res3b2_branch2b/weights": np.zeros([3, 3, 128, 64], np.float32)}
    save_tf1_checkpoint(wrong, tmp_path / "wrong")
    with pytest.raises(CheckpointMismatch, match=r"res3b2_branch2b/weights has shape \[3, 3, 128, 64\]"):
        load_backbone_weights(backbone, tmp_path / "wrong")
    deeplab = to_chenxi(weights, "DeepLab/", factor=2.0)
    del deeplab["DeepLab/group_5_1/block_2/bn/factor"]
    save_tf1_checkpoint(deeplab, tmp_path / "nofactor")
    with pytest.raises(CheckpointMismatch, match="DeepLab/group_5_1/block_2/bn/factor is missing"):
        load_backbone_weights(backbone, tmp_path / "nofactor")


def test_missing_file_and_unknown_scheme(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data/weights/deeplab_resnet_init\.ckpt.*deeplab_resnet_init\.ckpt"):
        load_backbone_weights(Backbone(), "data/weights/deeplab_resnet_init.ckpt")
    save_tf1_checkpoint({"text_objseg/conv0/DW": np.zeros([1], np.float32)}, tmp_path / "head")
    with pytest.raises(CheckpointMismatch, match="naming scheme"):
        load_backbone_weights(Backbone(), tmp_path / "head")


def run_converter(*args):
    return subprocess.run([sys.executable, str(REPO / "external" / "convert_backbone.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def test_converter_cli(golden, loaded, drsleep_ckpt, tmp_path):
    out = tmp_path / "tf2" / "backbone"
    done = run_converter(drsleep_ckpt, out)
    assert done.returncode == 0, done.stderr
    assert "520 mapped, 0 missing, 1 unexpected" in done.stdout
    assert "res4b22_branch2c/weights" in done.stdout and "unexpected  fc1_voc12_c0/weights" in done.stdout
    backbone = Backbone()
    report = load_backbone_weights(backbone, out)
    assert report["format"] == "tf2" and report["missing"] == [] and report["unexpected"] == []
    assert_same_variables(backbone, loaded[0])
    image = golden[2]["case1_input"]
    got, want = features(backbone, image), features(loaded[0], image)
    for name in FEATURES:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)

    partial = {n: v for n, v in golden[1].items() if n.startswith(("conv1/", "bn_conv1/"))}
    save_tf1_checkpoint(partial, tmp_path / "partial")
    done = run_converter(tmp_path / "partial", tmp_path / "refused")
    assert done.returncode == 2 and "--allow-partial" in done.stderr and "515 missing" in done.stdout
    assert not list(tmp_path.glob("refused*"))
    done = run_converter(tmp_path / "partial", tmp_path / "accepted", "--allow-partial")
    assert done.returncode == 0, done.stderr
    report = load_backbone_weights(Backbone(), tmp_path / "accepted")
    assert report["missing"] == []  # a TF2 checkpoint always holds every variable (missing ones as zeros)


def test_dilated_kernels_have_gradients_on_cpu(loaded):
    """``-conv5`` differentiates the dilated res4/res5 kernels: Conv2D's own ``dilations`` has no CPU gradient, the
    originals' atrous convolution (space-to-batch) has; the forward is unchanged by it (golden tests above)."""
    backbone = loaded[0]
    image = tf.constant(np.random.RandomState(3).normal(0, 50, (1, 40, 40, 3)).astype(np.float32))
    kernels = [backbone.vars[n] for n in ("res4b22_branch2b/weights", "res5c_branch2b/weights", "res3a_branch2a/weights")]

    @tf.function
    def gradients(x):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(kernels)
            total = tf.reduce_sum(backbone(x)["res5c_relu"])
        return tape.gradient(total, kernels)

    for kernel, grad in zip(kernels, gradients(image)):
        grad = grad.numpy()
        assert grad.shape == tuple(kernel.shape) and np.isfinite(grad).all() and np.abs(grad).max() > 0, kernel.name
