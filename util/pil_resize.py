"""Pillow's ``Image.resize((w, h), Image.BILINEAR)`` of a uint8 RGB image, bit for bit, in TensorFlow graph ops (the
image's size may be a tensor: the SavedModel exports of SaG and TRIS feed images of any size).

What Pillow (13, ``libImaging/Resample.c``) computes, and this module rebuilds (our code):

- Per axis, a resize in_size → out_size with scale = in/out, filterscale = max(scale, 1) and support =
  filterscale (the triangle filter's support 1, widened when shrinking: Pillow's anti-aliasing). Output i's centre
  is c = (i + 0.5)·scale; its source range is xmin = max(0, ⌊c − support + 0.5⌋) … xmax = min(in, ⌊c + support +
  0.5⌋); source j gets w = tri((j − c + 0.5)/filterscale) with tri(x) = max(0, 1 − |x|), in float64 and this
  order of operations (``(j − c) + 0.5`` times ``1/filterscale``); the weights are divided by their sum, summed
  left to right (``ww`` is a sequential float64 sum; done here by a ``tf.while_loop`` in the same order), and
  turned into 22-bit fixed point (PRECISION_BITS = 32 − 8 − 2): k = ⌊0.5 + w·2²²⌋ (all weights are ≥ 0).
- A pass: out = clip8((2²¹ + Σ_j in_j·k_j) >> 22), i.e. rounded to the nearest integer and clipped to [0, 255];
  the sums are integers below 2³¹, so a float64 matmul with the integer coefficient matrix [out, in] computes
  them exactly whatever its summation order, and ⌊s / 2²²⌋ is exact.
- Two passes with the intermediate image rounded to uint8: horizontal first, unless the height shrinks by more
  than twice as many pixels as the width ((in_h − out_h) > 0 and (in_h − out_h) > 2·(in_w − out_w)), then
  vertical first. An axis whose size does not change is not resampled (its pass would be the identity anyway).
  Pillow's vertical pass only over the rows the horizontal pass computed changes no value.

``Image.resize`` returns a copy when the size does not change; so does this. No ``reducing_gap`` (the default).
"""
import tensorflow as tf

PRECISION_BITS = 32 - 8 - 2


def fixed_point_weights(in_size, out_size):
    """Pillow's per-output weights of a 1-D resize in_size → out_size (scalar int tensors; module docstring):
    (float64 [out_size, ksize] 22-bit fixed-point integers, int32 [out_size] first source index xmin, int32
    [out_size] number of source pixels used)."""
    in_size, out_size = tf.cast(in_size, tf.int32), tf.cast(out_size, tf.int32)
    scale = tf.cast(in_size, tf.float64) / tf.cast(out_size, tf.float64)
    filterscale = tf.maximum(scale, 1.0)
    support = filterscale
    ksize = tf.cast(tf.math.ceil(support), tf.int32) * 2 + 1
    center = (tf.cast(tf.range(out_size), tf.float64) + 0.5) * scale
    xmin = tf.maximum(tf.cast(tf.floor(center - support + 0.5), tf.int32), 0)
    count = tf.minimum(tf.cast(tf.floor(center + support + 0.5), tf.int32), in_size) - xmin
    taps = tf.range(ksize)
    arg = (tf.cast(taps[None, :] + xmin[:, None], tf.float64) - center[:, None] + 0.5) * (1.0 / filterscale)
    weights = tf.maximum(1.0 - tf.abs(arg), 0.0)
    weights = tf.where(taps[None, :] < count[:, None], weights, tf.zeros_like(weights))
    total = tf.while_loop(lambda k, ww: k < ksize, lambda k, ww: (k + 1, ww + weights[:, k]),
                          (tf.constant(0), tf.zeros([out_size], tf.float64)))[1]
    weights = tf.where(tf.not_equal(total, 0.0)[:, None], weights / total[:, None], weights)
    return tf.floor(0.5 + weights * float(1 << PRECISION_BITS)), xmin, count


def dense_coefficients(weights, in_size):
    """float64 [out_size, in_size]: ``fixed_point_weights``' result as a matrix over the source pixels."""
    fixed, xmin, count = weights
    rel = tf.range(in_size)[None, :] - xmin[:, None]
    inside = tf.logical_and(rel >= 0, rel < count[:, None])
    dense = tf.gather(fixed, tf.clip_by_value(rel, 0, tf.shape(fixed)[1] - 1), batch_dims=1)
    return tf.where(inside, dense, tf.zeros_like(dense))


def coefficients(in_size, out_size):
    """float64 [out_size, in_size]: Pillow's fixed-point bilinear coefficients (integers, row i = output i's
    weights over the source pixels) of a 1-D resize in_size → out_size."""
    return dense_coefficients(fixed_point_weights(in_size, out_size), in_size)


def _round_clip(sums):
    """clip8((2²¹ + s) >> 22) of exact integer sums (float64)."""
    shifted = tf.floor((sums + float(1 << (PRECISION_BITS - 1))) / float(1 << PRECISION_BITS))
    return tf.clip_by_value(shifted, 0.0, 255.0)


def _horizontal(image, weights):
    """One horizontal pass of float64 [H, W, C] (uint8 values) with ``fixed_point_weights`` of W → out_w."""
    return _round_clip(tf.einsum("hwc,xw->hxc", image, dense_coefficients(weights, tf.shape(image)[1])))


def _vertical(image, weights):
    """One vertical pass of float64 [H, W, C] (uint8 values) with ``fixed_point_weights`` of H → out_h."""
    return _round_clip(tf.einsum("hwc,yh->ywc", image, dense_coefficients(weights, tf.shape(image)[0])))


def _maybe(condition, fn, image):
    return tf.cond(condition, lambda: fn(image), lambda: image)


def pil_resize_bilinear(image, height, width):
    """uint8 [height, width, C]: ``Image.fromarray(image).resize((width, height), Image.BILINEAR)`` of a uint8
    [H, W, C] image (H, W ≥ 1; height, width ≥ 1 ints or scalar int tensors), exactly (module docstring). The
    weights are computed outside the branches that choose the pass order (a loop inside a branch upsets grappler's
    dependency optimizer)."""
    image = tf.convert_to_tensor(image)
    in_h, in_w = tf.shape(image)[0], tf.shape(image)[1]
    height, width = tf.cast(height, tf.int32), tf.cast(width, tf.int32)
    x = tf.cast(image, tf.float64)
    need_h, need_v = tf.not_equal(width, in_w), tf.not_equal(height, in_h)
    vertical_first = tf.logical_and(in_h - height > 0, in_h - height > (in_w - width) * 2)
    weights_h, weights_v = fixed_point_weights(in_w, width), fixed_point_weights(in_h, height)

    def horizontal(t):
        return _horizontal(t, weights_h)

    def vertical(t):
        return _vertical(t, weights_v)

    out = tf.cond(vertical_first, lambda: _maybe(need_h, horizontal, _maybe(need_v, vertical, x)),
                  lambda: _maybe(need_v, vertical, _maybe(need_h, horizontal, x)))
    return tf.cast(out, tf.uint8)
