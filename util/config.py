"""One run configuration from the originals' flags, with each model's original defaults."""
import dataclasses
import os
import sys

import numpy as np

# Per model: (max_iter -i, snapshot interval -s, stop -st (None = -i), snapshots kept).
MODEL_DEFAULTS = {
    "CMPC_model": (800000, 100000, 700000, 4),
    "RRN_model": (800000, 100000, None, 1000),
    "RMI_model": (750000, 50000, None, 1000),
    "LSTM_model": (750000, 50000, None, 1000),
}
SHORT_NAMES = {"RMI_model": "RMI", "LSTM_model": "LSTM"}
INIT_WEIGHTS = {
    "deeplab_resnet": "./data/weights/deeplab_resnet_init.ckpt",
    "deeplab": "./external/TF-deeplab/model/ResNet101_train.tfmodel",
    "resnet": "./external/TF-resnet/model/ResNet101_init.tfmodel",
}


@dataclasses.dataclass
class RunConfig:
    mode: str
    model: str
    dataset: str = "referit"
    split: str = None
    iteration: int = None
    snapshot: int = None
    stop_iter: int = None
    folder: str = None
    lr: float = 0.00025
    batch_size: int = 1
    visualize: bool = False
    dcrf: bool = False
    emb: bool = False
    conv5: bool = False
    weights: str = "deeplab"
    image_size: int = 320
    seed: int = 0
    batch_root: str = "."
    data_dir: str = "data"
    init_weights: str = None
    resume_from: str = None
    vis_folder: str = None
    xla: bool = False
    log_every: int = 100
    progress: bool = True
    precision: str = "fp32"
    strategy: str = "none"
    logdir: str = None
    summary_every: int = 100
    image_summary_every: int = 1000
    export_dir: str = None
    vocab_file: str = None
    bench_batch_sizes: tuple = (1, 8)
    bench_json: str = None
    bench_repeats: int = 5
    bench_xla: tuple = (False, True)
    data_format: str = "auto"

    def __post_init__(self):
        max_iter, snapshot, stop, keep = MODEL_DEFAULTS[self.model]
        self.max_iter = self.iteration if self.iteration is not None else max_iter
        self.iteration = self.max_iter
        self.snapshot = self.snapshot or snapshot
        self.stop_iter = self.stop_iter or stop or self.max_iter
        self.keep_snapshots = keep
        self.vocab_size = 8803 if self.dataset == "referit" else 12112
        if self.init_weights is None:
            key = self.weights if self.model in SHORT_NAMES else "deeplab_resnet"
            self.init_weights = INIT_WEIGHTS[key]
        if self.vocab_file is None:
            name = "referit" if self.dataset == "referit" else "Gref"
            self.vocab_file = os.path.join(self.data_dir, f"vocabulary_{name}.txt")
        if self.vis_folder is None:
            self.vis_folder = os.path.join(".", self.dataset, "visualization", f"{self.model}_{self.iteration}")

    @property
    def batch_folder(self):
        return os.path.join(self.batch_root, self.dataset, f"{self.split}_batch")

    @property
    def batch_prefix(self):
        return f"{self.dataset}_{self.split}"

    @property
    def snapshot_folder(self):
        """``-f``; RMI/LSTM default to their original ``./<dataset>/tfmodel``."""
        if self.folder:
            return self.folder
        if self.model in SHORT_NAMES:
            return os.path.join(self.batch_root, self.dataset, "tfmodel")
        raise ValueError(f"-f (snapshot folder) is required for -n {self.model}")

    @property
    def snapshot_name(self):
        """``<dataset>_iter`` (CMPC, RRN) or RMI's ``<dataset>_<weights>_<model>_iter``."""
        if self.model in SHORT_NAMES:
            return f"{self.dataset}_{self.weights}_{SHORT_NAMES[self.model]}_iter"
        return f"{self.dataset}_iter"

    def snapshot_candidates(self, iteration):
        base = os.path.join(self.snapshot_folder, f"{self.snapshot_name}_{iteration}")
        return [base, base + ".tfmodel"]

    @property
    def embedding_path(self):
        name = "referit" if (self.emb and self.dataset == "referit") else "Gref"
        return os.path.join(self.data_dir, f"{name}_emb.npy")

    def load_embedding(self):
        """CMPC's GloVe matrix (``np.load``, no pickles); None for the other models."""
        if self.model != "CMPC_model":
            return None
        path = self.embedding_path
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} not found: CMPC needs the GloVe matrix of the vocabulary; build it with "
                f"external/glove_to_npy.py (see data/README.md)")
        try:
            emb = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"{path}: not a plain .npy array ({e})") from None
        if emb.ndim != 2:
            raise ValueError(f"{path}: expected a 2-D [vocabulary, dim] array, got shape {emb.shape}")
        return emb.astype(np.float32)


def error_line(e):
    """The one line a CLI prints for exception ``e``: an OSError as ``<path>: <reason>`` (both paths of a rename),
    a TensorFlow error by the first line of its message, anything else by the first line of ``str(e)``."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        paths = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else f"{e.filename}"
        return f"{paths}: {e.strerror}"
    tf = sys.modules.get("tensorflow")
    text = e.message if tf is not None and isinstance(e, tf.errors.OpError) else str(e)
    return (text.strip().splitlines() or [type(e).__name__])[0][:500]
