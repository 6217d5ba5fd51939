"""Reading the ``build_batches.py`` output: the originals' per-sample preprocessing, their sample order, and a
``tf.data`` pipeline that yields exactly the same samples.

The originals' ``DataReader`` counts ``<prefix>_0.npz, <prefix>_1.npz, …`` up to the first gap and, when shuffling,
draws a fresh (unseeded) permutation at the start of every epoch. Ours draws the permutation of epoch ``e`` from
``np.random.RandomState(seed + e)``, so a run is reproducible and the plain loop and the pipeline agree.
"""
import logging
import os
import zipfile

import numpy as np

# Image mean of the Caffe-converted backbones, in B, G, R order (float64 as the originals).
MU = np.array((104.00698793, 116.66876762, 122.67891434))
NPZ_KEYS = ("text_batch", "im_batch", "mask_batch", "sent_batch")

log = logging.getLogger(__name__)


class BadSample(ValueError):
    """A ``.npz`` sample that cannot be read (truncated, wrong keys, wrong shapes)."""


def batch_files(folder, prefix):
    """Paths ``<folder>/<prefix>_<n>.npz`` for n = 0, 1, … up to the first missing index."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"batch folder {folder} not found: create it with build_batches.py (see README, 'Data')")
    present = set(os.listdir(folder))
    files = []
    while f"{prefix}_{len(files)}.npz" in present:
        files.append(os.path.join(folder, f"{prefix}_{len(files)}.npz"))
    if not files:
        raise FileNotFoundError(f"no batches found under {folder} with prefix \"{prefix}\" "
                                f"(expected {prefix}_0.npz): run build_batches.py for this dataset and split")
    log.info('found %d batches under %s with prefix "%s"', len(files), folder, prefix)
    return files


def load_sample(path):
    """Read one sample; ``np.load(allow_pickle=False)``. Raises ``BadSample`` naming the file on any defect."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in NPZ_KEYS if k not in npz.files]
            if missing:
                raise BadSample(f"{path}: missing key {missing[0]} (expected {', '.join(NPZ_KEYS)})")
            sample = {k: npz[k] for k in NPZ_KEYS}
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
        if isinstance(e, BadSample):
            raise
        raise BadSample(f"{path}: unreadable .npz ({e})") from None
    im, mask = sample["im_batch"], sample["mask_batch"]
    if im.ndim != 3 or im.shape[2] != 3 or mask.shape != im.shape[:2] or sample["text_batch"].ndim != 1:
        raise BadSample(f"{path}: unexpected shapes im_batch {im.shape}, mask_batch {mask.shape}, "
                        f"text_batch {sample['text_batch'].shape}")
    return sample


def sentence_of(sample):
    """The raw sentence as ``str`` (py2 ``str`` samples load as bytes)."""
    sent = sample["sent_batch"][0]
    return sent.decode("utf-8", "replace") if isinstance(sent, bytes) else str(sent)


def to_network_input(rgb_uint8, mu=MU):
    """``float32(im)[:, :, ::-1]`` then ``-= mu`` in place, as the originals (float64 arithmetic, float32 result)."""
    bgr = rgb_uint8.astype(np.float32)[:, :, ::-1]
    return (bgr - mu).astype(np.float32)


def train_example(sample, mu=MU):
    """One training example exactly as the originals' loop feeds it: (words int32 [T], image float32 BGR − mu
    [H, W, 3], target float32 [H, W, 1]). Training npz files are already resized and padded."""
    words = sample["text_batch"].astype(np.int32)
    image = to_network_input(sample["im_batch"], mu)
    target = sample["mask_batch"].astype(np.float32)[:, :, None]
    return words, image, target


def epoch_order(num_samples, epoch, seed, shuffle):
    """Sample order of one epoch: ``RandomState(seed + epoch).permutation(n)`` when shuffling, else 0..n−1."""
    if not shuffle:
        return np.arange(num_samples)
    return np.random.RandomState(seed + epoch).permutation(num_samples)


def sample_indices(num_samples, seed, shuffle, start=0):
    """Endless stream of sample indices, epoch after epoch, beginning at global position ``start``."""
    epoch, offset = divmod(start, num_samples)
    while True:
        order = epoch_order(num_samples, epoch, seed, shuffle)
        for index in order[offset:]:
            yield int(index)
        epoch, offset = epoch + 1, 0


def training_samples(files, seed, shuffle=True, start=0, mu=MU):
    """The plain batch-1 loop: yields (words, image, target) in the order of ``sample_indices``."""
    for index in sample_indices(len(files), seed, shuffle, start):
        yield train_example(load_sample(files[index]), mu)


def training_dataset(files, batch_size, seed, shuffle=True, start=0, mu=MU, num_parallel_calls=None):
    """``tf.data`` version of ``training_samples``, batched: the same samples, preprocessing and order.

    ``start`` is the global sample position to resume from (iteration × batch size). Reading and decoding run in
    parallel (``deterministic=True`` keeps the order), and batches are prefetched.
    """
    import tensorflow as tf

    first = train_example(load_sample(files[0]), mu)
    size, steps = first[1].shape[:2], first[0].shape[0]
    paths = np.array(files)

    def indices():
        return sample_indices(len(files), seed, shuffle, start)

    def read(index):
        return train_example(load_sample(paths[int(index)]), mu)

    def read_tf(index):
        words, image, target = tf.numpy_function(read, [index], [tf.int32, tf.float32, tf.float32])
        words.set_shape([steps])
        image.set_shape([size[0], size[1], 3])
        target.set_shape([size[0], size[1], 1])
        return words, image, target

    parallel = num_parallel_calls or tf.data.AUTOTUNE
    ds = tf.data.Dataset.from_generator(indices, output_signature=tf.TensorSpec([], tf.int64))
    ds = ds.map(read_tf, num_parallel_calls=parallel, deterministic=True)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
