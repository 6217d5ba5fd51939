"""Convert an original TF1 training or test snapshot into our TF2 snapshot format.

Usage: ``python external/convert_snapshot.py SRC OUT -n MODEL [-w deeplab|resnet] [--with-optimizer]``

- SRC: an original snapshot prefix, e.g. ``ckpts/unc/cmpc_model/unc_iter_700000.tfmodel`` (CMPC, RRN) or
  ``unc/tfmodel/unc_deeplab_RMI_iter_650000.tfmodel`` (RMI, LSTM). Head variables load by their TF1 names, the
  backbone by whichever of the three naming schemes the snapshot uses.
- OUT: output prefix, e.g. ``ckpts/unc/cmpc_model/unc_iter_700000`` — then ``trainval_model.py -m test -i 700000``
  (and training, which resumes from the newest snapshot of its folder) pick it up. Written atomically.
- ``--with-optimizer``: also carry the training state (the float step counter, ``beta1_power``/``beta2_power`` and
  the Adam slots ``text_objseg/<name>/Adam[_1]``) so training resumes exactly; SRC must be a training snapshot.
- Errors are one line: a bad SRC exits with status 2, an OS error (permissions, disk full; the path named) with 1,
  Ctrl-C with 130; OUT is then not written. SRC that is already a TF2 snapshot of ours is refused (status 2).
- The model's sizes are read from SRC: the vocabulary from the embedding, the input size from the ConvLSTM
  peepholes (CMPC, RRN; 320 otherwise). A missing or misshapen tensor stops the conversion, naming it.
"""
import argparse
import logging
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported, as trainval_model.py

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from models import MODEL_NAMES, build_model, canonical_name  # noqa: E402
from util.checkpoints import CheckpointMismatch, read_tf1_checkpoint  # noqa: E402
from util.config import run_converter  # noqa: E402
from util.optim import TF1Adam  # noqa: E402
from util.snapshots import is_tf2_checkpoint, restore_model, write_checkpoint_atomic  # noqa: E402

log = logging.getLogger("convert_snapshot")
PEEPHOLE = "text_objseg/rnn/conv_lstm_cell/W_ci"


def model_from_snapshot(name, stored, weights="deeplab"):
    """Build ``name`` with the sizes the stored tensors imply (see the module docstring)."""
    name = canonical_name(name)
    image_size = stored[PEEPHOLE][0] * 8 if PEEPHOLE in stored else 320
    if name == "CMPC_model":
        if "text_objseg/Variable" not in stored:
            raise CheckpointMismatch("tensor text_objseg/Variable (the GloVe matrix) is missing")
        emb = np.zeros(stored["text_objseg/Variable"], np.float32)
        return build_model(name, embedding=emb, image_size=image_size)
    if "text_objseg/embedding" not in stored:
        raise CheckpointMismatch("tensor text_objseg/embedding is missing")
    return build_model(name, vocab_size=stored["text_objseg/embedding"][0], image_size=image_size, weights=weights)


def convert(src, out, name, weights="deeplab", with_optimizer=False):
    """Convert; returns the loaders' report (see ``util.snapshots.restore_model``). Raises ValueError when ``src`` is
    already one of our TF2 snapshots (nothing to convert)."""
    stored = read_tf1_checkpoint(src)
    if is_tf2_checkpoint(src):
        raise ValueError(f"{src} is already a TF2 snapshot of ours: nothing to convert; use it as it is "
                         f"(trainval_model.py -f <its folder> -i <N>, or --resume-from {src})")
    model = model_from_snapshot(name, stored, weights)
    objects = {"model": model}
    optimizer = None
    if with_optimizer:
        head = model.head
        optimizer = TF1Adam(model.train_variables(), 2.5e-4, head.LR_DECAY_STEPS, head.STEP_NAME)
        objects["optimizer"] = optimizer
    report = restore_model(model, src, optimizer)
    write_checkpoint_atomic(tf.train.Checkpoint(**objects), out)
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="original TF1 snapshot prefix (…_iter_N.tfmodel)")
    parser.add_argument("out", help="output prefix of the TF2 snapshot")
    parser.add_argument("-n", required=True, choices=MODEL_NAMES, help="model")
    parser.add_argument("-w", default="deeplab", choices=("deeplab", "resnet"), help="RMI/LSTM backbone weights")
    parser.add_argument("--with-optimizer", action="store_true", help="carry the Adam state and step counter")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    code, result = run_converter(lambda: convert(args.src, args.out, args.n, args.w, args.with_optimizer), args.out, log)
    if code:
        return code
    report = result
    for part in ("head", "backbone", "optimizer"):
        if part in report:
            log.info("%-9s %4d loaded, %d unexpected", part, len(report[part]["loaded"]), len(report[part]["unexpected"]))
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
