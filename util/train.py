"""Training: one ``tf.function`` step with the originals' objective, and the training loop."""
import contextlib
import logging
import sys
import time

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from models import RANDOM_INIT
from models.backbone import seeded_weights
from models.layers import resize_bilinear_legacy
from util import data
from util.checkpoints import load_backbone_weights
from util.metrics import compute_accuracy
from util.optim import WEIGHT_DECAY, gradient_multiplier, l2_regularization
from util.snapshots import NonFiniteWeights, Snapshots
from util.summaries import plugin_metadata

log = logging.getLogger("train")


COMPUTE_DTYPES = {"fp32": tf.float32, "bf16": tf.bfloat16, "fp16": tf.float16}


class DynamicLossScale(tf.Module):
    """Dynamic loss scaling for float16: the cost is multiplied by ``scale`` before differentiation and the
    gradients divided by it. A step whose gradients are not all finite is skipped and halves the scale; after
    ``growth_interval`` finite steps in a row the scale doubles. The initial 2⁸ (not the usual 2¹⁵): the
    originals' loss is a SUM over pixels, so gradients w.r.t. the score maps are O(1) per pixel and 2¹⁵ overflows
    float16 in the backward pass (four skipped steps at 64×64)."""

    def __init__(self, initial=2.0 ** 8, growth_interval=2000):
        super().__init__(name="loss_scale")
        self.growth_interval = growth_interval
        self.scale = tf.Variable(initial, trainable=False, dtype=tf.float32, name="loss_scale")
        self.good_steps = tf.Variable(0, trainable=False, dtype=tf.int64, name="good_steps")

    def update(self, finite):
        """Record one step (``finite``: bool tensor) and adjust the scale."""
        grown = tf.logical_and(finite, self.good_steps + 1 >= self.growth_interval)
        self.scale.assign(tf.where(grown, self.scale * 2.0, tf.where(finite, self.scale, self.scale * 0.5)))
        self.good_steps.assign(tf.where(tf.logical_and(finite, tf.logical_not(grown)), self.good_steps + 1, 0))


def make_train_step(forward, losses_fn, objective, train_vars, optimizer, weight_decay=WEIGHT_DECAY,
                    jit_compile=False, strategy=None, loss_scale=None, regularization=None,
                    multiplier=gradient_multiplier):
    """Build the step of the originals' ``train_op``.

    cost = losses[objective] + weight_decay · Σ ½‖W‖² (over the ``DW``/``weights`` kernels of ``train_vars``);
    gradients of cost w.r.t. ``train_vars`` times ``gradient_multiplier`` (×2 on ``biases``); one TF1 Adam update.
    A model's registry entry may replace the regularisation term (``regularization(train_vars)`` → scalar) and the
    multipliers (``multiplier(name)`` → float), and bring another optimizer with the same ``apply_gradients``.

    Args:
      forward: fn(inputs) -> outputs dict (the model's forward pass).
      losses_fn: fn(outputs, target_fine) -> dict of classification losses (float32 scalars).
      objective: key of the loss that is optimised (``cls_loss``; CMPC ``cls_loss_all``).
      train_vars: {TF1 name: tf.Variable} that are updated (the original's ``tvars``); watched explicitly, so frozen
        (non-trainable) backbone kernels selected by ``-conv5`` get gradients and nothing else is differentiated.
      optimizer: ``util.optim.TF1Adam`` (or ``util.adamw.AdamW``) over the same variables.
      jit_compile: compile with XLA (under a strategy: the per-replica forward/backward).
      strategy: a ``tf.distribute.Strategy`` whose scope created the variables, or None. Each replica computes the
        losses and gradients of its share of the global batch (its own batch mean, as the originals' loss); the
        gradients and losses are averaged over the replicas (``ReduceOp.MEAN``: with equal shares, the gradient of
        the global-batch mean loss) and the single Adam update runs in cross-replica context.
      loss_scale: a ``DynamicLossScale`` (float16), or None: the update is skipped when a gradient is not finite.
    Returns:
      step(inputs, target_fine) -> (losses, outputs): losses before the update plus ``reg_loss``, ``cost`` and the
      ``learning_rate`` used by this update (float32 scalars, averaged over replicas); outputs as ``forward``
      returns them (under a strategy: per-replica values).
    """
    names = sorted(train_vars)
    var_list = [train_vars[n] for n in names]

    def gradients(inputs, target_fine):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(var_list)
            outputs = forward(inputs)
            losses = dict(losses_fn(outputs, target_fine))
            losses["reg_loss"] = (l2_regularization(train_vars, weight_decay) if regularization is None
                                  else regularization(train_vars))
            losses["cost"] = losses[objective] + losses["reg_loss"]
            scaled_cost = losses["cost"] * loss_scale.scale if loss_scale is not None else losses["cost"]
        grads = {}
        for name, grad in zip(names, tape.gradient(scaled_cost, var_list)):
            if grad is not None:
                grad = tf.convert_to_tensor(grad)
                grads[name] = grad / loss_scale.scale if loss_scale is not None else grad
        return losses, outputs, grads

    def apply(grads):
        scaled = {}
        for name, grad in grads.items():
            mult = multiplier(name)
            scaled[name] = tf.multiply(mult, grad) if mult != 1.0 else grad
        if loss_scale is None:
            return optimizer.apply_gradients(scaled)
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in scaled.values()])
        loss_scale.update(finite)
        return tf.cond(finite, lambda: optimizer.apply_gradients(scaled), optimizer.learning_rate)

    if strategy is None:
        def step(inputs, target_fine):
            losses, outputs, grads = gradients(inputs, target_fine)
            losses["learning_rate"] = apply(grads)
            return losses, outputs

        return tf.function(step, jit_compile=jit_compile, autograph=False)

    replica_fn = tf.function(gradients, jit_compile=True, autograph=False) if jit_compile else gradients
    mean = tf.distribute.ReduceOp.MEAN

    def distributed_step(inputs, target_fine):
        losses, outputs, grads = strategy.run(replica_fn, args=(inputs, target_fine))
        losses = {k: strategy.reduce(mean, v, axis=None) for k, v in losses.items()}
        losses["learning_rate"] = apply({k: strategy.reduce(mean, g, axis=None) for k, g in grads.items()})
        return losses, outputs

    return tf.function(distributed_step, autograph=False)


def make_strategy(name):
    """``none`` → None; ``mirrored`` → MirroredStrategy over the GPUs, or over the logical CPU devices when there
    is no GPU (one replica per ``tf.config`` logical CPU); ``multiworker`` → MultiWorkerMirroredStrategy (TF_CONFIG)."""
    if name == "none":
        return None
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.MirroredStrategy([d.name for d in gpus or tf.config.list_logical_devices("CPU")])
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"unknown --strategy {name!r} (none, mirrored or multiworker)")


def is_chief(strategy):
    """True unless this process is a multi-worker task other than the chief (``chief``, else ``worker`` 0)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    cluster = resolver.cluster_spec().as_dict() if resolver is not None else {}
    if not cluster:
        return True
    if "chief" in cluster:
        return resolver.task_type == "chief"
    return resolver.task_type == "worker" and resolver.task_id == 0


class TrainSummaries:
    """TensorBoard summaries of a training run (``--logdir``): every ``every`` iterations the scalars
    ``loss/<name>`` (each loss of the head, ``reg_loss``, ``cost``), ``learning_rate``, ``accuracy/{all,pos,neg}``
    and ``accuracy_avg/{all,pos,neg}`` (the logged moving averages); every ``image_every`` iterations the PNG images
    ``image`` (RGB), ``ground_truth`` and ``prediction`` (sigmoid of the full-size score) of the batch's first sample.

    Written with the core ``tf.summary.write`` and TensorBoard's ``scalars`` / ``images`` plugin metadata (the
    layout ``tf.summary.scalar`` / ``image`` produce), so the ``tensorboard`` package is not needed to train.
    """

    def __init__(self, logdir, every, image_every, mu=data.MU, display_rgb=None):
        self.writer = tf.summary.create_file_writer(logdir)
        self.every, self.image_every, self.mu = every, image_every, mu
        self.display_rgb = display_rgb
        self._scalar = plugin_metadata("scalars")
        self._image = plugin_metadata("images")

    def write(self, n_iter, losses, acc, avg_acc, image, target, sigm):
        """Write iteration ``n_iter``'s summaries that are due. ``image`` [B,H,W,3] the network input (BGR − mu, or
        what ``display_rgb`` maps back to RGB), ``target`` and ``sigm`` [B,H,W,1] in [0, 1] (numpy)."""
        if n_iter % self.every == 0:
            values = {name if name == "learning_rate" else f"loss/{name}": value for name, value in losses.items()}
            for prefix, accs in (("accuracy", acc), ("accuracy_avg", avg_acc)):
                values.update({f"{prefix}/{kind}": a for kind, a in zip(("all", "pos", "neg"), accs)})
            with self.writer.as_default():
                for tag, value in values.items():
                    tf.summary.write(tag, tf.constant(float(value), tf.float32), step=n_iter,
                                     metadata=self._scalar)
        if n_iter % self.image_every == 0:
            rgb = (np.clip((np.asarray(image[0], np.float64) + self.mu)[:, :, ::-1], 0, 255)
                   if self.display_rgb is None else self.display_rgb(image[0]))
            with self.writer.as_default():
                for tag, picture in (("image", rgb), ("ground_truth", 255 * target[0]), ("prediction", 255 * sigm[0])):
                    png = tf.io.encode_png(np.round(picture).astype(np.uint8))
                    height, width = picture.shape[:2]
                    tf.summary.write(tag, tf.stack([tf.as_string(width), tf.as_string(height), png]), step=n_iter,
                                     metadata=self._image)
        if n_iter % min(self.every, self.image_every) == 0:
            self.writer.flush()

    def close(self):
        self.writer.close()




class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def last_good_snapshot(snapshots):
    """The newest good snapshot's path for messages, or "(none yet)"."""
    return snapshots.latest_good()[1] or "(none yet)"


def save_snapshot(snapshots, checkpoint, n_iter, modules):
    """Write the snapshot after iteration ``n_iter`` (number ``n_iter + 1``) and log it; non-finite weights stop the
    run with ``TrainingDiverged`` naming the last good snapshot (the bad one is not written)."""
    try:
        log.info("snapshot saved to %s", snapshots.save(checkpoint, n_iter + 1, modules))
    except NonFiniteWeights as e:
        raise TrainingDiverged(f"weights are not finite after iteration {n_iter}: {e}; stopping; the last good "
                               f"snapshot is {last_good_snapshot(snapshots)}") from None


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


def _local(value):
    """The values of this process's replicas concatenated on the batch axis (float32 numpy)."""
    if isinstance(value, tf.distribute.DistributedValues):
        parts = [np.asarray(v, np.float32) for v in value.values]
        return np.concatenate(parts)
    return np.asarray(value, np.float32)


def train(cfg):
    """The originals' ``train()``: see ``trainval_model.py`` for the flags in ``cfg``.

    Beyond the originals: ``cfg.precision`` (bf16/fp16 compute on the images and features, fp32 losses and master
    weights; fp16 with ``DynamicLossScale``), ``cfg.strategy`` (``cfg.batch_size`` is the global batch, split
    evenly across the replicas; snapshots and summaries are written by the chief only; logged accuracies are over
    this process's replicas), ``cfg.logdir`` (``TrainSummaries``) and TFRecord input (``data.training_source``).

    Before the model is built, every training sample is checked (``data.check_training_source``). Training resumes
    from the newest *good* snapshot (``Snapshots.latest_good``: complete and finite). It stops with
    ``TrainingDiverged`` when the loss is not finite, or when the weights are not finite at a snapshot (which is then
    not written); the message names the newest good snapshot.

    A registry entry with its own recipe (``spec.train_loop(cfg)``: TRIS, SaG) trains through it instead.
    """
    if cfg.spec.train_loop is not None:
        cfg.spec.train_loop(cfg)
        return
    strategy = make_strategy(cfg.strategy)
    replicas = strategy.num_replicas_in_sync if strategy is not None else 1
    if cfg.batch_size % replicas:
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by the {replicas} replicas")
    chief = is_chief(strategy)
    source = data.training_source(cfg.batch_folder, cfg.batch_prefix, cfg.data_format)
    data.check_training_source(source, cfg.image_size)
    dtype = COMPUTE_DTYPES[cfg.precision]
    spec = cfg.spec
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = spec.build(cfg.vocab_size, cfg.load_embedding(), cfg.image_size, cfg.weights, cfg.seed)
        tvars = spec.train_variables(model, cfg.conv5)
        optimizer = spec.make_optimizer(model, tvars, cfg.lr, cfg.max_iter)
        loss_scale = DynamicLossScale() if cfg.precision == "fp16" else None
    snapshots = Snapshots(cfg.snapshot_folder, cfg.snapshot_name, keep=cfg.keep_snapshots)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)

    start, latest = snapshots.latest_good()
    if latest is not None:
        spec.restore(model, latest, optimizer)
        start = int(optimizer.step.numpy())
        log.info("resuming from %s (iteration %d)", latest, start)
    elif cfg.resume_from:
        spec.restore(model, cfg.resume_from, optimizer)
        start = int(optimizer.step.numpy())
        log.info("resuming from %s (iteration %d)", cfg.resume_from, start)
    else:
        start = 0
        spec.initialize(model, cfg.init_weights, cfg.seed)

    regularized = spec.regularized_names(tvars)
    if regularized:
        log.info("Collecting variables for regularization:")
        for name in regularized:
            log.info("\t%s", name)
        log.info("Done.")

    if dtype == tf.float32:
        def forward(inputs):
            return spec.forward(model, *inputs, training=True)
    else:
        def forward(inputs):
            return spec.forward(model, tf.cast(inputs[0], dtype), inputs[1], training=True)
    step_fn = make_train_step(forward, spec.losses(model), spec.objective(model), tvars, optimizer,
                              jit_compile=cfg.xla, strategy=strategy, loss_scale=loss_scale,
                              regularization=spec.regularization, multiplier=spec.gradient_multiplier)
    if strategy is None:
        dataset = data.training_dataset(source, cfg.batch_size, cfg.seed, shuffle=True, start=start * cfg.batch_size,
                                        preprocess=spec.input_numpy)
    else:
        per_replica = cfg.batch_size // replicas

        def dataset_fn(context):
            local = replicas // context.num_input_pipelines
            return data.training_dataset(source, per_replica, cfg.seed, shuffle=True, start=start * cfg.batch_size,
                                         first_replica=context.input_pipeline_id * local, local_replicas=local,
                                         num_replicas=replicas, preprocess=spec.input_numpy)
        dataset = strategy.distribute_datasets_from_function(dataset_fn)
        log.info("%s: %d replicas, %d samples each per step (chief: %s)", cfg.strategy, replicas, per_replica, chief)
    summaries = (TrainSummaries(cfg.logdir, cfg.summary_every, cfg.image_summary_every, display_rgb=spec.display_rgb)
                 if cfg.logdir and chief else None)
    batches = iter(dataset)
    averages = MovingAverages()
    score_size = None
    last_time = time.time()
    end = min(cfg.max_iter, cfg.stop_iter)
    bar = tqdm(total=end, initial=min(start, end), desc="train", unit="iter", disable=not cfg.progress,
               file=sys.stderr)
    for n_iter in range(start, cfg.max_iter):
        try:
            words, image, target = next(batches)
        except tf.errors.OpError as e:
            first_line = (e.message.strip().splitlines() or [type(e).__name__])[0]
            raise data.BadSample(f"reading the sample of iteration {n_iter} failed: "
                                 f"{first_line.split('BadSample: ')[-1][:300]}") from None
        losses, outputs = step_fn((image, words), target)
        cls_loss = float(losses[spec.log_loss])
        if not np.isfinite(float(losses["cost"])):
            raise TrainingDiverged(
                f"loss is {float(losses['cost'])} at iteration {n_iter}: stopping; the last good snapshot is "
                f"{last_good_snapshot(snapshots)}")
        avg_loss = averages.update("loss", cls_loss)
        pred = _local(outputs[spec.score_key])
        score_size = score_size or list(pred.shape[1:3])
        local_target = _local(target)
        acc = compute_accuracy(pred, _downsample_target(local_target, score_size))
        avg_acc = [averages.update(k, a) for k, a in zip(("all", "pos", "neg"), acc)]
        if summaries is not None:
            summaries.write(n_iter, losses, acc, avg_acc, _local(image), local_target,
                            spec.probability(_local(outputs[spec.probability_key])))
        now = time.time()
        if n_iter % cfg.log_every == 0:
            log.info("iter = %d, loss (cur) = %f, loss (avg) = %f, lr = %f",
                     n_iter, cls_loss, avg_loss, float(losses["learning_rate"]))
            log.info("iter = %d, accuracy (cur) = %f (all), %f (pos), %f (neg)", n_iter, *acc)
            log.info("iter = %d, accuracy (avg) = %f (all), %f (pos), %f (neg)", n_iter, *avg_acc)
            log.info("iter = %d, cur time = %.5f, model_name: %s", n_iter, now - last_time, cfg.model)
        last_time = now
        bar.update(1)
        if chief and ((n_iter + 1) % cfg.snapshot == 0 or n_iter + 1 >= cfg.max_iter):
            save_snapshot(snapshots, checkpoint, n_iter, (model, optimizer))
        if n_iter + 1 >= cfg.stop_iter:
            log.info("stop training at iter %d", cfg.stop_iter)
            break
    bar.close()
    if summaries is not None:
        summaries.close()
    log.info("Optimization done.")
