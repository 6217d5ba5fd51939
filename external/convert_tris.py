"""Convert a TRIS PyTorch checkpoint (``.pth``) into our TF2 checkpoint, without torch.

Usage: ``python external/convert_tris.py SRC.pth OUT``

- SRC: a released TRIS checkpoint (``stage1_<dataset>.pth`` from fawnliu/storage v1.0.4, ``stage2_<dataset>.pth``
  from v1.0.1) or one TRIS's training wrote (``utils/util.save_checkpoint``: {'model', 'optimizer',
  'lr_scheduler', 'epoch'}; only 'model' is used, as TRIS's ``load_checkpoint``), or a plain state_dict. It is read
  by ``util.pth`` (a restricted unpickler: tensors and containers only; any other pickled object is refused,
  naming it).
- The stage is read from the keys (``vis_project`` → stage 1, ``reduced_c1`` → stage 2), the CLIP sizes as TRIS's
  ``clip.build_model`` reads them, the head sizes from their shapes. Loading is strict: a missing, misshapen or
  unexpected tensor stops the conversion, naming it (the original loads with ``strict=False``).
- OUT: output prefix of a TF2 checkpoint of ``models.tris.TRISStage1`` / ``TRISStage2``
  (``tf.train.Checkpoint(model=…)``), written atomically (temporary prefix, then renamed).

Exit codes: 0 written; 2 bad input (missing file, not a TRIS checkpoint, refused pickle); 1 write or TensorFlow
error; 130 interrupted.
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

from models import tris  # noqa: E402
from util.config import run_converter  # noqa: E402
from util.pth import load_pth  # noqa: E402
from util.snapshots import write_checkpoint_atomic  # noqa: E402

log = logging.getLogger("convert_tris")
CHECKPOINT_SOURCE = ("TRIS's README links stage1_*.pth (fawnliu/storage v1.0.4) and stage2_*.pth (v1.0.1); "
                     "training writes <output>/<name>.pth")


def load_tris_pth(path):
    """The TRIS model (stage 1 or 2) held by the ``.pth`` at ``path``, strictly loaded."""
    state_dict = tris.model_state_dict(load_pth(path, get_from=CHECKPOINT_SOURCE), str(path))
    return tris.from_state_dict(state_dict, str(path)), state_dict


def convert(src, out):
    """Read ``src`` (.pth), write the TF2 checkpoint ``out``; returns (stage, tensors, parameters)."""
    model, state_dict = load_tris_pth(src)
    write_checkpoint_atomic(tf.train.Checkpoint(model=model), str(out))
    parameters = sum(int(np.prod(v.shape)) for k, v in model.state_dict_variables().items() if v.trainable)
    return model.stage, len(state_dict), parameters


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="TRIS checkpoint (.pth)")
    parser.add_argument("out", help="output prefix of the TF2 checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    code, result = run_converter(lambda: convert(args.src, args.out), args.out, log)
    if code:
        return code
    stage, tensors, parameters = result
    log.info("TRIS stage %d: %d tensors, %d parameters", stage, tensors, parameters)
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
