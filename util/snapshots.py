"""Training snapshots: the originals' naming, atomic writes, retention, and restoring either format.

Our snapshots are TF2 object checkpoints at ``<folder>/<dataset>_iter_<N>`` (``.index`` + ``.data-00000-of-00001``),
the originals' name without ``.tfmodel``. A snapshot is written under a temporary prefix and renamed (data file
first, index last), so a snapshot whose ``.index`` exists is complete; a run killed mid-write leaves only a
``.tmp`` file that the next save removes. The newest ``keep`` snapshots are kept (CMPC's ``max_to_keep=4``).

Original TF1 snapshots (``<dataset>_iter_<N>.tfmodel``, RMI's ``<dataset>_<weights>_<model>_iter_<N>.tfmodel``) are
read by variable name.
"""
import glob
import logging
import os
import re
import shutil
import time

import tensorflow as tf

from util.checkpoints import CheckpointMismatch, checkpoint_exists, load_backbone_weights, load_tf1_variables, read_tf1_checkpoint

log = logging.getLogger(__name__)
_DATA_SUFFIX = ".data-00000-of-00001"
# Fault injection for the interruption tests: seconds to pause between writing a snapshot and renaming it.
FAULT_PAUSE_ENV = "REFSEG_FAULT_PAUSE_BEFORE_RENAME"


def is_tf2_checkpoint(prefix):
    return "_CHECKPOINTABLE_OBJECT_GRAPH" in read_tf1_checkpoint(prefix)


def write_checkpoint_atomic(checkpoint, prefix):
    """``checkpoint.write`` under a hidden temporary prefix beside ``prefix``, then rename (data first, index last).

    Leftover temporaries of an earlier interrupted write of the same prefix are removed first."""
    folder, name = os.path.split(os.path.abspath(prefix))
    os.makedirs(folder, exist_ok=True)
    for stale in glob.glob(os.path.join(folder, f".{glob.escape(name)}.tmp*")):
        shutil.rmtree(stale) if os.path.isdir(stale) else os.remove(stale)
    tmp = os.path.join(folder, f".{name}.tmp{os.getpid()}")
    checkpoint.write(tmp)
    if os.environ.get(FAULT_PAUSE_ENV):
        time.sleep(float(os.environ[FAULT_PAUSE_ENV]))
    os.replace(tmp + _DATA_SUFFIX, prefix + _DATA_SUFFIX)
    os.replace(tmp + ".index", prefix + ".index")
    return prefix


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

    def latest(self):
        its = self.iterations()
        return (its[-1], self.path(its[-1])) if its else (None, None)

    def save(self, checkpoint, iteration):
        """Write ``checkpoint`` (a ``tf.train.Checkpoint``) as snapshot ``iteration``, atomically."""
        final = write_checkpoint_atomic(checkpoint, self.path(iteration))
        for old in self.iterations()[:-self.keep] if self.keep else []:
            for suffix in (".index", _DATA_SUFFIX):
                if os.path.exists(self.path(old) + suffix):
                    os.remove(self.path(old) + suffix)
        return final


def find_snapshot(candidates):
    """First existing checkpoint prefix among ``candidates``; FileNotFoundError listing them all otherwise."""
    for prefix in candidates:
        if checkpoint_exists(prefix):
            return prefix
    raise FileNotFoundError("snapshot not found; looked for " + ", ".join(f"{c}.index" for c in candidates))


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
