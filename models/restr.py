"""ReSTR: Kim et al., "ReSTR: Convolution-free Referring Image Segmentation Using Transformers" (CVPR 2022,
arXiv 2203.16768), as built by SouthFlame/restr @ 371f102d (``model/factory.create_restr``).

Data flow (full size: D = 768, P = 16, H = W = 480, G = 30, N = G² = 900 patches, T = 20 words, d_l = 300):

  images [B,H,W,3] ─``encoder_v`` (the vision encoder, ViT-B/16)─────────────────────▶ x_v [B,1+N,D]
  words  [B,T]     ─``encoder_l`` (the text encoder: GloVe + 6 post-norm blocks)───────▶ x_l [B,T,D]
  ``fusion_module`` (``MM_fusion``):
    class token dropped; x_v, x_l l2-normalised; ``proj_v`` / ``proj_l``; pad words zeroed
    ``visual_linguistic_encoder`` (``blocks_vl``, 2 blocks) over [patches ; words]   ─▶ fused patches, fused words
    ``linguistic_seed_encoder`` (``blocks_ls``, 2 blocks) + ``norm`` over [words ; ``seed_emb``] ─▶ seed output
    ``adaptive_classifier``: patch logits = (patches·``proj_patch``)·(seed·``proj_cls``)ᵀ ─▶ patch_pred [B,G,G,1]
    ``coarse_to_fine_decoder`` (4 × [×2 bilinear, 1×1 conv, LeakyReLU], 1×1 conv) over
        [projected visual tokens ; patch-logit-weighted patches] (2D channels)        ─▶ pixel_pred [B,H,W,1]

Variables: ``state_dict_variables()`` is the table {PyTorch state_dict key: tf.Variable}; names ARE the keys and
shapes ARE the PyTorch shapes (Linear [out, in], Conv2d OIHW, no transposes), so a ReSTR ``.pth`` state_dict loads
with ``load_state_dict`` as is. 291 tensors, 129,759,472 parameters at full size with the Gref vocabulary.

Faithful to the original (``../shared/spec/restr.md``), including what looks accidental: LayerNorm eps 1e-5 (not
timm's 1e-6) everywhere; no attention mask anywhere (pads carry the positional encoding and take part in every
attention; in the fusion module pad words are zeroed after ``proj_l`` only); the text blocks are post-norm; the
decoder's visual input is the projected ViT feature from BEFORE fusion; T = 20 is fixed. Batch > 1 as the original.
Dropout p is 0 in every shipped configuration (not implemented); DropPath (ViT 0…0.1, fusion [0, 0.1]) runs in
training only.
"""
import math

import numpy as np
import tensorflow as tf

from models import vit
from util import adamw
from util.torch_image import resize_and_crop, resize_and_crop_nearest, resize_and_pad, resize_bilinear_align_corners

MAX_WORDS = 20                 # positionalencoding1d(d_lang, 20) and MM_fusion.n_l = 20, hard-coded
IMAGE_SIZE = 480               # --input_size 480,480
PATCH_SIZE = 16
BATCH_SIZE = 8
NUM_STEPS = 400000
LEARNING_RATE = 1e-5           # --lr (encoder_v: 0.1 ×)
END_LEARNING_RATE = 0.0        # --end_lr
WARM_ITER = 40000              # --warm_iter: NUM_STEPS // 10 of the DEFAULT 400000, whatever --num_steps is
POWER = 0.9
WEIGHT_DECAY = 5e-4
ENCODER_V_LR_MULT = 0.1
ALPHA_LOC = 0.1                # weight of the patch loss
PATCH_THRESHOLD = 0.8          # --patch_thres, compared with a pixel COUNT: ≥ 1 foreground pixel
IMAGE_MEAN = IMAGE_STD = 127.5
EVAL_THRESHOLD = 1e-9          # eval/evaluate.py's --threshold (training-time validation used 1e-8)
DECODER_LEAKY_SLOPE = 0.01     # nn.LeakyReLU default


# (v − 127.5) / 127.5 in float32 for every uint8 value v, rounded once as torch computes it
_UINT8_NORMALISED = (np.arange(256, dtype=np.float32) - np.float32(IMAGE_MEAN)) / np.float32(IMAGE_STD)


def preprocess(images):
    """``ReferDataSet_vit``'s normalisation: RGB [B, H, W, 3] (uint8 or float) → (x − 127.5) / 127.5, float32.

    uint8 images go through a 256-entry table of the correctly rounded quotients: inside a graph TF's optimizer
    rewrites a division by a constant as a multiplication by its reciprocal (1 ulp apart), so the table keeps the
    exported SavedModel's input equal to the eager evaluation's bit for bit."""
    images = tf.convert_to_tensor(images)
    if images.dtype == tf.uint8:
        return tf.gather(tf.constant(_UINT8_NORMALISED), tf.cast(images, tf.int32))
    return (tf.cast(images, tf.float32) - IMAGE_MEAN) / IMAGE_STD


def eval_input(image, size=IMAGE_SIZE):
    """``eval/evaluate.evaluate`` step 1: one original-size RGB image [1, h, w, 3] (uint8) → normalised and
    resized-and-padded to [1, size, size, 3] (torch bilinear, no antialias; the padding is 0 = grey)."""
    return resize_and_pad(preprocess(image), size, size)


def eval_output(outputs, height, width, threshold=EVAL_THRESHOLD):
    """``eval/evaluate.evaluate`` steps 2–4 for a batch-1 forward of ``eval_input``: back to the original
    height × width with ``resize_and_crop`` → {``pred_orig`` (logits), ``sigmoid_orig`` (sigmoid, then resized),
    ``patch_sigmoid_orig`` (patch sigmoid, nearest), ``mask`` (bool: resized logits ≥ threshold)}, [1, h, w, 1]."""
    pred = resize_and_crop(outputs["pixel_pred"], height, width)
    return {"pred_orig": pred,
            "sigmoid_orig": resize_and_crop(tf.sigmoid(outputs["pixel_pred"]), height, width),
            "patch_sigmoid_orig": resize_and_crop_nearest(tf.sigmoid(outputs["patch_pred"]), height, width),
            "mask": pred >= threshold}


def glove_embedding(glove, source="GloVe matrix"):
    """``TR_GloVe``'s embedding from a GloVe matrix [V, d_l] (array or ``*_emb.npy`` path): float32, row 0 (<pad>)
    set to zero. Raises one line naming ``source`` (or the path) when it is not a 2-D matrix."""
    if isinstance(glove, (str, bytes)) or hasattr(glove, "__fspath__"):
        source = str(glove)
        glove = np.load(glove)
    matrix = np.array(glove, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[0] < 1 or matrix.shape[1] % 2:
        raise ValueError(f"{source}: expected a GloVe matrix [vocabulary, even width], got shape {matrix.shape}")
    matrix[0] = 0.0
    return matrix


def positional_encoding_1d(d_model, length=MAX_WORDS):
    """``positionalencoding1d`` (model/transformers/utils.py), float32 as torch computes it:
    PE[pos, 2i] = sin(pos·e^(2i·(−ln 10000 / d))), PE[pos, 2i+1] = cos(same) → [length, d]."""
    div_term = np.exp(np.arange(0, d_model, 2, dtype=np.float32) * np.float32(-(math.log(10000.0) / d_model)))
    angles = np.arange(length, dtype=np.float32)[:, None] * div_term
    pe = np.zeros((length, d_model), np.float32)
    pe[:, 0::2] = np.sin(angles)
    pe[:, 1::2] = np.cos(angles)
    return pe


class LangBlock(vit.TorchModule):
    """ReSTR ``LangBlock`` (``blocks.py``) — POST-norm transformer block, no attention mask:

        x = LN1(x + DropPath(Attn(x)));  x = LN2(x + DropPath(MLP(x)))

    Parameters in state_dict order: norm1, norm2, attn, mlp. [B, T, d_l] → [B, T, d_l].
    """

    def __init__(self, prefix, dim, heads, mlp_dim, rng, drop_path_rate=0.0, generator=None):
        super().__init__(prefix)
        eps = vit.TORCH_LAYER_NORM_EPS
        self.norm1 = self.add_module(vit.LayerNorm(prefix + "norm1.", dim, eps))
        self.norm2 = self.add_module(vit.LayerNorm(prefix + "norm2.", dim, eps))
        self.attn = self.add_module(vit.Attention(prefix + "attn.", dim, heads, rng))
        self.mlp = self.add_module(vit.FeedForward(prefix + "mlp.", dim, mlp_dim, rng))
        self.drop_path_rate = drop_path_rate
        self.generator = generator

    def __call__(self, x, training=False):
        x = self.norm1(x + vit.drop_path(self.attn(x), self.drop_path_rate, training, self.generator))
        return self.norm2(x + vit.drop_path(self.mlp(x), self.drop_path_rate, training, self.generator))


class TR_GloVe(vit.TorchModule):  # noqa: N801 (the original's class name)
    """The text encoder (``model/glove_transformer.py`` ``TR_GloVe``), state_dict prefix ``encoder_l.``.

    words [B, 20] → ``embedding`` (GloVe [V, d_l], trainable, row 0 = <pad> zero and never updated:
    ``padding_idx=0``) → + fixed sinusoidal positional encoding at EVERY position (left pads included) →
    ``blocks`` (post-norm ``LangBlock``s, d_l wide, no mask) → ``proj_lang`` (d_l → D) → ``lang_norm`` → [B, 20, D].
    """

    def __init__(self, prefix, embedding, d_model, n_layers, n_heads, rng, drop_path_rate=0.0, generator=None):
        super().__init__(prefix)
        d_lang = embedding.shape[1]
        self.embedding = self.add_parameter("embedding.weight", embedding)
        self.pos_emb_l = tf.constant(positional_encoding_1d(d_lang)[None])
        self.blocks = [self.add_module(LangBlock(f"{prefix}blocks.{j}.", d_lang, n_heads, 4 * d_lang, rng, rate,
                                                 generator))
                       for j, rate in enumerate(vit.drop_path_rates(drop_path_rate, n_layers))]
        self.proj_lang = self.add_module(vit.Linear(prefix + "proj_lang.", d_lang, d_model, rng))
        self.lang_norm = self.add_module(vit.LayerNorm(prefix + "lang_norm.", d_model, vit.TORCH_LAYER_NORM_EPS))

    def word_embedding(self, words):
        """``nn.Embedding(padding_idx=0)``: the rows of ``words`` [B, T]; id 0 passes no gradient to row 0."""
        rows = tf.gather(self.embedding, words)
        return tf.where(tf.equal(words, 0)[..., None], tf.stop_gradient(rows), rows)

    def __call__(self, words, training=False, taps=None):
        """words int [B, 20] → text features [B, 20, D]. ``taps`` receives ``embedding``, ``pos_encoding``,
        ``emb_plus_pos``, ``block{j}``, ``proj_lang``, ``lang_norm``."""
        taps = {} if taps is None else taps
        x = taps["embedding"] = self.word_embedding(words)
        taps["pos_encoding"] = self.pos_emb_l
        x = taps["emb_plus_pos"] = x + self.pos_emb_l
        for j, block in enumerate(self.blocks):
            x = taps[f"block{j}"] = block(x, training)
        x = taps["proj_lang"] = self.proj_lang(x)
        x = taps["lang_norm"] = self.lang_norm(x)
        return x


def l2_normalize(x):
    """torch ``F.normalize(x, dim=-1)``: x / max(‖x‖₂, 1e-12)."""
    return x / tf.maximum(tf.norm(x, axis=-1, keepdims=True), 1e-12)


class MM_fusion(vit.TorchModule):  # noqa: N801 (the original's class name)
    """The multimodal fusion encoder, seed token, adaptive classifier and coarse-to-fine decoder
    (``model/fusion_module.py`` ``MM_fusion``, the class the factory actually uses), prefix ``fusion_module.``.

    Parameters (state_dict order): ``seed_emb`` [1,1,D] (the seed token), ``proj_patch``, ``proj_cls`` [D,D]
    (right-multiplied, no bias; init D^−½·N(0,1)), ``proj_v``, ``proj_l`` (Linear D → D), ``blocks_vl.{k}``,
    ``blocks_ls.{k}`` (pre-norm ``Block``s), ``norm``, ``decoder.{u}.up.1.weight`` [D/2^u, 2D/2^u, 1, 1] (u < 4),
    ``decoder.4.weight`` [1, D/8, 1, 1].
    """

    def __init__(self, prefix, d_model, n_layers, n_heads, rng, n_up=4, drop_path_rate=0.0, generator=None):
        super().__init__(prefix)
        eps = vit.TORCH_LAYER_NORM_EPS
        self.d_model = d_model
        self.seed_emb = self.add_parameter("seed_emb", vit.trunc_normal((1, 1, d_model), rng))
        scale = d_model ** -0.5
        self.proj_patch = self.add_parameter("proj_patch", scale * rng.standard_normal((d_model, d_model)))
        self.proj_cls = self.add_parameter("proj_cls", scale * rng.standard_normal((d_model, d_model)))
        self.proj_v = self.add_module(vit.Linear(prefix + "proj_v.", d_model, d_model, rng))
        self.proj_l = self.add_module(vit.Linear(prefix + "proj_l.", d_model, d_model, rng))
        rates = vit.drop_path_rates(drop_path_rate, n_layers)
        self.blocks_vl = [self.add_module(vit.Block(f"{prefix}blocks_vl.{k}.", d_model, n_heads, 4 * d_model, rng,
                                                    rate, eps, generator))
                          for k, rate in enumerate(rates)]
        self.blocks_ls = [self.add_module(vit.Block(f"{prefix}blocks_ls.{k}.", d_model, n_heads, 4 * d_model, rng,
                                                    rate, eps, generator))
                          for k, rate in enumerate(rates)]
        self.norm = self.add_module(vit.LayerNorm(prefix + "norm.", d_model, eps))
        decoder = vit.TorchModule(prefix + "decoder.")
        self.decoder_convs = [decoder.add_parameter(f"{u}.up.1.weight", vit.xavier_uniform(
                                  (d_model // 2 ** u, 2 * d_model // 2 ** u, 1, 1), rng))
                              for u in range(n_up)]
        self.decoder_final = decoder.add_parameter(f"{n_up}.weight",
                                                   vit.xavier_uniform((1, d_model // 2 ** (n_up - 1), 1, 1), rng))
        self.add_module(decoder)

    def visual_linguistic_encoder(self, x_v, x_l, training, taps):
        """``blocks_vl`` over [patches ; words] [B, N+T, D] → (fused patches [B,N,D], fused words [B,T,D])."""
        x = taps["vl_in"] = tf.concat([x_v, x_l], axis=1)
        for k, block in enumerate(self.blocks_vl):
            x = taps[f"vl_block{k}"] = block(x, training)
        return x[:, :-MAX_WORDS], x[:, -MAX_WORDS:]

    def linguistic_seed_encoder(self, words, training, taps):
        """``blocks_ls`` + ``norm`` over [words ; seed token] [B, T+1, D] → the seed's output [B, 1, D]."""
        seed = tf.tile(self.seed_emb, [tf.shape(words)[0], 1, 1])
        x = taps["ls_in"] = tf.concat([words, seed], axis=1)
        for k, block in enumerate(self.blocks_ls):
            x = taps[f"ls_block{k}"] = block(x, training)
        x = taps["norm"] = self.norm(x)
        return x[:, -1:]

    def adaptive_classifier(self, patches, seed, taps):
        """Patch logits from the seed: (patches·``proj_patch``) · (seed·``proj_cls``)ᵀ → [B, N, 1]; also returns
        the projected patches weighted by their logit (the decoder's second input) [B, N, D]."""
        patches = taps["patches_proj"] = tf.matmul(patches, self.proj_patch)
        classifier = taps["classifier_proj"] = tf.matmul(seed, self.proj_cls)
        logits = taps["patch_logits_flat"] = tf.matmul(patches, classifier, transpose_b=True)
        masked = taps["masked_patches"] = logits * patches
        return logits, masked

    def coarse_to_fine_decoder(self, x, taps):
        """``decoder``: 4 × ``uplinearBlock`` (×2 bilinear with align_corners=True, 1×1 conv without bias halving
        the channels, LeakyReLU 0.01), then a 1×1 conv to 1 channel. [B, G, G', 2D] → logits [B, 16G, 16G', 1]."""
        taps["dec.in"] = x
        for u, weight in enumerate(self.decoder_convs):
            x = taps[f"dec.up{u}.upsample"] = resize_bilinear_align_corners(x, (2 * x.shape[1], 2 * x.shape[2]))
            x = taps[f"dec.up{u}.conv"] = conv1x1(x, weight)
            x = taps[f"dec.up{u}.out"] = tf.nn.leaky_relu(x, alpha=DECODER_LEAKY_SLOPE)
        x = taps["dec.final_conv"] = conv1x1(x, self.decoder_final)
        return x

    def __call__(self, x_v, x_l, words, grid, training=False, taps=None):
        """x_v [B, 1+N, D] (ViT output), x_l [B, T, D] (text features), words [B, T], grid = (G, G') with
        N = G·G' → {patch_pred [B, G, G', 1], pixel_pred [B, 16G, 16G', 1]} (logits).

        ``taps`` receives ``x_v_l2normalized``, ``x_l_l2normalized``, ``proj_v``, ``proj_l`` (before pads are
        zeroed), the encoders' and classifier's stages and the decoder's (``dec.*``, NHWC)."""
        taps = {} if taps is None else taps
        x_v = taps["x_v_l2normalized"] = l2_normalize(x_v[:, 1:])
        x_l = taps["x_l_l2normalized"] = l2_normalize(x_l)
        x_v = taps["proj_v"] = self.proj_v(x_v)
        x_l = taps["proj_l"] = self.proj_l(x_l)
        x_l = tf.where(tf.equal(words, 0)[..., None], tf.zeros_like(x_l), x_l)
        patches, fused_words = self.visual_linguistic_encoder(x_v, x_l, training, taps)
        seed = self.linguistic_seed_encoder(fused_words, training, taps)
        logits, masked = self.adaptive_classifier(patches, seed, taps)
        batch = tf.shape(logits)[0]
        patch_pred = tf.reshape(logits, [batch, grid[0], grid[1], 1])
        decoder_in = tf.reshape(tf.concat([x_v, masked], axis=2), [batch, grid[0], grid[1], 2 * self.d_model])
        return {"patch_pred": patch_pred, "pixel_pred": self.coarse_to_fine_decoder(decoder_in, taps)}


def conv1x1(x, weight):
    """``nn.Conv2d(in, out, kernel_size=1, bias=False)`` with an OIHW weight [out, in, 1, 1] on NHWC x."""
    shape = tf.shape(x)
    kernel = tf.reshape(weight, weight.shape[:2])
    y = tf.matmul(tf.reshape(x, [-1, weight.shape[1]]), kernel, transpose_b=True)
    return tf.reshape(y, tf.concat([shape[:3], [weight.shape[0]]], 0))


class ReSTR(vit.TorchModule):
    """The ReSTR model (``model/restr.py`` ``ReSTR``): ``encoder_v``, ``encoder_l``, ``fusion_module``.

    Args (defaults = ``train_restr.py``'s full size; the MLP widths are 4× their block's width):
      embedding: GloVe matrix [V, d_l] (``glove_embedding``; row 0 is zeroed here too).
      image_size: (H, W) the ViT is built for (its position-embedding grid); other sizes resize it at run time.
      patch_size, d_model, n_heads, vit_layers, vit_drop_path_rate: the ViT (``v_backbone`` of config.yml); the
        text encoder and the fusion module use the same d_model and n_heads.
      text_layers, text_drop_path_rate: ``TR_GloVe`` (``l_backbone.transformer_glove``).
      fusion_layers, fusion_drop_path_rate, n_up: ``MM_fusion`` (``fusion_module``).
      n_cls: the unused ViT head's classes (1000, loaded from the AugReg checkpoint).
      seed: numpy seed of the initial values; DropPath draws from a ``tf.random.Generator`` seeded by it.
    """

    def __init__(self, embedding, image_size=(IMAGE_SIZE, IMAGE_SIZE), patch_size=PATCH_SIZE, d_model=768,
                 n_heads=12, vit_layers=12, vit_drop_path_rate=0.1, text_layers=6, text_drop_path_rate=0.0,
                 fusion_layers=2, fusion_drop_path_rate=0.1, n_up=4, n_cls=1000, seed=0):
        super().__init__("")
        rng = np.random.default_rng(seed)
        self.generator = tf.random.Generator.from_seed(seed)
        self.patch_size = patch_size
        self.encoder_v = self.add_module(vit.VisionTransformer(
            "encoder_v.", tuple(image_size), patch_size, vit_layers, d_model, 4 * d_model, n_heads, rng, n_cls,
            vit_drop_path_rate, vit.TORCH_LAYER_NORM_EPS, self.generator))
        self.encoder_l = self.add_module(TR_GloVe(
            "encoder_l.", glove_embedding(embedding), d_model, text_layers, n_heads, rng, text_drop_path_rate,
            self.generator))
        self.fusion_module = self.add_module(MM_fusion(
            "fusion_module.", d_model, fusion_layers, n_heads, rng, n_up, fusion_drop_path_rate, self.generator))

    def __call__(self, images, words, training=False, taps=None):
        """images [B, H, W, 3] float32 normalised (``preprocess``), H, W static multiples of 16; words int
        [B, 20] (left-padded ids, 0 = pad) → {``patch_pred`` [B, H/16, W/16, 1], ``pixel_pred`` [B, H, W, 1]}
        (logits).

        ``taps`` (optional dict) receives every intermediate stage under the golden's names (``vit.*``,
        ``txt.*``, ``fus.*``, ``dec.*``), channels-last.
        """
        words = tf.convert_to_tensor(words)
        if words.shape.rank != 2 or (words.shape[1] is not None and words.shape[1] != MAX_WORDS):
            raise ValueError(f"ReSTR takes words of shape [batch, {MAX_WORDS}], got {words.shape}")
        grid = (int(images.shape[1]) // self.patch_size, int(images.shape[2]) // self.patch_size)
        stages = {"vit": {}, "txt": {}, "fus": {}}
        x_v = self.encoder_v(images, training, stages["vit"])
        x_l = self.encoder_l(words, training, stages["txt"])
        outputs = self.fusion_module(x_v, x_l, words, grid, training, stages["fus"])
        if taps is not None:
            for part, values in stages.items():
                taps.update({(k if k.startswith("dec.") else f"{part}.{k}"): v for k, v in values.items()})
        return outputs

    def load_state_dict(self, state_dict, source="state_dict"):
        """Assign {PyTorch key: array} (strict, as torch's ``load_state_dict``): every key of
        ``state_dict_variables()`` must be present with its shape and no other key may be; otherwise one line
        naming ``source`` and the first offending key, before anything is assigned."""
        variables = self.state_dict_variables()
        for key, var in variables.items():
            if key not in state_dict:
                raise ValueError(f"{source}: missing key {key} (expected {len(variables)} ReSTR parameters)")
            shape = tuple(np.shape(state_dict[key]))
            if shape != tuple(var.shape):
                raise ValueError(f"{source}: {key} has shape {shape}, the model expects {tuple(var.shape)}")
        unexpected = [key for key in state_dict if key not in variables]
        if unexpected:
            raise ValueError(f"{source}: unexpected key {unexpected[0]} ({len(unexpected)} not in the model)")
        for key, var in variables.items():
            var.assign(np.asarray(state_dict[key], np.float32))


def patch_labels(masks, patch_size=PATCH_SIZE, threshold=PATCH_THRESHOLD):
    """``utils/torchutils.Patch_label_gen(patch_size, threshold)``: foreground pixel COUNT per P×P patch (an
    all-ones stride-P convolution) > threshold → float 0/1. With the default 0.8 a patch is positive iff it holds
    at least one foreground pixel. masks [B, H, W, 1] → [B, H/P, W/P, 1] (trailing rows/columns beyond a multiple
    of P are ignored, as the VALID convolution)."""
    masks = tf.cast(masks, tf.float32)
    gh, gw = int(masks.shape[1]) // patch_size, int(masks.shape[2]) // patch_size
    patches = tf.reshape(masks[:, :gh * patch_size, :gw * patch_size],
                         [-1, gh, patch_size, gw, patch_size, 1])
    return tf.cast(tf.reduce_sum(patches, axis=[2, 4]) > threshold, tf.float32)


def bce_with_logits(logits, labels):
    """torch ``BCEWithLogitsLoss()`` (mean): mean of max(x, 0) − x·y + log(1 + e^−|x|)."""
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits))


def losses(outputs, masks, alpha_loc=ALPHA_LOC, patch_threshold=PATCH_THRESHOLD):
    """``train_restr.py``'s objective: {``loss_pixel``, ``loss_patch``, ``loss`` = pixel + alpha_loc·patch}.

    outputs: the model's dict; masks [B, H, W, 1] (any dtype, foreground ≠ 0) at the input size. BCE means over
    every pixel (padding included) and every patch (labels from ``patch_labels``). The original's ``interp_pred``
    / ``interp_label`` resize to ``--input_size`` first, an identity since the batches are at that size.
    """
    masks = tf.cast(tf.cast(masks, tf.bool), tf.float32)
    loss_pixel = bce_with_logits(outputs["pixel_pred"], masks)
    loss_patch = bce_with_logits(outputs["patch_pred"], patch_labels(masks, threshold=patch_threshold))
    return {"loss_pixel": loss_pixel, "loss_patch": loss_patch, "loss": loss_pixel + alpha_loc * loss_patch}


OBJECTIVE = "loss"


def optim_parameters(model):
    """``ReSTR.optim_parameters``: [(fusion_module + encoder_l, 1), (encoder_v, 0.1)] as ({key: var}, lr
    multiplier). ``encoder_v.head`` is left out: never used in the forward pass, it never has a gradient, so torch
    never gives it AdamW state or weight decay."""
    variables = model.state_dict_variables()
    group0 = {k: v for prefix in ("fusion_module.", "encoder_l.") for k, v in variables.items()
              if k.startswith(prefix)}
    group1 = {k: v for k, v in variables.items() if k.startswith("encoder_v.") and not k.startswith("encoder_v.head.")}
    return [(group0, 1.0), (group1, ENCODER_V_LR_MULT)]


def make_optimizer(model, lr=LEARNING_RATE, end_lr=END_LEARNING_RATE, num_steps=NUM_STEPS, power=POWER,
                   warm_iter=WARM_ITER, weight_decay=WEIGHT_DECAY, cosine=False):
    """``torch.optim.AdamW(model.optim_parameters(args), lr, betas=(0.9, 0.999), weight_decay)`` driven by
    ``adjust_learning_rate``: ``lr_poly`` (default) or ``lr_cos`` (``--is_cos``) of the update number, group 1 at
    0.1×. The first update runs at lr 0."""
    if cosine:
        def schedule(t):
            return adamw.lr_cos(lr, end_lr, t, num_steps, warm_iter)
    else:
        def schedule(t):
            return adamw.lr_poly(lr, end_lr, t, num_steps, power, warm_iter)
    return adamw.AdamW(optim_parameters(model), adamw.schedule_table(schedule, num_steps), weight_decay)
