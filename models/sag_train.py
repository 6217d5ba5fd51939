"""SaG training (``train_cma_recon.train``) through the shared own-recipe loop (``util.loop.run_training``).

Data: the ``.npz`` samples of ``build_batches.py --family sag`` (no padding, variable sizes) in our seeded
per-epoch order (``util.data.sample_indices``; the original's DataLoader shuffles unseeded). Per iteration: B
samples, each image through ``sag.input_image`` (PIL bilinear stretch to ``--img-size``, (x/255 − 0.5)/0.5), the
raw sentences through WordPiece and ``collate`` (sorted by length, longest first, images permuted alike: the
original's ``collate_fn``), fresh slot noise from the model's seeded generator (saved in snapshots); the masks are
not used (text supervision). The step is ``sag.train_step``: losses, the loss-scaling warm-up, global-norm clipping
at 0.1, one AdamW update over the five groups (``SaGSpec.make_optimizer``). Initial weights: the AugReg ViT-S/16
``.npz`` (``--init-weights``) and BERT's ``model.safetensors`` (``SaGSpec.initialize``); ``random`` keeps the seeded
values.
"""
import logging
import os

import numpy as np
import tensorflow as tf

from models import sag
from util import data

log = logging.getLogger("train")


def train_input_problem(spec, cfg):
    """Why ``-m train -n SaG…`` cannot start (one line naming the file or flag), else None: the training samples,
    the WordPiece vocabulary and, unless ``--init-weights random``, the ViT and BERT weights."""
    if not os.path.isdir(cfg.batch_folder) or not data.batch_files(cfg.batch_folder, cfg.batch_prefix):
        return (f"no training samples {cfg.batch_folder}/{cfg.batch_prefix}_*.npz (make them with build_batches.py "
                f"-d {cfg.dataset} -t {cfg.split} --family sag)")
    vocab = spec.vocab_path(cfg)
    if not os.path.isfile(vocab):
        return f"BERT vocabulary {vocab} not found (vocab.txt of bert-base-uncased; see data/README.md)"
    if cfg.init_weights != "random":
        for path, what in ((cfg.init_weights, "--init-weights (the AugReg ViT-S/16 .npz, "
                                              f"{sag.AUGREG_S16_384_URL})"),
                           (spec.bert_path(cfg), "BERT weights (model.safetensors of bert-base-uncased)")):
            if not os.path.isfile(path):
                return f"{what} {path} not found (or pass --init-weights random)"
    return None


def _batches(files, batch_size, seed, start):
    """fn(n_iter) → the ``batch_size`` sample paths of iteration ``n_iter`` (our seeded per-epoch order)."""
    def batch(n_iter):
        indices = data.sample_indices(len(files), seed, True, start=n_iter * batch_size)
        return [files[next(indices)] for _ in range(batch_size)]
    return batch


def train(spec, cfg):
    """``-m train`` for SaG: see the module docstring; raises ValueError (one line) when an input is missing."""
    from util.loop import run_training

    problem = train_input_problem(spec, cfg)
    if problem:
        raise ValueError(problem)
    files = data.batch_files(cfg.batch_folder, cfg.batch_prefix)
    log.info("%s: %d training samples in %s, batch %d", spec.name, len(files), cfg.batch_folder, cfg.batch_size)
    model = spec.build(image_size=cfg.image_size, seed=cfg.seed)
    optimizer = spec.make_optimizer(model, None, cfg.lr, cfg.max_iter)
    tokenizer = spec.tokenizer(spec.vocab_path(cfg))
    noise_shape = [None, model.num_slots, model.embed_dim]
    size = cfg.image_size

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32),
                                  tf.TensorSpec([None, None], tf.int64), tf.TensorSpec(noise_shape, tf.float32)],
                 autograph=False)
    def train_step(images, ids, noise):
        out = sag.train_step(model, optimizer, images, ids, noise)
        return {k: out[k] for k in ("loss", "loss_cm", "loss_recon", "grad_total_norm")}, out["lrs"][0]

    batch_paths = _batches(files, cfg.batch_size, cfg.seed, 0)

    def step(n_iter):
        samples = [data.load_sample(path) for path in batch_paths(n_iter)]
        order, ids, _ = spec.text_batch([data.sentence_of(s) for s in samples], tokenizer)
        images = np.stack([sag.input_image(samples[k]["im_batch"], size) for k in order])
        values, lr = train_step(tf.constant(images), tf.constant(ids, tf.int64),
                                spec.slot_noise(model, len(samples)))
        return {"loss": float(values["loss"]), "lr": float(lr), "loss_cm": float(values["loss_cm"]),
                "loss_recon": float(values["loss_recon"]), "grad_norm": float(values["grad_total_norm"])}

    run_training(cfg, model, optimizer, step, restore=lambda path: spec.restore(model, path, optimizer),
                 initialize=lambda: spec.initialize(model, cfg.init_weights, cfg.seed, spec.bert_path(cfg)))
