"""Segment the object one sentence refers to in one image; write the mask and an overlay PNG.

    python demo.py --img photo.jpg --text "man on the right" -n CMPC_model -f ckpts/unc/cmpc_model -i 700000
    python demo.py --img photo.jpg --text "man on the right" --saved-model exported/cmpc_unc --crf

From a snapshot (``-n -f -i``, TF2 or original TF1) the image goes through the test loop's own functions
(``util.evaluate.prepare`` / ``predict_masks``, ``util.text.preprocess_sentence`` with the ``-d`` vocabulary);
from a SavedModel of ``trainval_model.py -m export`` everything but DenseCRF runs inside the SavedModel.

Writes ``<out>_mask.png`` (8-bit, 255 = object, the decoded image's size) and ``<out>_overlay.png`` (the sentence on a
white band above the image; object pixels blended 50/50 with red — with cyan where a pixel is pure red — and every
other image pixel unchanged). ``--out`` defaults to the image's file name without extension, in the current folder.
Both files are written under temporary names in their folder and renamed, so a failed run leaves no partial PNG.

The image is read by ``util.image.read_image`` (16-bit, float, alpha, palette and CMYK files mapped to 8-bit RGB as
documented there). An image whose longer side exceeds ``--max-side`` (default 1024, at least ``--img-size``; the
network itself sees ``--img-size``) is decoded at a reduced size whose longer side is still ≥ ``--max-side`` — JPEGs by
libjpeg's 1/2, 1/4, 1/8 DCT scaling, so a 10000×10000 photo never exists in memory at full size, other formats by
k×k box averaging — and the mask and overlay are written at that decoded size (logged). Errors are one line
(``error: …``), exit 1; a bad command line exits 2.
"""
import argparse
import logging
import os
import sys
import textwrap

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger("demo")
RED = np.array([255, 0, 0], np.uint16)
CYAN = np.array([0, 255, 255], np.uint16)
TITLE_FONT_SIZE = 14
TITLE_MARGIN = 4
DEFAULT_MAX_SIDE = 1024


def positive_int(text):
    """argparse type: an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be ≥ 1")
    return value


def parse_args(argv):
    from models import MODEL_NAMES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--img", required=True, help="input image (any format PIL reads; converted to RGB)")
    p.add_argument("--text", required=True, help="the referring sentence")
    p.add_argument("-n", default="CMPC_model", choices=MODEL_NAMES, help="model (with -f/-i)")
    p.add_argument("-f", default=None, help="snapshot folder (RMI/LSTM default ./<dataset>/tfmodel)")
    p.add_argument("-i", type=int, default=None, help="snapshot iteration (required with -f)")
    p.add_argument("--saved-model", default=None, help="a SavedModel folder written by trainval_model.py -m export")
    p.add_argument("-d", default="unc", choices=("Gref", "unc", "unc+", "referit"),
                   help="dataset the snapshot was trained on (picks the vocabulary)")
    p.add_argument("-w", default="deeplab", choices=("deeplab", "resnet"), help="RMI/LSTM backbone variant")
    p.add_argument("-emb", action="store_true", help="CMPC: the snapshot was trained with -emb")
    p.add_argument("--img-size", type=int, default=None,
                   help="network input size of the snapshot (the model's default: 320; ReSTR 480)")
    p.add_argument("--data-dir", default="data", help="folder of the vocabularies (and CMPC's GloVe matrix)")
    p.add_argument("--vocab-file", default=None, help="vocabulary (default <data-dir>/vocabulary_Gref.txt, "
                                                      "referit: vocabulary_referit.txt)")
    p.add_argument("--crf", action="store_true", help="refine the mask with DenseCRF")
    p.add_argument("--out", default=None, help="output prefix: <out>_mask.png, <out>_overlay.png")
    p.add_argument("--max-side", type=positive_int, default=DEFAULT_MAX_SIDE,
                   help=f"decode larger images at a reduced size whose longer side is ≥ this (default "
                        f"{DEFAULT_MAX_SIDE}; never below --img-size); outputs are written at that size")
    return p.parse_args(argv)


def read_image(path, max_side):
    """uint8 RGB [H, W, 3] of ``path`` via ``util.image.read_image`` (one-channel results tiled to 3 channels, as
    Pillow's L → RGB), decoded at a reduced size when its longer side exceeds ``max_side``. Raises
    ``util.image.ImageReadError`` (a ValueError) with a one-line message naming the file."""
    from util.image import ImageReadError
    from util.image import read_image as decode

    try:
        image, (orig_h, orig_w) = decode(path, max_side=max_side)
    except ImageReadError as e:
        if e.reason == "missing image":
            raise FileNotFoundError(f"image {path} not found") from None
        raise
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.shape[:2] != (orig_h, orig_w):
        log.info("%s is %d×%d: decoded at %d×%d (--max-side %d); the mask and overlay have that size", path, orig_w,
                 orig_h, image.shape[1], image.shape[0], max_side)
    return image


def mask_from_snapshot(args, image):
    """Bool [H, W]: the test loop's prediction (``--crf``: DenseCRF's) of snapshot ``-i`` of ``-f``, through the
    model's registry entry (``predictor``)."""
    from models import canonical_name
    from util.config import RunConfig
    from util.text import load_vocab_dict_from_file, preprocess_sentence

    if args.i is None:
        raise ValueError("-i (snapshot iteration) is required unless --saved-model is given")
    cfg = RunConfig(mode="test", model=canonical_name(args.n), dataset=args.d, iteration=args.i, folder=args.f,
                    emb=args.emb, weights=args.w, image_size=args.img_size, data_dir=args.data_dir,
                    vocab_file=args.vocab_file)
    if cfg.spec.reads_sentences:
        words = []
    elif not os.path.isfile(cfg.vocab_file):
        raise FileNotFoundError(f"vocabulary file {cfg.vocab_file} not found (set --vocab-file or --data-dir)")
    else:
        words = preprocess_sentence(args.text, load_vocab_dict_from_file(cfg.vocab_file))
    if args.crf and not cfg.spec.supports_crf:
        raise ValueError(f"--crf is not available for -n {cfg.model} (its original evaluation has none)")
    prefix = cfg.spec.find_snapshot(cfg.snapshot_candidates(cfg.iteration))
    model = cfg.spec.load_trained(prefix, cfg)
    log.info("restored %s from %s", cfg.model, prefix)
    sample = {"im_batch": image, "text_batch": np.asarray(words), "sent_batch": np.array([args.text]),
              "mask_batch": np.zeros(image.shape[:2], bool)}
    [(plain, refined)] = cfg.spec.predictor(model, cfg.image_size, args.crf)([sample])
    return (refined if args.crf else plain) != 0


def mask_from_saved_model(args, image):
    """Bool [H, W]: the SavedModel's ``mask`` (``--crf``: DenseCRF on its probability map and padded image, mapped
    back with ``resize_and_crop``)."""
    import tensorflow as tf

    from util.crf import dense_crf
    from util.image import resize_and_crop

    if not os.path.isfile(os.path.join(args.saved_model, "saved_model.pb")):
        raise FileNotFoundError(f"SavedModel {args.saved_model} not found (no saved_model.pb)")
    serve = tf.saved_model.load(args.saved_model).signatures["serving_default"]
    outputs = serve(image=tf.constant(image), sentence=tf.constant(args.text))
    if not args.crf:
        return outputs["mask"].numpy() != 0
    refined = dense_crf(outputs["probability"].numpy(), outputs["padded_image"].numpy())
    return resize_and_crop(refined, *image.shape[:2]) != 0


def overlay(image, mask, title):
    """uint8 RGB [band + H, W, 3]: ``title`` in black on a white band (wrapped to the width), above ``image`` whose
    pixels under ``mask`` are ⌊(pixel + tint) / 2⌋ with tint red, or cyan for pure-red pixels (so every one of them
    changes); pixels outside ``mask`` are copied unchanged."""
    pixels = image.astype(np.uint16)
    tint = np.where(np.all(pixels == RED, axis=-1, keepdims=True), CYAN, RED)
    tinted = np.where(mask[..., None], (pixels + tint) // 2, pixels).astype(np.uint8)
    font = ImageFont.load_default(size=TITLE_FONT_SIZE)
    width = image.shape[1]
    chars_per_line = max(1, int((width - 2 * TITLE_MARGIN) / max(font.getlength("x"), 1)))
    lines = textwrap.wrap(title, chars_per_line) or [""]
    line_height = TITLE_FONT_SIZE + TITLE_MARGIN
    band = len(lines) * line_height + TITLE_MARGIN
    canvas = Image.new("RGB", (width, band + image.shape[0]), "white")
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(lines):
        draw.text((TITLE_MARGIN, TITLE_MARGIN + k * line_height), line, fill="black", font=font)
    canvas.paste(Image.fromarray(tinted), (0, band))
    return np.asarray(canvas)


def run(args):
    """Compute the mask and write both PNGs; returns (mask path, overlay path). The output folder is created and
    both temporary files opened before the model runs (an unwritable folder fails first); they are renamed onto the
    outputs only when both are complete, and removed on any error."""
    if not args.text.strip():
        raise ValueError("empty sentence: --text has no words")
    from models import model_spec

    image = read_image(args.img, max(args.max_side, args.img_size or model_spec(args.n).defaults.image_size))
    prefix = args.out or os.path.splitext(os.path.basename(args.img))[0]
    folder = os.path.dirname(prefix) or "."
    os.makedirs(folder, exist_ok=True)
    paths = (f"{prefix}_mask.png", f"{prefix}_overlay.png")
    temps = []
    try:
        for path in paths:
            temps.append(f"{path}.{os.getpid()}.tmp")
            open(temps[-1], "wb").close()
        mask = mask_from_saved_model(args, image) if args.saved_model else mask_from_snapshot(args, image)
        for tmp, path, array in zip(temps, paths, (mask.astype(np.uint8) * 255, overlay(image, mask, args.text))):
            try:
                Image.fromarray(array).save(tmp, format="PNG")
            except OSError as e:
                raise OSError(e.errno, e.strerror or str(e), e.filename or path) from None
        for tmp, path in zip(temps, paths):
            os.replace(tmp, path)
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.remove(tmp)
    log.info("wrote %s and %s (%d of %d pixels on)", *paths, int(mask.sum()), mask.size)
    return paths


def main(argv=None):
    """CLI entry point: 0 on success, 1 with one ``error: …`` line for bad input files or OS errors (the path named),
    2 for a bad command line (argparse), 130 on Ctrl-C (no partial output left)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        args = parse_args(argv)
        from util.checkpoints import CheckpointMismatch
    except KeyboardInterrupt:
        log.error("interrupted; nothing was written")
        return 130
    try:
        run(args)
    except KeyboardInterrupt:
        log.error("interrupted; no partial output was left")
        return 130
    except (FileNotFoundError, CheckpointMismatch, ValueError) as e:
        log.error("error: %s", e)
        return 1
    except OSError as e:
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        log.error("error: %s%s", e.strerror or e, f": {where}" if where else "")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
