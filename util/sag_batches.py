"""SaG's ``build_batches.py`` sample processing (kdwonn/SaG @ 8788922, the "no-pad" variant), as a pure function.

The original resizes training splits (split name containing 'train') to fit inside size×size keeping the aspect
ratio — s = min(size/h, size/w), (round(h·s), round(w·s)) with ``np.round`` — and does NOT pad (its padding call is
commented out); other splits keep the original size. Image: ``skimage.img_as_ubyte(skimage.transform.resize(im,
shape))``; mask: ``skimage.transform.resize(float32 mask, shape) > 0``. SaG pins no scikit-image; its resize for
these inputs is the same from 0.19 (the first with ``anti_aliasing`` on by default when shrinking) to today's, so the
semantics are ``util.image.resize_skimage019`` (Gaussian anti-aliasing when shrinking, mirror edges, half-pixel
bilinear zoom) — a shrunk mask thresholded at > 0 grows by the blur, as the original's.
"""
import numpy as np

from util import image as im_proc

SAG_IMG_SIZE = 480


def nopad_size(height, width, size=SAG_IMG_SIZE):
    """(round(h·s), round(w·s)) with s = min(size/h, size/w), ``np.round`` (half to even) as the original."""
    scale = min(size / height, size / width)
    return int(np.round(height * scale)), int(np.round(width * scale))


def process_pair_nopad(im, mask, train, size=SAG_IMG_SIZE):
    """One sample as SaG's ``build_batches.py`` writes it: (uint8 [h', w', 3] image, bool [h', w'] mask).

    im: uint8 [H, W, 3] or [H, W]; mask: [H, W] (any dtype, foreground > 0). Train splits: resized by
    ``nopad_size`` (image through ``img_as_ubyte``; mask as float32, then > 0), no padding; other splits unchanged.
    A 2-D image is tiled to 3 channels afterwards.
    """
    im = np.asarray(im)
    mask = np.asarray(mask).astype(np.float32)
    if train:
        out_h, out_w = nopad_size(im.shape[0], im.shape[1], size)
        im = im_proc.img_as_ubyte(im_proc.resize_skimage019(im, out_h, out_w))
        mask = im_proc.resize_skimage019(mask, out_h, out_w)
    if im.ndim == 2:
        im = np.tile(im[:, :, np.newaxis], (1, 1, 3))
    return im, mask > 0
