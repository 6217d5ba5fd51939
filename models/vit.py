"""ViT pieces with PyTorch semantics (timm / Segmenter), variables named and laid out as the PyTorch state_dict.

Shared by the PyTorch-descended models (ReSTR; reusable by others built on timm's ViT-B/16). Sources:
Segmenter ``model/vit.py`` and ``model/transformers/blocks.py`` (rstrudel/segmenter), as copied into ReSTR
(SouthFlame/restr ``model/vit.py``, ``model/transformers/blocks.py``); timm 0.6 ``DropPath`` and ``trunc_normal_``.

Conventions:
- Every parameter is a plain ``tf.Variable`` whose name is its full PyTorch state_dict key
  (``encoder_v.blocks.0.attn.qkv.weight``) and whose shape is the PyTorch shape: Linear weights ``[out, in]``,
  Conv2d weights OIHW. No transposes anywhere in the mapping: ``state_dict_variables()`` is the 1:1 table.
- Activations are channels-last: tokens ``[B, N, D]``, images ``[B, H, W, C]``.
- ``LayerNorm`` takes its eps explicitly: torch's ``nn.LayerNorm`` default 1e-5 is what Segmenter/ReSTR run
  (timm's own ViT builds its LayerNorms with 1e-6 for the same AugReg weights; the difference is 1e-5…7e-4).
- Dropout: every shipped configuration has p = 0.0 (identity), so it is not implemented. DropPath is (training
  only, per sample). Initial values follow the originals' initialisers with a seeded numpy generator (the
  distributions, not torch's random stream).
"""
import numpy as np
import tensorflow as tf

from util.torch_image import resize_bilinear

TORCH_LAYER_NORM_EPS = 1e-5       # torch nn.LayerNorm default, used by Segmenter's and ReSTR's blocks
INIT_STD = 0.02


# --------------------------------------------------------------------------------------------- initialisers
def trunc_normal(shape, rng, std=INIT_STD, bound=2.0):
    """timm ``trunc_normal_(t, std=0.02)``: N(0, std²) truncated to [−2, 2] — ABSOLUTE bounds, ±100σ, so in effect
    an untruncated normal (an outlier would be redrawn, as the truncation does)."""
    values = rng.standard_normal(size=shape, dtype=np.float32) * np.float32(std)
    outside = np.abs(values) > bound
    while outside.any():
        values[outside] = rng.standard_normal(size=int(outside.sum()), dtype=np.float32) * np.float32(std)
        outside = np.abs(values) > bound
    return values


def xavier_uniform(shape, rng):
    """torch ``nn.init.xavier_uniform_`` for an OIHW / [out, in] weight: U(±√(6/(fan_in + fan_out))) with
    fan_in = in·kh·kw, fan_out = out·kh·kw."""
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    bound = np.sqrt(6.0 / (shape[1] * receptive + shape[0] * receptive))
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


# --------------------------------------------------------------------------------------------- base module
class TorchModule(tf.Module):
    """A ``tf.Module`` mirroring an ``nn.Module``: parameters registered under their full state_dict key.

    ``state_dict_variables()`` lists them in PyTorch's state_dict order: the module's own parameters first, then
    its sub-modules in registration order.
    """

    def __init__(self, prefix):
        super().__init__(name=type(self).__name__)
        self.prefix = prefix
        self._torch_params = {}
        self._torch_children = []

    def add_parameter(self, name, initial_value):
        key = self.prefix + name
        var = tf.Variable(np.asarray(initial_value, np.float32), name=key)
        self._torch_params[key] = var
        return var

    def add_module(self, module):
        self._torch_children.append(module)
        return module

    def state_dict_variables(self):
        """{PyTorch state_dict key: tf.Variable} in state_dict order (shapes in PyTorch layout)."""
        out = dict(self._torch_params)
        for child in self._torch_children:
            out.update(child.state_dict_variables())
        return out


def _like(w, x):
    return tf.cast(w, x.dtype) if w.dtype != x.dtype else w


# --------------------------------------------------------------------------------------------- layers
class Linear(TorchModule):
    """``nn.Linear(d_in, d_out)`` with ReSTR's ``init_weights``: weight [out, in] ~ trunc_normal(0.02), bias 0.

    y = x · Wᵀ + b over the last axis of x [..., d_in] → [..., d_out].
    """

    def __init__(self, prefix, d_in, d_out, rng):
        super().__init__(prefix)
        self.weight = self.add_parameter("weight", trunc_normal((d_out, d_in), rng))
        self.bias = self.add_parameter("bias", np.zeros(d_out, np.float32))

    def __call__(self, x):
        shape = tf.shape(x)
        flat = tf.reshape(x, [-1, self.weight.shape[1]])
        y = tf.matmul(flat, _like(self.weight, x), transpose_b=True) + _like(self.bias, x)
        return tf.reshape(y, tf.concat([shape[:-1], [self.weight.shape[0]]], 0))


class LayerNorm(TorchModule):
    """``nn.LayerNorm(dim, eps)`` over the last axis: (x − E[x]) / √(Var[x] + eps) · weight + bias (biased
    variance). weight 1, bias 0 at init. The eps is explicit: see the module docstring."""

    def __init__(self, prefix, dim, eps):
        super().__init__(prefix)
        self.eps = eps
        self.weight = self.add_parameter("weight", np.ones(dim, np.float32))
        self.bias = self.add_parameter("bias", np.zeros(dim, np.float32))

    def __call__(self, x):
        mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
        return (x - mean) * tf.math.rsqrt(variance + self.eps) * _like(self.weight, x) + _like(self.bias, x)


def drop_path(x, rate, training, generator):
    """timm ``DropPath(rate)``: in training, each sample's residual branch [B, ...] is kept with probability
    1 − rate and then scaled by 1/(1 − rate) (``scale_by_keep=True``); identity in eval or at rate 0."""
    if not training or rate == 0.0:
        return x
    keep = 1.0 - rate
    shape = tf.concat([tf.shape(x)[:1], tf.ones([tf.rank(x) - 1], tf.int32)], 0)
    mask = tf.cast(generator.uniform(shape) < keep, x.dtype)
    return x * mask / keep


def drop_path_rates(max_rate, n_layers):
    """``torch.linspace(0, max_rate, n_layers)`` as the blocks' rates (ViT-B: 0, 0.00909, …, 0.1)."""
    return [float(r) for r in np.linspace(0.0, max_rate, n_layers, dtype=np.float32)]


class Attention(TorchModule):
    """Segmenter ``Attention`` (``blocks.py``): multi-head self-attention WITHOUT any mask.

    x [B, N, D] → ``qkv`` (D → 3D) viewed as [B, N, 3, heads, D/heads]: q, k, v are the first, second and third D
    outputs, heads are contiguous chunks of D/heads. logits = (q·kᵀ)·(D/heads)^−0.5, softmax over keys,
    heads concatenated in order, ``proj`` (D → D). [B, N, D].
    """

    def __init__(self, prefix, dim, heads, rng):
        super().__init__(prefix)
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = self.add_module(Linear(prefix + "qkv.", dim, 3 * dim, rng))
        self.proj = self.add_module(Linear(prefix + "proj.", dim, dim, rng))

    def __call__(self, x):
        batch, tokens, dim = tf.shape(x)[0], tf.shape(x)[1], x.shape[-1]
        qkv = tf.reshape(self.qkv(x), [batch, tokens, 3, self.heads, self.head_dim])
        q, k, v = tf.unstack(tf.transpose(qkv, [2, 0, 3, 1, 4]))            # each [B, heads, N, head_dim]
        attn = tf.nn.softmax(tf.matmul(q, k, transpose_b=True) * self.scale, axis=-1)
        out = tf.reshape(tf.transpose(tf.matmul(attn, v), [0, 2, 1, 3]), [batch, tokens, dim])
        return self.proj(out)


class FeedForward(TorchModule):
    """Segmenter ``FeedForward`` (the ``mlp`` of a block): ``fc1`` (D → d_ff), exact erf GELU (``nn.GELU()``, not
    the tanh form), ``fc2`` (d_ff → D)."""

    def __init__(self, prefix, dim, hidden_dim, rng):
        super().__init__(prefix)
        self.fc1 = self.add_module(Linear(prefix + "fc1.", dim, hidden_dim, rng))
        self.fc2 = self.add_module(Linear(prefix + "fc2.", hidden_dim, dim, rng))

    def __call__(self, x):
        return self.fc2(tf.nn.gelu(self.fc1(x), approximate=False))


class Block(TorchModule):
    """Segmenter ``Block`` — pre-norm transformer block (timm's ViT block semantics):

        x = x + DropPath(Attn(LN1(x)));  x = x + DropPath(MLP(LN2(x)))

    Parameters in state_dict order: norm1, norm2, attn (qkv, proj), mlp (fc1, fc2). [B, N, D] → [B, N, D].
    """

    def __init__(self, prefix, dim, heads, mlp_dim, rng, drop_path_rate=0.0, eps=TORCH_LAYER_NORM_EPS,
                 generator=None):
        super().__init__(prefix)
        self.norm1 = self.add_module(LayerNorm(prefix + "norm1.", dim, eps))
        self.norm2 = self.add_module(LayerNorm(prefix + "norm2.", dim, eps))
        self.attn = self.add_module(Attention(prefix + "attn.", dim, heads, rng))
        self.mlp = self.add_module(FeedForward(prefix + "mlp.", dim, mlp_dim, rng))
        self.drop_path_rate = drop_path_rate
        self.generator = generator

    def __call__(self, x, training=False):
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, training, self.generator)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, training, self.generator)


class PatchEmbedding(TorchModule):
    """Segmenter ``PatchEmbedding``: ``proj`` = Conv2d(C → D, kernel = stride = P, bias), weight OIHW
    [D, C, P, P] (xavier_uniform, bias 0).

    images [B, H, W, C] → tokens [B, (H/P)·(W/P), D], grid flattened row-major (torch's ``flatten(2)``).
    """

    def __init__(self, prefix, patch_size, dim, rng, channels=3):
        super().__init__(prefix)
        self.patch_size = patch_size
        self.weight = self.add_parameter("proj.weight", xavier_uniform((dim, channels, patch_size, patch_size), rng))
        self.bias = self.add_parameter("proj.bias", np.zeros(dim, np.float32))

    def __call__(self, images):
        kernel = tf.transpose(_like(self.weight, images), [2, 3, 1, 0])                # OIHW → HWIO
        y = tf.nn.conv2d(images, kernel, strides=self.patch_size, padding="VALID") + _like(self.bias, images)
        return tf.reshape(y, [tf.shape(y)[0], -1, self.weight.shape[0]])


class VisionTransformer(TorchModule):
    """Segmenter/ReSTR ``VisionTransformer`` (``model/vit.py``), ``forward(im, return_features=True)``.

    Parameters (state_dict order): ``cls_token`` [1,1,D], ``pos_embed`` [1,1+N,D] (N = grid of ``image_size``),
    ``patch_embed.proj``, ``blocks.{i}``, ``norm``, ``head`` ([n_cls, D]; loaded with the AugReg weights, never
    used by the features path).

    images [B, H, W, 3] → patch embedding → class token prepended → + position embedding (bilinearly resized when
    the grid differs from the construction grid, ``position_embedding``) → blocks → ``norm`` → [B, 1+N, D].
    """

    def __init__(self, prefix, image_size, patch_size, n_layers, d_model, d_ff, n_heads, rng, n_cls=1000,
                 drop_path_rate=0.0, eps=TORCH_LAYER_NORM_EPS, generator=None):
        super().__init__(prefix)
        if image_size[0] % patch_size or image_size[1] % patch_size:
            raise ValueError(f"image size {image_size} is not divisible by the patch size {patch_size}")
        self.patch_size = patch_size
        self.d_model = d_model
        self.grid_size = (image_size[0] // patch_size, image_size[1] // patch_size)
        num_patches = self.grid_size[0] * self.grid_size[1]
        self.cls_token = self.add_parameter("cls_token", trunc_normal((1, 1, d_model), rng))
        self.pos_embed = self.add_parameter("pos_embed", trunc_normal((1, 1 + num_patches, d_model), rng))
        self.patch_embed = self.add_module(PatchEmbedding(prefix + "patch_embed.", patch_size, d_model, rng))
        self.blocks = [self.add_module(Block(f"{prefix}blocks.{i}.", d_model, n_heads, d_ff, rng, rate, eps,
                                             generator))
                       for i, rate in enumerate(drop_path_rates(drop_path_rate, n_layers))]
        self.norm = self.add_module(LayerNorm(prefix + "norm.", d_model, eps))
        self.head = self.add_module(Linear(prefix + "head.", d_model, n_cls, rng))

    def position_embedding(self, grid):
        """``pos_embed`` for a (gh, gw) patch grid [1, 1+gh·gw, D]: as stored for the construction grid, else
        Segmenter's ``resize_pos_embed``: class part kept, grid part resized with torch bilinear
        (align_corners=False, no antialias)."""
        if tuple(grid) == self.grid_size:
            return self.pos_embed
        gh0, gw0 = self.grid_size
        grid_part = tf.reshape(self.pos_embed[:, 1:], [1, gh0, gw0, self.d_model])
        resized = tf.reshape(resize_bilinear(grid_part, grid), [1, grid[0] * grid[1], self.d_model])
        return tf.concat([self.pos_embed[:, :1], resized], axis=1)

    def __call__(self, images, training=False, taps=None):
        """images [B, H, W, 3] (static H, W divisible by P) → features [B, 1 + (H/P)(W/P), D].

        ``taps`` (a dict, optional) receives ``patch_embed``, ``tokens_plus_pos``, ``block{i}``, ``norm``.
        """
        taps = {} if taps is None else taps
        grid = (int(images.shape[1]) // self.patch_size, int(images.shape[2]) // self.patch_size)
        x = taps["patch_embed"] = self.patch_embed(images)
        cls = tf.tile(_like(self.cls_token, x), [tf.shape(x)[0], 1, 1])
        x = taps["tokens_plus_pos"] = tf.concat([cls, x], axis=1) + _like(self.position_embedding(grid), x)
        for i, block in enumerate(self.blocks):
            x = taps[f"block{i}"] = block(x, training)
        x = taps["norm"] = self.norm(x)
        return x
