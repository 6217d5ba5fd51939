"""One run configuration from the originals' flags, with each model's original defaults (from its registry entry,
``models.model_spec``)."""
import dataclasses
import os
import sys

import numpy as np


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
    lr: float = None
    batch_size: int = None
    visualize: bool = False
    dcrf: bool = False
    emb: bool = False
    conv5: bool = False
    weights: str = "deeplab"
    image_size: int = None
    seed: int = 0
    batch_root: str = "."
    data_dir: str = "data"
    data_root: str = "."
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
    bench_parts: bool = False
    bench_baseline: str = None
    data_format: str = "auto"

    def __post_init__(self):
        from models import model_spec

        self.spec = model_spec(self.model)
        defaults = self.spec.defaults
        self.max_iter = self.iteration if self.iteration is not None else defaults.max_iter
        self.iteration = self.max_iter
        self.snapshot = self.snapshot or defaults.snapshot
        self.stop_iter = self.stop_iter or defaults.stop or self.max_iter
        self.keep_snapshots = defaults.keep
        self.lr = defaults.lr if self.lr is None else self.lr
        self.batch_size = self.batch_size or defaults.batch_size
        self.image_size = self.image_size or defaults.image_size
        self.vocab_size = 8803 if self.dataset == "referit" else 12112
        if self.init_weights is None:
            self.init_weights = self.spec.default_init_weights(self.weights)
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
        folder = self.spec.default_snapshot_folder(self.batch_root, self.dataset)
        if folder:
            return folder
        raise ValueError(f"-f (snapshot folder) is required for -n {self.model}")

    @property
    def snapshot_name(self):
        """``<dataset>_iter`` (CMPC, RRN, ReSTR) or RMI's ``<dataset>_<weights>_<model>_iter``."""
        return self.spec.snapshot_name(self.dataset, self.weights)

    def snapshot_candidates(self, iteration):
        return self.spec.snapshot_candidates(self.snapshot_folder, self.dataset, self.weights, iteration)

    @property
    def embedding_path(self):
        return os.path.join(self.data_dir, self.spec.embedding_file(self.dataset, self.emb))

    def load_embedding(self):
        """The GloVe matrix of a model that embeds words with it (CMPC, ReSTR; ``np.load``, no pickles); None for
        the other models."""
        if not self.spec.needs_embedding(self.emb):
            return None
        path = self.embedding_path
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} not found: {self.model} needs the GloVe matrix of the vocabulary; build it with "
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


def run_converter(convert, out, log):
    """Run ``convert()`` as every converter in ``external/`` does and return (exit code, its result or None): bad
    input (a missing file, a file that is not what it should be: ``FileNotFoundError`` / ``ValueError``) →
    ``error: <message>``, 2; an OS or TensorFlow error → ``error: <error_line>``, 1; Ctrl-C → ``interrupted; <out>
    not written``, 130; each as one line on ``log``."""
    tf = sys.modules.get("tensorflow")
    system_errors = (OSError,) + ((tf.errors.OpError,) if tf is not None else ())
    try:
        return 0, convert()
    except (FileNotFoundError, ValueError) as e:
        log.error("error: %s", e)
        return 2, None
    except system_errors as e:
        log.error("error: %s", error_line(e))
        return 1, None
    except KeyboardInterrupt:
        log.error("interrupted; %s not written", out)
        return 130, None
