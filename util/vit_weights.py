"""Google AugReg ViT ``.npz`` → timm / ReSTR ``VisionTransformer`` state_dict, without torch.

``augreg_state_dict`` does what timm 0.6.x ``vision_transformer._load_weights(model, path, prefix='')`` writes into
the model (spec restr.md §R.5), as {state_dict key: float32 numpy array}:

| npz key (after the optional ``opt/target/`` prefix) | state_dict key | layout change |
|---|---|---|
| ``embedding/kernel`` [P,P,3,D] (HWIO) | ``patch_embed.proj.weight`` [D,3,P,P] | transpose (3,2,0,1) |
| ``embedding/bias`` | ``patch_embed.proj.bias`` | — |
| ``cls`` [1,1,D] | ``cls_token`` | — |
| ``Transformer/posembed_input/pos_embedding`` [1,1+g²,D] | ``pos_embed`` [1,1+gh·gw,D] | grid resized (below) |
| ``Transformer/encoder_norm/{scale,bias}`` | ``norm.{weight,bias}`` | — |
| ``head/kernel`` [D,K], ``head/bias`` [K] | ``head.weight`` [K,D], ``head.bias`` | transpose; only if K = ``num_classes`` |
| ``Transformer/encoderblock_{i}/LayerNorm_0/{scale,bias}`` | ``blocks.{i}.norm1.*`` | — |
| ``…/MultiHeadDotProductAttention_1/{query,key,value}/kernel`` [D,h,d] | ``blocks.{i}.attn.qkv.weight`` [3D,D] | each → [D,h·d], transposed, stacked q, k, v |
| ``…/MultiHeadDotProductAttention_1/{query,key,value}/bias`` [h,d] | ``blocks.{i}.attn.qkv.bias`` [3D] | flattened, concatenated q, k, v |
| ``…/MultiHeadDotProductAttention_1/out/kernel`` [h,d,D] | ``blocks.{i}.attn.proj.weight`` [D,D] | transpose (2,0,1), then [D,h·d] |
| ``…/MultiHeadDotProductAttention_1/out/bias`` | ``blocks.{i}.attn.proj.bias`` | — |
| ``…/MlpBlock_3/Dense_{0,1}/{kernel,bias}`` | ``blocks.{i}.mlp.fc{1,2}.*`` | kernel transposed |
| ``…/LayerNorm_2/{scale,bias}`` | ``blocks.{i}.norm2.*`` | — |

Details kept from timm: blocks 0 … n_layers−1 are read (extra npz blocks are ignored, a missing one is an error); the
head is copied only when the npz head has ``num_classes`` outputs (ReSTR: 1000 = the AugReg ImageNet-1k head; else
the model keeps its own initialisation, so the head keys are left out); ``pre_logits`` is never loaded; a 4-D kernel
with three leading 1s would be flattened first (never the case for these keys). Values are cast to float32 (what
``Parameter.copy_`` does) — before the resize: a float64 npz, which timm would resize in float64, can then differ by a
few 1e-6 in ``pos_embed`` (the AugReg files are float32). Only 3-channel patch kernels are accepted (timm's
``adapt_input_conv`` is then a no-op).

Position embedding: if the npz's [1,1+g²,D] differs from the model's [1,1+gh·gw,D], timm's ``resize_pos_embed``
keeps the first (class) token and resizes the g×g grid (g = int(√(tokens−1)), row-major) to gh×gw with
``torch_bicubic_resize``.
"""
import os
import zipfile

import numpy as np

AUGREG_B16_384_URL = ("https://storage.googleapis.com/vit_models/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-"
                      "do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384.npz")

_F32, _F64 = np.float32, np.float64


def _fma32(a, b, c):
    """Fused multiply-add a·b + c of float32 arrays, rounded once to float32 (exactly, as the hardware FMA).

    The float64 product is exact; the float64 sum is made round-to-odd (TwoSum error, then the odd neighbour), after
    which rounding to float32 is the correctly rounded result (float64 has more than 24 + 1 bits).
    """
    p = np.asarray(a, _F32).astype(_F64) * np.asarray(b, _F32).astype(_F64)
    c = np.asarray(c, _F32).astype(_F64)
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)
    even = (s.view(np.int64) & 1) == 0
    fix = (err != 0) & even
    s = np.where(fix, np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
    return s.astype(_F32)


def _cubic_taps(in_size, out_size):
    """torch's bicubic source taps along one axis: (indices [out,4] clamped to [0, in−1], float32 weights [out,4]).

    As ATen ``HelperInterpCubic::compute_indices_weights`` for float32, ``align_corners=False``, output size given:
    scale = float32(in/out); x = scale·(i + 0.5) − 0.5 (no clamp at 0 for cubic); i0 = min(floor(x), in−1);
    t = clamp(x − i0, 0, 1); Keys' cubic convolution with A = −0.75 at distances t+1, t, 1−t, 2−t:
    |s| ≤ 1: ((A+2)|s| − (A+3))·s² + 1; 1 < |s| < 2: ((A|s| − 5A)|s| + 8A)|s| − 4A; taps i0−1 … i0+2 clamped to the
    border (border replication). Computed in float32 with the multiply-adds fused as the x86-64 AVX2 build of ATen
    does (GCC contracts ``a*b + c`` into an FMA).
    """
    a = _F32(-0.75)
    scale = _F32(in_size) / _F32(out_size)
    i = np.arange(out_size, dtype=_F32)
    x = _fma32(scale, i + _F32(0.5), _F32(-0.5))
    i0 = np.minimum(np.floor(x).astype(np.int64), in_size - 1)
    t = np.clip(x - i0.astype(_F32), _F32(0), _F32(1)).astype(_F32)

    def near(s):  # |s| <= 1
        return _fma32(_fma32(a + _F32(2), s, -(a + _F32(3))) * s, s, _F32(1))

    def far(s):  # 1 < |s| < 2
        return _fma32(_fma32(_fma32(a, s, -_F32(5) * a), s, _F32(8) * a), s, -_F32(4) * a)

    one_minus_t = (_F32(1) - t).astype(_F32)
    weights = np.stack([far(t + _F32(1)), near(t), near(one_minus_t), far(one_minus_t + _F32(1))], axis=1)
    taps = np.clip(i0[:, None] + np.arange(-1, 3)[None, :], 0, in_size - 1)
    return taps, weights.astype(_F32)


def _interp_axis(values, weights):
    """Σ_j values[j]·weights[j] over the 4 taps, in ATen's float32 order: fma(v0, w0, v1·w1), then fma per tap."""
    acc = _fma32(values[0], weights[0], (values[1] * weights[1]).astype(_F32))
    for j in (2, 3):
        acc = _fma32(values[j], weights[j], acc)
    return acc


def torch_bicubic_resize(grid, out_hw):
    """Resize ``grid`` [h, w, C] to [H, W, C] exactly as torch's
    ``F.interpolate(x, size=(H, W), mode='bicubic', align_corners=False)`` (antialias off) on CPU in float32.

    Taps and weights per axis: ``_cubic_taps``. Each output value is, as in ATen's generic upsampling kernel,
    Σ_a w_h[a] · (Σ_b w_w[b] · grid[y_a, x_b]) — the inner sum over the width taps, both sums in float32 with ATen's
    fused multiply-add order (``_interp_axis``). Bitwise equal to torch 2.x on x86-64 (AVX2/AVX-512 kernels) for the
    golden 3×3 → 4×4 and 3×3 → 30×30 cases; a torch built without FMA contraction can differ by 1 ulp.
    """
    grid = np.asarray(grid, _F32)
    (h, w, _), (out_h, out_w) = grid.shape, out_hw
    rows, wy = _cubic_taps(h, out_h)
    cols, wx = _cubic_taps(w, out_w)
    gathered = grid[rows[:, :, None, None], cols[None, None, :, :]]  # [H, 4, W, 4, C]
    inner = _interp_axis(np.moveaxis(gathered, 3, 0), wx.T[:, None, None, :, None])  # [H, 4, W, C]
    return _interp_axis(np.moveaxis(inner, 1, 0), wy.T[:, :, None, None])


def resize_pos_embed(posemb, grid_hw, num_prefix_tokens=1):
    """timm 0.6.x ``resize_pos_embed``: [1, P+g², D] → [1, P+gh·gw, D], the P prefix tokens kept, the g×g grid
    (g = int(√(tokens−P)), row-major) resized with ``torch_bicubic_resize``."""
    posemb = np.asarray(posemb, _F32)
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
    g = int(np.sqrt(len(grid)))
    if g * g != len(grid):
        raise ValueError(f"position embedding grid of {len(grid)} tokens is not square")
    resized = torch_bicubic_resize(grid.reshape(g, g, -1), grid_hw)
    return np.concatenate([prefix, resized.reshape(1, grid_hw[0] * grid_hw[1], -1)], axis=1)


def _n2p(w, t=True):
    """timm ``_n2p``: flatten 1×1×1×N kernels, then (if ``t``) 4-D → (3,2,0,1), 3-D → (2,0,1), 2-D → transpose."""
    if w.ndim == 4 and w.shape[0] == w.shape[1] == w.shape[2] == 1:
        w = w.flatten()
    if t:
        w = w.transpose({4: (3, 2, 0, 1), 3: (2, 0, 1), 2: (1, 0), 1: (0,), 0: ()}[w.ndim])
    return np.ascontiguousarray(w, _F32)


def augreg_state_dict(path, n_layers, grid_hw, num_classes=1000, key_prefix=""):
    """Read a Google AugReg ViT ``.npz`` into {``key_prefix`` + timm state_dict key: float32 array} (module docstring).

    Args:
      path: the ``.npz`` (e.g. the ``vit_base_patch16_384`` file at ``AUGREG_B16_384_URL``).
      n_layers: transformer blocks of the model (blocks 0 … n_layers−1 are read).
      grid_hw: the model's patch grid (H/16, W/16), e.g. (30, 30) at 480×480.
      num_classes: the model's head size; the head is returned only if the npz head has as many outputs.
      key_prefix: prepended to every key, e.g. "encoder_v." for ReSTR.
    Raises:
      FileNotFoundError (one line: the file and where to get the default one); ValueError (one line naming the file)
      for a file that is not an npz or lacks a key the model needs.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; the AugReg ViT-B/16 (384) weights ReSTR starts from are "
                                f"{AUGREG_B16_384_URL}")
    try:
        with np.load(path) as npz:
            w = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz ({e})") from None
    prefix = "opt/target/" if "opt/target/embedding/kernel" in w else ""

    def get(key, t=True):
        try:
            return _n2p(w[prefix + key], t)
        except KeyError:
            raise ValueError(f"{path}: key {prefix + key} missing (not an AugReg ViT .npz with {n_layers} blocks?)") \
                from None

    out = {}
    kernel = get("embedding/kernel")
    if kernel.ndim != 4 or kernel.shape[1] != 3:
        raise ValueError(f"{path}: embedding/kernel {w[prefix + 'embedding/kernel'].shape} is not a 3-channel "
                         "[P,P,3,D] patch kernel")
    out["patch_embed.proj.weight"] = kernel
    out["patch_embed.proj.bias"] = get("embedding/bias")
    out["cls_token"] = get("cls", t=False)
    pos = get("Transformer/posembed_input/pos_embedding", t=False)
    if pos.shape != (1, 1 + grid_hw[0] * grid_hw[1], pos.shape[-1]):
        try:
            pos = resize_pos_embed(pos, grid_hw)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    out["pos_embed"] = pos
    out["norm.weight"] = get("Transformer/encoder_norm/scale")
    out["norm.bias"] = get("Transformer/encoder_norm/bias")
    if prefix + "head/bias" in w and w[prefix + "head/bias"].shape[-1] == num_classes:
        out["head.weight"] = get("head/kernel")
        out["head.bias"] = get("head/bias")
    for i in range(n_layers):
        block, mha = f"Transformer/encoderblock_{i}/", f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/"
        b = f"blocks.{i}."
        out[b + "norm1.weight"] = get(block + "LayerNorm_0/scale")
        out[b + "norm1.bias"] = get(block + "LayerNorm_0/bias")
        kernels = [get(f"{mha}{n}/kernel", t=False) for n in ("query", "key", "value")]  # [D, h, d] each
        out[b + "attn.qkv.weight"] = np.concatenate([k.reshape(k.shape[0], -1).T for k in kernels])
        out[b + "attn.qkv.bias"] = np.concatenate([get(f"{mha}{n}/bias", t=False).reshape(-1)
                                                   for n in ("query", "key", "value")])
        proj = get(mha + "out/kernel")
        out[b + "attn.proj.weight"] = np.ascontiguousarray(proj.reshape(proj.shape[0], -1))
        out[b + "attn.proj.bias"] = get(mha + "out/bias")
        for r in range(2):
            out[b + f"mlp.fc{r + 1}.weight"] = get(f"{block}MlpBlock_3/Dense_{r}/kernel")
            out[b + f"mlp.fc{r + 1}.bias"] = get(f"{block}MlpBlock_3/Dense_{r}/bias")
        out[b + "norm2.weight"] = get(block + "LayerNorm_2/scale")
        out[b + "norm2.bias"] = get(block + "LayerNorm_2/bias")
    return {key_prefix + k: np.ascontiguousarray(v, _F32) for k, v in out.items()}
