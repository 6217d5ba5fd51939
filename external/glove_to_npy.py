"""Build a ``<name>_emb.npy`` word-embedding matrix (as CMPC's ``Gref_emb.npy`` / ``referit_emb.npy``) from GloVe.

Usage: ``python external/glove_to_npy.py GLOVE_TXT VOCAB_TXT OUT_NPY [--seed 0] [--std 0.3]``

- GloVe text format: ``word v1 … vD`` per line. The vector is the LAST D fields, where D is fixed by the first
  line (number of fields − 1); the word is everything before it, so the few glove.840B words that contain spaces
  are kept. Every line must have at least D + 1 fields, otherwise it is an error (one line, naming the line number).
  If a word occurs twice, the first occurrence wins.
- Vocabulary: one word per line, each ``strip()``-ed as by the tokenizer; row i of the output = line i.
- Treatment: ``<pad>`` (row 0 by convention, wherever it appears) = zeros. Every other word found in GloVe =
  its GloVe vector. Words missing from GloVe, and ``<go>``, ``<eos>``, ``<unk>``, = seeded random normal with
  std 0.3 (about the spread of GloVe components: a random row is as large as a typical word vector without
  dominating it), drawn in row order from ``numpy.random.default_rng(seed)``, so the file is reproducible.
- Output: float32 [vocabulary lines, D], written to a temporary file next to OUT_NPY and renamed (atomic).
- Coverage (words found, %, first 20 missing) is reported via logging.
- Errors are one line, exit status 1 (an OS error names the path: permissions, a folder given for a file, disk
  full); Ctrl-C exits with 130. OUT_NPY is then left as it was.
"""
import argparse
import logging
import os
import pathlib
import sys

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from util.config import error_line  # noqa: E402
from util.text import load_vocab_dict_from_file  # noqa: E402

log = logging.getLogger("glove_to_npy")

PAD = "<pad>"
SPECIAL = ("<go>", "<eos>", "<unk>")


class GloveError(Exception):
    """Missing or inconsistent input (message names the file)."""


def read_vocab(path):
    """Vocabulary lines, stripped, in file order; checked (UTF-8, an optional byte-order mark, the special ids
    0-3) by ``util.text.load_vocab_dict_from_file`` like every vocabulary the models read."""
    try:
        load_vocab_dict_from_file(path)
        with open(path, encoding="utf-8-sig") as f:
            return [line.strip() for line in f.read().splitlines()]
    except FileNotFoundError:
        raise GloveError(f"vocabulary file not found: {path}") from None
    except ValueError as e:
        raise GloveError(str(e)) from None


def read_glove(path, wanted):
    """{word: float32 vector} for the words of ``wanted`` found in the GloVe text file ``path``; returns (dict, D).

    D = fields of the first line − 1; the vector of a line is its last D fields, the word the rest joined by ' '.
    """
    vectors, dim = {}, None
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise GloveError(f"GloVe file not found: {path}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            fields = line.rstrip("\n").rstrip("\r").split(" ")
            if dim is None:
                dim = len(fields) - 1
                if dim < 1:
                    raise GloveError(f"{path}:1: no vector on the first line")
            if len(fields) < dim + 1:
                raise GloveError(f"{path}:{lineno}: {len(fields) - 1} fields after the word, expected {dim}")
            word = " ".join(fields[:-dim])
            if word in wanted and word not in vectors:
                try:
                    vectors[word] = np.array(fields[-dim:], dtype=np.float32)
                except ValueError:
                    raise GloveError(f"{path}:{lineno}: non-numeric vector component") from None
    if dim is None:
        raise GloveError(f"GloVe file is empty: {path}")
    return vectors, dim


def build_matrix(vocab, vectors, dim, seed=0, std=0.3):
    """float32 [len(vocab), dim] and the list of missing words (see the module docstring for the treatment)."""
    rng = np.random.default_rng(seed)
    emb = np.zeros((len(vocab), dim), dtype=np.float32)
    missing = []
    for i, word in enumerate(vocab):
        if word == PAD:
            continue
        if word in vectors and word not in SPECIAL:
            emb[i] = vectors[word]
        else:
            emb[i] = rng.standard_normal(dim) * std
            if word not in SPECIAL:
                missing.append(word)
    return emb, missing


def save_atomic(path, array):
    """``np.save`` to ``<path>.tmp`` then ``os.replace`` onto ``path``."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def glove_to_npy(glove_path, vocab_path, out_path, seed=0, std=0.3):
    """Whole conversion; returns (matrix, missing words). Logs coverage over the non-special vocabulary words."""
    vocab = read_vocab(vocab_path)
    vectors, dim = read_glove(glove_path, set(vocab))
    emb, missing = build_matrix(vocab, vectors, dim, seed, std)
    n_words = sum(1 for w in vocab if w != PAD and w not in SPECIAL)
    found = n_words - len(missing)
    log.info("%d of %d vocabulary words found in GloVe (%.1f%%), dim %d; %d missing%s", found, n_words,
             100.0 * found / max(n_words, 1), dim, len(missing),
             (": " + " ".join(repr(w) for w in missing[:20]) + (" …" if len(missing) > 20 else "")) if missing else "")
    save_atomic(out_path, emb)
    log.info("wrote %s %s", out_path, emb.shape)
    return emb, missing


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="glove_to_npy: %(levelname)s: %(message)s", stream=sys.stderr)
    p = argparse.ArgumentParser(description="GloVe text + vocabulary -> <name>_emb.npy (float32, vocabulary order)")
    p.add_argument("glove")
    p.add_argument("vocab")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0, help="seed of the random rows (default 0)")
    p.add_argument("--std", type=float, default=0.3, help="std of the random rows (default 0.3)")
    args = p.parse_args(argv)
    try:
        glove_to_npy(args.glove, args.vocab, args.out, args.seed, args.std)
    except GloveError as e:
        log.error("%s", e)
        return 1
    except OSError as e:
        log.error("%s", error_line(e))
        return 1
    except KeyboardInterrupt:
        log.error("interrupted; %s not written", args.out)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
