"""BERT WordPiece tokenisation (``transformers.BertTokenizer``, do_lower_case=True, as bert-base-uncased) and SaG's
caption ids, without ``transformers``.

``WordPiece(vocab_path)`` reads the ``vocab.txt`` users supply (one token per line, UTF-8; the line number is the
id; a repeated token keeps its last line, as ``load_vocab``) and reproduces:

- ``basic_tokens`` = ``BasicTokenizer(do_lower_case=True).tokenize`` with no never-split set (what SaG calls):
  drop NUL, U+FFFD and every category-C character except tab/newline/CR; whitespace (space, tab, newline, CR,
  category Zs) → space; spaces around CJK ideographs; NFC; split on whitespace; each token lower-cased and
  accent-stripped (NFD, category Mn dropped); split on punctuation (ASCII 33–47, 58–64, 91–96, 123–126 and every
  category P character is a token of its own);
- ``wordpieces`` = ``WordpieceTokenizer``: per word, greedy longest match from the left, continuations prefixed
  ``##``; a word that cannot be covered, or longer than 100 characters, becomes ``[UNK]``;
- ``ids`` = ``convert_tokens_to_ids`` (unknown token → the ``[UNK]`` id).

SaG (``data.process_caption_bert`` with drop_prob 0): ``caption_ids`` = [CLS] + word pieces + [SEP], no truncation,
no maximum length; ``collate`` = ``data.collate_fn``'s text part: the batch sorted by id count, longest first
(stable), padded with 0 ([PAD]) to the longest.
"""
import unicodedata

import numpy as np

MAX_CHARS_PER_WORD = 100
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
               (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_whitespace(char):
    return char in " \t\n\r" or unicodedata.category(char) == "Zs"


def _is_control(char):
    return char not in "\t\n\r" and unicodedata.category(char).startswith("C")


def _is_punctuation(char):
    cp = ord(char)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _is_cjk(char):
    cp = ord(char)
    return any(low <= cp <= high for low, high in _CJK_RANGES)


def _clean(text):
    out = []
    for char in text:
        if ord(char) in (0, 0xFFFD) or _is_control(char):
            continue
        out.append(" " if _is_whitespace(char) else char)
    return "".join(out)


def _strip_accents(token):
    return "".join(c for c in unicodedata.normalize("NFD", token) if unicodedata.category(c) != "Mn")


def _split_punctuation(token):
    pieces, current = [], []
    for char in token:
        if _is_punctuation(char):
            if current:
                pieces.append("".join(current))
                current = []
            pieces.append(char)
        else:
            current.append(char)
    if current:
        pieces.append("".join(current))
    return pieces


def basic_tokens(text):
    """``BasicTokenizer(do_lower_case=True).tokenize(text)`` (module docstring) → list of str."""
    text = "".join(f" {c} " if _is_cjk(c) else c for c in _clean(text))
    tokens = []
    for token in unicodedata.normalize("NFC", text).split():
        tokens.extend(_split_punctuation(_strip_accents(token.lower())))
    return " ".join(tokens).split()


class WordPiece:
    """A BERT uncased WordPiece tokenizer over the vocabulary file ``vocab_path``.

    Raises FileNotFoundError (one line naming the file) when it is missing, ValueError (one line naming the file)
    when it is not UTF-8 text or lacks one of [PAD], [UNK], [CLS], [SEP].
    """

    def __init__(self, vocab_path):
        self.path = str(vocab_path)
        try:
            with open(self.path, encoding="utf-8") as f:
                lines = f.readlines()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path}: no such file (the BERT vocab.txt of bert-base-uncased)") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path}: not a UTF-8 vocabulary ({e.reason} at byte {e.start})") from None
        self.vocab = {}
        for index, line in enumerate(lines):
            self.vocab[line.rstrip("\n")] = index
        missing = [t for t in SPECIAL_TOKENS if t not in self.vocab]
        if missing:
            raise ValueError(f"{self.path}: not a BERT vocabulary (no {missing[0]} token)")
        self.pad_id, self.unk_id = self.vocab["[PAD]"], self.vocab["[UNK]"]
        self.cls_id, self.sep_id = self.vocab["[CLS]"], self.vocab["[SEP]"]

    def word_pieces(self, word):
        """``WordpieceTokenizer`` on one word → its pieces, or ["[UNK]"]."""
        if len(word) > MAX_CHARS_PER_WORD:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
                end -= 1
            else:
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces

    def wordpieces(self, text):
        """Basic tokens → word pieces (list of str)."""
        return [piece for word in basic_tokens(text) for piece in self.word_pieces(word)]

    def ids(self, tokens):
        """``convert_tokens_to_ids``: tokens → ids (unknown → [UNK]'s id)."""
        return [self.vocab.get(token, self.unk_id) for token in tokens]

    def caption_ids(self, sentence):
        """SaG ``process_caption_bert`` (no masking): [CLS] + word pieces + [SEP] → list of int, untruncated."""
        return [self.cls_id] + self.ids(self.wordpieces(sentence)) + [self.sep_id]


def collate(captions, pad_id=0):
    """``data.collate_fn``'s text part for a batch of id lists: (order, ids int64 [B, L], lengths int64 [B]) with
    ``order`` the stable longest-first permutation (batch row j is sample order[j]) and 0-padding to the longest."""
    order = sorted(range(len(captions)), key=lambda i: len(captions[i]), reverse=True)
    lengths = np.array([len(captions[i]) for i in order], np.int64)
    ids = np.full((len(captions), int(lengths.max(initial=0))), pad_id, np.int64)
    for row, i in enumerate(order):
        ids[row, :lengths[row]] = captions[i]
    return order, ids, lengths
