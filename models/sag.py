"""SaG: Kim et al., "Shatter and Gather: Learning Referring Image Segmentation with Text Supervision" (ICCV 2023),
as built by kdwonn/SaG @ fb5329e7 (``model/cross_modal_attention.CrossModalAttentionRecon`` around
``model/encoders.ImageTextEncodersRecon``), with the flags of ``train_eval_unc.sh``. Spec: ``../shared/spec/sag.md``.

Data flow (full size: Dv = 384 ViT width, D = 512, Dt = 768, S = 36 slots in C = 12 groups of k = 3, G = 24 patch
grid at the 384 input, N = G², L tokens):

  images [B,384,384,3] ─ViT-S/16 (built for 480: table 30×30, bilinear to 24×24 at every forward)─▶ [B,1+N,Dv]
      class token dropped ─▶ img_feat [B,N,Dv] (the reconstruction target)
      ``spm_1x1`` (Dv → D) + 2-D sine position ─▶ context [B,N,D]
  slot noise [B,S,D] (an INPUT: the original draws it with torch.randn in every forward, eval included)
      slots₀ = mu[group] + exp(½·log_sigma[group])·noise ─▶ 6 × one weight-tied block:
        slot cross-attention (softmax over SLOTS, renormalised over patches) + residual, FF + residual,
        in-group self-attention over the k slots of each group + residual, FF + residual
      ``last_layer`` (Linear) ─▶ ``residual_norm`` (LN) ─▶ img_slot [B,S,D]
  ids [B,L] ─BERT (HF names)─▶ h [B,L,Dt] ─``linear``─▶ txt_emb = linear(h)[:, :1] [B,1,D] (the [CLS] state)
  ``cma``: every text t attends to the slots of every image i ─▶ cm_feat [B_img,B_txt,D] (L2-normalised)
  ``decoder``: every slot broadcast to the N positions + learned position ─MLP─▶ feature + alpha logit,
      alpha softmax over slots ─▶ img_feat_recon [B,N,Dv]

Variables: ``state_dict_variables()`` is the 1:1 table {PyTorch state_dict key: tf.Variable}; names are the keys of
the distinct parameters, shapes the PyTorch shapes (Linear [out, in], Conv OIHW). The weight-tied aggregator block is
ONE set of variables (named ``…agg_blocks.0.*``) listed under all six keys ``agg_blocks.{0..5}.*``, as the original
state_dict does (558 keys, 418 distinct tensors, 145,955,305 parameters at full size).

Faithful to the original, including what looks accidental: the ViT is built for 480×480 and its table resized
twice; LayerNorm eps 1e-5 (ViT, aggregator, cma) and 1e-12 (BERT); ``--agg_last_ln`` has no effect (no LayerNorm in
``last_layer``); ``residual_fc``, ``set_pred_module.fc``, the ViT head and the BERT pooler are built but unused (no
gradient; ``residual_fc``'s output is computed only when taps are asked for); the text embedding is the [CLS] hidden
state through ``linear``, not BERT's pooler. Dropout (aggregator ``to_out`` and FFs, cma ``to_out``, BERT) and the
ViT's DropPath run in training only, from a ``tf.random.Generator`` seeded by ``seed``.
"""
import math

import numpy as np
import tensorflow as tf

from models import bert, vit
from util import adamw
from util.torch_image import resize_bilinear
from util.vit_weights import augreg_state_dict

CROP_SIZE = 384                # --crop_size: input size and the reconstruction grid (G = 24)
CONSTRUCTION_SIZE = 480        # get_img_backbone hard-codes image_size (480, 480)
PATCH_SIZE = 16
AUGREG_S16_384_URL = ("https://storage.googleapis.com/vit_models/augreg/S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-"
                      "do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_384.npz")
LAYER_NORM_EPS = vit.TORCH_LAYER_NORM_EPS
SLOT_RENORM_EPS = 1e-7         # model/attention.Attention: attn / (attn.sum(-1) + 1e-7) for the slot type
L2_EPS = 1e-12                 # F.normalize
CMA_FF_MULT = 4                # TransformerLayer's ff_mult default (--agg_ff_mult does not reach the cma)
BERT_BASE = dict(vocab_size=30522, hidden=768, layers=12, heads=12, intermediate=3072, max_positions=512,
                 type_vocab_size=2, dropout_rate=0.1)


def _torch_linear_init(rng, d_in, d_out):
    """torch ``nn.Linear`` default init: weight (kaiming_uniform a=√5) and bias both U(±1/√d_in)."""
    bound = 1.0 / math.sqrt(d_in)
    return (rng.uniform(-bound, bound, (d_out, d_in)).astype(np.float32),
            rng.uniform(-bound, bound, d_out).astype(np.float32))


class Linear(vit.TorchModule):
    """``nn.Linear(d_in, d_out, bias)`` with torch's default init; weight [out, in]. [..., d_in] → [..., d_out]."""

    def __init__(self, prefix, d_in, d_out, rng, bias=True):
        super().__init__(prefix)
        weight, b = _torch_linear_init(rng, d_in, d_out)
        self.weight = self.add_parameter("weight", weight)
        self.bias = self.add_parameter("bias", b) if bias else None

    def __call__(self, x):
        y = tf.tensordot(x, self.weight, axes=[[x.shape.rank - 1], [1]])
        return y + self.bias if self.bias is not None else y


class PreNormAttention(vit.TorchModule):
    """``PreNorm(dim, Attention(dim, context_dim, heads, dim_head, attn_type), context_dim)``
    (``model/attention.py``); keys ``fn.to_{q,k,v}.weight`` (no bias), ``fn.to_out.0.*``, ``norm.*`` and, for
    cross-attention, ``norm_context.*``.

    x [B, Nq, D] (context [B, Nk, Dc], default the normalised x) → (out [B, Nq, D] = ``to_out`` output before any
    residual, attention [B, heads, Nq, Nk]). Heads are contiguous ``dim_head`` chunks; logits scaled by
    dim_head^−½. ``attn_type`` 'transformer': softmax over the keys (returned). 'slot': softmax over the QUERIES (the
    slots; this is the returned map), then each query's weights renormalised over the keys: w / (Σ_keys w + 1e-7).
    """

    def __init__(self, prefix, dim, heads, dim_head, rng, context_dim=None, attn_type="transformer",
                 dropout_rate=0.0, generator=None):
        super().__init__(prefix)
        inner = heads * dim_head
        self.heads, self.dim_head, self.attn_type = heads, dim_head, attn_type
        self.to_q = self.add_module(Linear(prefix + "fn.to_q.", dim, inner, rng, bias=False))
        self.to_k = self.add_module(Linear(prefix + "fn.to_k.", context_dim or dim, inner, rng, bias=False))
        self.to_v = self.add_module(Linear(prefix + "fn.to_v.", context_dim or dim, inner, rng, bias=False))
        self.to_out = self.add_module(Linear(prefix + "fn.to_out.0.", inner, dim, rng))
        self.norm = self.add_module(vit.LayerNorm(prefix + "norm.", dim, LAYER_NORM_EPS))
        self.norm_context = (self.add_module(vit.LayerNorm(prefix + "norm_context.", context_dim, LAYER_NORM_EPS))
                             if context_dim else None)
        self.dropout_rate, self.generator = dropout_rate, generator

    def _split(self, x):
        shape = tf.shape(x)
        return tf.transpose(tf.reshape(x, [shape[0], shape[1], self.heads, self.dim_head]), [0, 2, 1, 3])

    def __call__(self, x, context=None, training=False):
        x = self.norm(x)
        context = x if self.norm_context is None else self.norm_context(context)
        q, k, v = self._split(self.to_q(x)), self._split(self.to_k(context)), self._split(self.to_v(context))
        sim = tf.matmul(q, k, transpose_b=True) * (self.dim_head ** -0.5)          # [B, h, Nq, Nk]
        if self.attn_type == "slot":
            attn = tf.nn.softmax(sim, axis=2)
            weights = attn / (tf.reduce_sum(attn, axis=-1, keepdims=True) + SLOT_RENORM_EPS)
        else:
            attn = weights = tf.nn.softmax(sim, axis=-1)
        out = tf.transpose(tf.matmul(weights, v), [0, 2, 1, 3])
        shape = tf.shape(out)
        out = self.to_out(tf.reshape(out, [shape[0], shape[1], self.heads * self.dim_head]))
        return bert.dropout(out, self.dropout_rate, training, self.generator), attn


class PreNormFeedForward(vit.TorchModule):
    """``PreNorm(dim, FeedForward(dim, mult, activation='gelu'))``: keys ``fn.net.0.*`` (D → mult·D), ``fn.net.3.*``
    (mult·D → D), ``norm.*``. x → net.3(Dropout(GELU(net.0(LN(x))))) (exact GELU; no residual here)."""

    def __init__(self, prefix, dim, mult, rng, dropout_rate=0.0, generator=None):
        super().__init__(prefix)
        hidden = int(dim * mult)
        self.fc1 = self.add_module(Linear(prefix + "fn.net.0.", dim, hidden, rng))
        self.fc2 = self.add_module(Linear(prefix + "fn.net.3.", hidden, dim, rng))
        self.norm = self.add_module(vit.LayerNorm(prefix + "norm.", dim, LAYER_NORM_EPS))
        self.dropout_rate, self.generator = dropout_rate, generator

    def __call__(self, x, training=False):
        h = tf.nn.gelu(self.fc1(self.norm(x)), approximate=False)
        return self.fc2(bert.dropout(h, self.dropout_rate, training, self.generator))


def sine_position_2d(grid, dim):
    """``PositionEmbeddingSine2D(dim/2, normalize=True)`` (``model/pos_encoding.py``) for a G×G' grid → [G·G', dim]
    float32: y = row + 1, x = col + 1, each divided by (its last value + 1e-6) and times 2π; per half j = 0 … F−1
    (F = dim/2): value / 10000^(2⌊j/2⌋/F), sin at even j, cos at odd j; [y half ; x half], row-major."""
    feats = dim // 2
    gh, gw = grid
    y = np.arange(1, gh + 1, dtype=np.float32)
    x = np.arange(1, gw + 1, dtype=np.float32)
    scale = np.float32(2 * math.pi)
    y = y / (y[-1] + np.float32(1e-6)) * scale
    x = x / (x[-1] + np.float32(1e-6)) * scale
    dim_t = np.power(np.float32(10000), (2 * (np.arange(feats) // 2)).astype(np.float32) / np.float32(feats))

    def encode(values):
        angles = values[:, None] / dim_t.astype(np.float32)
        out = np.empty_like(angles)
        out[:, 0::2] = np.sin(angles[:, 0::2])
        out[:, 1::2] = np.cos(angles[:, 1::2])
        return out

    pos_y = np.broadcast_to(encode(y)[:, None, :], (gh, gw, feats))
    pos_x = np.broadcast_to(encode(x)[None, :, :], (gh, gw, feats))
    return np.concatenate([pos_y, pos_x], axis=-1).reshape(gh * gw, 2 * feats).astype(np.float32)


class Aggregator(vit.TorchModule):
    """``model/aggregator.Aggregator`` with SaG's flags, prefix ``encoders.img_enc.set_pred_module.agg.``: the
    entity-discovery module ("shatter").

    Parameters: ``queries.slots_mu`` / ``queries.slots_log_sigma`` [1, C, D]; ONE block (``agg_blocks.0``: ``0``
    slot cross-attention, ``2`` FF, ``4.0.0`` in-group self-attention, ``4.0.2`` FF) run ``depth`` times;
    ``last_layer.1`` (Linear D → D; the ``last_layer.0`` slot is an Identity).

    data [B, G, G', D], noise [B, S, D] → [B, S, D]. Slot s belongs to group ⌊s/k⌋.
    """

    def __init__(self, prefix, dim, num_slots, cascade, depth, cross_heads, cross_dim_head, latent_heads,
                 latent_dim_head, ff_mult, rng, var_scale=1.0, dropout_rate=0.0, generator=None):
        super().__init__(prefix)
        self.dim, self.num_slots, self.cascade, self.depth = dim, num_slots, cascade, depth
        groups = num_slots // cascade
        bound = math.sqrt(6.0 / (groups * dim + dim))                      # xavier_uniform on [1, C, D]
        self.slots_mu = self.add_parameter("queries.slots_mu", rng.uniform(-bound, bound, (1, groups, dim)))
        log_sigma = rng.uniform(-bound, bound, (1, groups, dim)).astype(np.float32)
        self.slots_log_sigma = self.add_parameter("queries.slots_log_sigma",
                                                  log_sigma + np.log(np.float32(1.0 / (dim * var_scale))))
        block = prefix + "agg_blocks.0."
        self.cross_attn = self.add_module(PreNormAttention(block + "0.", dim, cross_heads, cross_dim_head, rng,
                                                           context_dim=dim, attn_type="slot",
                                                           dropout_rate=dropout_rate, generator=generator))
        self.cross_ff = self.add_module(PreNormFeedForward(block + "2.", dim, ff_mult, rng, dropout_rate, generator))
        self.self_attn = self.add_module(PreNormAttention(block + "4.0.0.", dim, latent_heads, latent_dim_head, rng,
                                                          dropout_rate=dropout_rate, generator=generator))
        self.self_ff = self.add_module(PreNormFeedForward(block + "4.0.2.", dim, ff_mult, rng, dropout_rate,
                                                          generator))
        self.last_layer = self.add_module(Linear(prefix + "last_layer.1.", dim, dim, rng))
        self.block_prefix = block

    def state_dict_variables(self):
        """The table with the shared block under all ``depth`` keys ``agg_blocks.{t}.*`` (the same variables)."""
        own = super().state_dict_variables()
        block = {k[len(self.block_prefix):]: v for k, v in own.items() if k.startswith(self.block_prefix)}
        out = {k: v for k, v in own.items() if k.startswith(self.prefix + "queries.")}
        for t in range(self.depth):
            out.update({f"{self.prefix}agg_blocks.{t}.{k}": v for k, v in block.items()})
        out.update({k: v for k, v in own.items() if k.startswith(self.prefix + "last_layer.")})
        return out

    def initial_slots(self, noise):
        """``Queries.forward`` (type 'entity'): repeat(mu) + exp(½·repeat(log_sigma)) ⊙ noise, [B, S, D]."""
        mu = tf.repeat(self.slots_mu, self.cascade, axis=1)
        sigma = tf.exp(tf.repeat(self.slots_log_sigma, self.cascade, axis=1) * 0.5)
        return mu + sigma * noise

    def __call__(self, data, noise, training=False, taps=None):
        taps = {} if taps is None else taps
        batch, gh, gw = tf.shape(data)[0], int(data.shape[1]), int(data.shape[2])
        pos = taps["pos_enc"] = tf.tile(sine_position_2d((gh, gw), self.dim)[None], [batch, 1, 1])
        context = taps["context"] = tf.reshape(data, [batch, gh * gw, self.dim]) + pos
        x = taps["queries"] = self.initial_slots(noise)
        groups = self.num_slots // self.cascade
        for t in range(self.depth):
            out, attn = self.cross_attn(x, context, training)
            taps[f"iter{t}.cross_attn_softmax"], taps[f"iter{t}.cross_out"] = attn, out
            x = taps[f"iter{t}.after_cross"] = out + x
            x = taps[f"iter{t}.after_cross_ff"] = self.cross_ff(x, training) + x
            x = tf.reshape(x, [batch * groups, self.cascade, self.dim])
            out, attn = self.self_attn(x, training=training)
            taps[f"iter{t}.self_attn_softmax"] = tf.reshape(attn, [batch, groups] + attn.shape[1:].as_list())
            taps[f"iter{t}.self_out"] = tf.reshape(out, [batch, self.num_slots, self.dim])
            x = out + x
            x = self.self_ff(x, training) + x
            x = taps[f"iter{t}.slots"] = tf.reshape(x, [batch, self.num_slots, self.dim])
        return self.last_layer(x)


class MlpDecoder(vit.TorchModule):
    """``model/decoder.MlpDecoder`` (prefix ``decoder.``): ``pos_emb.{row,col}_embed.weight`` [50, D/2]
    (``PositionEmbeddingLearned2D``, init U[0, 1)), ``mlp.{0,2,4}`` (D → D, ReLU), ``mlp.6`` (D → Dv + 1).

    slots [B, S, D] → each slot + pos[n] for the G×G' positions (pos(r, c) = [col_embed[c] ; row_embed[r]]) → MLP →
    feature [B, S, N, Dv] and alpha = softmax over the SLOTS of the last channel → recon [B, N, Dv] = Σ_s alpha·feat.
    """

    def __init__(self, prefix, dim, feat_dim, rng, max_grid=50):
        super().__init__(prefix)
        self.row_embed = self.add_parameter("pos_emb.row_embed.weight", rng.uniform(0, 1, (max_grid, dim // 2)))
        self.col_embed = self.add_parameter("pos_emb.col_embed.weight", rng.uniform(0, 1, (max_grid, dim // 2)))
        self.mlp = [self.add_module(Linear(f"{prefix}mlp.{j}.", dim, dim, rng)) for j in (0, 2, 4)]
        self.out = self.add_module(Linear(prefix + "mlp.6.", dim, feat_dim + 1, rng))

    def position(self, grid):
        """[G·G', D]: (r, c) → [col_embed[c] ; row_embed[r]], row-major."""
        gh, gw = grid
        cols = tf.tile(self.col_embed[None, :gw], [gh, 1, 1])
        rows = tf.tile(self.row_embed[:gh, None], [1, gw, 1])
        return tf.reshape(tf.concat([cols, rows], axis=-1), [gh * gw, -1])

    def __call__(self, slots, grid, taps=None):
        taps = {} if taps is None else taps
        pos = self.position(grid)
        taps["pos_emb"] = tf.tile(pos[None], [tf.shape(slots)[0], 1, 1])
        x = slots[:, :, None, :] + pos[None, None]
        for layer in self.mlp:
            x = tf.nn.relu(layer(x))
        decoded = taps["mlp"] = self.out(x)
        alpha = taps["alpha"] = tf.nn.softmax(decoded[..., -1], axis=1)
        recon = taps["recon"] = tf.einsum("bsnd,bsn->bnd", decoded[..., :-1], alpha)
        return recon


class CrossModalAttention(vit.TorchModule):
    """``TransformerLayer`` of ``CrossModalAttentionRecon.cma`` ("gather"): ``attn`` (pre-norm transformer-type
    attention with a context LayerNorm) and ``ff`` (pre-norm FF, no dropout inside), residuals; ``last_norm`` /
    ``last_fc`` are Identities with pre-norm.

    txt_emb [B_txt, 1, D], img_slot [B_img, S, D] → cm_feat [B_img, B_txt, D] = l2norm(layer(Q[i] = all texts,
    context = slots of image i)), and the relevance attention [B_img, heads, B_txt, S].
    """

    def __init__(self, prefix, dim, heads, dim_head, ff_mult, rng, dropout_rate=0.0, generator=None):
        super().__init__(prefix)
        self.attn = self.add_module(PreNormAttention(prefix + "attn.", dim, heads, dim_head, rng, context_dim=dim,
                                                     dropout_rate=dropout_rate, generator=generator))
        self.ff = self.add_module(PreNormFeedForward(prefix + "ff.", dim, ff_mult, rng))

    def __call__(self, txt_emb, img_slot, training=False, taps=None):
        taps = {} if taps is None else taps
        queries = taps["query_in"] = tf.tile(tf.transpose(txt_emb, [1, 0, 2]), [tf.shape(img_slot)[0], 1, 1])
        out, attn = self.attn(queries, img_slot, training)
        taps["attn_softmax"], taps["attn_out"] = attn, out
        x = queries + out
        ff = taps["ff_out"] = self.ff(x, training)
        x = taps["out"] = ff + x
        return x / tf.maximum(tf.norm(x, axis=-1, keepdims=True), L2_EPS), attn


class SaG(vit.TorchModule):
    """The SaG model (``CrossModalAttentionRecon``): ``encoders.img_enc`` (ViT, ``spm_1x1``, ``set_pred_module``,
    ``residual_fc``), ``encoders.txt_enc`` (``bert``, ``linear``), ``cma``, ``decoder``.

    Args (defaults = ``train_eval_unc.sh``):
      crop_size: input H = W (``--crop_size``; also the decoder's grid crop_size/16).
      construction_size, patch_size, vit_dim, vit_heads, vit_layers, vit_drop_path_rate: the ViT-S/16.
      embed_dim: D; num_slots, cascade: S and k (C = S/k groups); agg_depth; cross_heads, cross_dim_head;
      latent_heads, latent_dim_head; ff_mult; var_scale (``--agg_var_scaling``).
      cma_heads, cma_dim_head; dropout: ``--dropout`` (aggregator and cma ``to_out``/FFs).
      bert_config: ``BertModel`` keyword arguments (``BERT_BASE``; ``dropout_rate`` is BERT's own dropout).
      n_cls: the unused ViT head; seed: numpy seed of the initial values and of the dropout generator.
      rng: a numpy ``Generator`` for the initial values instead of ``seed``'s (anything with ``uniform``,
        ``normal`` and ``standard_normal``; a constant one makes a weights-to-be-loaded build cheap).
    """

    def __init__(self, crop_size=CROP_SIZE, construction_size=CONSTRUCTION_SIZE, patch_size=PATCH_SIZE, vit_dim=384,
                 vit_heads=6, vit_layers=12, vit_drop_path_rate=0.1, embed_dim=512, num_slots=36, cascade=3,
                 agg_depth=6, cross_heads=4, cross_dim_head=256, latent_heads=4, latent_dim_head=128, ff_mult=4,
                 var_scale=1.0, cma_heads=4, cma_dim_head=256, dropout=0.1, bert_config=None, n_cls=1000, seed=0,
                 rng=None):
        super().__init__("")
        rng = np.random.default_rng(seed) if rng is None else rng
        self.generator = tf.random.Generator.from_seed(seed)
        self.crop_size, self.patch_size = crop_size, patch_size
        self.grid = (crop_size // patch_size, crop_size // patch_size)
        self.num_slots, self.embed_dim = num_slots, embed_dim
        img, txt = "encoders.img_enc.", "encoders.txt_enc."
        self.vit = self.add_module(vit.VisionTransformer(
            img + "img_backbone.", (construction_size, construction_size), patch_size, vit_layers, vit_dim,
            4 * vit_dim, vit_heads, rng, n_cls, vit_drop_path_rate, LAYER_NORM_EPS, self.generator))
        self.spm_1x1 = self.add_module(Linear(img + "spm_1x1.", vit_dim, embed_dim, rng))
        spm = vit.TorchModule(img + "set_pred_module.")
        self.residual_norm = spm.add_module(vit.LayerNorm(spm.prefix + "residual_norm.", embed_dim, LAYER_NORM_EPS))
        spm.add_module(Linear(spm.prefix + "fc.", embed_dim, 1024, rng))
        self.agg = spm.add_module(Aggregator(
            spm.prefix + "agg.", embed_dim, num_slots, cascade, agg_depth, cross_heads, cross_dim_head,
            latent_heads, latent_dim_head, ff_mult, rng, var_scale, dropout, self.generator))
        self.add_module(spm)
        self.residual_fc = self.add_module(Linear(img + "residual_fc.", vit_dim, embed_dim, rng))
        config = dict(BERT_BASE if bert_config is None else bert_config)
        self.bert = self.add_module(bert.BertModel(txt + "bert.", rng, generator=self.generator, **config))
        self.txt_linear = self.add_module(Linear(txt + "linear.", config["hidden"], embed_dim, rng))
        self.cma = self.add_module(CrossModalAttention("cma.", embed_dim, cma_heads, cma_dim_head, CMA_FF_MULT, rng,
                                                       dropout, self.generator))
        self.decoder = self.add_module(MlpDecoder("decoder.", embed_dim, vit_dim, rng))

    def slot_noise(self, batch, generator):
        """N(0, 1) slot noise [batch, S, D] from a ``tf.random.Generator`` (what ``Queries.forward`` draws)."""
        return generator.normal([batch, self.num_slots, self.embed_dim])

    def encode_image(self, images, noise, training, taps):
        """images [B, H, W, 3] → (img_slot [B, S, D], img_feat [B, N, Dv])."""
        tokens = self.vit(images, training, taps["vit"])
        batch, dv = tf.shape(tokens)[0], tokens.shape[-1]
        grid = (int(images.shape[1]) // self.patch_size, int(images.shape[2]) // self.patch_size)
        patches = taps["img"]["patch_tokens"] = tf.reshape(tokens[:, 1:], [batch, grid[0], grid[1], dv])
        data = taps["img"]["spm_1x1"] = self.spm_1x1(patches)
        if taps["want"]:
            taps["img"]["residual_fc"] = self.residual_fc(tf.reduce_mean(tf.reshape(patches, [batch, -1, dv]), 1))
        set_prediction = taps["agg"]["set_prediction"] = self.agg(data, noise, training, taps["agg"])
        img_slot = taps["img"]["slots"] = self.residual_norm(set_prediction)
        return img_slot, tf.reshape(patches, [batch, grid[0] * grid[1], dv])

    def encode_text(self, ids, training, taps):
        """ids [B, L] (0 = [PAD]) → (txt_emb [B, 1, D], txt_bert = h[:, 0] [B, Dt])."""
        bert_taps = {}
        outputs = self.bert(ids, tf.not_equal(ids, 0), training, bert_taps)
        h = outputs["last_hidden_state"]
        words = self.txt_linear(h)
        taps["txt"].update({"bert_embeddings": bert_taps["embeddings"], "bert_last_hidden": h,
                            "bert_pooler": outputs["pooler_output"], "linear": words, "emb": words[:, :1],
                            "bert_cls": h[:, 0]})
        taps["txt"].update({f"bert_{k}": v for k, v in bert_taps.items() if k.startswith("layer")})
        return words[:, :1], h[:, 0]

    def __call__(self, images, ids, slot_noise, training=False, taps=None):
        """images [B, H, W, 3] float32 in [−1, 1] (``preprocess``; H = W = crop_size), ids int [B, L] (0-padded),
        slot_noise [B, S, D] → {``cm_feat`` [B, B, D], ``img_slot`` [B, S, D], ``txt_emb`` [B, 1, D],
        ``img_feat_recon`` [B, N, Dv], ``img_feat`` [B, N, Dv], ``txt_bert`` [B, Dt], ``slot_attn`` [B, depth, S, N]
        (head-mean softmax-over-slots map of every iteration), ``relevance`` [B, S] (head-mean cma attention of
        image i to its own text i)}.

        ``taps`` (optional dict) receives every stage under the golden's names (``vit.*``, ``img.*``, ``agg.*``,
        ``txt.*``, ``dec.*``, ``cma.*``, ``out.*``)."""
        parts = {name: {} for name in ("vit", "img", "agg", "txt", "dec", "cma")}
        parts["want"] = taps is not None
        ids = tf.convert_to_tensor(ids)
        img_slot, img_feat = self.encode_image(images, slot_noise, training, parts)
        txt_emb, txt_bert = self.encode_text(ids, training, parts)
        recon = self.decoder(img_slot, self.grid, parts["dec"])
        cm_feat, cma_attn = self.cma(txt_emb, img_slot, training, parts["cma"])
        depth = self.agg.depth
        slot_attn = tf.stack([tf.reduce_mean(parts["agg"][f"iter{t}.cross_attn_softmax"], axis=1)
                              for t in range(depth)], axis=1)
        relevance = tf.linalg.diag_part(tf.transpose(tf.reduce_mean(cma_attn, axis=1), [2, 0, 1]))
        outputs = {"cm_feat": cm_feat, "img_slot": img_slot, "txt_emb": txt_emb, "img_feat_recon": recon,
                   "img_feat": img_feat, "txt_bert": txt_bert, "slot_attn": slot_attn,
                   "relevance": tf.transpose(relevance)}
        if taps is not None:
            for part in ("vit", "img", "agg", "txt", "dec", "cma"):
                taps.update({f"{part}.{k}": v for k, v in parts[part].items()})
            taps["vit.pos_embed_resized"] = self.vit.position_embedding(
                (int(images.shape[1]) // self.patch_size, int(images.shape[2]) // self.patch_size))
            taps.update({f"out.{k}": outputs[k] for k in ("cm_feat", "img_slot", "txt_emb", "img_feat_recon",
                                                          "img_feat", "txt_bert")})
        return outputs

    def distinct_variables(self):
        """{key: tf.Variable} with every variable once (the tied block under its ``agg_blocks.0`` key)."""
        out, seen = {}, set()
        for key, var in self.state_dict_variables().items():
            if id(var) not in seen:
                seen.add(id(var))
                out[key] = var
        return out

    def load_state_dict(self, state_dict, source="state_dict"):
        """Assign {PyTorch key: array} strictly (every key of ``state_dict_variables()``, incl. the six aliases of the
        tied block, present with its shape; no other key); aliases must hold equal values. One line naming
        ``source`` and the first offending key, before anything is assigned."""
        variables = self.state_dict_variables()
        for key, var in variables.items():
            if key not in state_dict:
                raise ValueError(f"{source}: missing key {key} (expected {len(variables)} SaG state_dict keys)")
            if tuple(np.shape(state_dict[key])) != tuple(var.shape):
                raise ValueError(f"{source}: {key} has shape {tuple(np.shape(state_dict[key]))}, the model expects "
                                 f"{tuple(var.shape)}")
        unexpected = [key for key in state_dict if key not in variables]
        if unexpected:
            raise ValueError(f"{source}: unexpected key {unexpected[0]} ({len(unexpected)} not in the model)")
        first = {}
        for key, var in variables.items():
            if id(var) in first and not np.array_equal(state_dict[key], state_dict[first[id(var)]]):
                raise ValueError(f"{source}: {key} differs from {first[id(var)]} (weight-tied in SaG)")
            first.setdefault(id(var), key)
        for key, var in self.distinct_variables().items():
            var.assign(np.asarray(state_dict[key], np.float32))

    def load_augreg(self, path):
        """Initialise the ViT from a Google AugReg ``.npz`` (``vit_small_patch16_384``) as timm's loader does for
        SaG: table bicubic-resized to the 480 construction grid (``util.vit_weights``)."""
        if not tf.io.gfile.exists(str(path)):
            raise FileNotFoundError(f"{path}: no such file; SaG starts from the AugReg ViT-S/16 (384) weights at "
                                    f"{AUGREG_S16_384_URL}")
        weights = augreg_state_dict(path, len(self.vit.blocks), self.vit.grid_size, self.vit.head.weight.shape[0],
                                    key_prefix=self.vit.prefix)
        variables = self.vit.state_dict_variables()
        for key, value in weights.items():
            if tuple(value.shape) != tuple(variables[key].shape):
                raise ValueError(f"{path}: {key} has shape {value.shape}, the model expects "
                                 f"{tuple(variables[key].shape)}")
            variables[key].assign(value)


def input_image(rgb_uint8, size=CROP_SIZE):
    """``get_image_transform`` (train and test alike, ``--use_aug`` off): PIL ``Resize((size, size))`` — bilinear
    with PIL's anti-aliasing, aspect ratio NOT kept — then ``ToTensor`` and ``Normalize(0.5, 0.5)``. uint8 RGB
    [H, W, 3] (or [H, W]: converted to RGB as ``.convert('RGB')``) → float32 [size, size, 3] in [−1, 1]."""
    from PIL import Image

    image = Image.fromarray(np.asarray(rgb_uint8, np.uint8)).convert("RGB").resize((size, size), Image.BILINEAR)
    return ((np.asarray(image, np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)).astype(np.float32)


def preprocess(images):
    """``Normalize(0.5, 0.5)`` after ``ToTensor``: RGB [..., 3] (uint8 or float 0 … 255) → (x/255 − 0.5)/0.5."""
    return (tf.cast(images, tf.float32) / 255.0 - 0.5) / 0.5


# --------------------------------------------------------------------------------------------- training
LEARNING_RATE = 1e-5           # --lr
WEIGHT_DECAY = 1e-4            # --weight_decay (decoupled, every parameter with a gradient)
IMG_LR_SCALE = 0.1             # --img_lr_scale (the ViT)
IMG_SPM_LR_SCALE = 1.0         # --img_spm_lr_scale (image encoder minus the ViT)
TXT_LR_SCALE = 1.0             # --txt_lr_scale (BERT + linear)
WARMUP_ITER = 5000             # --lr_warmup_iter: loss scaling below it, cosine from it
GRAD_CLIP = 0.1                # --grad_clip: global L2 norm
RECON_WEIGHT = 1.0             # --recon_weight
BATCH_SIZE = 32
NUM_EPOCHS = 50
THRESHOLD = 0.5                # --pseudo_threshold
UNUSED_PREFIXES = ("encoders.img_enc.img_backbone.head.", "encoders.txt_enc.bert.pooler.",
                   "encoders.img_enc.set_pred_module.fc.", "encoders.img_enc.residual_fc.")


def losses(outputs, recon_weight=RECON_WEIGHT):
    """``CMA_Loss`` (info_nce, τ = 1, ``--cma_detach_target``) + ``nn.MSELoss`` reconstruction, as coded.

    sim[t, i] = ⟨stop_gradient(txt_emb[t]), cm_feat[i, t]⟩ (the text target is neither normalised nor trained from
    this side); loss_cm = mean_t (logsumexp_i sim[t, i] − sim[t, t]) (cross-entropy with the matching image first);
    loss_recon = mean((img_feat_recon − stop_gradient(img_feat))²); loss = loss_cm + recon_weight·loss_recon.
    """
    txt = tf.stop_gradient(outputs["txt_emb"][:, 0])
    sim = tf.einsum("td,itd->ti", txt, outputs["cm_feat"])
    loss_cm = tf.reduce_mean(tf.reduce_logsumexp(sim, axis=1) - tf.linalg.diag_part(sim))
    loss_recon = tf.reduce_mean(tf.square(outputs["img_feat_recon"] - tf.stop_gradient(outputs["img_feat"])))
    return {"loss_cm": loss_cm, "loss_recon": loss_recon, "loss": loss_cm + recon_weight * loss_recon}


def meter_average(values):
    """``utils.AverageMeter``'s ``avg`` of the per-batch losses (float32): Σ values / (count + 0.0001) — the
    original's 1e-4 in the denominator biases every reported mean (training and validation loss) by −1e-4·avg."""
    values = [tf.cast(v, tf.float32) for v in values]
    return tf.add_n(values) / (len(values) + 0.0001)


def warmup_scale(total_iter, warmup_iter=WARMUP_ITER):
    """``train_cma_recon.train``'s "warm-up": the LOSS (not the lr) is multiplied by total_iter/warmup_iter while
    total_iter (1, 2, …) < warmup_iter, else 1 — float32 of the float64 ratio (a Python int or a tensor)."""
    t = tf.cast(total_iter, tf.float64)
    return tf.cast(tf.where(t < warmup_iter, t / warmup_iter, tf.constant(1.0, tf.float64)), tf.float32)


def cosine_table(base_lr, t_max, warmup_iter=WARMUP_ITER, num_steps=None):
    """float64 [num_steps]: the learning rate of update number t = 0, 1, … (iteration t + 1).

    ``CosineAnnealingLR(T_max)`` is stepped after the update of every iteration with total_iter ≥ warmup_iter, so
    update t runs after k = max(0, t + 1 − warmup_iter) scheduler steps; the value is torch's recursive form
    lr_k = lr_{k−1}·(1 + cos(πk/T))/(1 + cos(π(k−1)/T)) (eta_min 0; ``(k − 1 − T) % 2T == 0`` takes torch's other
    branch), in Python floats. Groups scale it by their multiplier (torch recurses per group: ≤ 1 ulp apart).
    """
    num_steps = t_max if num_steps is None else num_steps
    by_k = [base_lr]
    for k in range(1, max(0, num_steps - warmup_iter + 1) + 1):
        if (k - 1 - t_max) % (2 * t_max) == 0:
            by_k.append(by_k[-1] + base_lr * (1 - math.cos(math.pi / t_max)) / 2)
        else:
            by_k.append((1 + math.cos(math.pi * k / t_max)) / (1 + math.cos(math.pi * (k - 1) / t_max)) * by_k[-1])
    return np.array([by_k[max(0, t + 1 - warmup_iter)] for t in range(num_steps)], np.float64)


def optim_groups(model, img_lr_scale=IMG_LR_SCALE, img_spm_lr_scale=IMG_SPM_LR_SCALE, txt_lr_scale=TXT_LR_SCALE):
    """``train_cma_recon.main``'s five AdamW groups as [({key: var}, lr multiplier)]: 0 ``cma``, 1 ``decoder``,
    2 the image encoder minus the ViT, 3 the ViT (``img_lr_scale``), 4 the text encoder. Parameters that never get a
    gradient (``UNUSED_PREFIXES``) are left out: torch skips them (no state, no decay)."""
    variables = {k: v for k, v in model.distinct_variables().items() if not k.startswith(UNUSED_PREFIXES)}

    def take(prefix, exclude=None):
        return {k: v for k, v in variables.items() if k.startswith(prefix) and not (exclude and k.startswith(exclude))}

    vit_prefix = "encoders.img_enc.img_backbone."
    return [(take("cma."), 1.0), (take("decoder."), 1.0), (take("encoders.img_enc.", vit_prefix), img_spm_lr_scale),
            (take(vit_prefix), img_lr_scale), (take("encoders.txt_enc."), txt_lr_scale)]


def make_optimizer(model, lr=LEARNING_RATE, t_max=None, warmup_iter=WARMUP_ITER, weight_decay=WEIGHT_DECAY,
                   num_steps=None, **scales):
    """``torch.optim.AdamW(optim_groups, lr, weight_decay)`` driven by ``cosine_table`` (``t_max`` =
    len(train_loader)·num_epochs)."""
    t_max = (num_steps or 1) if t_max is None else t_max
    return adamw.AdamW(optim_groups(model, **scales), cosine_table(lr, t_max, warmup_iter, num_steps or t_max),
                       weight_decay)


def clip_by_global_norm(grads, max_norm=GRAD_CLIP):
    """``clip_grad_norm_(parameters, max_norm)``: total = ‖(‖g‖₂ per tensor)‖₂ over the gradients present;
    every gradient × min(1, max_norm/(total + 1e-6)). Returns (clipped {name: grad}, total)."""
    present = {k: g for k, g in grads.items() if g is not None}
    total = tf.norm(tf.stack([tf.norm(g) for g in present.values()]))
    coef = tf.minimum(max_norm / (total + 1e-6), 1.0)
    return {k: g * coef for k, g in present.items()}, total


def train_step(model, optimizer, images, ids, slot_noise, total_iter=None, warmup_iter=WARMUP_ITER,
               recon_weight=RECON_WEIGHT, grad_clip=GRAD_CLIP):
    """One iteration of ``train_cma_recon.train``: training-mode forward, ``losses``, the loss scaled by
    ``warmup_scale(total_iter)`` (total_iter counts from 1; default: the optimizer's update count + 1, which a
    resumed snapshot keeps), gradients, ``clip_by_global_norm``, one AdamW update. Works eagerly and in a
    ``tf.function``. Returns {loss_cm, loss_recon, loss, loss_backward, grad_total_norm, grads (clipped), lrs (the
    groups' lr used)}."""
    total_iter = optimizer.step + 1 if total_iter is None else total_iter
    groups = [variables for variables, _ in optimizer.groups]
    names = [k for variables in groups for k in variables]
    variables = [v for g in groups for v in g.values()]
    with tf.GradientTape() as tape:
        outputs = model(images, ids, slot_noise, training=True)
        parts = losses(outputs, recon_weight)
        loss_backward = parts["loss"] * warmup_scale(total_iter, warmup_iter)
    grads = tape.gradient(loss_backward, variables)
    grads = {k: (tf.convert_to_tensor(g) if g is not None else None) for k, g in zip(names, grads)}
    clipped, total = clip_by_global_norm(grads, grad_clip)
    lrs = optimizer.group_learning_rates()
    optimizer.apply_gradients(clipped)
    return dict(parts, loss_backward=loss_backward, grad_total_norm=total, grads=clipped, lrs=lrs)


# --------------------------------------------------------------------------------------------- evaluation
VARIANTS = ("max_cm", "avg_cm", "no_cm", "min_cm")


def relevance_maps(slot_attn, relevance):
    """``eval_seg``'s four maps of one sample from the LAST iteration's head-mean slot map A [S, N] and the
    relevance r [S] (float32): max_cm = A[argmax r], avg_cm = Σ_s r[s]·A[s] (the reported one), no_cm = mean_s A,
    min_cm = A[argmin r]."""
    a = np.asarray(slot_attn, np.float32)
    r = np.asarray(relevance, np.float32)
    return {"max_cm": a[int(np.argmax(r))], "avg_cm": (r[:, None] * a).sum(axis=0, dtype=np.float32),
            "no_cm": a.mean(axis=0, dtype=np.float32), "min_cm": a[int(np.argmin(r))]}


def iou_map(relevance_map, label, threshold=THRESHOLD):
    """``get_IoU_map``: map [G·G] → [G, G] → bilinear (align_corners False) to the label's [h, w] → min-max
    normalised AFTER the resize, (m − min)/(max − min + 1e-9) in float32 → hard = ≥ threshold; I, U against the
    label (bool [h, w]). Returns (resized [h, w] float32, hard [h, w] bool, I, U)."""
    label = np.asarray(label, bool)
    grid = int(round(math.sqrt(np.size(relevance_map))))
    m = np.asarray(relevance_map, np.float32).reshape(1, grid, grid, 1)
    resized = np.asarray(resize_bilinear(m, label.shape))[0, :, :, 0]
    normed = (resized - resized.min()) / (resized.max() - resized.min() + np.float32(1e-9))
    hard = normed >= threshold
    return resized, hard, np.sum(np.logical_and(hard, label)), np.sum(np.logical_or(hard, label))


def seg_metrics(records, names=("cIoU", "mIoU", "prec", "recall")):
    """``eval_seg``'s dict from per-sample records {variant: (I, U, Σhard, Σlabel)} in data-set order, accumulated
    as the original (Python/numpy float64, same order): cIoU = 100·ΣI/ΣU; mIoU = Σ(I/U)·(100/n); prec = Σ(I/Σhard,
    0 when I = 0)·(100/n); recall = Σ(I/Σlabel)·(100/n). Keys ``max_*`` and ``avg_*`` (``names`` renames the four
    metrics, e.g. ``validation()`` says ``precision``)."""
    n = len(records)
    out = {}
    for variant, prefix in (("max_cm", "max"), ("avg_cm", "avg")):
        cum_i = cum_u = miou = prec = recall = 0.0
        for record in records:
            i, u, hard_sum, label_sum = record[variant]
            cum_i += i
            cum_u += u
            prec += (i / hard_sum if i != 0 else 0)
            recall += i / label_sum
            miou += i / u
        values = (100 * (cum_i / cum_u), miou * (100 / n), prec * (100 / n), recall * (100 / n))
        out.update({f"{prefix}_{name}": float(v) for name, v in zip(names, values)})
    return out


def evaluate_sample(slot_attn_last, relevance, label, threshold=THRESHOLD):
    """One sample of ``eval_seg``: {variant: {map, resized, hard, I, U}} and its record for ``seg_metrics``."""
    out, record = {}, {}
    for variant, m in relevance_maps(slot_attn_last, relevance).items():
        resized, hard, i, u = iou_map(m, label, threshold)
        out[variant] = {"map": m, "resized": resized, "hard": hard, "I": i, "U": u}
        record[variant] = (i, u, hard.sum(), np.asarray(label, bool).sum())
    return out, record
