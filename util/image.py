"""Image processing with the exact semantics of the originals' ``util/im_processing.py`` and
``util/processing_tools.py`` (scikit-image 0.13 era, reimplemented in numpy), ReSTR's scikit-image 0.19.3
``resize_and_pad`` (``resize_and_pad_skimage019``, through the installed scikit-image), and the one image-file
reader that ``build_batches.py`` and ``demo.py`` share (``read_image``: every Pillow mode to 8-bit, optional
reduced-size decoding)."""
import logging
import warnings

import numpy as np

log = logging.getLogger(__name__)

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageReadError(ValueError):
    """An image file that cannot be used: ``reason`` ('missing image', 'unreadable image', 'image too large') for
    summaries, the message names the file."""

    def __init__(self, reason, detail):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def sixteen_to_eight(values):
    """uint8 of 16-bit samples: ``clip(v, 0, 65535) >> 8`` (the high byte).

    The rule Pillow itself applies to 16-bit-per-channel RGB(A) PNGs, so gray and colour 16-bit files agree; an
    8-bit image expanded to 16 bits (v·257) comes back exactly; 65535 → 255 (never saturates below the top).
    """
    return (np.clip(np.asarray(values, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)


def float_to_eight(values):
    """uint8 of a float ('F') image: finite values all in [0, 1] (scikit-image's float convention) → ``rint(v·255)``;
    otherwise finite values in [0, 255] (Pillow's own F → L convention) → ``rint(v)``. NaN, infinity or values
    outside [0, 255] raise ValueError."""
    v = np.asarray(values, dtype=np.float64)
    if not np.isfinite(v).all():
        raise ValueError("float image holds NaN or infinity")
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
    if lo < 0 or hi > 255:
        raise ValueError(f"float image values span [{lo:g}, {hi:g}], expected [0, 1] or [0, 255]")
    return np.rint(v * 255 if hi <= 1 else v).astype(np.uint8)


def premultiply_black(color, alpha):
    """uint8 colour composited onto black: ``(c·a + 127) // 255`` per channel (= round(c·a/255)); transparent pixels
    become 0, the padding value the models see around every image. ``color`` [H, W] or [H, W, C], ``alpha`` [H, W]."""
    c = np.asarray(color, dtype=np.uint32)
    a = np.asarray(alpha, dtype=np.uint32)
    if c.ndim == 3:
        a = a[..., None]
    return ((c * a + 127) // 255).astype(np.uint8)


def pil_to_uint8(img):
    """uint8 [H, W] (one-channel modes: '1', 'L', 'LA', 16-bit, 'I', 'F') or [H, W, 3] (all others) of an open
    Pillow image, pixels as stored (no EXIF rotation):

    - 'L' and 'RGB' unchanged; '1' → 0 / 255;
    - 16-bit ('I;16', 'I;16L', 'I;16B', 'I;16N') and 32-bit 'I' → ``sixteen_to_eight`` (16-bit RGB PNGs are
      already reduced to 8 bits by Pillow with the same high-byte rule);
    - 'F' → ``float_to_eight``;
    - alpha ('RGBA', 'LA', 'PA', 'RGBa', 'La', and 'P' with a transparency entry) → ``premultiply_black``;
    - 'P' (no transparency), 'CMYK', 'YCbCr', 'LAB', 'HSV' → Pillow's ``convert('RGB')``.
    """
    mode = img.mode
    if mode in ("L", "RGB"):
        return np.asarray(img)
    if mode == "1":
        return np.asarray(img.convert("L"))
    if mode in SIXTEEN_BIT_MODES:
        return sixteen_to_eight(np.asarray(img))
    if mode == "F":
        return float_to_eight(np.asarray(img))
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in ALPHA_MODES:
        if mode in ("RGBa", "La"):
            img = img.convert("RGBA" if mode == "RGBa" else "LA")
        if img.mode == "PA":
            img = img.convert("RGBA")
        arr = np.asarray(img)
        return premultiply_black(arr[..., :-1] if arr.shape[-1] > 2 else arr[..., 0], arr[..., -1])
    return np.asarray(img.convert("RGB"))


def reduced_size_factor(size, max_side):
    """Integer k ≥ 1 for ``Image.reduce``: the largest with ``ceil(max(size) / k) >= max_side`` (1 when the
    longer side is already ≤ ``max_side``)."""
    return max(1, max(size) // max_side)


def read_image(path, max_side=None):
    """Decode image file ``path`` with ``pil_to_uint8``; returns (uint8 [H, W] or [H, W, 3], (orig_h, orig_w)).

    ``max_side``: when the longer side exceeds it, decode at a reduced size whose longer side stays ≥ ``max_side``:
    JPEGs through libjpeg's DCT scaling (``Image.draft``: 1/2, 1/4 or 1/8, so the full image is never in memory),
    then any format, after the 8-bit mapping, by ``Image.reduce(k)`` (k×k box average, k from
    ``reduced_size_factor``). ``None`` decodes the stored size. Pillow's decompression-bomb check stays on: over ``Image.MAX_IMAGE_PIXELS`` a one-line warning is
    logged; over twice that the file is refused. Raises ImageReadError (reason 'missing image', 'unreadable image' or
    'image too large'; message naming the file) for every file that cannot be decoded, including an OS error.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                orig_w, orig_h = img.size
                if max_side is not None and max(img.size) > max_side and img.format == "JPEG":
                    scale = max_side / max(img.size)
                    img.draft(img.mode, (int(np.ceil(orig_w * scale)), int(np.ceil(orig_h * scale))))
                arr = pil_to_uint8(img)
            if max_side is not None and reduced_size_factor(arr.shape[:2], max_side) > 1:
                arr = np.asarray(Image.fromarray(arr).reduce(reduced_size_factor(arr.shape[:2], max_side)))
        for w in caught:
            if issubclass(w.category, Image.DecompressionBombWarning):
                log.warning("%s: %d×%d = %d pixels is over Pillow's decompression-bomb warning limit (%d); "
                            "decoding it anyway", path, orig_w, orig_h, orig_w * orig_h, Image.MAX_IMAGE_PIXELS)
    except FileNotFoundError:
        raise ImageReadError("missing image", path) from None
    except Image.DecompressionBombError as e:
        raise ImageReadError("image too large", f"{path} ({e})") from None
    except IsADirectoryError:
        raise ImageReadError("unreadable image", f"{path} (a folder, not an image file)") from None
    except OSError as e:
        raise ImageReadError("unreadable image", f"{path} ({e.strerror or e})") from None
    except (UnidentifiedImageError, SyntaxError, ValueError, TypeError, EOFError) as e:
        raise ImageReadError("unreadable image", f"{path} ({e})") from None
    return arr, (orig_h, orig_w)


def generate_spatial_batch(N, featmap_H, featmap_W):
    """The 8 spatial channels every head concatenates: float32 [N, H, W, 8].

    For cell (h, w): [xmin, ymin, xmax, ymax, xctr, yctr, 1/W, 1/H] with xmin = 2w/W - 1, xmax = 2(w+1)/W - 1,
    ymin/ymax likewise over H, centres the midpoints; computed in float64, stored float32. The last two channels are
    the constants 1/W and 1/H (as the original, not the cell size 2/W).
    """
    out = np.zeros((N, featmap_H, featmap_W, 8), dtype=np.float32)
    for h in range(featmap_H):
        for w in range(featmap_W):
            xmin = w / featmap_W * 2 - 1
            xmax = (w + 1) / featmap_W * 2 - 1
            ymin = h / featmap_H * 2 - 1
            ymax = (h + 1) / featmap_H * 2 - 1
            out[:, h, w, :] = [xmin, ymin, xmax, ymax, (xmin + xmax) / 2, (ymin + ymax) / 2,
                               1 / featmap_W, 1 / featmap_H]
    return out


def _img_as_float(im):
    """scikit-image 0.13 ``img_as_float``: float64 copy of ``im``.

    uint8 → ``astype(float64) / 255`` (a true division, not a multiplication by 1/255); bool → 0.0/1.0; float →
    ``astype(float64)``, rejecting values outside [-1, 1] with ValueError exactly as 0.13 did.
    """
    im = np.asarray(im)
    if im.dtype == np.bool_:
        return im.astype(np.float64)
    if im.dtype.kind == "u":
        return im.astype(np.float64) / np.iinfo(im.dtype).max
    if im.dtype.kind == "f":
        if im.size and (im.min() < -1.0 or im.max() > 1.0):
            raise ValueError("Images of type float must be between -1 and 1.")
        return im.astype(np.float64)
    raise ValueError(f"unsupported image dtype {im.dtype}")


def _center_and_normalize_points(points):
    """0.13 ``_center_and_normalize_points``: (3×3 similarity matrix, normalized points) for 2-D ``points`` [N, 2]."""
    centroid = np.mean(points, axis=0)
    rms = np.sqrt(np.sum((points - centroid) ** 2) / points.shape[0])
    norm_factor = np.sqrt(2) / rms
    matrix = np.array([[norm_factor, 0, -norm_factor * centroid[0]],
                       [0, norm_factor, -norm_factor * centroid[1]],
                       [0, 0, 1]])
    pointsh = np.vstack([points.T, np.ones(points.shape[0])])
    new_pointsh = np.dot(matrix, pointsh).T
    new_points = new_pointsh[:, :2]
    new_points[:, 0] /= new_pointsh[:, 2]
    new_points[:, 1] /= new_pointsh[:, 2]
    return matrix, new_points


def _estimate_affine(src, dst):
    """0.13 ``AffineTransform.estimate(src, dst)``: 3×3 float64 matrix mapping (x, y) of ``src`` onto ``dst``.

    Total least squares: both point sets centred and scaled to RMS √2, the 2N×7 design matrix reduced to its last
    right-singular vector (``np.linalg.svd``), then de-normalized with ``inv(dst_matrix) @ H @ src_matrix``. The
    last row therefore carries round-off (~1e-17) instead of an exact [0, 0, 1]; that round-off is what produces the
    ~1e-15 values the original stack shows where an exact transform gives 0 (spec §7.8).
    """
    src_matrix, src = _center_and_normalize_points(np.asarray(src, dtype=np.float64))
    dst_matrix, dst = _center_and_normalize_points(np.asarray(dst, dtype=np.float64))
    xs, ys = src[:, 0], src[:, 1]
    xd, yd = dst[:, 0], dst[:, 1]
    rows = src.shape[0]
    a = np.zeros((rows * 2, 9))
    a[:rows, 0] = xs
    a[:rows, 1] = ys
    a[:rows, 2] = 1
    a[:rows, 6] = -xd * xs
    a[:rows, 7] = -xd * ys
    a[rows:, 3] = xs
    a[rows:, 4] = ys
    a[rows:, 5] = 1
    a[rows:, 6] = -yd * xs
    a[rows:, 7] = -yd * ys
    a[:rows, 8] = xd
    a[rows:, 8] = yd
    coeffs = [0, 1, 2, 3, 4, 5, 8]
    a = a[:, coeffs]
    _, _, v = np.linalg.svd(a)
    h = np.zeros((3, 3))
    h.flat[coeffs] = -v[-1, :-1] / v[-1, -1]
    h[2, 2] = 1
    return np.dot(np.linalg.inv(dst_matrix), np.dot(h, src_matrix))


def _resize_matrix(out_h, out_w, in_h, in_w):
    """The inverse map 0.13 ``resize`` hands to ``warp``: output (col, row) → input (col, row), half-pixel centres.

    A 1×1 output uses the pure translation (in_w/2 − 0.5, in_h/2 − 0.5); otherwise the affine transform is estimated
    from the three output corners (0,0), (0,out_h−1), (out_w−1,out_h−1) mapped to ``scale·(p + 0.5) − 0.5``.
    """
    if out_h == 1 and out_w == 1:
        m = np.eye(3)
        m[0:2, 2] = (in_w / 2.0 - 0.5, in_h / 2.0 - 0.5)
        return m
    row_scale = float(in_h) / out_h
    col_scale = float(in_w) / out_w
    src = np.array([[1, 1], [1, out_h], [out_w, out_h]]) - 1
    dst = np.zeros(src.shape, dtype=np.double)
    dst[:, 0] = col_scale * (src[:, 0] + 0.5) - 0.5
    dst[:, 1] = row_scale * (src[:, 1] + 0.5) - 0.5
    return _estimate_affine(src, dst)


def _warp_bilinear_constant(img, matrix, out_h, out_w):
    """0.13 ``_warp_fast`` with order=1, mode='constant', cval=0 on a float64 [H, W] or [H, W, C] image.

    For output pixel (row, col): c = (m00·col + m01·row + m02) / z, r = (m10·col + m11·row + m12) / z,
    z = m20·col + m21·row + m22; neighbours floor/ceil of r and c (identical when integral), pixels outside the
    image read as 0; value = (1 − dr)·((1 − dc)·p00 + dc·p01) + dr·((1 − dc)·p10 + dc·p11), evaluated in that
    order in float64 (channels independently, same coordinates).
    """
    h = matrix.ravel()
    y, x = np.mgrid[:out_h, :out_w].astype(np.float64)
    xx = h[0] * x + h[1] * y + h[2]
    yy = h[3] * x + h[4] * y + h[5]
    zz = h[6] * x + h[7] * y + h[8]
    c = xx / zz
    r = yy / zz
    minr = np.floor(r)
    minc = np.floor(c)
    maxr = np.ceil(r)
    maxc = np.ceil(c)
    dr = r - minr
    dc = c - minc
    rows, cols = img.shape[:2]

    def pixel(rr, cc):
        rr = rr.astype(np.int64)
        cc = cc.astype(np.int64)
        inside = (rr >= 0) & (rr < rows) & (cc >= 0) & (cc < cols)
        vals = img[np.clip(rr, 0, rows - 1), np.clip(cc, 0, cols - 1)]
        if img.ndim == 3:
            inside = inside[..., None]
        return np.where(inside, vals, 0.0)

    if img.ndim == 3:
        dr = dr[..., None]
        dc = dc[..., None]
    top = (1 - dc) * pixel(minr, minc) + dc * pixel(minr, maxc)
    bottom = (1 - dc) * pixel(maxr, minc) + dc * pixel(maxr, maxc)
    return (1 - dr) * top + dr * bottom


def resize_legacy(im, out_h, out_w):
    """``skimage.transform.resize(im, [out_h, out_w])`` with scikit-image 0.13 defaults, reimplemented in numpy.

    order=1 (bilinear), mode='constant', cval=0, clip=True, preserve_range=False, no anti-aliasing. ``im`` is
    [H, W] or [H, W, C] (channels resized independently); it is converted with 0.13 ``img_as_float`` (uint8 → /255).
    Returns float64 [out_h, out_w(, C)]. Clipping is to [min, max] of the converted input; if 0 lies outside that
    range, output values exactly 0 (cval) are kept at 0, as in 0.13 ``_clip_warp_output``.
    """
    img = _img_as_float(im)
    matrix = _resize_matrix(out_h, out_w, img.shape[0], img.shape[1])
    out = _warp_bilinear_constant(img, matrix, out_h, out_w)
    min_val, max_val = img.min(), img.max()
    preserve_cval = not (min_val <= 0 <= max_val)
    cval_mask = out == 0
    np.clip(out, min_val, max_val, out=out)
    if preserve_cval:
        out[cval_mask] = 0
    return out


def resize_and_pad(im, h, w, resize=None):
    """The original ``resize_and_pad``: scale to fit inside h×w keeping the aspect ratio, centre, zero-pad.

    scale = min(h/H, w/W); rh = int(np.round(H·scale)), rw likewise (half-to-even); offsets int(floor(h − rh) / 2),
    int(floor(w − rw) / 2); the resized image (``resize(im, rh, rw)``, default ``resize_legacy``: float64 in [0, 1]
    for uint8 input) is pasted into zeros of its dtype, shape (h, w) or (h, w, C).
    """
    resize = resize or resize_legacy
    im_h, im_w = im.shape[:2]
    scale = min(h / im_h, w / im_w)
    rh = int(np.round(im_h * scale))
    rw = int(np.round(im_w * scale))
    pad_h = int(np.floor(h - rh) / 2)
    pad_w = int(np.floor(w - rw) / 2)
    resized = resize(im, rh, rw)
    out = np.zeros((h, w) + im.shape[2:], dtype=resized.dtype)
    out[pad_h:pad_h + rh, pad_w:pad_w + rw, ...] = resized
    return out


def resize_and_crop(im, h, w):
    """The original ``resize_and_crop``: scale to cover h×w keeping the aspect ratio, then centre-crop.

    scale = max(h/H, w/W); rh, rw by np.round; crop offsets int(floor(rh − h) / 2), int(floor(rw − w) / 2);
    resize with ``resize_legacy``. Returns float64 (h, w) or (h, w, C).
    """
    im_h, im_w = im.shape[:2]
    scale = max(h / im_h, w / im_w)
    rh = int(np.round(im_h * scale))
    rw = int(np.round(im_w * scale))
    crop_h = int(np.floor(rh - h) / 2)
    crop_w = int(np.floor(rw - w) / 2)
    resized = resize_legacy(im, rh, rw)
    out = np.zeros((h, w) + im.shape[2:], dtype=resized.dtype)
    out[...] = resized[crop_h:crop_h + h, crop_w:crop_w + w, ...]
    return out


def resize_skimage019(im, out_h, out_w):
    """``skimage.transform.resize(im, [out_h, out_w])`` as scikit-image 0.19.3 ran it with its defaults (ReSTR's
    pinned version), through the installed scikit-image with every argument spelled out.

    0.19.3 defaults: order=1, mode='reflect' (scipy.ndimage 'mirror'), cval=0, clip=True, preserve_range=False,
    anti-aliasing exactly when either side shrinks: ``scipy.ndimage.gaussian_filter`` with sigma
    ``max(0, (in/out − 1) / 2)`` per axis (0 along channels), then ``scipy.ndimage.zoom(order=1, grid_mode=True)``
    (half-pixel centres), then clipping to [min, max] of the unfiltered input. Input uint8 (→ ``img_as_float``:
    float64 ``x · (1/255)``) or float (float32 stays float32, float64 stays float64); [H, W] or [H, W, C]. The
    Gaussian blur spreads every foreground pixel, so a shrunk mask thresholded at > 0 grows (up to about
    4·sigma + 1 input pixels). scikit-image's resize code for these inputs is the same from 0.19.3 to the installed
    version; the numbers come from the installed SciPy's ``ndimage``. Measured bit-identical (floats, uint8 images and
    thresholded masks) to ReSTR's own ``resize_and_pad`` run in its pinned environment (scikit-image 0.19.3, SciPy
    1.7.3, NumPy 1.21.5) on COCO-sized images at 480, 320 and 40 and on every sample-dataset file
    (``tests/test_build_batches_restr.py`` keeps digests of that run).
    """
    from skimage.transform import resize

    im = np.asarray(im)
    if im.dtype == np.bool_:
        raise ValueError("resize_skimage019: bool input (0.19.3 resized bool with order 0); pass 0/1 as float")
    shrinking = out_h < im.shape[0] or out_w < im.shape[1]
    return resize(im, (out_h, out_w), order=1, mode="reflect", cval=0, clip=True, preserve_range=False,
                  anti_aliasing=shrinking, anti_aliasing_sigma=None)


def resize_and_pad_skimage019(im, h, w):
    """ReSTR's ``resize_and_pad`` (its ``utils/im_processing.py``): the geometry of ``resize_and_pad`` (fit inside
    h×w, ``np.round`` sizes, floor-half offsets, zero padding = black) around ``resize_skimage019``. The output has
    the resized array's dtype: float64 for uint8 images, float32 for float32 masks."""
    return resize_and_pad(im, h, w, resize=resize_skimage019)


RESIZE_AND_PAD = {"skimage013": resize_and_pad, "skimage019": resize_and_pad_skimage019}


def img_as_ubyte(im):
    """scikit-image 0.13 ``img_as_ubyte`` for float input in [-1, 1] (ValueError otherwise) or uint8 (returned as is).

    Float: computed in the input's float type: ×255, ``np.rint`` (half-to-even), clip to [0, 255], cast to uint8.
    """
    im = np.asarray(im)
    if im.dtype == np.uint8:
        return im
    if im.dtype.kind != "f":
        raise ValueError(f"img_as_ubyte: unsupported dtype {im.dtype}")
    if im.size and (im.min() < -1.0 or im.max() > 1.0):
        raise ValueError("Images of type float must be between -1 and 1.")
    out = im * 255
    np.rint(out, out=out)
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)
