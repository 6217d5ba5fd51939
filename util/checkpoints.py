"""Checkpoint I/O by TF1 variable name.

Every model in this project keeps its variables in a dict keyed by the variable's TF1 name (without ``:0``), so a TF1
snapshot (``unc_iter_700000.tfmodel``, ``deeplab_resnet_init.ckpt``) loads by name with no table at all; only the
backbone naming schemes of the three original codebases need one (see the backbone section below).

Errors are one line and name the tensor (``CheckpointMismatch``).
"""
import contextlib
import glob
import logging
import os
import re
import shutil

import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)


class CheckpointMismatch(ValueError):
    """A checkpoint lacks a tensor the model needs, or holds one of the wrong shape."""


def checkpoint_exists(prefix):
    """True if ``prefix`` names a V2 checkpoint (``prefix.index`` exists)."""
    return os.path.isfile(str(prefix) + ".index")


def read_tf1_checkpoint(prefix):
    """Return {name: shape} of the tensors stored under a TF1/TF2 V2 checkpoint ``prefix``."""
    if not checkpoint_exists(prefix):
        raise FileNotFoundError(f"checkpoint {prefix}.index not found")
    return tf.train.load_checkpoint(str(prefix)).get_variable_to_shape_map()


def load_tf1_variables(variables, prefix, name_map=None, allow_missing=False, transforms=None):
    """Assign TF1-named tensors of checkpoint ``prefix`` to ``variables``.

    Args:
      variables: {our name: tf.Variable}.
      prefix: checkpoint prefix (the path without ``.index``).
      name_map: optional {our name: name in the checkpoint}; identity where absent.
      allow_missing: if False, a missing tensor raises ``CheckpointMismatch`` naming it.
      transforms: optional {our name: fn(reader) -> np.ndarray} computing a value from several stored tensors
        (e.g. DeepLab's ``mean / factor``); takes precedence over ``name_map``.

    Returns:
      dict with lists ``loaded``, ``missing`` (our names) and ``unexpected`` (checkpoint names nobody asked for).
    Raises:
      CheckpointMismatch on a missing tensor (unless allowed) or a shape mismatch; nothing is assigned then.
    """
    if not checkpoint_exists(prefix):
        raise FileNotFoundError(f"checkpoint {prefix}.index not found")
    return _assign_by_name(variables, tf.train.load_checkpoint(str(prefix)), prefix, name_map, allow_missing,
                           transforms)


def _assign_by_name(variables, reader, label, name_map=None, allow_missing=False, transforms=None):
    """The body of ``load_tf1_variables`` for any ``reader`` with ``get_variable_to_shape_map()`` and ``get_tensor()``.

    ``label`` names the source in error messages. All values are read and checked before any is assigned.
    """
    name_map = name_map or {}
    transforms = transforms or {}
    stored = reader.get_variable_to_shape_map()
    values, missing, used = {}, [], set()
    for ours, var in variables.items():
        if ours in transforms:
            value = np.asarray(transforms[ours](reader))
        else:
            theirs = name_map.get(ours, ours)
            if theirs not in stored:
                missing.append(ours)
                continue
            used.add(theirs)
            value = reader.get_tensor(theirs)
        if tuple(value.shape) != tuple(var.shape):
            raise CheckpointMismatch(
                f"{label}: tensor {name_map.get(ours, ours)} has shape {list(value.shape)}, "
                f"the model expects {var.shape.as_list()}")
        values[ours] = value
    if missing and not allow_missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointMismatch(
            f"{label}: tensor {name_map.get(missing[0], missing[0])} is missing{more}")
    for ours, value in values.items():
        variables[ours].assign(np.asarray(value).astype(variables[ours].dtype.as_numpy_dtype))
    unexpected = sorted(set(stored) - used)
    return {"loaded": sorted(values), "missing": missing, "unexpected": unexpected}


def save_tf1_checkpoint(tensors, prefix):
    """Write {TF1 name: array} as a name-based V2 checkpoint at ``prefix`` (what ``tf.compat.v1.train.Saver`` writes).

    Written under a temporary prefix first and renamed, so an interrupted save leaves no half-written files.
    """
    prefix = str(prefix)
    tmp = f"{prefix}.tmp{os.getpid()}"
    names = sorted(tensors)
    with removing_on_failure(tmp):
        tf.raw_ops.SaveV2(prefix=tmp, tensor_names=names, shape_and_slices=[""] * len(names),
                          tensors=[tf.convert_to_tensor(tensors[n]) for n in names])
        _rename_checkpoint(tmp, prefix)


@contextlib.contextmanager
def removing_on_failure(tmp):
    """If the body raises (anything, KeyboardInterrupt included), delete every file or folder whose path starts
    with ``tmp`` (a checkpoint's temporary prefix and TF's ``_temp`` folders), then re-raise."""
    try:
        yield
    except BaseException:
        for stale in glob.glob(glob.escape(tmp) + "*"):
            shutil.rmtree(stale, ignore_errors=True) if os.path.isdir(stale) else os.remove(stale)
        raise


def _rename_checkpoint(tmp, prefix):
    """Rename the data file first and the index last: a ``prefix.index`` that exists belongs to a complete write."""
    for suffix in (".data-00000-of-00001", ".index"):
        os.replace(tmp + suffix, prefix + suffix)


# ---------------------------------------------------------------------------------------------------------------------
# Backbone: one model (models/backbone.py, variables keyed by the DrSleep names), five kinds of file.
#
#   format       where it comes from                                  names (canonical → stored)
#   drsleep      DrSleep deeplab_resnet_init.ckpt (CMPC, RRN),         identical: conv1/weights, bn_conv1/moving_mean,
#                CMPC/RRN snapshots (V1 or V2, name-based)             res4b22_branch2c/weights, bn4b22_branch2c/gamma, …
#   tf-deeplab   chenxi116 TF-deeplab ResNet101_train.tfmodel (RMI     DeepLab/group_1/conv1/DW, DeepLab/group_1/bn_conv1/…,
#                -w deeplab)                                           DeepLab/group_4_22/block_3/conv/DW, …/bn/{beta,gamma,
#                                                                      mean,variance,factor}; moving stats = stored / factor
#   tf-resnet    chenxi116 TF-resnet ResNet101_init.tfmodel (RMI       ResNet/group_*… as above without factor, plus
#                -w resnet)                                            ResNet/fc1000/{DW,biases}
#   tf2          external/convert_backbone.py output (tf.train.       <any prefix>/vars/conv1.Sweights/.ATTRIBUTES/…
#                Checkpoint of a Backbone, or of a model holding one)
#   npy          Caffe-converted pickled dicts: DrSleep convert.py     {layer: {weights | moving_mean, moving_variance,
#                ({layer: {param: array}}), chenxi116 caffemodel2npy   gamma, beta}} (upstream caffe-tensorflow's mean,
#                ({'group_1/conv1/DW': array, …})                      variance, scale, offset accepted); flat chenxi116
#                                                                      names without the DeepLab/ResNet root
# Unit / block mapping of the chenxi116 names: res<S>a → group_<S>_0, res<S>b|c → _1|_2, res<S>b<N> → _<N>;
# branch2a|2b|2c → block_1|2|3, branch1 → block_add; conv1 → group_1/conv1.
# ---------------------------------------------------------------------------------------------------------------------

BACKBONE_SOURCES = (
    "see data/README.md: CMPC and RRN use DrSleep's deeplab_resnet_init.ckpt (tensorflow-deeplab-resnet), "
    "RMI -w deeplab uses TF-deeplab's ResNet101_train.tfmodel, RMI -w resnet TF-resnet's ResNet101_init.tfmodel "
    "(chenxi116/TF-deeplab, chenxi116/TF-resnet)")
_TF2_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
_TF2_CONV1 = "conv1.Sweights" + _TF2_SUFFIX
_NPY_BN_ALIASES = {"mean": "moving_mean", "variance": "moving_variance", "scale": "gamma", "offset": "beta"}
_CHENXI_BN = {"beta": "beta", "gamma": "gamma", "moving_mean": "mean", "moving_variance": "variance"}
_CHENXI_BLOCK = {"2a": "block_1", "2b": "block_2", "2c": "block_3", "1": "block_add"}
_CAFFE_NAME = re.compile(r"^(res|bn)(\d)([a-z])(\d*)_branch(1|2a|2b|2c)/(\w+)$")


class _DictReader:
    """A ``tf.train.load_checkpoint``-like view of a flat {name: array} dict."""

    def __init__(self, tensors):
        self._tensors = tensors

    def get_variable_to_shape_map(self):
        return {n: list(np.shape(v)) for n, v in self._tensors.items()}

    def get_tensor(self, name):
        return np.asarray(self._tensors[name])


def _read_npy_dict(path, allow_pickle):
    """Flatten a Caffe-converted ``.npy`` dict into {stored name: float32 array} (see the table above).

    Such a file is a pickled object array: unpickling can run arbitrary code, so it is refused unless ``allow_pickle``.
    """
    try:
        data = np.load(path, allow_pickle=allow_pickle, encoding="latin1")
    except ValueError as e:
        if allow_pickle:
            raise
        raise ValueError(
            f"{path} is a pickled .npy dict (an object array); unpickling can execute arbitrary code, so it is refused. "
            "If you trust the file, pass allow_pickle=True (converter: --allow-pickle), or better convert it once "
            "with external/convert_backbone.py --allow-pickle and use the TF2 checkpoint") from e
    if not (isinstance(data, np.ndarray) and data.dtype == object and data.shape == () and isinstance(data.item(), dict)):
        raise ValueError(f"{path}: expected np.save of one dict, found {type(data).__name__} "
                         f"{getattr(data, 'dtype', '')} {getattr(data, 'shape', '')}")
    flat = {}
    for key, value in data.item().items():
        if isinstance(value, dict):  # DrSleep convert.py: {layer: {param: array}}
            for param, array in value.items():
                flat[f"{key}/{_NPY_BN_ALIASES.get(param, param)}"] = np.asarray(array, np.float32)
        else:  # chenxi116 caffemodel2npy: {'group_1/conv1/DW': array}; its fc1000/DW is squeezed to [2048, 1000]
            array = np.asarray(value, np.float32)
            if key == "fc1000/DW" and array.ndim == 2:
                array = array.reshape((1, 1) + array.shape)
            flat[key] = array
    return flat


def _chenxi_name(canonical, root):
    """Canonical (DrSleep) backbone name → TF-deeplab / TF-resnet name under ``root`` ('DeepLab/', 'ResNet/' or '')."""
    if canonical.startswith("ResNet/fc1000/"):
        return root + canonical[len("ResNet/"):]
    scope, param = canonical.rsplit("/", 1)
    leaf = "DW" if param == "weights" else _CHENXI_BN[param]
    if scope in ("conv1", "bn_conv1"):
        return f"{root}group_1/{scope}/{leaf}"
    kind, stage, letter, number, branch, _ = _CAFFE_NAME.match(canonical).groups()
    unit = int(number) if number else "abc".index(letter)
    return f"{root}group_{stage}_{unit}/{_CHENXI_BLOCK[branch]}/{'conv' if kind == 'res' else 'bn'}/{leaf}"


def _tf2_name(canonical, prefix):
    """Canonical name → key in an object-based TF2 checkpoint whose Backbone ``vars`` dict sits at ``prefix``."""
    return prefix + canonical.replace(".", "..").replace("/", ".S") + _TF2_SUFFIX


def open_backbone_source(path, allow_pickle=False):
    """Resolve ``path`` (V2 prefix, ``.index`` file, V1 file, folder with a ``checkpoint`` file, ``.npy``) → (path, reader)."""
    path = str(path)
    if path.endswith(".index"):
        path = path[:-len(".index")]
    if os.path.isdir(path) and tf.train.latest_checkpoint(path):
        path = tf.train.latest_checkpoint(path)
    if path.endswith(".npy") and os.path.isfile(path):
        return path, _DictReader(_read_npy_dict(path, allow_pickle))
    if checkpoint_exists(path) or os.path.isfile(path):
        try:
            return path, tf.train.load_checkpoint(path)
        except (tf.errors.OpError, ValueError) as e:
            raise ValueError(f"{path} is neither a TensorFlow checkpoint nor a .npy dict: {e}") from e
    raise FileNotFoundError(f"backbone weights {path} not found (neither a checkpoint prefix, a file nor a .npy); "
                            + BACKBONE_SOURCES)


def detect_backbone_format(stored_names):
    """Name the naming scheme of a set of stored tensor names.

    Returns:
      (format, root) with format one of 'tf2', 'tf-deeplab', 'tf-resnet', 'drsleep' and root the prefix the names
      carry ('…/vars/' for tf2, 'DeepLab/' / 'ResNet/' / '' for the chenxi116 schemes, '' for drsleep).
    Raises:
      CheckpointMismatch if no conv1 kernel of any scheme is present.
    """
    stored = set(stored_names)
    for name in sorted(stored):
        if name.endswith("/" + _TF2_CONV1):
            return "tf2", name[:-len(_TF2_CONV1)]
    for root in ("DeepLab/", "ResNet/", ""):
        if f"{root}group_1/conv1/DW" in stored:
            deeplab = root == "DeepLab/" or (root == "" and "group_1/bn_conv1/factor" in stored)
            return ("tf-deeplab" if deeplab else "tf-resnet"), root
    if "conv1/weights" in stored:
        return "drsleep", ""
    raise CheckpointMismatch(
        "cannot tell the backbone naming scheme: none of conv1/weights (DrSleep), DeepLab/group_1/conv1/DW "
        "(TF-deeplab), ResNet/group_1/conv1/DW (TF-resnet), group_1/conv1/DW (.npy) or a TF2 Backbone is stored")


def _divide_by_factor(stored_name, factor_name):
    """TF-deeplab's frozen statistic: ``(1 / factor) · stored`` in float32, as its graph computes it."""
    def transform(reader):
        inv = np.float32(1.0) / reader.get_tensor(factor_name).astype(np.float32)
        return (inv * reader.get_tensor(stored_name).astype(np.float32)).astype(np.float32)
    return transform


def backbone_name_map(variables, fmt, root, stored_names):
    """Map the backbone's canonical names to stored names for format ``fmt`` (see ``detect_backbone_format``).

    Returns:
      (name_map, transforms, consumed): {canonical: stored name}; {canonical: fn(reader)} for TF-deeplab's moving
      statistics (stored / factor, only where both tensors exist, so a missing one is reported by its name);
      the stored names the transforms read.
    """
    stored = set(stored_names)
    name_map, transforms, consumed = {}, {}, set()
    for name in variables:
        if fmt == "tf2":
            name_map[name] = _tf2_name(name, root)
        elif fmt == "drsleep":
            name_map[name] = name
        else:
            name_map[name] = _chenxi_name(name, root)
            if fmt == "tf-deeplab" and name.endswith(("/moving_mean", "/moving_variance")):
                factor = name_map[name].rsplit("/", 1)[0] + "/factor"
                if name_map[name] in stored and factor in stored:
                    transforms[name] = _divide_by_factor(name_map[name], factor)
                    consumed.update((name_map[name], factor))
                elif name_map[name] in stored:
                    name_map[name] = factor
    return name_map, transforms, consumed


def load_backbone_weights(backbone, path, allow_partial=False, allow_pickle=False):
    """Load backbone weights from any of the supported files, detecting the naming scheme from the stored names.

    Args:
      backbone: a ``models.backbone.Backbone`` (or anything with ``tf1_variables()`` keyed by the DrSleep names).
      path: a name-based TF1 checkpoint (DrSleep / TF-deeplab / TF-resnet naming; V2 prefix or V1 file), a TF2
        checkpoint written by ``external/convert_backbone.py`` (or of any model holding a Backbone), a folder with a
        ``checkpoint`` file, or a Caffe-converted ``.npy`` dict.
      allow_partial: load what is there and report the rest as missing, instead of raising.
      allow_pickle: permit unpickling a ``.npy`` dict (only for trusted files).

    Returns:
      dict: ``path`` (resolved), ``format``, ``sources`` {canonical: stored name (or 'stored / factor')},
      ``loaded`` / ``missing`` (canonical names), ``unexpected`` (stored names nobody used).
    Raises:
      FileNotFoundError naming the path and where the original weights come from; CheckpointMismatch naming the
      first missing tensor (unless ``allow_partial``) or a tensor of the wrong shape — nothing is assigned then;
      ValueError for a pickled ``.npy`` without ``allow_pickle``.
    """
    variables = backbone.tf1_variables()
    path, reader = open_backbone_source(path, allow_pickle)
    stored = reader.get_variable_to_shape_map()
    fmt, root = detect_backbone_format(stored)
    name_map, transforms, consumed = backbone_name_map(variables, fmt, root, stored)
    report = _assign_by_name(variables, reader, path, name_map, allow_partial, transforms)
    report["unexpected"] = [n for n in report["unexpected"] if n not in consumed and n != "_CHECKPOINTABLE_OBJECT_GRAPH"]
    report["sources"] = {n: (f"{name_map[n]} / factor" if n in transforms else name_map[n]) for n in variables}
    report.update(path=path, format=fmt)
    log.info("backbone weights %s (%s): %d loaded, %d missing, %d unexpected", path, fmt, len(report["loaded"]),
                 len(report["missing"]), len(report["unexpected"]))
    return report


def save_backbone_checkpoint(backbone, prefix):
    """Write ``tf.train.Checkpoint(backbone=backbone)`` at ``prefix`` atomically (temporary prefix, then rename).

    Returns the prefix; ``load_backbone_weights`` reads it back (format 'tf2').
    """
    prefix = str(prefix)
    tmp = f"{prefix}.tmp{os.getpid()}"
    with removing_on_failure(tmp):
        tf.train.Checkpoint(backbone=backbone).write(tmp)
        _rename_checkpoint(tmp, prefix)
    return prefix
