"""DenseCRF post-processing as in the originals' ``test()`` (pydensecrf2, imported as ``pydensecrf``).

Parameters: ``DenseCRF2D(W, H, 2)``; unary = [−log(1 − p), −log(p)] (label 0 background, 1 foreground);
``addPairwiseGaussian(sxy=3, compat=3)``; ``addPairwiseBilateral(sxy=20, srgb=3, rgbim=<padded uint8 RGB image>,
compat=10)``; 5 mean-field iterations; argmax.

One deliberate difference: the originals do not clip, so a probability of exactly 0 or 1 (float32 sigmoid saturates
for |logit| > ~17) gives an infinite unary energy. We clip p to [1e-8, 1 − 1e-8] first (a unary of at most ~18.4),
which changes nothing where the original was finite up to float32 rounding.
"""
import numpy as np

PROB_EPSILON = 1e-8


def dense_crf(probs, rgb_image, iterations=5):
    """Refine a foreground probability map [H, W] with the RGB uint8 image [H, W, 3]; returns a float32 {0,1} map."""
    import pydensecrf.densecrf as dcrf

    probs = np.asarray(probs, dtype=np.float32)
    height, width = probs.shape
    p = np.clip(probs.astype(np.float64), PROB_EPSILON, 1.0 - PROB_EPSILON)
    unary = np.stack([-np.log(1.0 - p), -np.log(p)]).reshape(2, -1).astype(np.float32)
    crf = dcrf.DenseCRF2D(width, height, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=20, srgb=3, rgbim=np.ascontiguousarray(rgb_image, dtype=np.uint8), compat=10)
    q = crf.inference(iterations)
    return np.argmax(q, axis=0).reshape(height, width).astype(np.float32)
