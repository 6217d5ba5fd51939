"""Train and test the referring segmentation models with the originals' command line.

    python trainval_model.py -m train -d unc -t train -n CMPC_model -emb -f ckpts/unc/cmpc_model
    python trainval_model.py -m test -d unc -t val -n CMPC_model -i 700000 -c -emb -f ckpts/unc/cmpc_model
    python trainval_model.py -m train -w deeplab -n RMI -d unc -t train        (RMI's main.py flags)
"""
import argparse
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MODES = ("train", "test", "bench", "export")
DATASETS = ("Gref", "unc", "unc+", "referit")
SPLITS = ("train", "trainval", "val", "test", "testA", "testB")


def parse_args(argv):
    from models import MODEL_NAMES

    p = argparse.ArgumentParser(prog="trainval_model.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-g", type=str, default="0", help="GPU id (sets CUDA_VISIBLE_DEVICES)")
    p.add_argument("-i", type=int, default=None,
                   help="train: max iterations; test: snapshot iteration (default per model: 800000 CMPC/RRN, 750000 RMI/LSTM)")
    p.add_argument("-s", type=int, default=None, help="snapshot interval (default 100000 CMPC/RRN, 50000 RMI/LSTM)")
    p.add_argument("-st", type=int, default=None, help="stop training at this iteration (default 700000 CMPC, else -i)")
    p.add_argument("-m", type=str, required=True, choices=MODES, help="mode")
    p.add_argument("-d", type=str, default="referit", choices=DATASETS, help="dataset")
    p.add_argument("-t", type=str, default=None, choices=SPLITS, help="split (train, test)")
    p.add_argument("-f", type=str, default=None, help="snapshot folder (RMI/LSTM default ./<dataset>/tfmodel)")
    p.add_argument("-lr", type=float, default=0.00025, help="start learning rate")
    p.add_argument("-bs", type=int, default=1, help="batch size")
    p.add_argument("-v", action="store_true", help="test: save image / ground truth / prediction PNGs")
    p.add_argument("-c", action="store_true", help="test: also evaluate with DenseCRF")
    p.add_argument("-emb", action="store_true", help="CMPC: use the dataset's GloVe file (referit_emb.npy for referit)")
    p.add_argument("-n", type=str, required=True, choices=MODEL_NAMES, help="model")
    p.add_argument("-conv5", action="store_true", help="train: also fine-tune the res3-res5 convolution kernels")
    p.add_argument("-w", type=str, default="deeplab", choices=("deeplab", "resnet"), help="RMI/LSTM backbone weights")
    p.add_argument("--img-size", type=int, default=320, help="network input size (320 in the originals)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisers and the per-epoch shuffles")
    p.add_argument("--batch-root", default=".", help="folder holding <dataset>/<split>_batch (default .)")
    p.add_argument("--data-dir", default="data", help="folder of the *_emb.npy files (default data)")
    p.add_argument("--init-weights", default=None, help="backbone initialisation checkpoint (default: the original path)")
    p.add_argument("--resume-from", default=None, help="train: continue from this snapshot (ours or an original TF1 one)")
    p.add_argument("--vis-dir", default=None, help="test -v: output folder (default ./<dataset>/visualization/<model>_<iter>)")
    p.add_argument("--xla", action="store_true", help="compile the train step with XLA")
    p.add_argument("--log-every", type=int, default=100, help="train: log every N iterations (100 in the originals)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="compute dtype (fp32 = the originals' numbers; bf16/fp16 keep fp32 losses and master weights)")
    p.add_argument("--strategy", default="none", choices=("none", "mirrored", "multiworker"),
                   help="tf.distribute strategy (multiworker reads TF_CONFIG)")
    p.add_argument("--logdir", default=None, help="TensorBoard folder (off when not given)")
    p.add_argument("--summary-every", type=int, default=100, help="train: scalar summaries every N iterations")
    p.add_argument("--image-summary-every", type=int, default=1000, help="train: image summaries every N iterations")
    p.add_argument("--export-dir", default=None, help="export: SavedModel output folder")
    p.add_argument("--vocab-file", default=None,
                   help="export: vocabulary (default <data-dir>/vocabulary_Gref.txt, referit: vocabulary_referit.txt)")
    p.add_argument("--bench-batch-sizes", default="1,8", help="bench: comma-separated batch sizes")
    p.add_argument("--bench-json", default=None, help="bench: also write the figures as JSON here")
    p.add_argument("--bench-repeats", type=int, default=5, help="bench: timed calls per case (median; at least 5)")
    p.add_argument("--bench-no-xla", action="store_true", help="bench: skip the XLA cases")
    p.add_argument("--data-format", default="auto", choices=("auto", "npz", "tfrecord"),
                   help="train: read .npz files or TFRecord shards (auto: .npz when present)")
    return p.parse_args(argv)


def config_from_args(args):
    from models import canonical_name
    from util.config import RunConfig

    return RunConfig(
        mode=args.m, model=canonical_name(args.n), dataset=args.d, split=args.t, iteration=args.i, snapshot=args.s,
        stop_iter=args.st, folder=args.f, lr=args.lr, batch_size=args.bs, visualize=args.v, dcrf=args.c,
        emb=args.emb, conv5=args.conv5, weights=args.w, image_size=args.img_size, seed=args.seed,
        batch_root=args.batch_root, data_dir=args.data_dir, init_weights=args.init_weights,
        resume_from=args.resume_from, vis_folder=args.vis_dir, xla=args.xla, log_every=args.log_every,
        progress=sys.stderr.isatty(), precision=args.precision, strategy=args.strategy, logdir=args.logdir,
        summary_every=args.summary_every, image_summary_every=args.image_summary_every, export_dir=args.export_dir,
        vocab_file=args.vocab_file, bench_batch_sizes=tuple(int(b) for b in args.bench_batch_sizes.split(",")),
        bench_json=args.bench_json, bench_repeats=args.bench_repeats,
        bench_xla=(False,) if args.bench_no_xla else (False, True), data_format=args.data_format)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    os.environ["CUDA_VISIBLE_DEVICES"] = args.g
    from util.checkpoints import CheckpointMismatch
    from util.data import BadSample
    from util.train import TrainingDiverged

    if args.m in ("train", "test") and args.t is None:
        logging.getLogger("trainval_model").error("error: -t (split) is required with -m %s", args.m)
        return 2
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
        else:
            from util.export import export
            export(cfg)
    except (FileNotFoundError, CheckpointMismatch, BadSample, TrainingDiverged, ValueError) as e:
        logging.getLogger("trainval_model").error("error: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
