"""Training: one ``tf.function`` step with the originals' objective, and the training loop."""
import logging
import time

import numpy as np
import tensorflow as tf

from models import build_model
from models.backbone import seeded_weights
from models.layers import resize_bilinear_legacy
from util import data
from util.checkpoints import load_backbone_weights
from util.metrics import compute_accuracy
from util.optim import WEIGHT_DECAY, TF1Adam, gradient_multiplier, is_regularized, l2_regularization
from util.snapshots import Snapshots, restore_model

RANDOM_INIT = "random"
log = logging.getLogger("train")


def make_train_step(forward, losses_fn, objective, train_vars, optimizer, weight_decay=WEIGHT_DECAY,
                    jit_compile=False):
    """Build the step of the originals' ``train_op``.

    cost = losses[objective] + weight_decay · Σ ½‖W‖² (over the ``DW``/``weights`` kernels of ``train_vars``);
    gradients of cost w.r.t. ``train_vars`` times ``gradient_multiplier`` (×2 on ``biases``); one TF1 Adam update.

    Args:
      forward: fn(inputs) -> outputs dict (the model's forward pass).
      losses_fn: fn(outputs, target_fine) -> dict of classification losses (float32 scalars).
      objective: key of the loss that is optimised (``cls_loss``; CMPC ``cls_loss_all``).
      train_vars: {TF1 name: tf.Variable} that are updated (the original's ``tvars``); watched explicitly, so frozen
        (non-trainable) backbone kernels selected by ``-conv5`` get gradients and nothing else is differentiated.
      optimizer: ``util.optim.TF1Adam`` over the same variables.
    Returns:
      step(inputs, target_fine) -> (losses, outputs): losses before the update plus ``reg_loss``, ``cost`` and the
      ``learning_rate`` used by this update.
    """
    names = sorted(train_vars)
    var_list = [train_vars[n] for n in names]

    def step(inputs, target_fine):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(var_list)
            outputs = forward(inputs)
            losses = dict(losses_fn(outputs, target_fine))
            losses["reg_loss"] = l2_regularization(train_vars, weight_decay)
            losses["cost"] = losses[objective] + losses["reg_loss"]
        grads = tape.gradient(losses["cost"], var_list)
        scaled = {}
        for name, grad in zip(names, grads):
            if grad is None:
                continue
            mult = gradient_multiplier(name)
            scaled[name] = tf.multiply(mult, tf.convert_to_tensor(grad)) if mult != 1.0 else grad
        losses["learning_rate"] = optimizer.apply_gradients(scaled)
        return losses, outputs

    return tf.function(step, jit_compile=jit_compile)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def _downsample_target(target, size):
    """The originals' accuracy label: legacy bilinear resize of the full mask to the score map (pixel (8i, 8j))."""
    return resize_bilinear_legacy(tf.convert_to_tensor(target), size).numpy()


class MovingAverages:
    """EMAs with decay 0.99 starting from 0, as the originals' training logs."""

    def __init__(self, decay=0.99):
        self.decay, self.values = decay, {}

    def update(self, name, value):
        self.values[name] = self.decay * self.values.get(name, 0.0) + (1 - self.decay) * value
        return self.values[name]


def initialize_backbone(backbone, path, seed):
    """Load the pretrained backbone (``path``), or seeded stand-in weights when ``path`` is ``random``."""
    if path == RANDOM_INIT:
        log.info("Initialising the backbone with seeded random weights (seed %d): no pretrained weights", seed)
        weights = seeded_weights(seed, fc1000=backbone.fc1000)
        for name, var in backbone.tf1_variables().items():
            var.assign(weights[name])
        return
    log.info("Loading pretrained weights from %s", path)
    load_backbone_weights(backbone, path)


def train(cfg):
    """The originals' ``train()``: see ``trainval_model.py`` for the flags in ``cfg``."""
    files = data.batch_files(cfg.batch_folder, cfg.batch_prefix)
    model = build_model(cfg.model, vocab_size=cfg.vocab_size, embedding=cfg.load_embedding(),
                        image_size=cfg.image_size, weights=cfg.weights, seed=cfg.seed)
    head = model.head
    tvars = model.train_variables(cfg.conv5)
    optimizer = TF1Adam(tvars, cfg.lr, head.LR_DECAY_STEPS, head.STEP_NAME)
    snapshots = Snapshots(cfg.snapshot_folder, cfg.snapshot_name, keep=cfg.keep_snapshots)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)

    start, latest = snapshots.latest()
    if latest is not None:
        restore_model(model, latest, optimizer)
        start = int(optimizer.step.numpy())
        log.info("resuming from %s (iteration %d)", latest, start)
    elif cfg.resume_from:
        restore_model(model, cfg.resume_from, optimizer)
        start = int(optimizer.step.numpy())
        log.info("resuming from %s (iteration %d)", cfg.resume_from, start)
    else:
        start = 0
        initialize_backbone(model.backbone, cfg.init_weights, cfg.seed)

    log.info("Collecting variables for regularization:")
    for name in sorted(n for n in tvars if is_regularized(n)):
        log.info("\t%s", name)
    log.info("Done.")

    step_fn = make_train_step(lambda inp: model(*inp), head.losses, head.OBJECTIVE, tvars, optimizer,
                              jit_compile=cfg.xla)
    dataset = data.training_dataset(files, cfg.batch_size, cfg.seed, shuffle=True, start=start * cfg.batch_size)
    batches = iter(dataset)
    averages = MovingAverages()
    score_size = None
    last_time = time.time()
    for n_iter in range(start, cfg.max_iter):
        words, image, target = next(batches)
        losses, outputs = step_fn((image, words), target)
        cls_loss = float(losses["cls_loss"])
        if not np.isfinite(float(losses["cost"])):
            raise TrainingDiverged(
                f"loss is {float(losses['cost'])} at iteration {n_iter}: stopping; the last good snapshot is "
                f"{snapshots.latest()[1] or '(none yet)'}")
        avg_loss = averages.update("loss", cls_loss)
        pred = outputs["pred"].numpy()
        score_size = score_size or list(pred.shape[1:3])
        acc = compute_accuracy(pred, _downsample_target(target, score_size))
        avg_acc = [averages.update(k, a) for k, a in zip(("all", "pos", "neg"), acc)]
        now = time.time()
        if n_iter % cfg.log_every == 0:
            log.info("iter = %d, loss (cur) = %f, loss (avg) = %f, lr = %f",
                     n_iter, cls_loss, avg_loss, float(losses["learning_rate"]))
            log.info("iter = %d, accuracy (cur) = %f (all), %f (pos), %f (neg)", n_iter, *acc)
            log.info("iter = %d, accuracy (avg) = %f (all), %f (pos), %f (neg)", n_iter, *avg_acc)
            log.info("iter = %d, cur time = %.5f, model_name: %s", n_iter, now - last_time, cfg.model)
        last_time = now
        if (n_iter + 1) % cfg.snapshot == 0 or n_iter + 1 >= cfg.max_iter:
            log.info("snapshot saved to %s", snapshots.save(checkpoint, n_iter + 1))
        if n_iter + 1 >= cfg.stop_iter:
            log.info("stop training at iter %d", cfg.stop_iter)
            break
    log.info("Optimization done.")
