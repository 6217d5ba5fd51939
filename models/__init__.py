"""The model registry behind ``-n``: one ``ModelSpec`` per model owns its recipe, and the full TF1-era model.

| ``-n`` | model | paper |
|---|---|---|
| ``CMPC_model`` | DeepLab-ResNet-101 + ``models.cmpc.CMPCHead`` | Huang et al., CVPR 2020 |
| ``RRN_model`` | DeepLab-ResNet-101 + ``models.rrn.RRNHead`` | Li et al., CVPR 2018 |
| ``RMI_model`` (``RMI``) | DeepLab-ResNet-101 + ``models.rmi.RMIHead`` | Liu et al., ICCV 2017 |
| ``LSTM_model`` (``LSTM``) | DeepLab-ResNet-101 + ``models.lstm_baseline.LSTMHead`` | Liu et al., ICCV 2017 (baseline) |
| ``ReSTR`` | ``models.restr.ReSTR`` (ViT-B/16, 480×480) | Kim et al., CVPR 2022 |
| ``ReSTR_tiny`` | ``models.restr.ReSTR`` at the golden data's reduced width (64, 4 heads, 2 layers each) | CPU smoke runs |
| ``SaG`` | ``models.sag.SaG`` (ViT-S/16 + BERT-base, slots; ``-m test`` and the demo; ``.pth.tar`` checkpoints) | Kim et al., ICCV 2023 |
| ``SaG_tiny`` | ``models.sag.SaG`` at the golden data's reduced sizes | CPU smoke runs |
| ``TRIS_stage1`` / ``TRIS_stage2`` | ``models.tris`` (CLIP RN50 + localisation / segmentation heads; ``-m test`` and the demo from TRIS ``.pth``) | Liu et al., ICCV 2023 |

A ``ModelSpec`` (``model_spec(name)``) holds everything the train / test / bench loops need to know about a model:
its defaults (iterations, snapshot interval, learning rate, batch and image size, initial weights), how it is built,
how a uint8 RGB image becomes its input, its forward pass in training, losses and objective, trainable variables,
optimizer and schedule, regularisation, weight initialisation, snapshot names and loading, and its evaluation
(network input, post-processing back to the original size). The loops call the spec and never test the name.
"""
import dataclasses
import importlib
import logging
import math
import os

import numpy as np
import tensorflow as tf

log = logging.getLogger("models")
RANDOM_INIT = "random"

_HEADS = {
    "CMPC_model": ("models.cmpc", "CMPCHead"),
    "RRN_model": ("models.rrn", "RRNHead"),
    "RMI_model": ("models.rmi", "RMIHead"),
    "LSTM_model": ("models.lstm_baseline", "LSTMHead"),
}
_ALIASES = {"RMI": "RMI_model", "LSTM": "LSTM_model"}


def head_class(name):
    module, cls = _HEADS[canonical_name(name)]
    return getattr(importlib.import_module(module), cls)


def feature_size(image_size):
    """Spatial size of the output-stride-8 feature maps for a square input (TF 'SAME': ceil at each stride 2)."""
    size = image_size
    for _ in range(3):
        size = math.ceil(size / 2)
    return size


class Segmenter(tf.Module):
    """Backbone + head: ``(images [B,H,W,3] BGR − mean, words [B,T]) → head outputs``."""

    def __init__(self, backbone, head, name):
        super().__init__(name=name.replace("+", "_"))
        self.backbone = backbone
        self.head = head
        self.model_name = name

    def __call__(self, images, words):
        features = self.backbone(images)
        return self.head({k: features[k] for k in self.head.FEATURES}, words)

    def tf1_variables(self):
        """{TF1 name: tf.Variable}: backbone (DrSleep names) and head."""
        out = dict(self.backbone.tf1_variables())
        out.update(self.head.tf1_variables())
        return out

    def train_variables(self, conv5=False):
        """The original's ``tvars``: every head variable (+ RMI's ``ResNet/fc1000``), + res3–res5 kernels with -conv5."""
        out = dict(self.head.tf1_variables())
        out.update({n: v for n, v in self.backbone.tf1_variables().items() if n.startswith("ResNet/fc1000")})
        if conv5:
            out.update({v.name.split(":")[0]: v for v in self.backbone.conv5_variables()})
        return out


@dataclasses.dataclass(frozen=True)
class Defaults:
    """A model's original run defaults: ``-i``, ``-s``, ``-st`` (None = ``-i``), snapshots kept, ``-lr``, ``-bs``,
    ``--img-size``."""
    max_iter: int
    snapshot: int
    stop: int
    keep: int
    lr: float
    batch_size: int
    image_size: int


class ModelSpec:
    """What every registry entry shares unless it overrides it (``TF1Spec``, ``ReSTRSpec``, ``SaGSpec``,
    ``TRISSpec``): no DenseCRF, exportable, reads ``text_batch`` ids, util.train's generic step, ``loss`` logged, no
    GloVe matrix, its own initial weights, ``-f`` required, snapshots ``<dataset>_iter_<N>``, no L2 term and no
    gradient multipliers, probabilities as float64 as given, no figures beyond the standard block, the SavedModel's
    forward = ``forward``. Each entry gives ``name`` and ``defaults`` (a ``Defaults``)."""
    supports_crf = False
    exportable = True
    reads_sentences = False        # the predictor reads ``text_batch`` (ids), not ``sent_batch``
    train_loop = None              # trains through util.train's generic step (TRIS and SaG bring their own loop)
    log_loss = "loss"

    def needs_embedding(self, emb):
        return False

    def embedding_file(self, dataset, emb):
        return None

    def default_init_weights(self, weights):
        return self.init_weights

    def default_snapshot_folder(self, batch_root, dataset):
        return None

    def snapshot_name(self, dataset, weights):
        return f"{dataset}_iter"

    def find_snapshot(self, candidates):
        from util.snapshots import find_snapshot

        return find_snapshot(candidates)

    def regularization(self, train_vars):
        return tf.constant(0.0)

    def regularized_names(self, train_vars):
        return []

    def gradient_multiplier(self, name):
        return 1.0

    def probability(self, values):
        return np.asarray(values, np.float64)

    def original_metrics(self):
        """Figures of the original's own evaluation beyond the standard block, after ``predictor``'s last run:
        none."""
        return None

    def serving_forward(self, model, images, words):
        """The SavedModel's forward: ``forward`` in inference mode."""
        return self.forward(model, images, words)


class TF1Spec(ModelSpec):
    """The TF1-era models (DeepLab-ResNet-101 backbone + a head): the originals' recipe.

    Input: ``float32(rgb)[..., ::-1] − mu`` (BGR, Caffe mean; ``util.data.to_network_input``); training step:
    ``losses[OBJECTIVE]`` + 5e-4·Σ½‖W‖² over the ``DW``/``weights`` kernels, ×2 gradients on ``biases``, TF1 Adam
    with polynomial decay over the head's ``LR_DECAY_STEPS``; backbone from the DeepLab checkpoint; evaluation on the
    scikit-image-0.13 resize-and-pad frame (``util.evaluate.prepare`` / ``predict_masks``), DenseCRF available.
    """
    log_loss = "cls_loss"
    score_key = "pred"
    probability_key = "sigm"
    supports_crf = True
    batch_family = "tf1"           # build_batches.py --family of its .npz files

    def __init__(self, name, defaults, short_name=None, glove=False):
        self.name, self.defaults, self.short_name, self.glove = name, defaults, short_name, glove

    # --- configuration ---------------------------------------------------------------------------------------------
    def needs_embedding(self, emb):
        """CMPC's head embeds words with a GloVe matrix; the others learn their embedding."""
        return self.glove

    def embedding_file(self, dataset, emb):
        """CMPC's GloVe matrix: ``referit_emb.npy`` with ``-emb -d referit``, else ``Gref_emb.npy``."""
        return "referit_emb.npy" if (emb and dataset == "referit") else "Gref_emb.npy"

    def default_init_weights(self, weights):
        """DrSleep's DeepLab checkpoint (CMPC, RRN) or RMI's ``-w deeplab|resnet`` checkpoints."""
        if self.short_name is None:
            return "./data/weights/deeplab_resnet_init.ckpt"
        return {"deeplab": "./external/TF-deeplab/model/ResNet101_train.tfmodel",
                "resnet": "./external/TF-resnet/model/ResNet101_init.tfmodel"}[weights]

    def default_snapshot_folder(self, batch_root, dataset):
        """RMI/LSTM: ``./<dataset>/tfmodel``; the others need ``-f`` (None)."""
        return os.path.join(batch_root, dataset, "tfmodel") if self.short_name else None

    def snapshot_name(self, dataset, weights):
        """``<dataset>_iter`` (CMPC, RRN) or RMI's ``<dataset>_<weights>_<model>_iter``."""
        return f"{dataset}_{weights}_{self.short_name}_iter" if self.short_name else f"{dataset}_iter"

    def snapshot_candidates(self, folder, dataset, weights, iteration):
        base = os.path.join(folder, f"{self.snapshot_name(dataset, weights)}_{iteration}")
        return [base, base + ".tfmodel"]

    # --- building and weights --------------------------------------------------------------------------------------
    def build(self, vocab_size=12112, embedding=None, image_size=320, weights="deeplab", seed=0):
        from models.backbone import Backbone

        vf = feature_size(image_size)
        kwargs = dict(vf_h=vf, vf_w=vf, H=image_size, W=image_size, seed=seed)
        if self.glove:
            if embedding is None:
                raise ValueError(f"{self.name} needs the GloVe embedding matrix (data/Gref_emb.npy or "
                                 "data/referit_emb.npy)")
            kwargs["embedding"] = embedding
        else:
            kwargs["vocab_size"] = vocab_size
        if self.short_name is not None:
            kwargs["weights"] = weights
        head = head_class(self.name)(**kwargs)
        return Segmenter(Backbone(fc1000="fc1000" in head.FEATURES), head, self.name)

    def initialize(self, model, path, seed):
        """Load the pretrained backbone (``path``), or seeded stand-in weights when ``path`` is ``random``."""
        from util.train import initialize_backbone

        initialize_backbone(model.backbone, path, seed)

    def restore(self, model, path, optimizer=None):
        from util.snapshots import restore_model

        return restore_model(model, path, optimizer)

    def load_trained(self, path, cfg):
        """The model of ``cfg`` (a ``util.config.RunConfig``) with the weights of snapshot ``path`` (ours or an
        original TF1 one)."""
        model = self.build(cfg.vocab_size, cfg.load_embedding(), cfg.image_size, cfg.weights, cfg.seed)
        self.restore(model, path)
        return model

    # --- training --------------------------------------------------------------------------------------------------
    def input_numpy(self, rgb_uint8):
        from util.data import to_network_input

        return to_network_input(rgb_uint8)

    def display_rgb(self, network_input):
        """Network input [H, W, 3] back to RGB in [0, 255] (for image summaries)."""
        from util.data import MU

        return np.clip((np.asarray(network_input, np.float64) + MU)[:, :, ::-1], 0, 255)

    def forward(self, model, images, words, training=False):
        return model(images, words)

    def backbone(self, model, images):
        return model.backbone(images)

    def losses(self, model):
        return model.head.losses

    def objective(self, model):
        return model.head.OBJECTIVE

    def train_variables(self, model, conv5=False):
        return model.train_variables(conv5)

    def make_optimizer(self, model, train_vars, lr, max_iter):
        """TF1 Adam with polynomial decay over the head's own ``LR_DECAY_STEPS`` (the originals': not ``-i``)."""
        from util.optim import TF1Adam

        return TF1Adam(train_vars, lr, model.head.LR_DECAY_STEPS, model.head.STEP_NAME)

    def regularization(self, train_vars):
        from util.optim import l2_regularization

        return l2_regularization(train_vars)

    def regularized_names(self, train_vars):
        from util.optim import is_regularized

        return sorted(n for n in train_vars if is_regularized(n))

    def gradient_multiplier(self, name):
        from util.optim import gradient_multiplier

        return gradient_multiplier(name)

    def probability(self, values):
        return values

    # --- evaluation ------------------------------------------------------------------------------------------------
    def serving_input(self, image, image_size):
        """In-graph ``util.evaluate.prepare`` of one uint8 RGB image [H, W, 3] (any size): (network input
        [1, S, S, 3], the resized zero-padded uint8 image [S, S, 3]) (``util.export.in_graph_preprocess``)."""
        from util.export import in_graph_network_input, in_graph_preprocess

        padded = in_graph_preprocess(image, image_size)
        return in_graph_network_input(padded)[None], padded

    def serving_output(self, outputs, height, width):
        """In-graph ``util.evaluate.predict_masks`` without DenseCRF: (mask uint8 [height, width], the sigmoid map
        [S, S] DenseCRF would refine)."""
        from util.export import in_graph_mask

        return in_graph_mask(outputs["up"][0, :, :, 0], height, width), outputs["sigm"][0, :, :, 0]

    def serving_tokenizer(self, cfg):
        """The SavedModel's in-graph tokenizer: the GloVe vocabulary ``cfg.vocab_file``'s
        (``util.export.glove_tokenizer``)."""
        from util.export import glove_tokenizer

        return glove_tokenizer(cfg)

    def predictor(self, model, image_size, dcrf):
        """fn(samples) → [(prediction, DenseCRF prediction or None)] at each sample's original size (nonzero =
        foreground): the originals' test loop, the batch's padded S×S images in one forward."""
        from util.evaluate import predict_masks, prepare

        forward = tf.function(lambda images, words: model(images, words), autograph=False)

        def predict(samples):
            prepared = [prepare(s, image_size) for s in samples]
            outputs = forward(tf.constant(np.stack([p[1] for p in prepared])),
                              tf.constant(np.stack([p[0] for p in prepared])))
            up, sigm = outputs["up"].numpy()[..., 0], outputs["sigm"].numpy()[..., 0]
            return [predict_masks(up[k], sigm[k], p[2], s["mask_batch"].shape, dcrf)
                    for k, (s, p) in enumerate(zip(samples, prepared))]
        return predict


class ReSTRSpec(ModelSpec):
    """ReSTR (``models.restr``): its ``train_restr.py`` / ``eval/evaluate.py`` recipe.

    Input: RGB, (x − 127.5)/127.5 (``restr.preprocess``); training batches are the ``.npz`` ones as built (padded
    black, normalised −1, as the original's); losses: pixel BCE + 0.1 × patch BCE (``restr.losses``); torch AdamW with
    two groups (ViT at 0.1×) and weight decay on every parameter, warm-up (40000 iterations, whatever ``-i``) + poly
    over ``-i`` (``restr.make_optimizer``), no L2 term, no gradient multipliers; DropPath in training; the ViT starts
    from Google's AugReg ViT-B/16 ``.npz`` (``util.vit_weights``; ``random``: the model's own seeded initial values).
    Evaluation per image at its original size: ``restr.eval_input`` (resize-and-pad, grey), forward,
    ``restr.eval_output`` (resize-and-crop, logits ≥ 1e-9). Snapshots: ours (TF2, with the AdamW state), or the
    original's ``<dataset>_<iter>.pth`` state_dicts for testing.
    """
    score_key = "pixel_pred"
    probability_key = "pixel_pred"
    batch_family = "restr"

    def __init__(self, name, defaults, sizes, init_weights):
        self.name, self.defaults, self.sizes, self.init_weights = name, defaults, dict(sizes), init_weights

    def needs_embedding(self, emb):
        return True

    def embedding_file(self, dataset, emb):
        """``referit_emb.npy`` for ReferIt, else ``Gref_emb.npy`` (the original's rule; ``-emb`` is not needed)."""
        return "referit_emb.npy" if dataset == "referit" else "Gref_emb.npy"

    def snapshot_candidates(self, folder, dataset, weights, iteration):
        """Our ``<dataset>_iter_<N>``, then the original's ``<dataset>_<N>.pth``."""
        return [os.path.join(folder, f"{dataset}_iter_{iteration}"), os.path.join(folder, f"{dataset}_{iteration}.pth")]

    def build(self, vocab_size=12112, embedding=None, image_size=480, weights=None, seed=0):
        from models.restr import ReSTR

        if embedding is None:
            raise ValueError(f"{self.name} needs the GloVe embedding matrix (data/Gref_emb.npy or data/referit_emb.npy)")
        model = ReSTR(embedding, image_size=(image_size, image_size), seed=seed, **self.sizes)
        model.model_name = self.name
        return model

    def initialize(self, model, path, seed):
        """The ViT (``encoder_v``) from an AugReg ``.npz``; ``random``: keep the model's seeded initial values."""
        from util.vit_weights import augreg_state_dict

        if path == RANDOM_INIT:
            log.info("Keeping the seeded initial ViT weights (seed %d): no pretrained weights", seed)
            return
        log.info("Loading the pretrained ViT from %s", path)
        vit = model.encoder_v
        variables = {k: v for k, v in model.state_dict_variables().items() if k.startswith("encoder_v.")}
        weights = augreg_state_dict(path, len(vit.blocks), vit.grid_size,
                                    int(variables["encoder_v.head.weight"].shape[0]), key_prefix="encoder_v.")
        for key, var in variables.items():
            if key not in weights:
                if key.startswith("encoder_v.head."):
                    continue
                raise ValueError(f"{path}: no weights for {key}")
            if tuple(weights[key].shape) != tuple(var.shape):
                raise ValueError(f"{path}: {key} has shape {tuple(weights[key].shape)}, the model expects "
                                 f"{tuple(var.shape)} (another ViT size?)")
        for key, value in weights.items():
            variables[key].assign(value)

    def restore(self, model, path, optimizer=None):
        """Our TF2 snapshot (with the optimizer), or a ReSTR ``.pth`` state_dict (weights only, strict)."""
        from util.pth import load_state_dict
        from util.snapshots import restore_model

        if path.endswith(".pth"):
            model.load_state_dict(load_state_dict(path), path)
            return {"format": "pth"}
        return restore_model(model, path, optimizer)

    def load_trained(self, path, cfg):
        """A ``.pth`` builds the model its tensors describe (``external.convert_restr``: vocabulary, widths and depths
        from the shapes, heads from this entry); our snapshot needs the model of this entry and the GloVe file."""
        if path.endswith(".pth"):
            from external.convert_restr import restr_from_state_dict
            from util.pth import load_state_dict

            model = restr_from_state_dict(load_state_dict(path), self.sizes["n_heads"], source=path)
            model.model_name = self.name
            return model
        model = self.build(cfg.vocab_size, cfg.load_embedding(), cfg.image_size, cfg.weights, cfg.seed)
        self.restore(model, path)
        return model

    def input_numpy(self, rgb_uint8):
        return ((np.asarray(rgb_uint8, np.float32) - np.float32(127.5)) / np.float32(127.5)).astype(np.float32)

    def display_rgb(self, network_input):
        return np.clip(np.asarray(network_input, np.float64) * 127.5 + 127.5, 0, 255)

    def forward(self, model, images, words, training=False):
        return model(images, words, training=training)

    def backbone(self, model, images):
        return model.encoder_v(images)

    def losses(self, model):
        from models import restr

        return restr.losses

    def objective(self, model):
        from models import restr

        return restr.OBJECTIVE

    def train_variables(self, model, conv5=False):
        """Every parameter of ``restr.optim_parameters`` (both groups; not the unused ViT head)."""
        from models import restr

        return {k: v for group, _ in restr.optim_parameters(model) for k, v in group.items()}

    def make_optimizer(self, model, train_vars, lr, max_iter):
        """``restr.make_optimizer`` with ``--lr`` = ``-lr`` and ``--num_steps`` = ``-i`` (warm-up stays 40000)."""
        from models import restr

        return restr.make_optimizer(model, lr=lr, num_steps=max_iter)

    def probability(self, values):
        return 1.0 / (1.0 + np.exp(-np.asarray(values, np.float64)))

    def serving_input(self, image, image_size):
        """``restr.eval_input`` of one uint8 RGB image [H, W, 3] of any size: (network input [1, S, S, 3], the
        resized image as uint8 RGB [S, S, 3], grey where padded — what the network saw)."""
        from models import restr

        network_input = tf.ensure_shape(restr.eval_input(image[None], image_size), [1, image_size, image_size, 3])
        display = tf.round(network_input[0] * restr.IMAGE_STD + restr.IMAGE_MEAN)
        return network_input, tf.cast(tf.clip_by_value(display, 0, 255), tf.uint8)

    def serving_output(self, outputs, height, width):
        """``restr.eval_output``'s mask (resized logits ≥ 1e-9) as uint8 [height, width], and the pixel sigmoid
        [S, S]."""
        from models import restr
        from util.torch_image import resize_and_crop

        logits = outputs["pixel_pred"]
        mask = resize_and_crop(logits, height, width)[0, :, :, 0] >= restr.EVAL_THRESHOLD
        return tf.cast(mask, tf.uint8), tf.sigmoid(logits)[0, :, :, 0]

    def serving_tokenizer(self, cfg):
        """The SavedModel's in-graph tokenizer: the GloVe vocabulary ``cfg.vocab_file``'s
        (``util.export.glove_tokenizer``)."""
        from util.export import glove_tokenizer

        return glove_tokenizer(cfg)

    def predictor(self, model, image_size, dcrf):
        """fn(samples) → [(mask, None)]: the original evaluation, one image at a time at its own size."""
        from models import restr

        forward = tf.function(lambda images, words: model(images, words), autograph=False)

        def predict(samples):
            out = []
            for s in samples:
                height, width = s["mask_batch"].shape
                outputs = forward(restr.eval_input(s["im_batch"][None], image_size),
                                  tf.constant(s["text_batch"].astype(np.int32)[None]))
                out.append((restr.eval_output(outputs, height, width)["mask"].numpy()[0, :, :, 0], None))
            return out
        return predict


from models.sag_spec import AUGREG_S16_FILE, SAG_DEFAULTS, SAG_SIZES, SAG_TINY_SIZES, SaGSpec  # noqa: E402
from models.tris_spec import TRISSpec  # noqa: E402 (after the spec classes they mirror; no circular import)

AUGREG_FILE = ("./data/weights/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-"
               "lr_0.01-res_384.npz")
_FULL = dict(patch_size=16, d_model=768, n_heads=12, vit_layers=12, text_layers=6, fusion_layers=2)
_TINY = dict(patch_size=16, d_model=64, n_heads=4, vit_layers=2, text_layers=2, fusion_layers=2)

_SPECS = {
    "CMPC_model": TF1Spec("CMPC_model", Defaults(800000, 100000, 700000, 4, 0.00025, 1, 320), glove=True),
    "RRN_model": TF1Spec("RRN_model", Defaults(800000, 100000, None, 1000, 0.00025, 1, 320)),
    "RMI_model": TF1Spec("RMI_model", Defaults(750000, 50000, None, 1000, 0.00025, 1, 320), short_name="RMI"),
    "LSTM_model": TF1Spec("LSTM_model", Defaults(750000, 50000, None, 1000, 0.00025, 1, 320), short_name="LSTM"),
    "ReSTR": ReSTRSpec("ReSTR", Defaults(400000, 5000, None, 4, 1e-5, 8, 480), _FULL, AUGREG_FILE),
    "ReSTR_tiny": ReSTRSpec("ReSTR_tiny", Defaults(400000, 5000, None, 4, 1e-5, 8, 480), _TINY, RANDOM_INIT),
    "SaG": SaGSpec("SaG", Defaults(**SAG_DEFAULTS), SAG_SIZES, AUGREG_S16_FILE),
    "SaG_tiny": SaGSpec("SaG_tiny", Defaults(**SAG_DEFAULTS), SAG_TINY_SIZES, RANDOM_INIT),
    # TRIS counts epochs (15, batch 48, lr 5e-5 at 320); -i = epochs × ceil(train refs / batch): 13200 = 15 × 880
    # (refcocog umd); the stage-1 LambdaLR runs over -i iterations
    "TRIS_stage1": TRISSpec("TRIS_stage1", Defaults(13200, 880, None, 4, 5e-5, 48, 320), 1),
    "TRIS_stage2": TRISSpec("TRIS_stage2", Defaults(13200, 880, None, 4, 5e-5, 48, 320), 2),
}
MODEL_NAMES = tuple(_SPECS) + tuple(_ALIASES)


def canonical_name(name):
    """``RMI`` → ``RMI_model`` etc.; raises ValueError naming the valid choices."""
    name = _ALIASES.get(name, name)
    if name not in _SPECS:
        raise ValueError(f"unknown model -n {name!r}: choose one of {', '.join(MODEL_NAMES)}")
    return name


def model_spec(name):
    """The registry entry of ``-n name`` (aliases accepted)."""
    return _SPECS[canonical_name(name)]


def build_model(name, vocab_size=12112, embedding=None, image_size=320, weights="deeplab", seed=0):
    """Build ``-n name`` at ``image_size``.

    ``embedding`` (CMPC, ReSTR): the GloVe matrix [V, 300]. ``weights`` (RMI/LSTM only): ``deeplab`` (res5c + conv0)
    or ``resnet`` (the backbone's fc1000).
    """
    return model_spec(name).build(vocab_size, embedding, image_size, weights, seed)
