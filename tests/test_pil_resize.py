"""util/pil_resize.py: Pillow's ``Image.resize(..., Image.BILINEAR)`` of uint8 RGB images in graph ops, bit for bit,
for sizes given as tensors (down, up, mixed, one-pixel, odd; both pass orders)."""
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from util.pil_resize import coefficients, pil_resize_bilinear

RESIZE = tf.function(pil_resize_bilinear, input_signature=[
    tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.int32)])
FIXED = [(1, 1), (1, 700), (700, 1), (2, 3), (320, 320), (384, 384), (321, 319), (1000, 37), (37, 1000),
         (640, 480), (480, 640), (161, 959), (960, 160), (3, 3)]


def pil(image, height, width):
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def check(rs, h, w, th, tw, smooth=False):
    if smooth:      # flat blocks: many exact ties between neighbours
        blocks = rs.randint(0, 256, size=(3, 4, 3)).astype(np.uint8)
        image = blocks[np.arange(h) * 3 // h][:, np.arange(w) * 4 // w]
    else:
        image = rs.randint(0, 256, size=(h, w, 3)).astype(np.uint8)
    got = RESIZE(tf.constant(image), th, tw).numpy()
    assert got.dtype == np.uint8 and np.array_equal(got, pil(image, th, tw)), (h, w, th, tw)


@pytest.mark.parametrize("target", [320, 384])
def test_equals_pillow_on_fixed_and_random_sizes(target):
    rs = np.random.RandomState(target)
    for h, w in FIXED:
        check(rs, h, w, target, target)
    for k in range(24):
        h, w = rs.randint(1, 1200, size=2)
        check(rs, h, w, target, target, smooth=k % 3 == 0)


def test_equals_pillow_on_random_targets_and_both_pass_orders():
    rs = np.random.RandomState(1)
    # (900 → 2 rows, 7 → 800 cols): vertical pass first; (7 → 900, 900 → 2): horizontal first
    cases = [(900, 7, 2, 800), (7, 900, 900, 2), (50, 50, 1, 1), (5, 9, 5, 40), (40, 5, 9, 5)]
    cases += [tuple(rs.randint(1, 700, size=4)) for _ in range(20)]
    for h, w, th, tw in cases:
        check(rs, h, w, th, tw)


def test_coefficients_rows_sum_to_about_one_in_fixed_point():
    for n_in, n_out in ((1000, 320), (320, 1000), (7, 7)):
        sums = coefficients(n_in, n_out).numpy().sum(axis=1)
        assert np.all(np.abs(sums - (1 << 22)) <= n_in)
