"""Convert original DeepLab-ResNet-101 backbone weights into a TF2 checkpoint of ``models.backbone.Backbone``.

Usage: ``python external/convert_backbone.py SRC OUT [--allow-partial] [--allow-pickle] [--fc1000 auto|yes|no]``

- SRC: DrSleep's ``deeplab_resnet_init.ckpt`` (CMPC, RRN), TF-deeplab's ``ResNet101_train.tfmodel`` (RMI
  ``-w deeplab``), TF-resnet's ``ResNet101_init.tfmodel`` (RMI ``-w resnet``) — name-based TF1 checkpoints, V1 file or
  V2 prefix — or the Caffe-converted ``.npy`` dicts those projects made (pickled: refused without ``--allow-pickle``).
  The naming scheme is detected from the stored names (see util/checkpoints.py).
- OUT: checkpoint prefix; ``tf.train.Checkpoint(backbone=Backbone(...))`` is written under a temporary prefix and
  renamed, so an interrupted run leaves nothing half-written.
- ``--fc1000 auto`` (default) builds TF-resnet's ``ResNet/fc1000`` head when the source holds it.
- Errors are one line: a bad SRC exits with status 2, an OS error (permissions, disk full; the path named) with 1,
  Ctrl-C with 130; OUT is then not written. SRC that this converter wrote already is refused (status 2).
- Prints a table (canonical name, stored name, shape, status), the unexpected stored tensors and a summary to stdout.
  A source lacking any backbone tensor is refused (exit 2, nothing written) unless ``--allow-partial``; the missing
  variables then keep their zero initial values.

``util.checkpoints.load_backbone_weights`` reads every SRC format directly at run time too; converting once saves
the renaming and the unpickling on every start.
"""
import argparse
import logging
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported, as trainval_model.py

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import tensorflow as tf  # noqa: E402

from models.backbone import FC1000, Backbone  # noqa: E402
from util.checkpoints import (CheckpointMismatch, backbone_name_map, detect_backbone_format,  # noqa: E402
                              load_backbone_weights, open_backbone_source, save_backbone_checkpoint)
from util.config import error_line  # noqa: E402

# The root of the stored names in a checkpoint this converter wrote (``tf.train.Checkpoint(backbone=...)``).
OUR_ROOT = "backbone/vars/"

log = logging.getLogger("convert_backbone")


def source_has_fc1000(stored_names):
    """True if the stored names (any scheme) include both ``fc1000`` tensors of TF-resnet."""
    fmt, root = detect_backbone_format(stored_names)
    name_map, _, _ = backbone_name_map(FC1000, fmt, root, stored_names)
    return all(name_map[n] in stored_names for n in FC1000)


def format_table(report, shapes):
    """The printed report: one row per model variable, then the unexpected stored tensors, then counts."""
    missing = set(report["missing"])
    rows = [("status", "variable", "stored as", "shape")]
    rows += [("MISSING" if n in missing else "mapped", n, report["sources"][n], "x".join(map(str, shapes[n])))
             for n in report["sources"]]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows]
    lines += [f"unexpected  {n}" for n in report["unexpected"]]
    lines.append(f"{report['path']} ({report['format']}): {len(report['loaded'])} mapped, {len(missing)} missing, "
                 f"{len(report['unexpected'])} unexpected")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="TF1 checkpoint (DrSleep / TF-deeplab / TF-resnet), TF2 checkpoint or .npy dict")
    parser.add_argument("out", help="output checkpoint prefix")
    parser.add_argument("--allow-partial", action="store_true",
                        help="write even if backbone tensors are missing (they stay zero)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="unpickle a .npy dict; pickles can execute code, use only for files you trust")
    parser.add_argument("--fc1000", choices=("auto", "yes", "no"), default="auto",
                        help="build TF-resnet's fc1000 head (auto: when the source holds it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        return convert(parser, args)
    except (OSError, tf.errors.OpError) as e:
        parser.exit(1, f"convert_backbone: error: {error_line(e)}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"convert_backbone: interrupted; {args.out} not written\n")


def convert(parser, args):
    """The conversion of ``main``'s parsed ``args``; input problems exit through ``parser`` with status 2."""
    try:
        path, reader = open_backbone_source(args.src, args.allow_pickle)
        stored = reader.get_variable_to_shape_map()
        if detect_backbone_format(stored) == ("tf2", OUR_ROOT):
            raise ValueError(f"{path} is already a TF2 snapshot of ours (a converted backbone): nothing to convert; "
                             f"pass it to --init-weights as it is")
        fc1000 = source_has_fc1000(stored) if args.fc1000 == "auto" else args.fc1000 == "yes"
        backbone = Backbone(fc1000=fc1000)
        report = load_backbone_weights(backbone, path, allow_partial=True, allow_pickle=args.allow_pickle)
    except (FileNotFoundError, CheckpointMismatch, ValueError) as e:
        parser.exit(2, f"convert_backbone: error: {e}\n")
    print(format_table(report, {n: v.shape.as_list() for n, v in backbone.tf1_variables().items()}))
    if report["missing"] and not args.allow_partial:
        parser.exit(2, f"convert_backbone: error: {len(report['missing'])} backbone tensors are missing (first: "
                       f"{report['sources'][report['missing'][0]]}); nothing written. Pass --allow-partial to write "
                       "a checkpoint whose missing variables stay zero.\n")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_backbone_checkpoint(backbone, args.out)
    log.info("wrote %s (%d variables, fc1000=%s)", args.out, len(backbone.tf1_variables()), fc1000)


if __name__ == "__main__":
    main()
