"""Checkpoint I/O by TF1 variable name.

Every model in this project keeps its variables in a dict keyed by the variable's TF1 name (without ``:0``), so a TF1
snapshot (``unc_iter_700000.tfmodel``, ``deeplab_resnet_init.ckpt``) loads by name with no table at all; only the
backbone naming schemes of the three original codebases need one (see the backbone section below).

Errors are one line and name the tensor (``CheckpointMismatch``).
"""
import os

import numpy as np
import tensorflow as tf


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
    name_map = name_map or {}
    transforms = transforms or {}
    if not checkpoint_exists(prefix):
        raise FileNotFoundError(f"checkpoint {prefix}.index not found")
    reader = tf.train.load_checkpoint(str(prefix))
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
                f"{prefix}: tensor {name_map.get(ours, ours)} has shape {list(value.shape)}, "
                f"the model expects {var.shape.as_list()}")
        values[ours] = value
    if missing and not allow_missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointMismatch(
            f"{prefix}: tensor {name_map.get(missing[0], missing[0])} is missing{more}")
    for ours, value in values.items():
        variables[ours].assign(value.astype(variables[ours].dtype.as_numpy_dtype))
    unexpected = sorted(set(stored) - used)
    return {"loaded": sorted(values), "missing": missing, "unexpected": unexpected}


def save_tf1_checkpoint(tensors, prefix):
    """Write {TF1 name: array} as a name-based V2 checkpoint at ``prefix`` (what ``tf.compat.v1.train.Saver`` writes).

    Written under a temporary prefix first and renamed, so an interrupted save leaves no half-written files.
    """
    prefix = str(prefix)
    tmp = f"{prefix}.tmp{os.getpid()}"
    names = sorted(tensors)
    tf.raw_ops.SaveV2(prefix=tmp, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.convert_to_tensor(tensors[n]) for n in names])
    for suffix in (".index", ".data-00000-of-00001"):
        os.replace(tmp + suffix, prefix + suffix)
