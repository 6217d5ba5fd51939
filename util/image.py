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
