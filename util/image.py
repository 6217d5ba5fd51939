"""Image processing with the exact semantics of the originals' ``util/im_processing.py`` and
``util/processing_tools.py`` (scikit-image 0.13 era)."""
import numpy as np


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


def resize_and_pad(im, h, w):
    """The original ``resize_and_pad``: scale to fit inside h×w keeping the aspect ratio, centre, zero-pad.

    scale = min(h/H, w/W); rh = int(np.round(H·scale)), rw likewise (half-to-even); offsets int(floor(h − rh) / 2),
    int(floor(w − rw) / 2); the resized image (``resize_legacy``, float64 in [0, 1] for uint8 input) is pasted into
    float64 zeros of shape (h, w) or (h, w, C).
    """
    im_h, im_w = im.shape[:2]
    scale = min(h / im_h, w / im_w)
    rh = int(np.round(im_h * scale))
    rw = int(np.round(im_w * scale))
    pad_h = int(np.floor(h - rh) / 2)
    pad_w = int(np.floor(w - rw) / 2)
    resized = resize_legacy(im, rh, rw)
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
