"""OpenAI CLIP's byte-level BPE tokenizer (``clip/simple_tokenizer.py``, ``clip.tokenize``) and TRIS's 20-token cut
(``dataset/ReferDataset.py``: ``tokenize(sentence).squeeze(0)[:20]``), our own code, without ftfy or regex.

The vocabulary comes from the merges file users supply, ``bpe_simple_vocab_16e6.txt.gz`` (in the TRIS and CLIP
repositories, ``CLIP/clip/`` and ``clip/``; never committed here): a gzip text whose lines 2 … 48895 are the
48,894 merges "a b" in rank order. Ids: the 256 byte symbols (CLIP's byte → printable-character map), the same 256
with ``</w>``, one id per merge (the merged string), then ``<|startoftext|>`` 49406 and ``<|endoftext|>`` 49407.

Text cleanup (``basic_clean`` + ``whitespace_clean``, then lower-case): CLIP calls ``ftfy.fix_text`` first. ftfy is
not a dependency; ``clean_text`` does what fix_text does to ordinary text — Unicode NFC, curly quotes to straight
ones, Latin ligatures (ﬁ …) spelt out — then HTML-unescapes twice, collapses whitespace runs to one space, strips and
lower-cases, as CLIP. Not done: ftfy's mojibake repair (UTF-8 decoded as Windows-1252 and the like), full-width to
half-width, terminal-escape and control-character removal. Text with such damage can tokenize differently; the
golden sentences (accents, an em dash, an HTML entity, an emoji, punctuation runs) give CLIP's ids exactly.

Pre-tokenisation: CLIP's ``regex`` pattern
``<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`` (IGNORECASE) is
emulated by a scanner that tries the same alternatives in the same order at each position, with ``\\p{L}`` /
``\\p{N}`` = Unicode general categories L* / N* (``unicodedata.category``) and ``\\s`` = ``str.isspace``; characters
that start no alternative (whitespace) are skipped, as ``findall`` does.
"""
import functools
import gzip
import html
import unicodedata

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
SOT_ID, EOT_ID = 49406, 49407
CONTEXT_LENGTH = 77            # clip.tokenize's default
TRIS_LENGTH = 20               # --max_query_len
N_MERGES = 49152 - 256 - 2     # simple_tokenizer: merges[1:49152-256-2+1]
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
QUOTES = {"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",
          "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"'}
LIGATURES = {"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl", "\ufb05": "st",
             "\ufb06": "st", "\u0132": "IJ", "\u0133": "ij", "\u01c7": "LJ", "\u01c8": "Lj", "\u01c9": "lj",
             "\u01ca": "NJ", "\u01cb": "Nj", "\u01cc": "nj"}


class BPEError(ValueError):
    """The merges file is missing or malformed, or a text is too long (one line)."""


def bytes_to_unicode():
    """CLIP's byte → character map: printable Latin-1 bytes map to themselves, the other 68 bytes to U+0100 … in
    byte order."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def clean_text(text):
    """CLIP's cleanup as described in the module docstring → lower-cased text with single spaces."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(QUOTES.get(c, LIGATURES.get(c, c)) for c in text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


def _kind(char):
    category = unicodedata.category(char)[0]
    return "L" if category == "L" else "N" if category == "N" else "S" if char.isspace() else "O"


def split_words(text):
    """CLIP's regex ``findall`` on cleaned text (see the module docstring) → list of pieces."""
    pieces, i, n = [], 0, len(text)
    while i < n:
        rest = text[i:]
        special = next((s for s in (SOT, EOT) if rest.startswith(s)), None)
        contraction = next((c for c in CONTRACTIONS if rest.lower().startswith(c)), None)
        kind = _kind(text[i])
        if special or contraction:
            token = special or contraction
        elif kind == "S":
            i += 1
            continue
        elif kind == "N":
            token = text[i]
        else:
            j = i + 1
            while j < n and _kind(text[j]) == kind:
                j += 1
            token = text[i:j]
        pieces.append(token)
        i += len(token)
    return pieces


class ClipTokenizer:
    """``SimpleTokenizer`` over the merges file at ``path`` (``bpe_simple_vocab_16e6.txt.gz``)."""

    def __init__(self, path):
        path = str(path)
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                lines = f.read().split("\n")
        except FileNotFoundError:
            raise BPEError(f"{path}: no such file (CLIP's BPE merges, bpe_simple_vocab_16e6.txt.gz from the TRIS "
                           "or CLIP repository)") from None
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise BPEError(f"{path}: not a gzip UTF-8 BPE merges file ({e})") from None
        merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]
        if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
            raise BPEError(f"{path}: expected {N_MERGES} merges of two symbols after the header line")
        self.byte_encoder = bytes_to_unicode()
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.ranks = {merge: i for i, merge in enumerate(merges)}
        self.bpe = functools.lru_cache(maxsize=65536)(self._bpe)

    def _bpe(self, token):
        """Greedy merges of the lowest rank first (all occurrences, left to right) → space-separated symbols."""
        if token in (SOT, EOT):
            return token
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return " ".join(word)

    def encode(self, text):
        """``SimpleTokenizer.encode``: cleaned, split, byte-mapped, BPE'd → list of ids (no SOT/EOT)."""
        ids = []
        for piece in split_words(clean_text(text)):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[symbol] for symbol in self.bpe(mapped).split(" "))
        return ids

    def decode(self, ids):
        """ids → text (``</w>`` → a space), as ``SimpleTokenizer.decode``."""
        byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        text = "".join(self.decoder[i] for i in ids)
        return bytearray(byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def tokenize(self, text, context_length=CONTEXT_LENGTH):
        """``clip.tokenize(text)`` (truncate=False): [SOT, ids…, EOT, 0 …] of ``context_length`` int32 ids; raises
        BPEError when SOT + ids + EOT exceed it (the original raises RuntimeError)."""
        tokens = [SOT_ID] + self.encode(text) + [EOT_ID]
        if len(tokens) > context_length:
            raise BPEError(f"Input {text} is too long for context length {context_length}")
        return tokens + [0] * (context_length - len(tokens))


def tris_ids(tokens77, length=TRIS_LENGTH):
    """TRIS's cut of a ``clip.tokenize`` row: the first ``length`` ids, nothing else — a sentence of more than
    length − 2 BPE tokens loses its EOT (and its stage-1 sentence embedding then sits at position 0)."""
    return list(tokens77[:length])
