"""PyTorch's image resampling, exactly, for the PyTorch-descended models (ReSTR).

Every function takes and returns NHWC tensors (``[B, H, W, C]``; numpy arrays are accepted) and names the torch
call it reproduces. Sizes are Python ints (static shapes), as in the originals; ``resize_and_pad`` and
``resize_and_crop`` also take images of unknown size and target sizes as scalar tensors (inside a ``tf.function``
with a ``[None, None, 3]`` signature, as the SavedModel export uses them): their sizes are then computed with the
same float64 arithmetic in TensorFlow ops (``tf.round`` rounds half to even, as Python's ``round``), so both paths
give the same sizes.

Contents:
- ``resize_bilinear``: ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)`` — also what
  torchvision 0.14's ``TF.resize`` does to a tensor when ``antialias`` is not given.
- ``resize_bilinear_align_corners``: ``nn.Upsample(mode="bilinear", align_corners=True)``.
- ``resize_nearest``: ``F.interpolate(mode="nearest")`` (torch's legacy nearest, not ``nearest-exact``).
- ``resize_and_pad`` / ``resize_and_crop`` / ``resize_and_crop_nearest``: ReSTR's ``utils/torchutils.py`` helpers
  used by its evaluation (``eval/evaluate.py``).
"""
import numpy as np
import tensorflow as tf


def resize_bilinear(x, size):
    """torch ``F.interpolate(x, size, mode="bilinear", align_corners=False, antialias=False)``.

    Source coordinate (dst + 0.5)·in/out − 0.5, negative values clamped to 0, the upper neighbour clamped to the
    border, no anti-aliasing when shrinking. TF2's ``tf.image.resize(method="bilinear", antialias=False)`` (half-pixel
    centres) computes the same interpolation; only the float32 rounding of the weights' products differs (≤ 1e-7
    relative). torchvision ≥ 0.17 anti-aliases by default: that is NOT this function.
    """
    x = tf.convert_to_tensor(x)
    y = tf.image.resize(x, size, method="bilinear", antialias=False)
    return tf.cast(y, x.dtype) if y.dtype != x.dtype else y


def resize_bilinear_align_corners(x, size):
    """torch ``nn.Upsample(size or scale_factor, mode="bilinear", align_corners=True)``.

    Source coordinate dst·(in − 1)/(out − 1): the corner pixels of input and output coincide. Equal to TF1's
    ``resize_bilinear(align_corners=True)`` (``ResizeBilinear`` with half_pixel_centers=False); TF2's
    ``tf.image.resize`` has no such mode.
    """
    x = tf.convert_to_tensor(x)
    y = tf.raw_ops.ResizeBilinear(images=x, size=size, align_corners=True, half_pixel_centers=False)
    return tf.cast(y, x.dtype) if y.dtype != x.dtype else y


def nearest_indices(in_size, out_size):
    """Source indices of torch's legacy ``mode="nearest"`` along one axis (``nearest_idx`` in
    aten/src/ATen/native/UpSample.h): identity when out = in, dst >> 1 when out = 2·in, else
    min(floor(dst · s), in − 1) with s = in/out and the product computed in float32."""
    dst = np.arange(out_size)
    if out_size == in_size:
        return dst
    if out_size == 2 * in_size:
        return dst >> 1
    scale = np.float32(in_size / out_size)
    return np.minimum(np.floor(dst.astype(np.float32) * scale).astype(np.int64), in_size - 1)


def resize_nearest(x, size):
    """torch ``F.interpolate(x, size, mode="nearest")`` (= torchvision ``TF.resize(..., NEAREST)`` on a tensor).

    Unlike TF2's ``tf.image.resize(method="nearest")`` (half-pixel centres), torch picks source index
    floor(dst · in/out) (see ``nearest_indices``).
    """
    x = tf.convert_to_tensor(x)
    rows = nearest_indices(int(x.shape[1]), int(size[0]))
    cols = nearest_indices(int(x.shape[2]), int(size[1]))
    return tf.gather(tf.gather(x, rows, axis=1), cols, axis=2)


def _rounded_size(h, w, scale):
    """``int(round(h·scale)), int(round(w·scale))`` with Python's round (ties to even), as the originals."""
    return int(round(h * scale)), int(round(w * scale))


def _image_hw(images):
    """(H, W) of [B, H, W, C] ``images``: Python ints when static, else int32 scalar tensors."""
    h, w = images.shape[1], images.shape[2]
    if h is None or w is None:
        shape = tf.shape(images)
        return shape[1], shape[2]
    return int(h), int(w)


def _fit_size(h, w, input_h, input_w, fit):
    """(round(h·s), round(w·s)) with s = fit(input_h/h, input_w/w) (fit = min or max): ``_rounded_size`` for
    Python ints, else the same float64 arithmetic on tensors."""
    if all(isinstance(v, int) for v in (h, w, input_h, input_w)):
        return _rounded_size(h, w, fit(input_h / h, input_w / w))
    h, w, input_h, input_w = (tf.cast(v, tf.float64) for v in (h, w, input_h, input_w))
    scale = (tf.minimum if fit is min else tf.maximum)(input_h / h, input_w / w)
    return tf.cast(tf.round(h * scale), tf.int32), tf.cast(tf.round(w * scale), tf.int32)


def resize_and_pad(images, input_h, input_w):
    """ReSTR ``utils/torchutils.resize_and_pad``: fit [B, h, w, C] into [B, input_h, input_w, C].

    s = min(input_h/h, input_w/w); resized to (round(h·s), round(w·s)) with ``resize_bilinear`` (torchvision 0.14
    tensor resize: no anti-aliasing); placed at offsets (⌊(input_h − rh)/2⌋, ⌊(input_w − rw)/2⌋) into zeros.
    ReSTR applies it to the NORMALISED image, so the padding is 0 = grey (pixel value 127.5), whereas its training
    batches were padded black by ``build_batches.py``.
    """
    images = tf.convert_to_tensor(images)
    rh, rw = _fit_size(*_image_hw(images), input_h, input_w, min)
    top, left = (input_h - rh) // 2, (input_w - rw) // 2
    resized = resize_bilinear(images, (rh, rw))
    return tf.pad(resized, [[0, 0], [top, input_h - rh - top], [left, input_w - rw - left], [0, 0]])


def _crop_to(resized, input_h, input_w):
    height, width = _image_hw(resized)
    top, left = (height - input_h) // 2, (width - input_w) // 2
    return resized[:, top:top + input_h, left:left + input_w]


def resize_and_crop(images, input_h, input_w):
    """ReSTR ``utils/torchutils.resize_and_crop``: [B, H, W, C] → [B, input_h, input_w, C].

    s = max(input_h/H, input_w/W); resized to (round(H·s), round(W·s)) with ``resize_bilinear``, then the centre
    crop starting at (⌊(rh − input_h)/2⌋, ⌊(rw − input_w)/2⌋). Used to bring the 480×480 predictions back to the
    original image size; it inverts ``resize_and_pad`` only approximately (two independent roundings).
    """
    images = tf.convert_to_tensor(images)
    size = _fit_size(*_image_hw(images), input_h, input_w, max)
    return _crop_to(resize_bilinear(images, size), input_h, input_w)


def resize_and_crop_nearest(images, input_h, input_w):
    """ReSTR ``utils/torchutils.resize_and_crop_nearest``: ``resize_and_crop`` with ``resize_nearest``."""
    images = tf.convert_to_tensor(images)
    h, w = int(images.shape[1]), int(images.shape[2])
    size = _rounded_size(h, w, max(input_h / h, input_w / w))
    return _crop_to(resize_nearest(images, size), input_h, input_w)
