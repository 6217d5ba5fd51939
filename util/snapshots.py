"""Training snapshots: the originals' naming, atomic writes, retention, and restoring either format.

Our snapshots are TF2 object checkpoints at ``<folder>/<dataset>_iter_<N>`` (``.index`` + ``.data-00000-of-00001``),
the originals' name without ``.tfmodel``. A snapshot is written under a temporary prefix and renamed (data file
first, index last), so a snapshot whose ``.index`` exists is complete; a run killed mid-write leaves only a
``.tmp`` file that the next save removes, and a write that fails (disk full, permissions) removes its temporaries.
The newest ``keep`` snapshots are kept (CMPC's ``max_to_keep=4``).

A snapshot is *good* when its data file is as long as its index says and every floating-point tensor is finite:
``Snapshots.save`` refuses to write weights that are not finite, and resuming takes the newest good snapshot,
skipping (with a warning, never deleting) truncated or non-finite ones that got there another way.

Original TF1 snapshots (``<dataset>_iter_<N>.tfmodel``, RMI's ``<dataset>_<weights>_<model>_iter_<N>.tfmodel``) are
read by variable name.
"""
import glob
import logging
import os
import re
import shutil
import time

import numpy as np
import tensorflow as tf

from util.checkpoints import CheckpointMismatch, checkpoint_exists, load_backbone_weights, load_tf1_variables, read_tf1_checkpoint

log = logging.getLogger(__name__)
_DATA_SUFFIX = ".data-00000-of-00001"
# Fault injection for the interruption tests: seconds to pause between writing a snapshot and renaming it.
FAULT_PAUSE_ENV = "REFSEG_FAULT_PAUSE_BEFORE_RENAME"


class NonFiniteWeights(ValueError):
    """A snapshot was not written because a variable holds NaN or an infinity."""


def is_tf2_checkpoint(prefix):
    return "_CHECKPOINTABLE_OBJECT_GRAPH" in read_tf1_checkpoint(prefix)


def first_non_finite(modules):
    """Name of the first floating-point variable of ``modules`` (tf.Modules) holding NaN or ±inf, else None."""
    for module in modules:
        for var in module.variables:
            if var.dtype.is_floating and not np.isfinite(var.numpy()).all():
                return var.name.split(":")[0]
    return None


def _remove_temporaries(folder, name):
    for stale in glob.glob(os.path.join(folder, f".{glob.escape(name)}.tmp*")):
        shutil.rmtree(stale, ignore_errors=True) if os.path.isdir(stale) else os.remove(stale)


def write_checkpoint_atomic(checkpoint, prefix):
    """``checkpoint.write`` under a hidden temporary prefix beside ``prefix``, then rename (data first, index last).

    Leftover temporaries of an earlier interrupted write of the same prefix are removed first; a write that raises
    (OSError, ``tf.errors.OpError``, KeyboardInterrupt) removes its own before the exception propagates."""
    folder, name = os.path.split(os.path.abspath(prefix))
    os.makedirs(folder, exist_ok=True)
    _remove_temporaries(folder, name)
    tmp = os.path.join(folder, f".{name}.tmp{os.getpid()}")
    try:
        checkpoint.write(tmp)
        if os.environ.get(FAULT_PAUSE_ENV):
            time.sleep(float(os.environ[FAULT_PAUSE_ENV]))
        os.replace(tmp + _DATA_SUFFIX, prefix + _DATA_SUFFIX)
        os.replace(tmp + ".index", prefix + ".index")
    except BaseException:
        _remove_temporaries(folder, name)
        raise
    return prefix


def snapshot_problem(prefix):
    """Why the checkpoint ``prefix`` is not a good snapshot, or None when it is.

    Checks, in order: the ``.index`` and ``.data-00000-of-00001`` files exist; the data file holds at least the bytes
    the index's numeric tensors need (Σ elements × dtype size; truncation); every tensor reads back in full and every
    floating-point one is finite (this reads the whole snapshot)."""
    data_path = prefix + _DATA_SUFFIX
    if not os.path.isfile(data_path):
        return f"its data file {os.path.basename(data_path)} is missing"
    try:
        reader = tf.train.load_checkpoint(prefix)
    except (tf.errors.OpError, ValueError) as e:
        return f"unreadable index ({str(e).strip().splitlines()[0][:200]})"
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    needed = sum(int(np.prod(shapes[n], dtype=np.int64)) * dtypes[n].size for n in shapes if dtypes[n] != tf.string)
    size = os.path.getsize(data_path)
    if size < needed:
        return f"truncated: {os.path.basename(data_path)} has {size} bytes, its index needs at least {needed}"
    for name in sorted(shapes):
        try:
            value = reader.get_tensor(name)
        except (IndexError, ValueError, tf.errors.OpError) as e:
            return f"unreadable tensor {name} ({str(e).strip().splitlines()[0][:200]}; truncated or corrupt)"
        if dtypes[name].is_floating and not np.isfinite(value).all():
            return f"tensor {name} is not finite (NaN or inf)"
    return None


class Snapshots:
    """Snapshots ``<folder>/<name>_<N>`` of one run."""

    def __init__(self, folder, name, keep=4):
        self.folder, self.name, self.keep = folder, name, keep
        self._pattern = re.compile(re.escape(name) + r"_(\d+)\.index$")

    def path(self, iteration):
        return os.path.join(self.folder, f"{self.name}_{iteration}")

    def iterations(self):
        """Iterations of the complete snapshots present, ascending."""
        if not os.path.isdir(self.folder):
            return []
        found = (self._pattern.match(f) for f in os.listdir(self.folder))
        return sorted(int(m.group(1)) for m in found if m)

    def latest_good(self):
        """(iteration, prefix) of the newest snapshot ``snapshot_problem`` finds nothing wrong with, else (None, None);
        each newer one skipped is logged with its problem (and left on disk)."""
        for iteration in reversed(self.iterations()):
            problem = snapshot_problem(self.path(iteration))
            if problem is None:
                return iteration, self.path(iteration)
            log.warning("skipping snapshot %s: %s", self.path(iteration), problem)
        return None, None

    def save(self, checkpoint, iteration, modules=()):
        """Write ``checkpoint`` (a ``tf.train.Checkpoint``) as snapshot ``iteration``, atomically.

        Raises ``NonFiniteWeights`` (nothing written) if a floating-point variable of ``modules`` is not finite."""
        bad = first_non_finite(modules)
        if bad is not None:
            raise NonFiniteWeights(f"variable {bad} is not finite (NaN or inf); snapshot {self.path(iteration)} "
                                   f"not written")
        final = write_checkpoint_atomic(checkpoint, self.path(iteration))
        for old in self.iterations()[:-self.keep] if self.keep else []:
            for suffix in (".index", _DATA_SUFFIX):
                if os.path.exists(self.path(old) + suffix):
                    os.remove(self.path(old) + suffix)
        return final


TORCH_SUFFIXES = (".pth", ".pth.tar")


def find_snapshot(candidates):
    """First existing snapshot among ``candidates``: a checkpoint prefix (its ``.index`` present) or, for a name
    ending in ``.pth`` / ``.pth.tar`` (the PyTorch originals' files), that file; FileNotFoundError listing them all
    otherwise."""
    for candidate in candidates:
        if os.path.isfile(candidate) if candidate.endswith(TORCH_SUFFIXES) else checkpoint_exists(candidate):
            return candidate
    raise FileNotFoundError("snapshot not found; looked for " + ", ".join(
        c if c.endswith(TORCH_SUFFIXES) else f"{c}.index" for c in candidates))


def restore_model(model, prefix, optimizer=None):
    """Restore ``model`` (and optionally the optimizer state) from our TF2 snapshot or an original TF1 one.

    TF1 snapshots: the head by its TF1 names, the backbone through ``load_backbone_weights`` (any of the three
    naming schemes), and — with ``optimizer`` — the step counter, beta powers and Adam slots by their TF1 names.
    Raises ``CheckpointMismatch`` naming the first missing or misshapen tensor.

    Returns {"format": "tf2"} or {"format": "tf1", "head": …, "backbone": …[, "optimizer": …]} with the loaders'
    reports (``loaded``, ``missing``, ``unexpected``).
    """
    if is_tf2_checkpoint(prefix):
        objects = {"model": model} if optimizer is None else {"model": model, "optimizer": optimizer}
        try:
            status = tf.train.Checkpoint(**objects).read(prefix)
            status.expect_partial()
            status.assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointMismatch(
                f"{prefix} is not a snapshot of this {model.model_name} (another model or other sizes?): "
                f"{first_line[:300]}") from None
        return {"format": "tf2"}
    report = {"format": "tf1",
              "head": load_tf1_variables(model.head.tf1_variables(), prefix),
              "backbone": load_backbone_weights(model.backbone, prefix)}
    if optimizer is not None:
        report["optimizer"] = load_tf1_variables(optimizer.tf1_variables(), prefix)
    return report
