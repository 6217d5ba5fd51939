"""Convert a SaG PyTorch checkpoint (``.pth.tar``) into our TF2 checkpoint, without torch.

Usage: ``python external/convert_sag.py SRC.pth.tar OUT [--vit-heads 6] [--bert-heads 12]``

- SRC: what SaG's ``train_cma_recon.save_ckpt`` writes, ``logs/<remark>/{ckpt,model_best}.pth.tar`` —
  ``{'args': argparse.Namespace, 'epoch', 'iou', 'loss', 'model': state_dict}`` (a plain state_dict is accepted
  too). Read by ``util.pth`` (a restricted unpickler: tensors, containers and the saved Namespace; any other pickled
  object is refused, naming it).
- OUT: output prefix of a TF2 checkpoint of ``models.sag.SaG`` (``tf.train.Checkpoint(model=…)``), written
  atomically.
- The model's sizes: widths, depths, vocabulary, slot groups and the ViT's 480-construction grid from the tensors'
  shapes; the crop size, slots per group, and the head counts of the aggregator and the cross-modal attention from
  the saved ``args`` (``--crop_size``, ``--cascade_factor``, ``--agg_cross_head``, ``--agg_latent_head``,
  ``--cma_heads``; the scripts' values when SRC has no args). The ViT's and BERT's head counts are in neither (the
  ViT's comes from ``model/img_encoder_cfg.yaml``, BERT's from its config): ``--vit-heads`` (ViT-S: 6) and
  ``--bert-heads`` (bert-base: 12). A missing, misshapen or unexpected tensor, or weight-tied aggregator entries
  that differ, stop the conversion, naming them.
"""
import argparse
import logging
import os
import pathlib
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported, as trainval_model.py

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from models.sag import SaG  # noqa: E402
from util.config import run_converter  # noqa: E402
from util.pth import PthError, load_pth  # noqa: E402
from util.snapshots import write_checkpoint_atomic  # noqa: E402

log = logging.getLogger("convert_sag")
SNAPSHOT_SOURCE = "SaG's train_cma_recon.py writes logs/<remark>/model_best.pth.tar"
SCRIPT_ARGS = {"crop_size": 384, "cascade_factor": 3, "agg_cross_head": 4, "agg_latent_head": 4, "cma_heads": 4}
IMG, AGG = "encoders.img_enc.", "encoders.img_enc.set_pred_module.agg."
BERT = "encoders.txt_enc.bert."


def _count(state_dict, pattern):
    """Number of distinct indices {i} among keys matching ``pattern`` (a regex with one group)."""
    return len({m.group(1) for k in state_dict for m in [re.fullmatch(pattern, k)] if m})


def _heads(width, heads, what, source):
    if heads <= 0 or width % heads:
        raise ValueError(f"{source}: {what} width {width} is not divisible by {heads} heads")
    return width // heads


def sag_sizes(state_dict, args=None, vit_heads=6, bert_heads=12, source="state_dict"):
    """SaG constructor arguments implied by a state_dict's shapes and the saved args (module docstring)."""
    need = (IMG + "img_backbone.cls_token", IMG + "img_backbone.pos_embed", AGG + "queries.slots_mu",
            AGG + "agg_blocks.0.0.fn.to_q.weight", AGG + "agg_blocks.0.4.0.0.fn.to_q.weight",
            AGG + "agg_blocks.0.2.fn.net.0.weight", "cma.attn.fn.to_q.weight",
            BERT + "embeddings.word_embeddings.weight", BERT + "embeddings.position_embeddings.weight",
            BERT + "embeddings.token_type_embeddings.weight", BERT + "encoder.layer.0.intermediate.dense.weight")
    for key in need:
        if key not in state_dict:
            raise ValueError(f"{source}: not a SaG state_dict (no {key})")
    given = {k: getattr(args, k, v) for k, v in SCRIPT_ARGS.items()}
    vit_dim = state_dict[IMG + "img_backbone.cls_token"].shape[-1]
    tokens = state_dict[IMG + "img_backbone.pos_embed"].shape[1] - 1
    grid = int(round(np.sqrt(tokens)))
    if grid * grid != tokens:
        raise ValueError(f"{source}: {tokens} position-embedding patches are not a square grid")
    embed_dim = state_dict[AGG + "queries.slots_mu"].shape[-1]
    words = state_dict[BERT + "embeddings.word_embeddings.weight"]
    bert_hidden = words.shape[1]
    _heads(vit_dim, vit_heads, "ViT", source)
    _heads(bert_hidden, bert_heads, "BERT", source)
    return {"crop_size": int(given["crop_size"]), "construction_size": grid * 16, "vit_dim": vit_dim,
            "vit_heads": vit_heads, "vit_layers": _count(state_dict, r"encoders\.img_enc\.img_backbone\.blocks\.(\d+)"
                                                                       r"\.norm1\.weight"),
            "embed_dim": embed_dim,
            "num_slots": state_dict[AGG + "queries.slots_mu"].shape[1] * int(given["cascade_factor"]),
            "cascade": int(given["cascade_factor"]),
            "agg_depth": _count(state_dict, r"encoders\.img_enc\.set_pred_module\.agg\.agg_blocks\.(\d+)\.0\.norm"
                                            r"\.weight"),
            "cross_heads": int(given["agg_cross_head"]),
            "cross_dim_head": _heads(state_dict[AGG + "agg_blocks.0.0.fn.to_q.weight"].shape[0],
                                     int(given["agg_cross_head"]), "slot cross-attention", source),
            "latent_heads": int(given["agg_latent_head"]),
            "latent_dim_head": _heads(state_dict[AGG + "agg_blocks.0.4.0.0.fn.to_q.weight"].shape[0],
                                      int(given["agg_latent_head"]), "in-group self-attention", source),
            "ff_mult": state_dict[AGG + "agg_blocks.0.2.fn.net.0.weight"].shape[0] / embed_dim,
            "cma_heads": int(given["cma_heads"]),
            "cma_dim_head": _heads(state_dict["cma.attn.fn.to_q.weight"].shape[0], int(given["cma_heads"]),
                                   "cross-modal attention", source),
            "bert_config": {"vocab_size": words.shape[0], "hidden": bert_hidden, "heads": bert_heads,
                            "layers": _count(state_dict, r"encoders\.txt_enc\.bert\.encoder\.layer\.(\d+)\.output"
                                                         r"\.dense\.weight"),
                            "intermediate": state_dict[BERT + "encoder.layer.0.intermediate.dense.weight"].shape[0],
                            "max_positions": state_dict[BERT + "embeddings.position_embeddings.weight"].shape[0],
                            "type_vocab_size": state_dict[BERT + "embeddings.token_type_embeddings.weight"].shape[0]},
            "n_cls": state_dict[IMG + "img_backbone.head.weight"].shape[0]
            if IMG + "img_backbone.head.weight" in state_dict else 1000}


def read_checkpoint(src):
    """``load_pth`` → (state_dict {key: array}, args Namespace or None); refuses anything else in one line."""
    obj = load_pth(src, get_from=SNAPSHOT_SOURCE)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        state_dict, args = obj["model"], obj.get("args")
    else:
        state_dict, args = obj, None
    if not (isinstance(state_dict, dict) and state_dict
            and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state_dict.items())):
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise PthError(f"{src}: neither a SaG checkpoint nor a plain state_dict (top level: {keys})")
    return dict(state_dict), (args if isinstance(args, argparse.Namespace) else None)


def convert(src, out, vit_heads=6, bert_heads=12):
    """Read ``src``, write the TF2 checkpoint ``out``; returns (state_dict keys, distinct parameters)."""
    state_dict, args = read_checkpoint(src)
    model = SaG(**sag_sizes(state_dict, args, vit_heads, bert_heads, str(src)))
    model.load_state_dict(state_dict, str(src))
    write_checkpoint_atomic(tf.train.Checkpoint(model=model), str(out))
    return len(state_dict), sum(int(np.prod(v.shape)) for v in model.distinct_variables().values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="SaG checkpoint (.pth.tar from save_ckpt, or a plain state_dict)")
    parser.add_argument("out", help="output prefix of the TF2 checkpoint")
    parser.add_argument("--vit-heads", type=int, default=6, help="ViT attention heads (not stored; ViT-S: 6)")
    parser.add_argument("--bert-heads", type=int, default=12, help="BERT attention heads (not stored; base: 12)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    code, result = run_converter(lambda: convert(args.src, args.out, args.vit_heads, args.bert_heads), args.out, log)
    if code:
        return code
    keys, parameters = result
    log.info("%d state_dict keys, %d parameters", keys, parameters)
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
