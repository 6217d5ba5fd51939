"""OpenAI CLIP as TRIS vendors and modifies it (fawnliu/TRIS ``CLIP/clip/model.py``, itself openai/CLIP
``clip/model.py``): the modified ResNet image encoder returning c1..c4 (``ModifiedResNet``), its attention pool
(``AttentionPool2d``), the causal text transformer (``Transformer`` / ``ResidualAttentionBlock``,
``CLIP.encode_text``) and the ViT image encoder (``VisionTransformer``, the frozen ViT-B/32 of TRIS's stage-1 loss).

Conventions (those of ``models/vit.py``): every parameter and BatchNorm buffer is a plain ``tf.Variable`` named by its
full PyTorch state_dict key with the PyTorch shape (Linear ``[out, in]``, Conv2d OIHW, ``nn.MultiheadAttention``'s
``in_proj_weight`` ``[3W, W]`` = q; k; v stacked); ``state_dict_variables()`` is the 1:1 table. BatchNorm
``running_mean`` / ``running_var`` are non-trainable float32 variables, ``num_batches_tracked`` a non-trainable int64
one. Activations are channels-last: images ``[B, H, W, C]``, tokens ``[N, T, W]`` (CLIP's own LND layout is an
internal transpose with no numerical effect).

Semantics kept from TRIS's copy (``../shared/spec/tris.md`` §T.2): ``ModifiedResNet`` returns (c1, c2, c3, c4) and
the attention pool's (global [B, E], map [B, H/32, W/32, E]); the attention pool's spatial positional grid is ALWAYS
resized with torch bilinear (align_corners False) to the feature size and every token is a query; the text
transformer's causal mask has ``txt_length`` (20) positions while the positional table keeps ``context_length`` (77)
rows; ``encode_text`` returns the ``ln_final`` output of every position [N, T, W] and the one at ``argmax(ids)``
(the first maximum) times ``text_projection`` — there is no padding mask. LayerNorm eps 1e-5, BatchNorm eps 1e-5 /
momentum 0.1, QuickGELU z·σ(1.702 z). Values are float32 (OpenAI's fp16 archives widened exactly).

Initial values: zeros (BatchNorm weights / running variances: ones; ``logit_scale`` log(1/0.07)). CLIP is never
trained from scratch in TRIS: its weights come from OpenAI's archives or a TRIS checkpoint, so random CLIP
initialisers would only cost time (the full model has 102 M values).
"""
import numpy as np
import tensorflow as tf

from models import vit
from util.torch_image import resize_bilinear

BN_EPS = 1e-5
BN_MOMENTUM = 0.1
LN_EPS = 1e-5
LOGIT_SCALE_INIT = float(np.log(1 / 0.07))


def _zeros(shape):
    return np.zeros(shape, np.float32)


class Linear(vit.Linear):
    """``nn.Linear(d_in, d_out)``: weight [out, in], y = x·Wᵀ + b over the last axis (``vit.Linear``'s forward).
    Initial values: zeros, or torch's default (U(±1/√d_in) for weight and bias, kaiming_uniform(a=√5)) from
    ``rng`` — not ``vit.Linear``'s ReSTR initialiser."""

    def __init__(self, prefix, d_in, d_out, rng=None):
        vit.TorchModule.__init__(self, prefix)
        bound = 1.0 / np.sqrt(d_in)
        init = (lambda shape: rng.uniform(-bound, bound, shape).astype(np.float32)) if rng is not None else _zeros
        self.weight = self.add_parameter("weight", init((d_out, d_in)))
        self.bias = self.add_parameter("bias", init((d_out,)))


class Conv2d(vit.TorchModule):
    """``nn.Conv2d(c_in, c_out, k, stride, padding, bias)``: weight OIHW [out, in, k, k], symmetric zero padding of
    ``padding`` pixels (as torch; TF's "SAME" would pad asymmetrically at stride 2). [B, H, W, c_in] →
    [B, H', W', c_out]. Initial values: zeros, or torch's default U(±1/√(c_in·k²)) from ``rng``."""

    def __init__(self, prefix, c_in, c_out, kernel=1, stride=1, padding=0, bias=True, rng=None):
        super().__init__(prefix)
        bound = 1.0 / np.sqrt(c_in * kernel * kernel)
        init = (lambda shape: rng.uniform(-bound, bound, shape).astype(np.float32)) if rng is not None else _zeros
        self.stride, self.padding = stride, padding
        self.weight = self.add_parameter("weight", init((c_out, c_in, kernel, kernel)))
        self.bias = self.add_parameter("bias", init((c_out,))) if bias else None

    def __call__(self, x):
        kernel = tf.transpose(self.weight, [2, 3, 1, 0])                                # OIHW → HWIO
        pad = self.padding
        padding = "VALID" if pad == 0 else [[0, 0], [pad, pad], [pad, pad], [0, 0]]
        y = tf.nn.conv2d(x, kernel, strides=self.stride, padding=padding)
        return y if self.bias is None else y + self.bias


class BatchNorm2d(vit.TorchModule):
    """``nn.BatchNorm2d(C)`` (eps 1e-5, momentum 0.1, affine, running statistics) over the last axis of
    [B, H, W, C].

    Eval: (x − running_mean)/√(running_var + eps)·weight + bias. Training: the batch's mean and biased variance over
    (B, H, W); when ``update`` the running statistics become (1 − 0.1)·old + 0.1·batch (the variance UNBIASED,
    n/(n − 1)) and ``num_batches_tracked`` += 1, as torch.
    """

    def __init__(self, prefix, channels):
        super().__init__(prefix)
        self.weight = self.add_parameter("weight", np.ones(channels, np.float32))
        self.bias = self.add_parameter("bias", _zeros(channels))
        self.running_mean = self._buffer("running_mean", tf.zeros([channels]))
        self.running_var = self._buffer("running_var", tf.ones([channels]))
        self.num_batches_tracked = self._buffer("num_batches_tracked", tf.zeros([], tf.int64))

    def _buffer(self, name, value):
        key = self.prefix + name
        var = tf.Variable(value, trainable=False, name=key)
        self._torch_params[key] = var
        return var

    def __call__(self, x, training=False, update=True):
        if not training:
            mean, variance = self.running_mean, self.running_var
        else:
            mean, variance = tf.nn.moments(x, axes=[0, 1, 2])
            if update:
                n = tf.cast(tf.reduce_prod(tf.shape(x)[:3]), tf.float32)
                unbiased = variance * n / (n - 1.0)
                self.running_mean.assign((1.0 - BN_MOMENTUM) * self.running_mean + BN_MOMENTUM * mean)
                self.running_var.assign((1.0 - BN_MOMENTUM) * self.running_var + BN_MOMENTUM * unbiased)
                self.num_batches_tracked.assign_add(1)
        return (x - mean) * tf.math.rsqrt(variance + BN_EPS) * self.weight + self.bias


def avg_pool(x, k):
    """``nn.AvgPool2d(k)``: kernel = stride = k, no padding, floor; identity for k = 1. [B, H, W, C]."""
    return x if k == 1 else tf.nn.avg_pool2d(x, k, k, "VALID")


class Bottleneck(vit.TorchModule):
    """``Bottleneck(inplanes, planes, stride)``: 1×1 conv–BN–ReLU, 3×3 conv (pad 1)–BN–ReLU, AvgPool(stride),
    1×1 conv to 4·planes–BN; shortcut identity or AvgPool(stride)–1×1 conv–BN (``downsample.0`` / ``.1``, present
    when stride > 1 or inplanes ≠ 4·planes); add, ReLU. All convs bias-free. [B, H, W, inplanes] →
    [B, H/stride, W/stride, 4·planes]."""

    def __init__(self, prefix, inplanes, planes, stride=1):
        super().__init__(prefix)
        self.stride = stride
        self.conv1 = self.add_module(Conv2d(prefix + "conv1.", inplanes, planes, 1, bias=False))
        self.bn1 = self.add_module(BatchNorm2d(prefix + "bn1.", planes))
        self.conv2 = self.add_module(Conv2d(prefix + "conv2.", planes, planes, 3, padding=1, bias=False))
        self.bn2 = self.add_module(BatchNorm2d(prefix + "bn2.", planes))
        self.conv3 = self.add_module(Conv2d(prefix + "conv3.", planes, 4 * planes, 1, bias=False))
        self.bn3 = self.add_module(BatchNorm2d(prefix + "bn3.", 4 * planes))
        self.downsample = None
        if stride > 1 or inplanes != 4 * planes:
            self.downsample = (self.add_module(Conv2d(prefix + "downsample.0.", inplanes, 4 * planes, 1, bias=False)),
                               self.add_module(BatchNorm2d(prefix + "downsample.1.", 4 * planes)))

    def __call__(self, x, training=False):
        out = tf.nn.relu(self.bn1(self.conv1(x), training))
        out = tf.nn.relu(self.bn2(self.conv2(out), training))
        out = self.bn3(self.conv3(avg_pool(out, self.stride)), training)
        identity = x
        if self.downsample is not None:
            conv, bn = self.downsample
            identity = bn(conv(avg_pool(x, self.stride)), training)
        return tf.nn.relu(out + identity)


def multi_head_attention(q, k, v, heads, mask=None):
    """Scaled dot-product attention over projected q [N, Lq, D], k, v [N, Lk, D]: heads = contiguous D/heads
    slices, logits q·kᵀ·(D/heads)^−½ (+ ``mask`` [Lq, Lk], additive), softmax over keys, heads concatenated.
    [N, Lq, D]."""
    n, d = tf.shape(q)[0], q.shape[-1]
    head_dim = d // heads

    def split(x):
        return tf.transpose(tf.reshape(x, [n, tf.shape(x)[1], heads, head_dim]), [0, 2, 1, 3])

    logits = tf.matmul(split(q), split(k), transpose_b=True) * (head_dim ** -0.5)
    if mask is not None:
        logits = logits + mask
    out = tf.matmul(tf.nn.softmax(logits, axis=-1), split(v))
    return tf.reshape(tf.transpose(out, [0, 2, 1, 3]), [n, tf.shape(q)[1], d])


class AttentionPool2d(vit.TorchModule):
    """TRIS's ``AttentionPool2d(spacial_dim, embed_dim, heads, output_dim)``: tokens = [mean; the H·W pixels] +
    positional embedding (class row kept, the spacial_dim² grid resized to H×W with torch bilinear, align_corners
    False, always); multi-head attention with separate q/k/v projections, every token a query; ``c_proj`` output.
    x [B, H, W, C] → (global [B, E], map [B, H, W, E]). Unused by TRIS (computed and discarded by the original)."""

    def __init__(self, prefix, spacial_dim, embed_dim, heads, output_dim):
        super().__init__(prefix)
        self.spacial_dim, self.embed_dim, self.heads = spacial_dim, embed_dim, heads
        self.positional_embedding = self.add_parameter("positional_embedding", _zeros((spacial_dim ** 2 + 1,
                                                                                       embed_dim)))
        self.k_proj = self.add_module(Linear(prefix + "k_proj.", embed_dim, embed_dim))
        self.q_proj = self.add_module(Linear(prefix + "q_proj.", embed_dim, embed_dim))
        self.v_proj = self.add_module(Linear(prefix + "v_proj.", embed_dim, embed_dim))
        self.c_proj = self.add_module(Linear(prefix + "c_proj.", embed_dim, output_dim))

    def __call__(self, x):
        b, h, w = tf.shape(x)[0], int(x.shape[1]), int(x.shape[2])
        tokens = tf.reshape(x, [b, h * w, self.embed_dim])
        tokens = tf.concat([tf.reduce_mean(tokens, axis=1, keepdims=True), tokens], axis=1)
        grid = tf.reshape(self.positional_embedding[1:], [1, self.spacial_dim, self.spacial_dim, self.embed_dim])
        spatial = tf.reshape(resize_bilinear(grid, (h, w)), [h * w, self.embed_dim])
        tokens = tokens + tf.concat([self.positional_embedding[:1], spatial], axis=0)
        out = self.c_proj(multi_head_attention(self.q_proj(tokens), self.k_proj(tokens), self.v_proj(tokens),
                                               self.heads))
        return out[:, 0], tf.reshape(out[:, 1:], [b, h, w, out.shape[-1]])


class ModifiedResNet(vit.TorchModule):
    """TRIS's ``ModifiedResNet(layers, output_dim, heads, input_resolution, width)``, prefix ``visual.``.

    Stem: conv1 3→w/2 3×3 stride 2 pad 1, BN, ReLU; conv2 w/2→w/2, BN, ReLU; conv3 w/2→w, BN, ReLU; AvgPool 2.
    layer1..4 (planes w, 2w, 4w, 8w; strides 1, 2, 2, 2) → c1 [B, S/4, S/4, 4w], c2 [.., S/8, 8w], c3 [S/16, 16w],
    c4 [S/32, 32w]; then ``attnpool`` (grid input_resolution/32, 32w → output_dim). RN50: w 64, layers (3, 4, 6, 3).
    """

    def __init__(self, prefix, layers, output_dim, heads, input_resolution, width):
        super().__init__(prefix)
        self.conv1 = self.add_module(Conv2d(prefix + "conv1.", 3, width // 2, 3, stride=2, padding=1, bias=False))
        self.bn1 = self.add_module(BatchNorm2d(prefix + "bn1.", width // 2))
        self.conv2 = self.add_module(Conv2d(prefix + "conv2.", width // 2, width // 2, 3, padding=1, bias=False))
        self.bn2 = self.add_module(BatchNorm2d(prefix + "bn2.", width // 2))
        self.conv3 = self.add_module(Conv2d(prefix + "conv3.", width // 2, width, 3, padding=1, bias=False))
        self.bn3 = self.add_module(BatchNorm2d(prefix + "bn3.", width))
        inplanes = width
        self.layers = []
        for i, (blocks, mult) in enumerate(zip(layers, (1, 2, 4, 8))):
            planes, stride = width * mult, (1 if i == 0 else 2)
            layer = []
            for j in range(blocks):
                layer.append(self.add_module(Bottleneck(f"{prefix}layer{i + 1}.{j}.", inplanes, planes,
                                                        stride if j == 0 else 1)))
                inplanes = 4 * planes
            self.layers.append(layer)
        self.attnpool = self.add_module(AttentionPool2d(prefix + "attnpool.", input_resolution // 32, width * 32,
                                                        heads, output_dim))

    def __call__(self, x, training=False, taps=None, attnpool=True):
        """images [B, S, S, 3] → (c1, c2, c3, c4, (global, map) or None when not ``attnpool``). ``taps`` receives
        ``stem_bn{1,2,3}`` (before ReLU), ``stem_out``, ``c1..c4``."""
        taps = {} if taps is None else taps
        for i, (conv, bn) in enumerate(((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3))):
            x = taps[f"stem_bn{i + 1}"] = bn(conv(x), training)
            x = tf.nn.relu(x)
        x = taps["stem_out"] = avg_pool(x, 2)
        outs = []
        for i, layer in enumerate(self.layers):
            for block in layer:
                x = block(x, training)
            outs.append(x)
            taps[f"c{i + 1}"] = x
        return (*outs, self.attnpool(x) if attnpool else None)


class ResidualAttentionBlock(vit.TorchModule):
    """CLIP ``ResidualAttentionBlock(d_model, n_head, attn_mask)``: x + MHA(LN1(x), mask) then x + MLP(LN2(x)),
    MLP = ``c_fc`` (W → 4W), QuickGELU, ``c_proj``. ``attn.in_proj_weight`` [3W, W] (q; k; v), ``in_proj_bias``,
    ``attn.out_proj``. [N, T, W] → [N, T, W]."""

    def __init__(self, prefix, width, heads):
        super().__init__(prefix)
        self.heads = heads
        self.in_proj_weight = self.add_parameter("attn.in_proj_weight", _zeros((3 * width, width)))
        self.in_proj_bias = self.add_parameter("attn.in_proj_bias", _zeros(3 * width))
        self.out_proj = self.add_module(Linear(prefix + "attn.out_proj.", width, width))
        self.ln_1 = self.add_module(vit.LayerNorm(prefix + "ln_1.", width, LN_EPS))
        self.c_fc = self.add_module(Linear(prefix + "mlp.c_fc.", width, 4 * width))
        self.c_proj = self.add_module(Linear(prefix + "mlp.c_proj.", 4 * width, width))
        self.ln_2 = self.add_module(vit.LayerNorm(prefix + "ln_2.", width, LN_EPS))

    def __call__(self, x, mask=None):
        qkv = tf.tensordot(self.ln_1(x), tf.transpose(self.in_proj_weight), axes=1) + self.in_proj_bias
        q, k, v = tf.split(qkv, 3, axis=-1)
        x = x + self.out_proj(multi_head_attention(q, k, v, self.heads, mask))
        h = self.c_fc(self.ln_2(x))
        return x + self.c_proj(h * tf.sigmoid(1.702 * h))


class Embedding(vit.TorchModule):
    """``nn.Embedding(V, W)``: ``weight`` [V, W]; ids [...] → rows [..., W]."""

    def __init__(self, prefix, vocab_size, width):
        super().__init__(prefix)
        self.weight = self.add_parameter("weight", _zeros((vocab_size, width)))

    def __call__(self, ids):
        return tf.gather(self.weight, ids)


def causal_mask(length):
    """CLIP ``build_attention_mask``: [L, L], −∞ above the diagonal (token t sees tokens ≤ t), 0 elsewhere."""
    upper = 1.0 - tf.linalg.band_part(tf.ones([length, length]), -1, 0)
    return tf.where(upper > 0, tf.constant(-np.inf, tf.float32), 0.0)


class VisionTransformer(vit.TorchModule):
    """CLIP ``VisionTransformer`` (prefix ``visual.``): ``conv1`` patch P (no bias), class embedding prepended,
    + ``positional_embedding`` (no resize: the input must be ``input_resolution``), ``ln_pre``, the unmasked
    transformer, ``ln_post`` of the class token, @ ``proj`` [W, E]. images [B, R, R, 3] → [B, E]."""

    def __init__(self, prefix, input_resolution, patch_size, width, layers, heads, output_dim):
        super().__init__(prefix)
        self.patch_size, self.heads = patch_size, heads
        self.class_embedding = self.add_parameter("class_embedding", _zeros(width))
        self.positional_embedding = self.add_parameter("positional_embedding",
                                                       _zeros(((input_resolution // patch_size) ** 2 + 1, width)))
        self.proj = self.add_parameter("proj", _zeros((width, output_dim)))
        self.conv1 = self.add_module(Conv2d(prefix + "conv1.", 3, width, patch_size, stride=patch_size, bias=False))
        self.ln_pre = self.add_module(vit.LayerNorm(prefix + "ln_pre.", width, LN_EPS))
        self.resblocks = [self.add_module(ResidualAttentionBlock(f"{prefix}transformer.resblocks.{i}.", width, heads))
                          for i in range(layers)]
        self.ln_post = self.add_module(vit.LayerNorm(prefix + "ln_post.", width, LN_EPS))

    def __call__(self, x):
        x = self.conv1(x)
        b, width = tf.shape(x)[0], x.shape[-1]
        x = tf.reshape(x, [b, -1, width])
        cls = tf.tile(tf.reshape(self.class_embedding, [1, 1, width]), [b, 1, 1])
        x = self.ln_pre(tf.concat([cls, x], axis=1) + self.positional_embedding)
        for block in self.resblocks:
            x = block(x)
        return tf.matmul(self.ln_post(x[:, 0]), self.proj)


class CLIP(vit.TorchModule):
    """TRIS's ``CLIP(embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size, context_length,
    txt_length, vocab_size, transformer_width, transformer_heads, transformer_layers)``.

    ``vision_layers`` a 4-tuple → ``ModifiedResNet`` (heads = 32·width/64), an int → ``VisionTransformer``
    (heads = width/64). Text heads as given (``build_model``: width // 64). State_dict order: own parameters
    (``positional_embedding`` [context, W], ``text_projection`` [W, E], ``logit_scale``), then ``visual``,
    ``transformer``, ``token_embedding``, ``ln_final``.
    """

    def __init__(self, prefix="", embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64,
                 vision_patch_size=None, context_length=77, txt_length=20, vocab_size=49408, transformer_width=512,
                 transformer_heads=8, transformer_layers=12):
        super().__init__(prefix)
        self.txt_length = txt_length
        self.positional_embedding = self.add_parameter("positional_embedding",
                                                       _zeros((context_length, transformer_width)))
        self.text_projection = self.add_parameter("text_projection", _zeros((transformer_width, embed_dim)))
        self.logit_scale = self.add_parameter("logit_scale", np.float32(LOGIT_SCALE_INIT))
        if isinstance(vision_layers, (tuple, list)):
            self.visual = self.add_module(ModifiedResNet(prefix + "visual.", vision_layers, embed_dim,
                                                         vision_width * 32 // 64, image_resolution, vision_width))
        else:
            self.visual = self.add_module(VisionTransformer(prefix + "visual.", image_resolution, vision_patch_size,
                                                            vision_width, vision_layers, vision_width // 64,
                                                            embed_dim))
        self.resblocks = [self.add_module(ResidualAttentionBlock(f"{prefix}transformer.resblocks.{i}.",
                                                                 transformer_width, transformer_heads))
                          for i in range(transformer_layers)]
        self.token_embedding = self.add_module(Embedding(prefix + "token_embedding.", vocab_size, transformer_width))
        self.ln_final = self.add_module(vit.LayerNorm(prefix + "ln_final.", transformer_width, LN_EPS))

    def encode_image(self, images, training=False, taps=None, attnpool=True):
        """images [B, S, S, 3] → ``visual``'s output (ResNet: c1..c4 and the attnpool pair; ViT: [B, E])."""
        if isinstance(self.visual, ModifiedResNet):
            return self.visual(images, training, taps, attnpool)
        return self.visual(images)

    def encode_text(self, ids, taps=None):
        """ids [N, T] (T = ``txt_length``: the causal mask's size, as the original) → (x [N, T, W]: ``ln_final``
        output of every position, hidden [N, E] = x at argmax(ids) @ ``text_projection``). ``taps`` receives
        ``token_embedding``, ``plus_pos``, ``block{i}``, ``ln_final``, ``eot_index``."""
        taps = {} if taps is None else taps
        length = int(ids.shape[-1])
        if length != self.txt_length:
            raise ValueError(f"CLIP text encoder: {length} tokens, the causal mask has {self.txt_length}")
        x = taps["token_embedding"] = self.token_embedding(ids)
        x = taps["plus_pos"] = x + self.positional_embedding[:length]
        mask = causal_mask(length)
        for i, block in enumerate(self.resblocks):
            x = taps[f"block{i}"] = block(x, mask)
        x = taps["ln_final"] = self.ln_final(x)
        eot = taps["eot_index"] = tf.argmax(ids, axis=-1)
        hidden = tf.matmul(tf.gather(x, eot, batch_dims=1), self.text_projection)
        return x, hidden
