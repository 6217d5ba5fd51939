"""Convert a ReSTR PyTorch snapshot (``.pth``) into our TF2 checkpoint, without torch.

Usage: ``python external/convert_restr.py SRC.pth OUT [--heads 12] [--input-size H,W]``

- SRC: what ReSTR's ``train_restr.py`` saves, ``weights/<exp_name>/<dataset>_<iter>.pth`` — ``torch.save`` of the
  model's plain state_dict (291 tensors at full size). It is read by ``util.pth`` (a restricted unpickler: tensors
  and containers only; any other pickled object is refused, naming it).
- OUT: output prefix of a TF2 checkpoint of ``models.restr.ReSTR`` (``tf.train.Checkpoint(model=…)``), written
  atomically.
- The model's sizes are read from SRC: width D (``encoder_v.cls_token``), patch size, ViT / text / fusion depths,
  decoder stages, head classes, vocabulary and GloVe width (``encoder_l.embedding.weight``); the input size is
  patch size × the position-embedding grid (square; ``--input-size`` for a non-square one). The number of attention
  heads cannot be read from shapes: ``--heads`` (ReSTR: 12). A missing, misshapen or unexpected tensor stops the
  conversion, naming it.
"""
import argparse
import logging
import math
import os
import pathlib
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported, as trainval_model.py

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from models.restr import ReSTR  # noqa: E402
from util.config import run_converter  # noqa: E402
from util.pth import load_state_dict  # noqa: E402
from util.snapshots import write_checkpoint_atomic  # noqa: E402

log = logging.getLogger("convert_restr")
SNAPSHOT_SOURCE = "ReSTR's train_restr.py writes weights/<exp_name>/<dataset>_<iter>.pth"


def _count(state_dict, pattern):
    """Number of distinct indices {i} among keys matching ``pattern`` (a regex with one group)."""
    return len({m.group(1) for k in state_dict for m in [re.fullmatch(pattern, k)] if m})


def restr_sizes(state_dict, n_heads=12, input_size=None, source="state_dict"):
    """ReSTR constructor arguments implied by a state_dict's shapes (see the module docstring)."""
    for key in ("encoder_v.cls_token", "encoder_v.patch_embed.proj.weight", "encoder_v.pos_embed",
                "encoder_l.embedding.weight"):
        if key not in state_dict:
            raise ValueError(f"{source}: not a ReSTR state_dict (no {key})")
    d_model = state_dict["encoder_v.cls_token"].shape[-1]
    patch = state_dict["encoder_v.patch_embed.proj.weight"].shape[-1]
    tokens = state_dict["encoder_v.pos_embed"].shape[1] - 1
    if input_size is None:
        grid = math.isqrt(tokens)
        if grid * grid != tokens:
            raise ValueError(f"{source}: {tokens} position-embedding patches are not a square grid; give --input-size")
        input_size = (grid * patch, grid * patch)
    elif (input_size[0] // patch) * (input_size[1] // patch) != tokens:
        raise ValueError(f"{source}: --input-size {input_size} gives a grid other than the {tokens} stored patches")
    if d_model % n_heads:
        raise ValueError(f"{source}: width {d_model} is not divisible by --heads {n_heads}")
    head = state_dict.get("encoder_v.head.weight")
    return {"image_size": tuple(input_size), "patch_size": patch, "d_model": d_model, "n_heads": n_heads,
            "vit_layers": _count(state_dict, r"encoder_v\.blocks\.(\d+)\.norm1\.weight"),
            "text_layers": _count(state_dict, r"encoder_l\.blocks\.(\d+)\.norm1\.weight"),
            "fusion_layers": _count(state_dict, r"fusion_module\.blocks_vl\.(\d+)\.norm1\.weight"),
            "n_up": _count(state_dict, r"fusion_module\.decoder\.(\d+)\.up\.1\.weight"),
            "n_cls": head.shape[0] if head is not None else 1000}


def restr_from_state_dict(state_dict, n_heads=12, input_size=None, source="state_dict"):
    """Build the ReSTR the state_dict describes (``restr_sizes``) and load it (strict ``load_state_dict``)."""
    sizes = restr_sizes(state_dict, n_heads, input_size, source)
    embedding = np.zeros(state_dict["encoder_l.embedding.weight"].shape, np.float32)
    model = ReSTR(embedding, **sizes)
    model.load_state_dict(state_dict, source)
    return model


def convert(src, out, n_heads=12, input_size=None):
    """Read ``src`` (.pth), write the TF2 checkpoint ``out``; returns (number of tensors, number of parameters)."""
    state_dict = load_state_dict(src, get_from=SNAPSHOT_SOURCE)
    model = restr_from_state_dict(state_dict, n_heads, input_size, str(src))
    write_checkpoint_atomic(tf.train.Checkpoint(model=model), str(out))
    return len(state_dict), sum(int(np.prod(v.shape)) for v in state_dict.values())


def _size(text):
    try:
        h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W, got {text!r}") from None
    return h, w


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="ReSTR snapshot (.pth, a torch.save'd state_dict)")
    parser.add_argument("out", help="output prefix of the TF2 checkpoint")
    parser.add_argument("--heads", type=int, default=12, help="attention heads (not stored in the .pth; ReSTR: 12)")
    parser.add_argument("--input-size", type=_size, default=None, help="H,W for a non-square position grid")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    code, result = run_converter(lambda: convert(args.src, args.out, args.heads, args.input_size), args.out, log)
    if code:
        return code
    tensors, parameters = result
    log.info("%d tensors, %d parameters", tensors, parameters)
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
