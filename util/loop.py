"""The training loop of the registry entries that bring their own step (``spec.train_loop``: SaG, TRIS).

What it shares with ``util.train.train``: resume from the newest good snapshot in ``-f`` (``Snapshots.latest_good``:
complete and finite), else ``--resume-from``, else the entry's initial weights; the iteration counter is the
optimizer's update count (``optimizer.step``), so a resumed run continues the schedule; a non-finite loss or
non-finite weights at a snapshot stop the run with ``TrainingDiverged`` naming the last good snapshot; snapshots
every ``-s`` iterations and at the end (atomic, the newest ``keep`` kept); ``-st`` stops early; the originals' log
line ``iter = N, loss (cur) = …, loss (avg) = …, lr = …`` (average: EMA 0.99 from 0) every ``--log-every``, with
the entry's other terms on a second line; a progress bar.
"""
import logging
import sys

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from util.snapshots import Snapshots
from util.train import MovingAverages, TrainingDiverged, last_good_snapshot, save_snapshot

log = logging.getLogger("train")


def run_training(cfg, model, optimizer, step, restore, initialize=None):
    """Train ``model`` with ``step`` from the resume point to ``cfg.max_iter`` (or ``cfg.stop_iter``).

    step(n_iter) → {"loss": float, "lr": float, other terms: float} for iteration ``n_iter`` (it draws its own
    batch); restore(path) restores model and optimizer from a snapshot; initialize() sets the initial weights when
    there is nothing to resume (None: the model was built with them). Returns the last iteration run + 1.
    """
    snapshots = Snapshots(cfg.snapshot_folder, cfg.snapshot_name, keep=cfg.keep_snapshots)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    resume = snapshots.latest_good()[1] or cfg.resume_from
    if resume:
        restore(resume)
        log.info("resuming from %s (iteration %d)", resume, int(optimizer.step.numpy()))
    elif initialize is not None:
        initialize()
    start = int(optimizer.step.numpy())

    averages = MovingAverages()
    end = min(cfg.max_iter, cfg.stop_iter)
    bar = tqdm(total=end, initial=min(start, end), desc="train", unit="iter", disable=not cfg.progress,
               file=sys.stderr)
    n_iter = start
    for n_iter in range(start, cfg.max_iter):
        values = step(n_iter)
        loss = values["loss"]
        if not np.isfinite(loss):
            raise TrainingDiverged(f"loss is {loss} at iteration {n_iter}: stopping; the last good snapshot is "
                                   f"{last_good_snapshot(snapshots)}")
        average = averages.update("loss", loss)
        if n_iter % cfg.log_every == 0:
            log.info("iter = %d, loss (cur) = %f, loss (avg) = %f, lr = %f", n_iter, loss, average, values["lr"])
            others = {k: v for k, v in values.items() if k not in ("loss", "lr")}
            if others:
                log.info("iter = %d, %s", n_iter, ", ".join(f"{k} = {v:f}" for k, v in others.items()))
        bar.update(1)
        if (n_iter + 1) % cfg.snapshot == 0 or n_iter + 1 >= cfg.max_iter:
            save_snapshot(snapshots, checkpoint, n_iter, (model, optimizer))
        if n_iter + 1 >= cfg.stop_iter:
            log.info("stop training at iter %d", cfg.stop_iter)
            break
    bar.close()
    log.info("Optimization done.")
    return n_iter + 1
