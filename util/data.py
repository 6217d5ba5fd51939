"""Reading the ``build_batches.py`` output (``.npz`` files or sharded TFRecords): the originals' per-sample
preprocessing, their sample order, and a ``tf.data`` pipeline that yields exactly the same samples.

The originals' ``DataReader`` counts ``<prefix>_0.npz, <prefix>_1.npz, …`` up to the first gap and, when shuffling,
draws a fresh (unseeded) permutation at the start of every epoch. Ours draws the permutation of epoch ``e`` from
``np.random.RandomState(seed + e)``, so a run is reproducible and the plain loop and the pipeline agree.
"""
import glob
import logging
import math
import os
import struct
import zipfile

import numpy as np

from util.files import atomic_output

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


def npz_shapes(path):
    """{key: (shape, dtype)} of the arrays in an ``.npz``, read from the zip directory and the ``.npy`` headers only
    (a few hundred bytes per array). Raises ``BadSample`` for a file that is not a zip of ``.npy`` arrays, a member
    shorter than its header says (truncation), or an object array (pickle)."""
    try:
        with zipfile.ZipFile(path) as archive:
            shapes = {}
            for info in archive.infolist():
                with archive.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(f)
                    if dtype.hasobject:
                        raise BadSample(f"{path}: {info.filename} is an object array (pickled data is refused)")
                    needed = f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                if info.file_size < needed:
                    raise BadSample(f"{path}: {info.filename} is truncated ({info.file_size} bytes, its header "
                                    f"needs {needed})")
                shapes[info.filename[:-len(".npy")] if info.filename.endswith(".npy") else info.filename] = (
                    shape, dtype)
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
        if isinstance(e, BadSample):
            raise
        raise BadSample(f"{path}: unreadable .npz ({e})") from None
    return shapes


def check_training_file(path, image_size, steps=None):
    """Raise ``BadSample`` naming ``path`` unless its headers (``npz_shapes``) describe a training sample of
    ``build_batches.py`` at ``image_size``: the four keys, ``im_batch`` [S, S, 3], ``mask_batch`` [S, S],
    ``text_batch`` [T] of integers with T = ``steps`` when given. Returns T."""
    shapes = npz_shapes(path)
    missing = [k for k in NPZ_KEYS if k not in shapes]
    if missing:
        raise BadSample(f"{path}: missing key {missing[0]} (expected {', '.join(NPZ_KEYS)})")
    (im, _), (mask, _), (text, text_dtype) = shapes["im_batch"], shapes["mask_batch"], shapes["text_batch"]
    expected_im = (image_size, image_size, 3)
    if tuple(im) != expected_im or tuple(mask) != expected_im[:2]:
        raise BadSample(f"{path}: im_batch {tuple(im)} / mask_batch {tuple(mask)}, expected {expected_im} / "
                        f"{expected_im[:2]} (a training sample built at --img-size {image_size})")
    if len(text) != 1 or text_dtype.kind not in "iu" or (steps is not None and text[0] != steps):
        raise BadSample(f"{path}: text_batch {tuple(text)} {text_dtype}, expected [{steps or 'T'}] integers")
    return text[0]


def _member_sizes(path):
    """{member name: uncompressed size} from the zip directory of an ``.npz`` (read from the end of the file, so a
    truncated file fails here). Raises ``BadSample``."""
    try:
        with zipfile.ZipFile(path) as archive:
            return {info.filename: info.file_size for info in archive.infolist()}
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
        raise BadSample(f"{path}: unreadable .npz ({e})") from None


def check_training_files(files, image_size):
    """Check every training ``.npz`` before training starts, so that a truncated, foreign or misshapen file is
    reported by path now rather than as an error at iteration N. Raises ``BadSample`` counting the bad files and
    naming the first.

    The first file gets the full header check (``check_training_file``); every other file's zip directory is read
    and its ``im_batch`` / ``mask_batch`` / ``text_batch`` members compared by size with the first's (same shapes
    and dtypes give the same sizes); only a file that differs gets the header check (with the same T), which names
    its defect (0.6 ms per file measured on this project's 2-core machine under a load of 8)."""
    bad, steps, reference = [], None, None
    for path in files:
        try:
            if reference is None:
                steps = check_training_file(path, image_size)
                reference = {k: v for k, v in _member_sizes(path).items() if not k.startswith("sent_batch")}
                continue
            sizes = _member_sizes(path)
            if any(sizes.get(name) != size for name, size in reference.items()):
                check_training_file(path, image_size, steps)
        except BadSample as e:
            bad.append(str(e))
    if bad:
        raise BadSample(f"{len(bad)} of {len(files)} training samples are unusable, first {bad[0]}; delete them and "
                        f"re-run build_batches.py (it writes only what is missing)")


def sample_image_size(batch_folder, prefix, data_format="auto"):
    """(height, width, path) of the first training sample of a split (``training_source``'s choice of format), or
    None when there is none or it is unreadable (training reports those itself)."""
    first = os.path.join(batch_folder, f"{prefix}_0.npz")
    try:
        if data_format == "npz" or (data_format == "auto" and os.path.isfile(first)):
            shape = npz_shapes(first)["im_batch"][0]
            return shape[0], shape[1], first
        if data_format in ("tfrecord", "auto"):
            source = TFRecordSamples(tfrecord_folder(batch_folder), prefix)
            shape = source.load(0)["im_batch"].shape
            return shape[0], shape[1], source.records[0][0]
    except (BadSample, OSError, KeyError, IndexError):
        return None
    return None


def sentence_of(sample):
    """The raw sentence as ``str`` (py2 ``str`` samples load as bytes)."""
    sent = sample["sent_batch"][0]
    return sent.decode("utf-8", "replace") if isinstance(sent, bytes) else str(sent)


def to_network_input(rgb_uint8, mu=MU):
    """``float32(im)[:, :, ::-1]`` then ``-= mu`` in place, as the originals (float64 arithmetic, float32 result)."""
    bgr = rgb_uint8.astype(np.float32)[:, :, ::-1]
    return (bgr - mu).astype(np.float32)


def train_example(sample, mu=MU, preprocess=None):
    """One training example exactly as the originals' loop feeds it: (words int32 [T], image float32 [H, W, 3],
    target float32 [H, W, 1]); the image is ``preprocess(im_batch)`` (the model's input, from its registry entry),
    by default the TF1 models' BGR − mu. Training npz files are already resized and padded."""
    words = sample["text_batch"].astype(np.int32)
    image = to_network_input(sample["im_batch"], mu) if preprocess is None else preprocess(sample["im_batch"])
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


class NpzSamples:
    """Random access to ``<prefix>_<n>.npz`` files (``batch_files``): ``len`` and ``load(n)`` → sample dict."""

    def __init__(self, files):
        self.files = list(files)

    def __len__(self):
        return len(self.files)

    def load(self, index):
        return load_sample(self.files[index])


# --- TFRecord shards -------------------------------------------------------------------------------------------------
# One record per sample, a ``tf.train.Example`` holding for each of NPZ_KEYS the array's raw bytes under ``<key>``,
# its shape under ``<key>/shape`` (int64 list) and its numpy dtype string under ``<key>/dtype``: the arrays read back
# are identical to the .npz ones. Sample n of the split is record n of the concatenation of the shards in name order.

TFRECORD_SHARD_SIZE = 1024


def tfrecord_folder(batch_folder):
    """``<root>/<dataset>/<split>_batch`` → ``<root>/<dataset>/<split>_tfrecord``."""
    return batch_folder[:-len("_batch")] + "_tfrecord" if batch_folder.endswith("_batch") else batch_folder


def tfrecord_name(prefix, shard, num_shards):
    """``<prefix>-00000-of-00012.tfrecord`` (``prefix`` = ``<dataset>_<split>``)."""
    return f"{prefix}-{shard:05d}-of-{num_shards:05d}.tfrecord"


def _example_bytes(sample):
    import tensorflow as tf

    feature = {}
    for key in NPZ_KEYS:
        arr = np.ascontiguousarray(sample[key])
        feature[key] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[arr.tobytes()]))
        feature[f"{key}/shape"] = tf.train.Feature(int64_list=tf.train.Int64List(value=list(arr.shape)))
        feature[f"{key}/dtype"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[arr.dtype.str.encode()]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_tfrecords(files, folder, prefix, shard_size=TFRECORD_SHARD_SIZE):
    """Pack the samples ``files`` (in order) into ``ceil(n / shard_size)`` shards ``folder/tfrecord_name(...)``;
    each shard is written to a temporary name and renamed. Returns the shard paths."""
    import tensorflow as tf

    os.makedirs(folder, exist_ok=True)
    num_shards = max(1, math.ceil(len(files) / shard_size))
    paths = []
    for shard in range(num_shards):
        path = os.path.join(folder, tfrecord_name(prefix, shard, num_shards))
        with atomic_output(path) as tmp, tf.io.TFRecordWriter(tmp) as writer:
            for f in files[shard * shard_size:(shard + 1) * shard_size]:
                writer.write(_example_bytes(load_sample(f)))
        paths.append(path)
    log.info("wrote %d samples in %d TFRecord shards under %s", len(files), num_shards, folder)
    return paths


def _record_offsets(path):
    """[(offset, length)] of the records of a TFRecord file (uint64 length, uint32 CRC, data, uint32 CRC each)."""
    offsets, size = [], os.path.getsize(path)
    with open(path, "rb") as f:
        pos = 0
        while pos < size:
            header = f.read(12)
            if len(header) < 12:
                raise BadSample(f"{path}: truncated TFRecord header at byte {pos}")
            (length,) = struct.unpack("<Q", header[:8])
            offsets.append((pos + 12, length))
            pos += 12 + length + 4
            f.seek(pos)
    if pos != size:
        raise BadSample(f"{path}: truncated TFRecord (last record ends at byte {pos}, file has {size})")
    return offsets


class TFRecordSamples:
    """Random access to the shards written by ``write_tfrecords`` (a record index is built from the headers, so the
    per-epoch order is the same as for the .npz files); ``load(n)`` → the same sample dict as ``load_sample``."""

    def __init__(self, folder, prefix):
        self.shards = sorted(glob.glob(os.path.join(glob.escape(folder), f"{glob.escape(prefix)}-*-of-*.tfrecord")))
        if not self.shards:
            raise FileNotFoundError(f"no TFRecord shards {prefix}-*-of-*.tfrecord under {folder}: run "
                                    f"build_batches.py --format tfrecord for this dataset and split")
        expected = int(self.shards[0].rsplit("-of-", 1)[1].split(".")[0])
        if len(self.shards) != expected:
            raise FileNotFoundError(f"{folder}: {len(self.shards)} shards of {prefix} found, {expected} expected")
        self.records = [(path, off, length) for path in self.shards for off, length in _record_offsets(path)]
        log.info('found %d samples in %d TFRecord shards under %s with prefix "%s"',
                 len(self.records), len(self.shards), folder, prefix)

    def __len__(self):
        return len(self.records)

    def load(self, index):
        import tensorflow as tf

        path, offset, length = self.records[index]
        with open(path, "rb") as f:
            f.seek(offset)
            feature = tf.train.Example.FromString(f.read(length)).features.feature
        try:
            return {key: np.frombuffer(feature[key].bytes_list.value[0],
                                       dtype=np.dtype(feature[f"{key}/dtype"].bytes_list.value[0].decode())
                                       ).reshape(tuple(feature[f"{key}/shape"].int64_list.value)).copy()
                    for key in NPZ_KEYS}
        except (IndexError, KeyError, ValueError, TypeError) as e:
            raise BadSample(f"{path}: record {index} unreadable ({type(e).__name__}: {e})") from None


def training_source(batch_folder, prefix, data_format="auto"):
    """The samples of a split: ``npz`` (``batch_files``), ``tfrecord`` (``tfrecord_folder(batch_folder)``), or
    ``auto``: the .npz files when ``<prefix>_0.npz`` exists, else the TFRecord shards."""
    if data_format == "npz" or (data_format == "auto" and
                                os.path.isfile(os.path.join(batch_folder, f"{prefix}_0.npz"))):
        return NpzSamples(batch_files(batch_folder, prefix))
    if data_format in ("tfrecord", "auto"):
        return TFRecordSamples(tfrecord_folder(batch_folder), prefix)
    raise ValueError(f"unknown data format {data_format!r} (npz, tfrecord or auto)")


def check_training_source(source, image_size):
    """Before training: every ``.npz`` of an ``NpzSamples`` passes ``check_training_files``; the first record of a
    ``TFRecordSamples`` (whose record index was already read in full) is a [S, S, 3] image. Raises ``BadSample``."""
    if isinstance(source, NpzSamples):
        check_training_files(source.files, image_size)
        return
    shape = source.load(0)["im_batch"].shape
    if shape != (image_size, image_size, 3):
        raise BadSample(f"{source.records[0][0]}: record 0 has im_batch {shape}, expected "
                        f"{(image_size, image_size, 3)} (--img-size {image_size})")


def _as_source(samples):
    return NpzSamples(samples) if isinstance(samples, (list, tuple)) else samples


def training_samples(files, seed, shuffle=True, start=0, mu=MU):
    """The plain batch-1 loop: yields (words, image, target) in the order of ``sample_indices``.

    ``files``: a list of .npz paths or a ``NpzSamples`` / ``TFRecordSamples``."""
    source = _as_source(files)
    for index in sample_indices(len(source), seed, shuffle, start):
        yield train_example(source.load(index), mu)


def replica_indices(num_samples, seed, shuffle, start, batch_size, first_replica=0, local_replicas=1,
                    num_replicas=1):
    """The sample stream of one input pipeline under data parallelism.

    The global stream (``sample_indices`` from ``start``) is cut into global batches of ``batch_size ×
    num_replicas`` samples; replica r takes slice [r·batch_size, (r+1)·batch_size) of each. This pipeline serves
    replicas ``first_replica … first_replica + local_replicas − 1`` and yields, per global batch, their slices one
    after the other. With one replica it is ``sample_indices`` itself.
    """
    stream = sample_indices(num_samples, seed, shuffle, start)
    global_batch = batch_size * num_replicas
    lo, hi = first_replica * batch_size, (first_replica + local_replicas) * batch_size
    while True:
        chunk = [next(stream) for _ in range(global_batch)]
        yield from chunk[lo:hi]


def training_dataset(files, batch_size, seed, shuffle=True, start=0, mu=MU, num_parallel_calls=None,
                     first_replica=0, local_replicas=1, num_replicas=1, preprocess=None):
    """``tf.data`` version of ``training_samples``, batched: the same samples, preprocessing and order.

    ``files``: a list of .npz paths or a ``NpzSamples`` / ``TFRecordSamples``. ``start`` is the global sample
    position to resume from (iteration × global batch size). Reading and decoding run in parallel
    (``deterministic=True`` keeps the order), and batches are prefetched. ``batch_size`` is per replica; the
    replica arguments select this pipeline's share of each global batch (``replica_indices``): consecutive
    elements of the dataset are the batches of replicas ``first_replica``, ``first_replica + 1``, … as
    ``tf.distribute.Strategy.distribute_datasets_from_function`` hands them out. ``preprocess``: the model's
    uint8 RGB → network input (``train_example``).
    """
    import tensorflow as tf

    source = _as_source(files)
    first = train_example(source.load(0), mu, preprocess)
    size, steps = first[1].shape[:2], first[0].shape[0]

    def indices():
        return replica_indices(len(source), seed, shuffle, start, batch_size, first_replica, local_replicas,
                               num_replicas)

    def read(index):
        return train_example(source.load(int(index)), mu, preprocess)

    def read_tf(index):
        words, image, target = tf.numpy_function(read, [index], [tf.int32, tf.float32, tf.float32])
        words.set_shape([steps])
        image.set_shape([size[0], size[1], 3])
        target.set_shape([size[0], size[1], 1])
        return words, image, target

    parallel = num_parallel_calls or tf.data.AUTOTUNE
    ds = tf.data.Dataset.from_generator(indices, output_signature=tf.TensorSpec([], tf.int64))
    ds = ds.map(read_tf, num_parallel_calls=parallel, deterministic=True)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    ds = ds.with_options(options)
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
