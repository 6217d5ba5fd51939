"""The model-registry entry for SaG (``models.sag``), with the interface of ``models.ReSTRSpec``, plus the readers
SaG's pretrained parts need (AugReg ViT-S/16 ``.npz``; bert-base-uncased ``model.safetensors``).

Recipe (``train_eval_unc.sh``): input = PIL bilinear (antialiased) resize to 384×384 of the batch image, whatever
its size (the no-pad batches of ``util.sag_batches``), then (x/255 − 0.5)/0.5 (``sag.input_image``); text = the
``sent_batch`` sentence through WordPiece (``util.wordpiece``; the ``text_batch`` GloVe ids are not used), the batch
sorted longest first and 0-padded (``collate``); a fresh N(0, 1) slot noise per forward from a seeded generator;
losses = InfoNCE + reconstruction (``sag.losses``; the masks are never used), loss scaled below iteration 5000, clip
0.1, AdamW with five groups and decay 1e-4 on every parameter, constant lr then cosine from iteration 5000
(``sag.train_step``, ``sag.make_optimizer``); evaluation = the relevance-weighted last-iteration slot map
(``avg_cm``), bilinear to the label size, min-max, ≥ 0.5 (``sag.evaluate_sample``); the noise comes from ``--seed``.
"""
import json
import logging
import os
import struct

import numpy as np
import tensorflow as tf

from models import ModelSpec, sag
from util.torch_image import resize_bilinear

log = logging.getLogger(__name__)

RANDOM_INIT = "random"
BERT_VOCAB_FILE = "./data/weights/bert-base-uncased/vocab.txt"
BERT_WEIGHTS_FILE = "./data/weights/bert-base-uncased/model.safetensors"
AUGREG_S16_FILE = ("./data/weights/S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-"
                   "lr_0.03-res_384.npz")
_SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8", "I32": "<i4", "U8": "u1", "BOOL": "?"}


def read_safetensors(path):
    """A ``.safetensors`` file → {name: numpy array} (8-byte little-endian header length, JSON header with dtype,
    shape and data offsets, raw little-endian data). BF16 tensors are widened to float32 exactly. One-line
    ValueError naming the file when it is not one."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (bert-base-uncased's model.safetensors)") from None
    try:
        (size,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + size])
    except (struct.error, ValueError, UnicodeDecodeError):
        raise ValueError(f"{path}: not a .safetensors file") from None
    data, out = raw[8 + size:], {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if info["dtype"] == "BF16":
            bits = np.frombuffer(data[start:end], "<u2").astype(np.uint32) << 16
            values = bits.view(np.float32)
        elif info["dtype"] in _SAFETENSORS_DTYPES:
            values = np.frombuffer(data[start:end], _SAFETENSORS_DTYPES[info["dtype"]])
        else:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        if values.size != int(np.prod(info["shape"])):
            raise ValueError(f"{path}: tensor {name} is truncated")
        out[name] = values.reshape(info["shape"]).copy()
    return out


def bert_state_dict(tensors, key_prefix="encoders.txt_enc.bert."):
    """Hugging Face BERT tensors → our keys: the ``bert.`` prefix of the pre-training checkpoint dropped, the old
    ``gamma``/``beta`` LayerNorm names renamed ``weight``/``bias`` (as ``from_pretrained`` does), the pre-training
    heads (``cls.*``) and the ``position_ids`` buffer left out."""
    out = {}
    for name, value in tensors.items():
        if name.startswith("cls.") or name.endswith("position_ids"):
            continue
        key = name[len("bert."):] if name.startswith("bert.") else name
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[key_prefix + key] = np.asarray(value, np.float32)
    return out


class SaGSpec(ModelSpec):
    """SaG: its ``train_cma_recon.py`` / ``eval_cma_recon.py`` recipe (module docstring).

    Methods as ``ReSTRSpec``; where SaG needs more than that interface carries, the extra methods say so:
    ``text_batch`` (sentences → sorted, padded ids), ``slot_noise`` (the per-forward noise), ``train_step`` (loss
    scaling and clipping inside the step), ``initialize`` takes the AugReg and the BERT files.
    """
    score_key = "relevance"
    probability_key = "relevance"
    reads_sentences = True      # the predictor tokenizes ``sent_batch`` itself (WordPiece), not ``text_batch``
    batch_family = "sag"

    def __init__(self, name, defaults, sizes, init_weights, vocab_file=BERT_VOCAB_FILE, bert_file=BERT_WEIGHTS_FILE):
        self.name, self.defaults, self.sizes = name, defaults, dict(sizes)
        self.init_weights, self.vocab_file, self.bert_file = init_weights, vocab_file, bert_file
        self._tokenizer = None
        self.last_records = []

    def snapshot_candidates(self, folder, dataset, weights, iteration):
        """Our ``<dataset>_iter_<N>``, then the original's ``model_best.pth.tar`` and ``ckpt.pth.tar``."""
        return [os.path.join(folder, f"{dataset}_iter_{iteration}"), os.path.join(folder, "model_best.pth.tar"),
                os.path.join(folder, "ckpt.pth.tar")]

    def build(self, vocab_size=None, embedding=None, image_size=sag.CROP_SIZE, weights=None, seed=0):
        """``sag.SaG`` at ``image_size`` (the crop size) with this entry's sizes; ``seed`` also seeds the training
        slot noise (``noise_generator``, ``slot_noise``) and the predictor's (``noise_seed``)."""
        model = sag.SaG(crop_size=image_size, seed=seed, **self.sizes)
        model.model_name, model.noise_seed = self.name, seed
        model.noise_generator = tf.random.Generator.from_seed(seed)
        return model

    def initialize(self, model, path, seed, bert_file=None):
        """The ViT from the AugReg ViT-S/16 ``.npz`` ``path`` and BERT from ``bert_file`` (default
        ``self.bert_file``); ``random``: keep the seeded initial values (both)."""
        if path == RANDOM_INIT:
            log.info("Keeping the seeded initial weights (seed %d): no pretrained ViT or BERT", seed)
            return
        log.info("Loading the pretrained ViT from %s", path)
        model.load_augreg(path)
        bert_file = bert_file or self.bert_file
        log.info("Loading the pretrained BERT from %s", bert_file)
        weights = bert_state_dict(read_safetensors(bert_file))
        variables = model.bert.state_dict_variables()
        for key, var in variables.items():
            if key not in weights:
                raise ValueError(f"{bert_file}: no weights for {key}")
            if tuple(weights[key].shape) != tuple(var.shape):
                raise ValueError(f"{bert_file}: {key} has shape {tuple(weights[key].shape)}, the model "
                                 f"expects {tuple(var.shape)} (another BERT size?)")
        for key, var in variables.items():
            var.assign(weights[key])

    def restore(self, model, path, optimizer=None):
        """Our TF2 snapshot (with the optimizer), or SaG's ``.pth.tar`` (weights only, strict)."""
        from external.convert_sag import read_checkpoint
        from util.snapshots import restore_model

        if path.endswith(".pth.tar") or path.endswith(".pth"):
            model.load_state_dict(read_checkpoint(path)[0], path)
            return {"format": "pth"}
        return restore_model(model, path, optimizer)

    def load_trained(self, path, cfg):
        """A ``.pth.tar`` builds the model its tensors and saved args describe (``external.convert_sag``); our
        snapshot needs the model of this entry."""
        if path.endswith((".pth", ".pth.tar")):
            from external.convert_sag import read_checkpoint, sag_sizes

            state_dict, args = read_checkpoint(path)
            model = sag.SaG(seed=cfg.seed, **sag_sizes(state_dict, args, self.sizes.get("vit_heads", 6),
                                                       self.sizes.get("bert_config", sag.BERT_BASE)["heads"], path))
            model.load_state_dict(state_dict, path)
            model.model_name, model.noise_seed = self.name, cfg.seed
            model.noise_generator = tf.random.Generator.from_seed(cfg.seed)
        else:
            model = self.build(image_size=cfg.image_size, seed=cfg.seed)
            self.restore(model, path)
        model.vocab_file = self.vocab_path(cfg)
        return model

    def vocab_path(self, cfg):
        """BERT's ``vocab.txt``: ``<--data-dir>/weights/bert-base-uncased/vocab.txt`` (this entry's file without a
        configuration)."""
        data_dir = getattr(cfg, "data_dir", None)
        if not data_dir:
            return self.vocab_file
        return os.path.join(data_dir, "weights", "bert-base-uncased", "vocab.txt")

    def bert_path(self, cfg):
        """BERT's ``model.safetensors`` beside ``vocab_path(cfg)``."""
        data_dir = getattr(cfg, "data_dir", None)
        if not data_dir:
            return self.bert_file
        return os.path.join(data_dir, "weights", "bert-base-uncased", "model.safetensors")

    def tokenizer(self, path=None):
        """The WordPiece tokenizer of ``path`` (default: this entry's ``vocab_file``), read once per file."""
        from util.wordpiece import WordPiece

        path = path or self.vocab_file
        if self._tokenizer is None or self._tokenizer[0] != path:
            self._tokenizer = (path, WordPiece(path))
        return self._tokenizer[1]

    def text_batch(self, sentences, tokenizer=None):
        """``data.collate_fn``'s text: sentences → (order, ids int64 [B, L], lengths); batch row j is sample
        order[j] (images must be permuted the same way). ``tokenizer``: default this entry's."""
        from util.wordpiece import collate

        tokenizer = tokenizer or self.tokenizer()
        return collate([tokenizer.caption_ids(s) for s in sentences])

    def slot_noise(self, model, batch):
        """A fresh N(0, 1) slot noise [batch, S, D] from the model's seeded generator (one per forward)."""
        return model.slot_noise(batch, model.noise_generator)

    def input_numpy(self, rgb_uint8):
        return sag.input_image(rgb_uint8, self.defaults.image_size)

    def display_rgb(self, network_input):
        return np.clip((np.asarray(network_input, np.float64) * 0.5 + 0.5) * 255.0, 0, 255)

    def forward(self, model, images, words, training=False):
        """``words`` = WordPiece ids [B, L] (``text_batch``), with fresh slot noise."""
        return model(images, words, self.slot_noise(model, tf.shape(images)[0]), training=training)

    def backbone(self, model, images):
        return model.vit(images)

    def losses(self, model):
        """fn(outputs, target) → ``sag.losses(outputs)`` (text supervision: the masks are not used)."""
        return lambda outputs, target: sag.losses(outputs)

    def objective(self, model):
        return "loss"

    def train_variables(self, model, conv5=False):
        """Every parameter of the five AdamW groups (not the unused ViT head, pooler, ``fc``, ``residual_fc``)."""
        return {k: v for group, _ in sag.optim_groups(model) for k, v in group.items()}

    def make_optimizer(self, model, train_vars, lr, max_iter):
        """``sag.make_optimizer`` with ``--lr`` = ``-lr`` and T_max = ``-i`` (= len(train_loader)·num_epochs in the
        original); the cosine starts at iteration 5000 whatever ``-i``."""
        return sag.make_optimizer(model, lr=lr, t_max=max_iter, num_steps=max_iter)

    def train_input_problem(self, cfg):
        """Why ``-m train`` cannot start (one line, checked at parse time), else None (``sag_train``)."""
        from models import sag_train

        return sag_train.train_input_problem(self, cfg)

    def train_loop(self, cfg):
        """``-m train``: SaG's own step through the shared loop (``models.sag_train.train``)."""
        from models import sag_train

        sag_train.train(self, cfg)

    def train_step(self, model, optimizer):
        """fn(images, ids, noise) → ``sag.train_step`` results: the step the generic one cannot express (loss scaled
        below iteration 5000, global-norm clip 0.1 before AdamW)."""
        return lambda images, ids, noise: sag.train_step(model, optimizer, images, ids, noise)

    def original_metrics(self):
        """``eval_seg``'s dict over the predictor's last run (``sag.seg_metrics``: cIoU, mIoU, precision, recall
        of the max- and avg-pooled maps, ×100)."""
        if not self.last_records:
            return None
        return {"title": "SaG eval_seg()", **sag.seg_metrics(self.last_records)}

    def serving_tokenizer(self, cfg):
        """The SavedModel's tokenizer: WordPiece over ``vocab_path(cfg)`` in graph ops (``util.export``)."""
        from util.export import WordPieceTokenizer

        return WordPieceTokenizer(self.vocab_path(cfg))

    def serving_input(self, image, image_size):
        """``sag.input_image`` of one uint8 RGB image [H, W, 3] of any size in graph ops: (network input
        [1, S, S, 3] in [−1, 1], the PIL-resized image uint8 [S, S, 3]); the resize is Pillow's bilinear exactly
        (``util.pil_resize``), the normalisation a 256-entry table of ``input_image``'s float32 values (grappler
        would turn x / 255 into x · (1/255), 1 ulp off), so the input equals the test loop's."""
        from util.pil_resize import pil_resize_bilinear

        resized = tf.ensure_shape(pil_resize_bilinear(image, image_size, image_size), [image_size, image_size, 3])
        levels = (np.arange(256, dtype=np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
        return tf.gather(tf.constant(levels), tf.cast(resized, tf.int32))[None], resized

    def serving_forward(self, model, images, words):
        """The forward with FIXED slot noise: the first draw of ``tf.random.Generator.from_seed(model.noise_seed)``
        (the noise ``-m test --seed N`` gives its first sample), drawn in-graph by the stateless Philox op
        ``StatelessRandomNormalV2`` with that generator's initial key and counter (``create_rng_state``), so the
        SavedModel gives the same mask for the same inputs at every call."""
        state = tf.bitcast(tf.random.create_rng_state(model.noise_seed, "philox"), tf.uint64)
        noise = tf.raw_ops.StatelessRandomNormalV2(shape=[1, model.num_slots, model.embed_dim], key=state[2:],
                                                   counter=state[:2], alg=1)
        return model(images, words, noise)

    def serving_output(self, outputs, height, width):
        """``sag.evaluate_sample``'s ``avg_cm`` mask in graph ops: (mask uint8 [height, width], the min-max
        normalised map [height, width] it thresholds at 0.5). The relevance-weighted sum over slots runs slot by
        slot in numpy's order (a ``tf.foldl``: grappler would regroup a chain of adds), the resize is
        ``util.torch_image.resize_bilinear``, all in float32 as the test loop."""
        slot_attn, relevance = outputs["slot_attn"][0, -1], outputs["relevance"][0]
        weighted = relevance[:, None] * slot_attn
        total = tf.foldl(lambda acc, row: acc + row, weighted[1:], initializer=weighted[0])
        grid = int(round(float(int(slot_attn.shape[1])) ** 0.5))
        resized = resize_bilinear(tf.reshape(total, [1, grid, grid, 1]), tf.stack([height, width]))[0, :, :, 0]
        low = tf.reduce_min(resized)
        # 1e-9 as a non-constant: grappler rewrites (max − min) + constant as max − (min − constant)
        eps = tf.raw_ops.PlaceholderWithDefault(input=tf.constant(1e-9, tf.float32), shape=[])
        normed = (resized - low) / (tf.reduce_max(resized) - low + eps)
        return tf.cast(normed >= sag.THRESHOLD, tf.uint8), normed

    def predictor(self, model, image_size, dcrf):
        """fn(samples) → [(mask, None)]: ``eval_seg``'s ``avg_cm`` mask per sample at its own size, one sample at a
        time at the model's crop size (``image_size`` is the model's; SaG has no other test size). The slot noise
        comes from a generator seeded by ``--seed`` (``build``/``load_trained``) and created here, so every
        evaluation with the same seed draws the same noise (the original's evaluation is not reproducible).
        ``self.last_records`` collects every sample's ``sag.evaluate_sample`` record (all four variants) for
        ``sag.seg_metrics`` — SaG's own metric dict."""
        from util import data

        size, noise_shape = model.crop_size, [1, model.num_slots, model.embed_dim]
        forward = tf.function(lambda images, ids, noise: model(images, ids, noise), input_signature=[
            tf.TensorSpec([1, size, size, 3], tf.float32), tf.TensorSpec([1, None], tf.int64),
            tf.TensorSpec(noise_shape, tf.float32)], autograph=False)
        generator = tf.random.Generator.from_seed(model.noise_seed)
        tokenizer = self.tokenizer(getattr(model, "vocab_file", None))
        self.last_records = []

        def predict(samples):
            out = []
            for s in samples:
                ids = np.asarray(tokenizer.caption_ids(data.sentence_of(s)), np.int64)[None]
                images = sag.input_image(s["im_batch"], model.crop_size)[None]
                outputs = forward(tf.constant(images), tf.constant(ids), generator.normal(noise_shape))
                result, record = sag.evaluate_sample(outputs["slot_attn"][0, -1].numpy(),
                                                     outputs["relevance"][0].numpy(), s["mask_batch"])
                self.last_records.append(record)
                out.append((result["avg_cm"]["hard"], None))
            return out
        return predict


# Registry values (``train_eval_unc.sh``): 50 epochs of ⌈120,624 RefCOCO train sentences / 32⌉ = 3770 iterations,
# a snapshot per epoch; the ``*_TINY`` entry is the golden's reduced model from random weights (smoke runs).
SAG_DEFAULTS = dict(max_iter=sag.NUM_EPOCHS * 3770, snapshot=3770, stop=None, keep=4, lr=sag.LEARNING_RATE,
                    batch_size=sag.BATCH_SIZE, image_size=sag.CROP_SIZE)
SAG_SIZES = {}
SAG_TINY_SIZES = dict(vit_dim=64, vit_heads=4, vit_layers=2, embed_dim=32, num_slots=9, cascade=3, cross_dim_head=16,
                      latent_dim_head=8, cma_dim_head=16,
                      bert_config=dict(sag.BERT_BASE, hidden=48, layers=2, heads=4, intermediate=96, max_positions=64))
