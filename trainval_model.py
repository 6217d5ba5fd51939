"""Train and test the referring segmentation models with the originals' command line.

    python trainval_model.py -m train -d unc -t train -n CMPC_model -emb -f ckpts/unc/cmpc_model
    python trainval_model.py -m test -d unc -t val -n CMPC_model -i 700000 -c -emb -f ckpts/unc/cmpc_model
    python trainval_model.py -m train -w deeplab -n RMI -d unc -t train        (RMI's main.py flags)
    python trainval_model.py -m table -n CMPC_model -i 700000 -c -emb -f ckpts/unc/cmpc_model     (util/table.py)
"""
import argparse
import logging
import math
import os
import sys
import tempfile

from util import tf_env

if __name__ == "__main__":
    tf_env.configure()  # as a script only: an importer's process (and its children) keeps its own environment

MODES = ("train", "test", "bench", "export", "table")
DATASETS = ("Gref", "unc", "unc+", "referit")
SPLITS = ("train", "trainval", "val", "test", "testA", "testB")
FLOAT32_MAX = 3.4028234663852886e38
EXIT_INTERRUPTED = 130
log = logging.getLogger("trainval_model")


def _integer(text, minimum, what):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def positive_int(text):
    """argparse type: an integer ≥ 1."""
    return _integer(text, 1, "a positive integer")


def nonnegative_int(text):
    """argparse type: an integer ≥ 0."""
    return _integer(text, 0, "an integer ≥ 0")


def seed_int(text):
    """argparse type: a numpy seed, 0 ≤ seed < 2³² − 2²⁰ (epoch seeds are seed + epoch)."""
    value = _integer(text, 0, "an integer ≥ 0")
    if value >= 2 ** 32 - 2 ** 20:
        raise argparse.ArgumentTypeError(f"expected a seed below {2 ** 32 - 2 ** 20}, got {value}")
    return value


def learning_rate(text):
    """argparse type: a finite float in (0, float32 max] (the step runs in float32)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= FLOAT32_MAX):
        raise argparse.ArgumentTypeError(f"expected a finite learning rate > 0, got {text}")
    return value


def existing_file(text):
    """argparse type: a path to an existing file."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text} is not a file")
    return text


def batch_size_list(text):
    """argparse type: comma-separated positive integers, e.g. ``1,8``."""
    return tuple(positive_int(part.strip()) for part in text.split(","))


def parse_args(argv):
    from models import MODEL_NAMES

    p = argparse.ArgumentParser(prog="trainval_model.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-g", type=str, default="0", help="GPU id (sets CUDA_VISIBLE_DEVICES)")
    p.add_argument("-i", type=nonnegative_int, default=None,
                   help="train: max iterations; test: snapshot iteration (default per model: 800000 CMPC/RRN, 750000 RMI/LSTM, "
                        "400000 ReSTR)")
    p.add_argument("-s", type=positive_int, default=None, help="snapshot interval (default 100000 CMPC/RRN, 50000 RMI/LSTM, 5000 ReSTR)")
    p.add_argument("-st", type=positive_int, default=None, help="stop training at this iteration (default 700000 CMPC, else -i)")
    p.add_argument("-m", type=str, required=True, choices=MODES, help="mode")
    p.add_argument("-d", type=str, default="referit", choices=DATASETS, help="dataset")
    p.add_argument("-t", type=str, default=None, choices=SPLITS, help="split (train, test)")
    p.add_argument("-f", type=str, default=None, help="snapshot folder (RMI/LSTM default ./<dataset>/tfmodel)")
    p.add_argument("-lr", type=learning_rate, default=None, help="start learning rate (default 0.00025; ReSTR 1e-5)")
    p.add_argument("-bs", type=positive_int, default=None, help="batch size (default 1; ReSTR 8)")
    p.add_argument("-v", action="store_true", help="test: save image / ground truth / prediction PNGs")
    p.add_argument("-c", action="store_true", help="test: also evaluate with DenseCRF")
    p.add_argument("-emb", action="store_true", help="CMPC: use the dataset's GloVe file (referit_emb.npy for referit)")
    p.add_argument("-n", type=str, required=True, choices=MODEL_NAMES, help="model")
    p.add_argument("-conv5", action="store_true", help="train: also fine-tune the res3-res5 convolution kernels")
    p.add_argument("-w", type=str, default="deeplab", choices=("deeplab", "resnet"), help="RMI/LSTM backbone weights")
    p.add_argument("--img-size", type=positive_int, default=None,
                   help="network input size (320 in the TF1 originals, 480 in ReSTR's)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the initialisers and the per-epoch shuffles")
    p.add_argument("--batch-root", default=".", help="folder holding <dataset>/<split>_batch (default .)")
    p.add_argument("--data-dir", default="data", help="folder of the *_emb.npy files (default data)")
    p.add_argument("--data-root", default=None,
                   help="TRIS: folder holding data/coco/images/train2014 and external/refer/data, as "
                        "build_batches.py --data-root (-d referit: data/referit/annotations/<split>.pickle and "
                        "data/referit/images, TRIS's layout); train: default .; test: evaluate from these files "
                        "instead of the .npz batches (with the gt boxes: TRIS's Hit)")
    p.add_argument("--init-weights", default=None, help="backbone initialisation checkpoint (default: the original path; "
                   "'random' for seeded stand-in weights)")
    p.add_argument("--resume-from", default=None, help="train: continue from this snapshot (ours or an original TF1 one)")
    p.add_argument("--vis-dir", default=None, help="test -v: output folder (default ./<dataset>/visualization/<model>_<iter>)")
    p.add_argument("--xla", action="store_true", help="compile the train step with XLA")
    p.add_argument("--log-every", type=positive_int, default=100, help="train: log every N iterations (100 in the originals)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="compute dtype (fp32 = the originals' numbers; bf16/fp16 keep fp32 losses and master weights)")
    p.add_argument("--strategy", default="none", choices=("none", "mirrored", "multiworker"),
                   help="tf.distribute strategy (multiworker reads TF_CONFIG)")
    p.add_argument("--logdir", default=None, help="TensorBoard folder (off when not given)")
    p.add_argument("--summary-every", type=positive_int, default=100, help="train: scalar summaries every N iterations")
    p.add_argument("--image-summary-every", type=positive_int, default=1000, help="train: image summaries every N iterations")
    p.add_argument("--export-dir", default=None, help="export: SavedModel output folder")
    p.add_argument("--vocab-file", default=None,
                   help="export: vocabulary (default <data-dir>/vocabulary_Gref.txt, referit: vocabulary_referit.txt)")
    p.add_argument("--bench-batch-sizes", type=batch_size_list, default=(1, 8), help="bench: comma-separated batch sizes")
    p.add_argument("--bench-json", default=None, help="bench: also write the figures as JSON here")
    p.add_argument("--bench-repeats", type=positive_int, default=5, help="bench: timed calls per case (median; at least 5)")
    p.add_argument("--bench-no-xla", action="store_true", help="bench: skip the XLA cases")
    p.add_argument("--bench-parts", action="store_true",
                   help="bench: also time the backbone alone and forward+backward without update (a per-part split)")
    p.add_argument("--bench-baseline", type=existing_file, default=None,
                   help="bench: JSON of the originals' timings (orig_timing or benchmarks/orig_parts.py): print ratios")
    p.add_argument("--data-format", default="auto", choices=("auto", "npz", "tfrecord"),
                   help="train: read .npz files or TFRecord shards (auto: .npz when present)")
    args = p.parse_args(argv)
    problem = command_line_problem(args)
    if problem:
        p.error(problem)
    return args


def _nearest_existing(path):
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def folder_problem(path, flag):
    """Why ``path`` cannot be used as an output folder (None if it can): it must be a folder or creatable, and the
    nearest existing folder on its way must accept a file (probed with an anonymous temporary file)."""
    if os.path.lexists(path) and not os.path.isdir(path):
        return f"{flag} {path} exists and is not a folder"
    base = _nearest_existing(path)
    if not os.path.isdir(base):
        return f"{flag} {path} cannot be created: {base} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        return f"{flag} {path}: cannot write in {base} ({e.strerror})"
    return None


def output_file_problem(path, flag):
    """Why the file ``path`` cannot be written (None if it can): not a folder, and its folder usable
    (``folder_problem``)."""
    if os.path.isdir(path):
        return f"{flag} {path} is a folder, expected a file name"
    return folder_problem(os.path.dirname(os.path.abspath(path)), f"{flag} {path}: its folder")


def command_line_problem(args):
    """The first problem of a parsed command line that can be seen before any work starts, or None.

    Checked: ``-t`` given for train/test; ``-f`` given where needed, a folder (train: writable or creatable);
    ``--logdir`` / ``--vis-dir`` writable; ``--export-dir`` given, its parent writable and replaceable
    (``util.export.check_export_dir``); ``--bench-json``'s folder writable; in training, ``--img-size`` equal to the
    size the first training sample was built at, or what the registry entry's ``train_input_problem`` checks (TRIS:
    the refer files, images, BPE and ViT-B/32 files, the initial weights)."""
    from util import data

    if args.m in ("train", "test") and args.t is None:
        return f"-t (split) is required with -m {args.m}"
    cfg = config_from_args(args)
    try:
        folder = cfg.snapshot_folder
    except ValueError as e:
        if args.m != "bench":
            return str(e)
        folder = None
    problems = []
    if args.m == "train":
        problems.append(folder_problem(folder, "-f"))
    elif folder and os.path.lexists(folder) and not os.path.isdir(folder):
        problems.append(f"-f {folder} is not a folder")
    if args.logdir and args.m in ("train", "test"):
        problems.append(folder_problem(args.logdir, "--logdir"))
    if args.m == "test" and args.v and args.vis_dir:
        problems.append(folder_problem(args.vis_dir, "--vis-dir"))
    if args.m == "bench" and args.bench_json:
        problems.append(output_file_problem(args.bench_json, "--bench-json"))
    if args.c and args.m == "test" and not cfg.spec.supports_crf:
        return f"-c (DenseCRF) is not available for -n {cfg.model} (its original evaluation has none)"
    if args.m == "export" and not cfg.spec.exportable:
        return f"-m export is not available for -n {cfg.model} yet"
    if args.m == "export":
        if not args.export_dir:
            return "-m export needs --export-dir DIR"
        from util.export import check_export_dir
        try:
            check_export_dir(args.export_dir, (folder,))
        except ValueError as e:
            return str(e)
        problems.append(folder_problem(os.path.dirname(os.path.abspath(args.export_dir)),
                                       f"--export-dir {args.export_dir}: its folder"))
    problems = [p for p in problems if p]
    if problems:
        return problems[0]
    if args.m == "train" and cfg.spec.train_loop is not None:
        return cfg.spec.train_input_problem(cfg)
    if args.m == "train":
        found = data.sample_image_size(cfg.batch_folder, cfg.batch_prefix, cfg.data_format)
        if found and found[:2] != (cfg.image_size, cfg.image_size):
            return (f"--img-size {cfg.image_size} does not match the training batches: {found[2]} is "
                    f"{found[0]}×{found[1]} (built with build_batches.py --img-size {found[0]}); pass --img-size "
                    f"{found[0]} or rebuild the batches")
    return None


def config_from_args(args):
    from models import canonical_name
    from util.config import RunConfig

    return RunConfig(
        mode=args.m, model=canonical_name(args.n), dataset=args.d, split=args.t, iteration=args.i, snapshot=args.s,
        stop_iter=args.st, folder=args.f, lr=args.lr, batch_size=args.bs, visualize=args.v, dcrf=args.c,
        emb=args.emb, conv5=args.conv5, weights=args.w, image_size=args.img_size, seed=args.seed,
        batch_root=args.batch_root, data_dir=args.data_dir, data_root=args.data_root, init_weights=args.init_weights,
        resume_from=args.resume_from, vis_folder=args.vis_dir, xla=args.xla, log_every=args.log_every,
        progress=sys.stderr.isatty(), precision=args.precision, strategy=args.strategy, logdir=args.logdir,
        summary_every=args.summary_every, image_summary_every=args.image_summary_every, export_dir=args.export_dir,
        vocab_file=args.vocab_file, bench_batch_sizes=args.bench_batch_sizes,
        bench_json=args.bench_json, bench_repeats=args.bench_repeats,
        bench_xla=(False,) if args.bench_no_xla else (False, True), bench_parts=args.bench_parts,
        bench_baseline=args.bench_baseline, data_format=args.data_format)


def interrupted_note(args):
    """What an interrupted run leaves: the newest good snapshot (train: complete and finite, the one a restart
    resumes from), or that nothing was written."""
    if args is None:
        return "nothing was written"
    if args.m == "train":
        from util.snapshots import Snapshots

        cfg = config_from_args(args)
        latest = Snapshots(cfg.snapshot_folder, cfg.snapshot_name).latest_good()[1]
        return f"the last complete snapshot is {latest or '(none yet)'}"
    return {"test": "no metrics written", "export": "no SavedModel written",
            "bench": "no figures written",
            "table": "finished splits are cached beside the snapshots; the same command continues"}[args.m]


def main(argv=None):
    """Run one command line; returns the exit status (0; 1 for an error; 130 when interrupted by Ctrl-C).
    A bad command line exits with status 2 (argparse)."""
    args = None
    try:
        args = parse_args(argv)
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
        os.environ["CUDA_VISIBLE_DEVICES"] = args.g
        return run(args)
    except KeyboardInterrupt:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
        log.error("interrupted; %s", interrupted_note(args))
        return EXIT_INTERRUPTED


def run(args):
    """Run the mode of a validated command line; errors become one ``error: …`` line and status 1."""
    import tensorflow as tf

    from util.checkpoints import CheckpointMismatch
    from util.config import error_line
    from util.data import BadSample
    from util.train import TrainingDiverged

    try:
        cfg = config_from_args(args)
        if cfg.mode == "train":
            from util.train import train
            train(cfg)
        elif cfg.mode == "test":
            from util.evaluate import test
            test(cfg)
        elif cfg.mode == "bench":
            from util.bench import bench
            bench(cfg)
        elif cfg.mode == "table":
            from util.table import table
            table(cfg)
        else:
            from util.export import export
            export(cfg)
    except (OSError, tf.errors.OpError, CheckpointMismatch, BadSample, TrainingDiverged, ValueError) as e:
        log.error("error: %s", error_line(e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
