"""TRIS: Liu et al., "Referring Image Segmentation Using Text Supervision" (ICCV 2023), as built by fawnliu/TRIS
@ c6666b3b: the stage-1 localisation network (``model/model_stage1.py:TRIS``, with ``model/attn.py:
bilateral_prompt``) and the stage-2 segmentation network (``model/model_stage2.py:TRIS``, with
``model/attn.py:PixelAttention`` and ``ConvBNRelu``), their training losses (``train_stage1.train_one_epoch``,
``train_stage2.train_one_epoch``) and the evaluation's metrics (``validate.validate``).

Data flow, full size (S = 320, T = 20 tokens, h = 1024 = ``--hidden_dim``):

  stage 1: ids [N,T] ─CLIP text─▶ hidden [N,1024] ─``lan_project``─▶ lan [N,h] ─l2-norm─┐
           image [B,S,S,3] ─CLIP RN50─▶ c4 [B,S/32,S/32,2048] ─``vis_project``─▶ l2-norm ─┤
           ``attn_fusion`` (bilateral prompt) adds 0.1·(new_vis, new_lan) (not re-normalised) ─▶
           score = exp(``logit_scale``)·vis·lanᵀ [B,HW,N]; response map of image i = its i-th text's column,
           bilinearly upsampled (align_corners False) to S×S; eval output ReLU(map) [B,S,S,1].
  stage 2: ids ─CLIP text─▶ per-token ln_final features [B,T,512] (pads included); c1..c4 ─▶
           f_k = PixelAttention_k(c_k, words) + c_k (k = 2..4; c1 gets no language) ─▶ ConvBNPReLU decoder
           (``reduced_c*``, ``output4..1``, upsampling between scales) ─▶ ``final_seg1`` logits at S×S [B,S,S,1];
           training adds the side outputs of ``final_seg2..4``.

Variables: ``state_dict_variables()`` is {PyTorch state_dict key: tf.Variable} with PyTorch shapes, buffers included
(``models/clip.py`` conventions): stage 1 has 518 entries / 113,559,906 parameters at full size, stage 2 625 /
142,085,869. ``load_state_dict`` is strict (the original loads with ``strict=False``: a stage-2 checkpoint would
silently fill only the stage-1 backbone).

Faithful to the original (``../shared/spec/tris.md``), including what looks accidental: the fused features are not
re-normalised, the bilateral prompt's weight is a hard-coded 0.1, ``logit_scale`` (stage 1's own) is never trained,
the sentence embedding sits at argmax(ids) (position 0 for sentences whose end token was cut), no padding mask
anywhere, ImageNet normalisation on the CLIP backbone, the attention pool is computed by the original but unused
(skipped here: ``attnpool=False``; its parameters are kept so the keys map 1:1).
"""
import numpy as np
import tensorflow as tf

from models import clip, vit
from util.torch_image import resize_bilinear, resize_bilinear_align_corners

IMAGE_SIZE = 320                 # --size in every script
MAX_QUERY_LEN = 20               # --max_query_len
HIDDEN_DIM = 1024                # --hidden_dim
FUSION_WEIGHT = 0.1              # hard-coded in model_stage1.TRIS.forward (--attn_multi only switches it on)
IN_EPS = 1e-5                    # nn.InstanceNorm2d default
PRELU_INIT = 0.25                # nn.PReLU() default
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LOSS_WEIGHTS = (1.0, 0.0, 0.0, 5.0, 2.0)   # args.py w1..w5 since bbd887d
FOCAL_P = 3                      # --FOCAL_P
FOCAL_LAMBDA = 0.01              # --FOCAL_LAMBDA
CLIP_INPUT_SIZE = 224            # train_stage1.train_one_epoch's clip_input_size
EVAL_THRESHOLD = 1e-9            # validate.validate: pred.gt(1e-9) after max-normalisation

RN50 = dict(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3), vision_width=64,
            vision_patch_size=None, context_length=77, txt_length=MAX_QUERY_LEN, vocab_size=49408,
            transformer_width=512, transformer_heads=8, transformer_layers=12)
VIT_B32 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
               context_length=77, txt_length=MAX_QUERY_LEN, vocab_size=49408, transformer_width=512,
               transformer_heads=8, transformer_layers=12)


def preprocess(images):
    """``dataset/transform.py``'s ``to_tensor`` + ``normalize`` with ImageNet statistics (not CLIP's): RGB uint8
    [B, S, S, 3] (already stretched to S×S) → (x/255 − mean)/std, float32."""
    x = tf.cast(images, tf.float32) / 255.0
    return (x - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)


class InstanceNorm2d(vit.TorchModule):
    """``nn.InstanceNorm2d(C, affine=True)``: per sample and channel over H, W (biased variance, eps 1e-5, no running
    statistics), then ·weight + bias (1, 0 at init). [B, H, W, C]."""

    def __init__(self, prefix, channels):
        super().__init__(prefix)
        self.weight = self.add_parameter("weight", np.ones(channels, np.float32))
        self.bias = self.add_parameter("bias", np.zeros(channels, np.float32))

    def __call__(self, x):
        mean, variance = tf.nn.moments(x, axes=[1, 2], keepdims=True)
        return (x - mean) * tf.math.rsqrt(variance + IN_EPS) * self.weight + self.bias


def _flat(x):
    """[B, H, W, C] → [B, H·W, C] (row-major, torch's ``flatten(2).transpose(1, 2)``)."""
    return tf.reshape(x, [tf.shape(x)[0], -1, x.shape[-1]])


class BilateralPrompt(vit.TorchModule):
    """``model/attn.py:bilateral_prompt(vis_chans, lan_chans)`` (m = vis_chans), prefix ``attn_fusion.``.

    v_proj{1,2,3} = 1×1 conv, InstanceNorm (affine), ReLU; t_proj{1,2,3} = Linear, ReLU; v_output = 1×1 conv,
    InstanceNorm; t_output = Linear. With d the text channel count: Av = softmax over texts of Qv·Ktᵀ/√d [B, HW, N],
    At = softmax over pixels of Qt·Kvᵀ/√d [B, N, HW]; new_vis = v_output(Av·Vt), new_lan = t_output(At·Vv).
    vis [B, H, W, C], lan [B, N, C] → (new_vis [B, H, W, C], new_lan [B, N, C]).
    """

    def __init__(self, prefix, vis_chans, lan_chans, rng=None):
        super().__init__(prefix)
        m = vis_chans
        self.v_proj = [(self.add_module(clip.Conv2d(f"{prefix}v_proj{i}.0.", vis_chans, m, rng=rng)),
                        self.add_module(InstanceNorm2d(f"{prefix}v_proj{i}.1.", m))) for i in (1, 2, 3)]
        self.t_proj = [self.add_module(clip.Linear(f"{prefix}t_proj{i}.0.", lan_chans, m, rng)) for i in (1, 2, 3)]
        self.v_output = (self.add_module(clip.Conv2d(f"{prefix}v_output.0.", m, vis_chans, rng=rng)),
                         self.add_module(InstanceNorm2d(f"{prefix}v_output.1.", vis_chans)))
        self.t_output = self.add_module(clip.Linear(f"{prefix}t_output.0.", m, lan_chans, rng))

    def __call__(self, vis, lan, taps=None):
        taps = {} if taps is None else taps
        scale = float(lan.shape[-1]) ** -0.5
        qv, kv, vv = (tf.nn.relu(norm(conv(vis))) for conv, norm in self.v_proj)
        qt, kt, vt = (tf.nn.relu(linear(lan)) for linear in self.t_proj)
        for i, (v, t) in enumerate(((qv, qt), (kv, kt), (vv, vt))):
            taps[f"v_proj{i + 1}"], taps[f"t_proj{i + 1}"] = v, t
        av = taps["Av"] = tf.nn.softmax(tf.matmul(_flat(qv), kt, transpose_b=True) * scale, axis=2)
        at = taps["At"] = tf.nn.softmax(tf.matmul(qt, _flat(kv), transpose_b=True) * scale, axis=2)
        new_vis = tf.reshape(tf.matmul(av, vt), tf.shape(vis))
        conv, norm = self.v_output
        new_vis = taps["v_output"] = norm(conv(new_vis))
        new_lan = taps["t_output"] = self.t_output(tf.matmul(at, _flat(vv)))
        return new_vis, new_lan


def clip_config_from_state_dict(state_dict, prefix="backbone.", txt_length=MAX_QUERY_LEN, source="state_dict"):
    """TRIS's ``clip.build_model`` reading of the architecture from the backbone's keys (ResNet when there is no
    ``visual.proj``): widths, depths, resolution, vocabulary; heads = width // 64 (text), 32·width // 64 (ResNet)."""
    def get(key):
        if prefix + key not in state_dict:
            raise ValueError(f"{source}: not a TRIS CLIP state_dict (no {prefix}{key})")
        return np.shape(state_dict[prefix + key])

    def count(pattern_prefix):
        return len({k[len(prefix + pattern_prefix):].split(".")[0] for k in state_dict
                    if k.startswith(prefix + pattern_prefix)})

    width = get("ln_final.weight")[0]
    config = dict(embed_dim=get("text_projection")[1], context_length=get("positional_embedding")[0],
                  txt_length=txt_length, vocab_size=get("token_embedding.weight")[0], transformer_width=width,
                  transformer_heads=max(1, width // 64), transformer_layers=count("transformer.resblocks."))
    if prefix + "visual.proj" in state_dict:
        vision_width = get("visual.conv1.weight")[0]
        patch = get("visual.conv1.weight")[-1]
        grid = int(round((get("visual.positional_embedding")[0] - 1) ** 0.5))
        config.update(vision_layers=count("visual.transformer.resblocks."), vision_width=vision_width,
                      vision_patch_size=patch, image_resolution=patch * grid)
    else:
        grid = int(round((get("visual.attnpool.positional_embedding")[0] - 1) ** 0.5))
        config.update(vision_layers=tuple(count(f"visual.layer{i}.") for i in (1, 2, 3, 4)),
                      vision_width=get("visual.layer1.0.conv1.weight")[0], vision_patch_size=None,
                      image_resolution=32 * grid)
    return config


def load_state_dict_strict(module, state_dict, source, what):
    """Assign {PyTorch key: array} to ``module.state_dict_variables()`` (strict, as torch's ``strict=True``): every
    key present with its shape and no other key, else ONE line naming ``source``, the missing and unexpected keys
    (the first few of each, with counts), before anything is assigned."""
    variables = module.state_dict_variables()
    missing = [k for k in variables if k not in state_dict]
    unexpected = [k for k in state_dict if k not in variables]
    if missing or unexpected:
        def some(keys):
            return ", ".join(keys[:3]) + (f", … ({len(keys)} in all)" if len(keys) > 3 else "")
        parts = ([f"missing keys {some(missing)}"] if missing else []) + \
                ([f"unexpected keys {some(unexpected)}"] if unexpected else [])
        raise ValueError(f"{source}: not a {what} state_dict: {'; '.join(parts)}")
    for key, var in variables.items():
        shape = tuple(np.shape(state_dict[key]))
        if shape != tuple(var.shape):
            raise ValueError(f"{source}: {key} has shape {shape}, the {what} model expects {tuple(var.shape)}")
    for key, var in variables.items():
        var.assign(np.asarray(state_dict[key], var.dtype.as_numpy_dtype))


class TRISStage1(vit.TorchModule):
    """``model/model_stage1.py:TRIS`` (``--backbone clip-RN50``, ``--attn_multi`` > 0).

    Parameters in state_dict order: ``logit_scale`` (log(1/0.07), never optimised), ``backbone.*`` (the whole CLIP:
    both towers, attnpool, CLIP's own logit_scale), ``vis_project`` (1×1 conv 32w → h), ``lan_project``
    (Linear E → h), ``attn_fusion.*`` (bilateral prompt at h). Head initial values: torch's defaults from ``rng``
    (zeros without one).
    """

    stage = 1

    def __init__(self, clip_config=None, hidden_dim=HIDDEN_DIM, rng=None):
        super().__init__("")
        config = dict(RN50 if clip_config is None else clip_config)
        self.logit_scale = self.add_parameter("logit_scale", np.float32(clip.LOGIT_SCALE_INIT))
        self.backbone = self.add_module(clip.CLIP("backbone.", **config))
        vis_channels = config["vision_width"] * 32
        self.vis_project = self.add_module(clip.Conv2d("vis_project.", vis_channels, hidden_dim, rng=rng))
        self.lan_project = self.add_module(clip.Linear("lan_project.", config["embed_dim"], hidden_dim, rng))
        self.attn_fusion = self.add_module(BilateralPrompt("attn_fusion.", hidden_dim, hidden_dim, rng))

    @classmethod
    def from_state_dict(cls, state_dict, source="state_dict"):
        """The stage-1 model a state_dict describes (CLIP config from its keys, h from ``vis_project``, else the
        default), loaded strictly: another state_dict fails in one line naming its missing and unexpected keys."""
        hidden = np.shape(state_dict["vis_project.weight"])[0] if "vis_project.weight" in state_dict else HIDDEN_DIM
        model = cls(clip_config_from_state_dict(state_dict, source=source), hidden_dim=hidden)
        model.load_state_dict(state_dict, source)
        return model

    def load_state_dict(self, state_dict, source="state_dict"):
        load_state_dict_strict(self, state_dict, source, "TRIS stage-1")

    def __call__(self, images, ids, training=False, taps=None):
        """images [B, S, S, 3] (ImageNet-normalised), ids [N, T] (N ≥ B; image i's text is row i).

        Eval → ReLU(response map) [B, S, S, 1]. Training (backbone BatchNorms on batch statistics, running stats
        updated) → dict ``cls_out`` [B, N], ``cls_fg`` [B], ``relu_seg``, ``sig_seg`` [B, S, S, 1],
        ``logit_scale`` (= exp), plus ``score_t_with_bg`` [B, H, W, 1+N], ``softmax_masks``, ``focal_in``,
        ``focal_out`` [B, 1+N]. ``taps`` receives the intermediate stages (``img.*``, ``txt.*``, ``fusion.*``, …).
        """
        taps = {} if taps is None else taps
        size = (int(images.shape[1]), int(images.shape[2]))
        txt, img = {}, {}
        _, hidden = self.backbone.encode_text(ids, taps=txt)
        _, _, _, c4, _ = self.backbone.encode_image(images, training, taps=img, attnpool=False)
        taps.update({f"txt.{k}": v for k, v in txt.items()})
        taps.update({f"img.{k}": v for k, v in img.items()})
        taps["txt.hidden"] = hidden
        lan = taps["lan_project"] = self.lan_project(hidden)                                   # [N, h]
        vis = taps["vis_project"] = self.vis_project(c4)                                       # [B, h', w', h]
        batch = tf.shape(vis)[0]
        norm_vis = vis / tf.norm(vis, axis=-1, keepdims=True)
        lan = tf.tile(lan[tf.newaxis], [batch, 1, 1])                                          # [B, N, h]
        norm_lan = lan / tf.norm(lan, axis=-1, keepdims=True)
        taps["norm_vis_map"], taps["norm_lan"] = norm_vis, norm_lan
        fusion = {}
        new_vis, new_lan = self.attn_fusion(norm_vis, norm_lan, taps=fusion)
        taps.update({f"fusion.{k}": v for k, v in fusion.items()})
        fused_vis = taps["fused_vis"] = _flat(new_vis) * FUSION_WEIGHT + _flat(norm_vis)         # [B, HW, h]
        fused_lan = taps["fused_lan"] = new_lan * FUSION_WEIGHT + norm_lan                       # [B, N, h]
        cosine = taps["cosine"] = tf.matmul(fused_vis, fused_lan, transpose_b=True)            # [B, HW, N]
        scale = taps["logit_scale_exp"] = tf.exp(self.logit_scale)
        score = scale * cosine
        grid = tf.shape(vis)[1:3]
        score_maps = tf.reshape(score, tf.concat([[batch], grid, [-1]], 0))                    # [B, h', w', N]
        diagonal = tf.range(batch)
        masks_out = taps["masks_out"] = tf.transpose(
            tf.gather(tf.transpose(score_maps, [0, 3, 1, 2]), diagonal[:, None], batch_dims=1), [0, 2, 3, 1])
        seg = taps["seg_final_out"] = resize_bilinear(masks_out, size)
        if not training:
            return tf.nn.relu(seg)
        return dict(_classification(score_maps), relu_seg=tf.nn.relu(seg), sig_seg=tf.sigmoid(seg),
                    logit_scale=scale)


def focal_term(x, p=FOCAL_P, c=FOCAL_LAMBDA):
    """``model_stage1.focal_loss``: (1 − x)^p · log(c + x)."""
    return tf.pow(1.0 - x, p) * tf.math.log(c + x)


def _classification(score_maps):
    """Stage 1's training branch on score maps [B, H, W, N]: a background channel of ones prepended, softmax over
    the 1+N channels; cls = GAP + GMP of the scores + focal term of the mean softmax mask (background dropped);
    cls_fg = mean softmax mask of each image's own text."""
    bg = tf.ones_like(score_maps[..., :1])
    score_t = tf.concat([bg, score_maps], axis=-1)
    masks = tf.nn.softmax(score_t, axis=-1)
    features = _flat(score_t)
    focal_in = tf.reduce_mean(_flat(masks), axis=1)
    focal_out = focal_term(focal_in)
    cls_1 = tf.reduce_mean(features, axis=1) + tf.reduce_max(features, axis=1)
    fg_mean = focal_in[:, 1:]
    batch = tf.shape(fg_mean)[0]
    labels = tf.eye(batch, tf.shape(fg_mean)[1])
    return {"score_t_with_bg": score_t, "softmax_masks": masks, "focal_in": focal_in, "focal_out": focal_out,
            "cls_out": cls_1[:, 1:] + focal_out[:, 1:],
            "cls_fg": tf.reduce_sum(fg_mean * labels, -1) / tf.reduce_sum(labels, -1)}


class PixelAttention(vit.TorchModule):
    """``model/attn.py:PixelAttention(Ci, Ct)`` (from LAVT), prefix ``attention{k}.``.

    Lk, Lv = ``Wk``, ``Wv`` (Conv1d 1×1, Ct → Ci, weight [Ci, Ct, 1]) of the words; Vq = ``ins_q``(``Wq``(vis));
    attn = softmax over the T tokens (no padding mask) of Vq·Lkᵀ/√Ci; G = attn·Lv; Gi = ``ins_w``(``Ww``(G));
    out = ReLU(``Wo``(ReLU(``Wm``(vis)) ⊙ Gi)). vis [B, H, W, Ci], words [B, T, Ct] → [B, H, W, Ci].
    """

    def __init__(self, prefix, ci, ct, rng=None):
        super().__init__(prefix)
        self.ci = ci
        bound = 1.0 / np.sqrt(ct)
        init = ((lambda shape: rng.uniform(-bound, bound, shape).astype(np.float32)) if rng is not None
                else (lambda shape: np.zeros(shape, np.float32)))
        self.wk = (self.add_parameter("Wk.weight", init((ci, ct, 1))), self.add_parameter("Wk.bias", init((ci,))))
        self.wv = (self.add_parameter("Wv.weight", init((ci, ct, 1))), self.add_parameter("Wv.bias", init((ci,))))
        self.wq, self.wm, self.ww, self.wo = (self.add_module(clip.Conv2d(f"{prefix}{n}.", ci, ci, rng=rng))
                                              for n in ("Wq", "Wm", "Ww", "Wo"))
        self.ins_q = self.add_module(InstanceNorm2d(prefix + "ins_q.", ci))
        self.ins_w = self.add_module(InstanceNorm2d(prefix + "ins_w.", ci))

    def __call__(self, vis, words, taps=None):
        taps = {} if taps is None else taps

        def conv1d(params):
            weight, bias = params
            return tf.tensordot(words, tf.transpose(weight[:, :, 0]), axes=1) + bias             # [B, T, Ci]

        lk, lv = taps["Wk"], taps["Wv"] = conv1d(self.wk), conv1d(self.wv)
        taps["Wq"] = self.wq(vis)
        vq = taps["ins_q"] = self.ins_q(taps["Wq"])
        attn = taps["attn_softmax"] = tf.nn.softmax(
            tf.matmul(_flat(vq), lk, transpose_b=True) / np.sqrt(self.ci).astype(np.float32), axis=2)
        g = tf.reshape(tf.matmul(attn, lv), tf.shape(vis))
        taps["Ww"] = self.ww(g)
        gi = taps["ins_w"] = self.ins_w(taps["Ww"])
        taps["Wm"] = self.wm(vis)
        taps["Wo"] = self.wo(tf.nn.relu(taps["Wm"]) * gi)
        return tf.nn.relu(taps["Wo"])


class ConvBNRelu(vit.TorchModule):
    """``model_stage2.ConvBNRelu(c_in, c_out, 3, padding=1)``: 3×3 conv (no bias), BatchNorm2d, PReLU with ONE
    shared slope (``relu.weight`` [1], 0.25 at init). [B, H, W, c_in] → [B, H, W, c_out]."""

    def __init__(self, prefix, c_in, c_out, rng=None):
        super().__init__(prefix)
        self.conv = self.add_module(clip.Conv2d(prefix + "conv.", c_in, c_out, 3, padding=1, bias=False, rng=rng))
        self.bn = self.add_module(clip.BatchNorm2d(prefix + "bn.", c_out))
        self.relu = self.add_module(PReLU(prefix + "relu."))

    def __call__(self, x, training=False):
        return self.relu(self.bn(self.conv(x), training))


class PReLU(vit.TorchModule):
    """``nn.PReLU()``: one slope ``weight`` [1] (0.25 at init) shared by all channels: max(x, 0) + a·min(x, 0)."""

    def __init__(self, prefix):
        super().__init__(prefix)
        self.weight = self.add_parameter("weight", np.full([1], PRELU_INIT, np.float32))

    def __call__(self, x):
        return tf.maximum(x, 0.0) + self.weight * tf.minimum(x, 0.0)


class FinalSeg(vit.TorchModule):
    """``final_seg{k}`` = Sequential(ConvBNRelu(c_in, c_mid), Conv2d(c_mid, 1, 1×1, no bias)) → logits [.., 1]."""

    def __init__(self, prefix, c_in, c_mid, rng=None):
        super().__init__(prefix)
        self.block = self.add_module(ConvBNRelu(prefix + "0.", c_in, c_mid, rng))
        self.conv = self.add_module(clip.Conv2d(prefix + "1.", c_mid, 1, bias=False, rng=rng))

    def __call__(self, x, training=False):
        return self.conv(self.block(x, training))


class TRISStage2(vit.TorchModule):
    """``model/model_stage2.py:TRIS`` (``clip-RN50``).

    ``v_chans`` = c1..c4 channels (RN50: 256, 512, 1024, 2048), ``text_dim`` = the text width (512); the decoder's
    widths (64, 128, 256, 512 / 32) are divided by ``decoder_div`` (1 in the original; the golden's reduced build
    uses 16). State_dict order: ``backbone.*``, ``attention2..4``, ``reduced_c1..4``, ``final_seg1..4``,
    ``output4..1``. Head initial values: torch's defaults from ``rng`` (zeros without one).
    """

    stage = 2

    def __init__(self, clip_config=None, decoder_div=1, rng=None):
        super().__init__("")
        config = dict(RN50 if clip_config is None else clip_config)
        w = config["vision_width"]
        v_chans = (4 * w, 8 * w, 16 * w, 32 * w)
        text_dim = config["transformer_width"]
        d = [c // decoder_div for c in (32, 64, 128, 256, 512)]
        self.backbone = self.add_module(clip.CLIP("backbone.", **config))
        self.attention = [self.add_module(PixelAttention(f"attention{k}.", v_chans[k - 1], text_dim, rng))
                          for k in (2, 3, 4)]
        self.reduced = [self.add_module(ConvBNRelu(f"reduced_c{k + 1}.", v_chans[k], d[k + 1], rng))
                        for k in range(4)]
        self.final_seg = [self.add_module(FinalSeg(f"final_seg{k}.", c_in, c_mid, rng))
                          for k, c_in, c_mid in ((1, d[0], d[0]), (2, d[1], d[0]), (3, d[2], d[1]), (4, d[3], d[1]))]
        self.output = [self.add_module(ConvBNRelu(f"output{k}.", c_in, c_out, rng))           # output4 … output1
                       for k, c_in, c_out in ((4, d[4], d[3]), (3, d[3], d[2]), (2, d[2], d[1]), (1, d[1], d[0]))]

    @classmethod
    def from_state_dict(cls, state_dict, source="state_dict"):
        """The stage-2 model a state_dict describes (CLIP config from its keys, decoder widths from
        ``reduced_c1``, else full size), loaded strictly: another state_dict fails in one line naming its missing
        and unexpected keys."""
        reduced = state_dict.get("reduced_c1.conv.weight")
        model = cls(clip_config_from_state_dict(state_dict, source=source),
                    decoder_div=1 if reduced is None else 64 // np.shape(reduced)[0])
        model.load_state_dict(state_dict, source)
        return model

    def load_state_dict(self, state_dict, source="state_dict"):
        load_state_dict_strict(self, state_dict, source, "TRIS stage-2")

    def __call__(self, images, ids, training=False, taps=None):
        """images [B, S, S, 3], ids [B, T] → eval: logits [B, S, S, 1]; training: (out1, out2, out3, out4), each
        [B, S, S, 1] (bilinear, align_corners False). ``taps`` receives ``attention{k}[.*]`` (``.Wm``, ``.Wo``
        before their ReLU), ``reduced_c{k}``, ``output{k}``, ``seg_out{4,3,2}_up``, ``final_seg1``."""
        taps = {} if taps is None else taps
        size = (int(images.shape[1]), int(images.shape[2]))
        words, _ = self.backbone.encode_text(ids)
        c1, c2, c3, c4, _ = self.backbone.encode_image(images, training, attnpool=False)
        fused = []
        for k, c, attention in zip((2, 3, 4), (c2, c3, c4), self.attention):
            inner = {}
            out = taps[f"attention{k}"] = attention(c, words, taps=inner)
            taps.update({f"attention{k}.{n}": v for n, v in inner.items()})
            fused.append(out + c)
        dem = []
        for k, (reduce, x) in enumerate(zip(self.reduced, (c1, *fused))):
            dem.append(reduce(x, training))
            taps[f"reduced_c{k + 1}"] = dem[-1]

        def up(x, like):
            return resize_bilinear(x, (int(like.shape[1]), int(like.shape[2])))

        output4, output3, output2, output1 = self.output
        taps["output4"] = output4(dem[3], training)
        seg4 = taps["seg_out4_up"] = up(taps["output4"], dem[2])
        taps["output3"] = output3(seg4 + dem[2], training)
        seg3 = taps["seg_out3_up"] = up(taps["output3"], dem[1])
        taps["output2"] = output2(seg3 + dem[1], training)
        seg2 = taps["seg_out2_up"] = up(taps["output2"], dem[0])
        seg1 = taps["output1"] = output1(seg2 + dem[0], training)
        taps["final_seg1"] = self.final_seg[0](seg1, training)
        out1 = resize_bilinear(taps["final_seg1"], size)
        if not training:
            return out1
        return (out1, *(resize_bilinear(head(s, training), size)
                        for head, s in zip(self.final_seg[1:], (seg2, seg3, seg4))))


def model_state_dict(obj, source="checkpoint"):
    """The state_dict inside what TRIS's ``utils/util.save_checkpoint`` writes ({'model', 'optimizer',
    'lr_scheduler', 'epoch'}; only 'model' is used, as ``load_checkpoint``) or a plain state_dict → {key: array}.
    Anything else: ValueError, one line naming ``source``."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()):
        return dict(obj)
    top = list(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(f"{source}: not a TRIS checkpoint (a dict with 'model', or a state_dict); top level: {top}")


def from_state_dict(state_dict, source="state_dict"):
    """Stage 1 or stage 2, whichever the keys describe (``vis_project`` → stage 1, ``reduced_c1`` → stage 2)."""
    if "vis_project.weight" in state_dict:
        return TRISStage1.from_state_dict(state_dict, source)
    return TRISStage2.from_state_dict(state_dict, source)


# --------------------------------------------------------------------------------------------- losses
def multilabel_soft_margin_loss(logits, labels):
    """``F.multilabel_soft_margin_loss``: mean over the batch of the mean over classes of
    −[y·log σ(z) + (1 − y)·log σ(−z)]."""
    per = -(labels * tf.math.log_sigmoid(logits) + (1.0 - labels) * tf.math.log_sigmoid(-logits))
    return tf.reduce_mean(tf.reduce_mean(per, axis=-1))


def max_loss(x):
    """``train_stage1.MaxLoss``: −mean log(clamp(x, 1e-4, 0.9999))."""
    return -tf.reduce_mean(tf.math.log(tf.clip_by_value(x, 1e-4, 0.9999)))


def _unit(x):
    return x / tf.norm(x, axis=-1, keepdims=True)


def stage1_losses(outputs, images, ids, neg_ids, clip_model, weights=LOSS_WEIGHTS):
    """``train_stage1.train_one_epoch``'s loss for a training forward's ``outputs``.

    images [B, S, S, 3] (normalised), ids [B, T], neg_ids [B, K, T] (K ≥ 1), ``clip_model`` the frozen ViT-B/32
    (``models.clip.CLIP``). fg = bilinear (align_corners True) 224 resizes of sigmoid(map) · image;
    l1 = MaxLoss(cos(ViT(fg_i), text_i)); l4 = multilabel soft margin of cls_out vs the identity; l5 = mean over i
    of −mean_k log(1 − cos(ViT(fg_i), neg_ik)); loss = w1·l1 + w4·l4 + w5·l5 (l2 = l3 = 0). → dict with ``loss``,
    ``fg_loss_l1``, ``cls_loss_l4``, ``cbs_loss_l5``, ``fg_224``, ``clip_similarity`` [B], the ViT features.
    """
    size = (CLIP_INPUT_SIZE, CLIP_INPUT_SIZE)
    fg = resize_bilinear_align_corners(outputs["sig_seg"], size) * resize_bilinear_align_corners(images, size)
    image_features = clip_model.encode_image(fg)
    _, text_features = clip_model.encode_text(ids)
    similarity = tf.reduce_sum(_unit(image_features) * _unit(text_features), axis=-1)
    l1 = max_loss(similarity)
    batch = tf.shape(ids)[0]
    l4 = multilabel_soft_margin_loss(outputs["cls_out"], tf.eye(batch))
    k = int(neg_ids.shape[1])
    _, neg_features = clip_model.encode_text(tf.reshape(neg_ids, [-1, neg_ids.shape[-1]]))
    neg_features = tf.reshape(_unit(neg_features), [batch, k, -1])
    neg_score = tf.reduce_sum(_unit(image_features)[:, None] * neg_features, axis=-1)           # [B, K]
    l5 = tf.reduce_mean(-tf.reduce_mean(tf.math.log(1.0 - neg_score), axis=1))
    w1, _, _, w4, w5 = weights
    return {"loss": l1 * w1 + l4 * w4 + l5 * w5, "fg_loss_l1": l1, "cls_loss_l4": l4, "cbs_loss_l5": l5,
            "fg_224": fg, "clip_similarity": similarity, "vit_image_features_fg": image_features,
            "vit_text_hidden_pos": text_features}


def bce_with_logits(logits, target):
    """``F.binary_cross_entropy_with_logits(reduction='mean')``: max(z, 0) − z·y + log(1 + e^−|z|), mean."""
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=target, logits=logits))


def stage2_losses(outputs, pseudo_gt):
    """``train_stage2.criterion`` summed over the four side outputs (no EMA term: ``--model_ema`` is off).
    outputs (out1..out4) [B, S, S, 1], pseudo_gt [B, S, S, 1] → dict ``loss``, ``l1``..``l4``."""
    target = tf.cast(pseudo_gt, tf.float32)
    terms = {f"l{k + 1}": bce_with_logits(out, target) for k, out in enumerate(outputs)}
    return dict(terms, loss=tf.add_n(list(terms.values())))


# --------------------------------------------------------------------------------------------- evaluation
def evaluate_sentence(output, gt_mask, boxes):
    """``validate.validate`` for one sentence: output [S, S] (the model's map at S×S, stage 1 ReLU / stage 2
    logits), gt_mask [h, w] (original size, 1 = object), boxes [K, 4] (x1, y1, x2, y2, original pixels).

    pred = bilinear align_corners True resize to h×w, / (max + 1e-5); hard = pred > 1e-9; I, U; Hit = argmax pixel
    (first in row-major order) inside a box (inclusive); HitM (PointM) = gt at that pixel is 1. → dict
    ``norm_pred``, ``hard_pred``, ``I``, ``U``, ``hit``, ``hitm``, ``max_loc`` (row, col)."""
    gt_mask = np.asarray(gt_mask)
    pred = resize_bilinear_align_corners(np.asarray(output, np.float32)[None, :, :, None], gt_mask.shape)
    pred = pred.numpy()[0, :, :, 0]
    pred = pred / (pred.max() + np.float32(1e-5))
    hard = pred > EVAL_THRESHOLD
    row, col = np.unravel_index(np.argmax(pred), pred.shape)
    hit = int(any(b[0] <= col <= b[2] and b[1] <= row <= b[3] for b in np.reshape(boxes, (-1, 4))))
    return {"norm_pred": pred, "hard_pred": hard.astype(np.uint8),
            "I": int(np.logical_and(hard, gt_mask).sum()), "U": int(np.logical_or(hard, gt_mask).sum()),
            "hit": hit, "hitm": int(gt_mask[row, col] == 1), "max_loc": (int(row), int(col))}


def summarize(results, counts=None):
    """The evaluation's figures over ``evaluate_sentence`` results (×100): ``mIoU`` (mean of I/U, what the paper
    reports), ``oIoU`` (ΣI/ΣU), ``hit`` and ``hitm`` (= PointM), fractions of sentences.

    ``counts`` (PRMS, ``validate_same_sentence``: one result per ref standing for its k sentences): the original's
    meters weight as coded — mIoU and the hits by k, but I and U are multiplied by k AND counted k times, so
    oIoU = Σ k²·I / Σ k²·U."""
    k = np.ones(len(results)) if counts is None else np.asarray(counts, np.float64)
    iou = np.array([r["I"] / r["U"] for r in results])
    return {"mIoU": 100.0 * float(np.sum(k * iou) / np.sum(k)),
            "oIoU": 100.0 * float(sum(w * w * r["I"] for w, r in zip(k, results))
                                  / sum(w * w * r["U"] for w, r in zip(k, results))),
            "hit": 100.0 * float(sum(w * r["hit"] for w, r in zip(k, results)) / np.sum(k)),
            "hitm": 100.0 * float(sum(w * r["hitm"] for w, r in zip(k, results)) / np.sum(k))}


def prms_scores(output, image, ids, clip_model):
    """``validate.validate_same_sentence``'s CLIP scores of one response map: fg = bilinear (align_corners True)
    224 resizes of the RAW map ``output`` [1, S, S, 1] (not normalised, no sigmoid) · the normalised image
    [1, S, S, 3]; → cos(ViT-B/32(fg), text_k) for each of the ref's sentences ``ids`` [k, T], float64 [k]."""
    size = (CLIP_INPUT_SIZE, CLIP_INPUT_SIZE)
    fg = resize_bilinear_align_corners(output, size) * resize_bilinear_align_corners(image, size)
    image_features = _unit(clip_model.encode_image(fg))
    _, text_features = clip_model.encode_text(ids)
    return np.asarray(tf.matmul(image_features, _unit(text_features), transpose_b=True), np.float64)[0]


def prms_select(score_rows):
    """PRMS's choice among a ref's k maps: the first j with the largest Σ_k score (``score > max``, max from −1; when
    no sum exceeds −1 the original fails on its placeholder, here the first map is kept)."""
    best, index = -1.0, 0
    for j, scores in enumerate(score_rows):
        total = float(np.sum(scores))
        if total > best:
            best, index = total, j
    return index


def lr_factor(t, iters_per_epoch, epochs):
    """Both stages' ``LambdaLR`` factor (1 − t/(iters_per_epoch·epochs))^0.9 (Python floats, as the original).
    Stage 1 steps it every iteration (t = iterations done); stage 2 once per epoch (t = epochs done), so its rate is
    practically constant."""
    return (1 - t / (iters_per_epoch * epochs)) ** 0.9
