"""Tokenizer and vocabulary with the exact semantics of the originals' ``util/text_processing.py`` (spec §1.6).

Python 2 compatibility note: the original split py2 ``str`` with ``re.split(r'(\\W+)', ...)`` and no UNICODE flag,
so only ASCII letters, digits and '_' were word characters. Python 3 ``re`` is Unicode-aware by default; we pass
``re.ASCII`` to reproduce the original (e.g. "café" → 'caf', 'é').
"""
import re

T_DEFAULT = 20
PAD_ID = 0
UNK_ID = 3

_SPLIT_RE = re.compile(r"(\W+)", re.ASCII)


def load_vocab_dict_from_lines(lines):
    """Map word → line index; every line is ``strip()``-ed; a later duplicate overwrites an earlier one."""
    return {line.strip(): i for i, line in enumerate(lines)}


SPECIAL_TOKENS = ("<pad>", "<go>", "<eos>", "<unk>")


def load_vocab_dict_from_file(path):
    """Read a vocabulary file (one word per line, UTF-8; a leading byte-order mark is ignored, as Windows editors
    write one) with ``load_vocab_dict_from_lines``.

    Repeated words keep the originals' rule (the later line wins; the originals' own ``vocabulary_Gref.txt``
    repeats "." and the empty line). Raises ValueError naming the file and the offending line when the file is not
    UTF-8, is empty, does not start with ``<pad>``, ``<go>``, ``<eos>``, ``<unk>`` (ids 0-3), or repeats one of those
    later (its id would move): ids from such a file would not mean what the models were trained on.
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"vocabulary file {path}: line {line} is not UTF-8 (byte {raw[e.start]:#04x})") from None
    lines = text.splitlines()
    vocab = load_vocab_dict_from_lines(lines)
    if not vocab:
        raise ValueError(f"vocabulary file {path} is empty")
    words = [line.strip() for line in lines]
    for i, token in enumerate(SPECIAL_TOKENS):
        if i >= len(words) or words[i] != token:
            found = repr(words[i]) if i < len(words) else "missing"
            raise ValueError(f"vocabulary file {path} must start with <pad>, <go>, <eos>, <unk> (ids 0-3) like the "
                             f"originals' vocabulary_Gref.txt / vocabulary_referit.txt; line {i + 1} is {found}")
        if vocab[token] != i:
            raise ValueError(f"vocabulary file {path}: {token} appears again on line {vocab[token] + 1} "
                             f"(it must only be line {i + 1})")
    return vocab


def tokenize(sentence):
    """Tokens of the original: split ``sentence.strip()`` on ``(\\W+)`` (ASCII), keep delimiters, drop tokens that
    are empty after ``strip()``, lower-case the rest WITHOUT stripping them, and drop a final token equal to '.'."""
    words = [w.lower() for w in _SPLIT_RE.split(sentence.strip()) if w.strip()]
    if words and words[-1] == ".":
        words = words[:-1]
    return words


def sentence2vocab_indices(sentence, vocab_dict):
    """Token ids of ``tokenize(sentence)``; unknown tokens → ``<unk>`` = 3.

    Raises ValueError when the sentence has no tokens at all (empty or whitespace only; the original crashed
    there). A sentence of only '.' is not empty: it yields [] after the final '.' is dropped, as in the original.
    """
    if not [w for w in _SPLIT_RE.split(sentence.strip()) if w.strip()]:
        raise ValueError(f"empty sentence (no tokens): {sentence!r}")
    return [vocab_dict.get(w, UNK_ID) for w in tokenize(sentence)]


def preprocess_sentence(sentence, vocab_dict, T=T_DEFAULT):
    """``T`` ids: the first ``T`` of ``sentence2vocab_indices`` left-padded with ``<pad>`` = 0 (no ``<eos>``)."""
    ids = sentence2vocab_indices(sentence, vocab_dict)[:T]
    return [PAD_ID] * (T - len(ids)) + ids
