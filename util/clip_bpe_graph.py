"""CLIP's BPE tokenizer with TRIS's 20-id cut (``util.clip_bpe``: ``tris_ids(tokenizer.tokenize(text))``) in
TensorFlow graph ops, for TRIS's SavedModel: ``ClipBPETokenizer(merges_path)`` is a ``tf.Module`` called on a
scalar string → int32 [20]. Its tables (merge ranks "a b" → rank, symbol → id) are built from the merges file at
export time and saved in the SavedModel; serving reads no file.

Steps, as ``util.clip_bpe`` (our code, not CLIP's):

- cleanup: Unicode NFC (``nfc``: singleton table, then canonical pairs composed, tables from Python's
  ``unicodedata``), curly quotes to straight ones and Latin ligatures spelt out (``QUOTES``, ``LIGATURES``), the HTML
  entities of ``HTML_ENTITIES`` decoded twice (what ``html.unescape`` twice does to them), Python's whitespace runs
  collapsed to one space, stripped, ``tf.strings.lower`` (Unicode full case mapping, as ``str.lower``);
- the pre-tokenisation regex, as ``split_words``' scanner: per character a kind (letter = category L*, number =
  N*, space = ``str.isspace``, other; classes built from Python's ``unicodedata``); the apostrophe contractions
  's 't 're 've 'm 'll 'd where a token starts; then the maximal letter run, one number, or the maximal run of
  other characters; spaces skipped (a ``tf.while_loop`` over the positions);
- each piece's UTF-8 bytes mapped by ``bytes_to_unicode``, ``</w>`` on the last symbol, then the merges of the
  lowest rank first, every non-overlapping occurrence left to right, until no pair has a rank;
- ids by the encoder, [49406] + ids + [49407], the first 20 kept (0-padded).

Differences from ``util.clip_bpe`` (documented in the README): NFC composes adjacent pairs only (combining marks
out of canonical order are not reordered), only the entities of ``HTML_ENTITIES`` are decoded (other named and
numeric ones are not; a name that merely starts like one of them, as &ltimes;, is decoded as that prefix),
``<|startoftext|>`` / ``<|endoftext|>`` written in the text are not special, a word-final capital sigma lower-cases to σ (Python: ς), and a text over 75 tokens is cut
where Python raises (``BPEError``).
"""
import unicodedata

import tensorflow as tf

from util import clip_bpe

# (RE2 pattern, replacement), applied in this order in each of the two passes: what ``html.unescape`` makes of
# these entities, with the semicolon optional where HTML5 allows it (amp, lt, gt, quot, nbsp), the apostrophe's
# numeric forms (a number is read whole: &#390; is not &#39;); &amp; last, so that the "&" it makes is decoded
# only by the next pass, as html.unescape's single scan per call does
HTML_ENTITIES = (("&lt;?", "<"), ("&gt;?", ">"), ("&quot;?", '"'), ("&nbsp;?", "\u00a0"), ("&apos;", "'"),
                 ("&#0*39;|&#0*39([^0-9]|$)", "'\\1"), ("&#[xX]0*27;|&#[xX]0*27([^0-9a-fA-F]|$)", "'\\1"),
                 ("&amp;?", "&"))
KIND_SPACE, KIND_LETTER, KIND_NUMBER, KIND_OTHER = 0, 1, 2, 3
NO_RANK = 1 << 30


def _regex_escape(text):
    return "".join(f"\\x{{{ord(c):x}}}" for c in text)


def nfc_tables():
    """({char: NFC(char)} where they differ, {"ab": c} for the canonical pairs that NFC composes: primary
    composites and Hangul L+V, LV+T), from Python's ``unicodedata``."""
    singles, pairs = {}, {}
    for code in range(0x110000):
        if 0xD800 <= code <= 0xDFFF:
            continue
        char = chr(code)
        if unicodedata.normalize("NFC", char) != char:
            singles[char] = unicodedata.normalize("NFC", char)
        decomposition = unicodedata.decomposition(char)
        if decomposition and not decomposition.startswith("<"):
            parts = "".join(chr(int(x, 16)) for x in decomposition.split())
            if len(parts) == 2 and unicodedata.normalize("NFC", parts) == char:
                pairs[parts] = char
    for lead in range(0x1100, 0x1113):
        for vowel in range(0x1161, 0x1176):
            syllable = unicodedata.normalize("NFC", chr(lead) + chr(vowel))
            pairs[chr(lead) + chr(vowel)] = syllable
            for tail in range(0x11A8, 0x11C3):
                pairs[syllable + chr(tail)] = unicodedata.normalize("NFC", syllable + chr(tail))
    return singles, pairs


def _string_table(mapping):
    return tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
        tf.constant(list(mapping), tf.string), tf.constant(list(mapping.values()), tf.string)), "")


def leftmost_matches(match):
    """bool [n]: the positions of ``match`` a left-to-right scan takes when a taken position i also consumes i + 1
    (in each run of consecutive matches, every other one from the run's start)."""
    positions = tf.range(tf.size(match))
    run = tf.cumsum(tf.cast(tf.logical_not(match), tf.int32))
    first = tf.math.unsorted_segment_min(positions, run, tf.size(match) + 1)
    run_start = tf.gather(first, run) + tf.cast(run > 0, tf.int32)
    return tf.logical_and(match, tf.equal((positions - run_start) % 2, 0))


def merge_pairs(symbols, take, merged):
    """``symbols`` [n] with each taken pair (i, i + 1) replaced by ``merged[i]`` ([n − 1])."""
    out = tf.concat([tf.where(take, merged, symbols[:-1]), symbols[-1:]], 0)
    return tf.boolean_mask(out, tf.concat([[True], tf.logical_not(take)], 0))


class ClipBPETokenizer(tf.Module):
    """``clip_bpe.tris_ids(ClipTokenizer(source).tokenize(text))`` in graph ops (module docstring). Raises
    ``clip_bpe.BPEError`` (one line) when the merges file is missing or malformed."""

    def __init__(self, source, length=clip_bpe.TRIS_LENGTH):
        from util.export import PY_WHITESPACE, char_class

        super().__init__(name="clip_bpe_tokenizer")
        reference = clip_bpe.ClipTokenizer(source)
        self.source, self.length = source, length
        ranks = {" ".join(pair): rank for pair, rank in reference.ranks.items()}
        self.ranks = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
            tf.constant(list(ranks), tf.string), tf.constant(list(ranks.values()), tf.int64)), NO_RANK)
        self.encoder = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
            tf.constant(list(reference.encoder), tf.string), tf.constant(list(reference.encoder.values()), tf.int64)),
            -1)
        self.byte_symbols = tf.constant([reference.byte_encoder[b] for b in range(256)], tf.string)
        singles, pairs = nfc_tables()
        self.nfc_singles, self.nfc_pairs = _string_table(singles), _string_table(pairs)
        self.replacements = [(_regex_escape(k), v) for k, v in {**clip_bpe.QUOTES, **clip_bpe.LIGATURES}.items()]
        self.whitespace = "[" + _regex_escape(PY_WHITESPACE) + "]"
        self.letter = char_class(lambda c: unicodedata.category(c)[0] == "L")
        self.number = char_class(lambda c: unicodedata.category(c)[0] == "N")

    def nfc(self, text):
        """Unicode NFC by the tables of ``nfc_tables``: singletons mapped, then adjacent canonical pairs composed,
        leftmost first, until none is left (marks out of canonical order are not reordered)."""
        chars = tf.strings.unicode_split(text, "UTF-8", errors="replace")
        mapped = self.nfc_singles.lookup(chars)
        chars = tf.where(tf.equal(mapped, ""), chars, mapped)

        def compose(chars, done):
            composed = self.nfc_pairs.lookup(chars[:-1] + chars[1:])
            take = leftmost_matches(tf.not_equal(composed, ""))
            return merge_pairs(chars, take, composed), tf.logical_not(tf.reduce_any(take))

        chars = tf.while_loop(lambda chars, done: tf.logical_and(tf.size(chars) > 1, tf.logical_not(done)), compose,
                              (chars, tf.constant(False)),
                              shape_invariants=(tf.TensorShape([None]), tf.TensorShape([])))[0]
        return tf.strings.reduce_join(chars)

    def clean(self, text):
        """The cleanup step: scalar string → scalar string."""
        text = self.nfc(text)
        for pattern, value in self.replacements:
            text = tf.strings.regex_replace(text, pattern, value)
        for _ in range(2):
            for pattern, value in HTML_ENTITIES:
                text = tf.strings.regex_replace(text, pattern, value)
        text = tf.strings.regex_replace(text, self.whitespace + "+", " ")
        text = tf.strings.regex_replace(text, "^ | $", "")
        return tf.strings.lower(text, encoding="utf-8")

    def pieces(self, text):
        """``clip_bpe.split_words`` of cleaned text: string [n]."""
        chars = tf.strings.unicode_split(text, "UTF-8", errors="replace")
        n = tf.size(chars)
        kind = tf.where(tf.strings.regex_full_match(chars, self.letter), KIND_LETTER,
                        tf.where(tf.strings.regex_full_match(chars, self.number), KIND_NUMBER,
                                 tf.where(tf.strings.regex_full_match(chars, self.whitespace), KIND_SPACE,
                                          KIND_OTHER)))
        change = tf.not_equal(kind, tf.concat([[-1], kind], 0)[:n])
        run = tf.cumsum(tf.cast(change, tf.int32)) - 1
        run_end = tf.gather(tf.math.unsorted_segment_max(tf.range(n), run, n) + 1, run)
        padded = tf.concat([chars, ["", ""]], 0)
        after1, after2 = padded[1:n + 1], padded[1:n + 1] + padded[2:n + 2]
        apostrophe = tf.equal(chars, "'")
        short = tf.logical_and(apostrophe, tf.reduce_any(tf.equal(after1[:, None], ["s", "t", "m", "d"]), 1))
        long = tf.logical_and(apostrophe, tf.reduce_any(tf.equal(after2[:, None], ["re", "ve", "ll"]), 1))
        length = tf.where(long, 3, tf.where(short, 2, tf.where(
            tf.equal(kind, KIND_NUMBER), 1, tf.where(tf.equal(kind, KIND_SPACE), 0, run_end - tf.range(n)))))

        def step(i, starts, sizes):
            size = length[i]
            take = size > 0
            starts = tf.concat([starts, tf.boolean_mask([i], [take])], 0)
            sizes = tf.concat([sizes, tf.boolean_mask([size], [take])], 0)
            return i + tf.maximum(size, 1), starts, sizes

        _, starts, sizes = tf.while_loop(
            lambda i, starts, sizes: i < n, step, (tf.constant(0), tf.zeros([0], tf.int32), tf.zeros([0], tf.int32)),
            shape_invariants=(tf.TensorShape([]), tf.TensorShape([None]), tf.TensorShape([None])))
        return tf.strings.substr(tf.fill(tf.shape(starts), text), starts, sizes, unit="UTF8_CHAR")

    def bpe(self, piece):
        """The byte-mapped symbols of one piece merged by rank: string [k]."""
        symbols = tf.gather(self.byte_symbols, tf.cast(tf.io.decode_raw(piece, tf.uint8), tf.int32))
        symbols = tf.concat([symbols[:-1], symbols[-1:] + "</w>"], 0)

        def merge(symbols, done):
            pairs = symbols[:-1] + " " + symbols[1:]
            ranks = self.ranks.lookup(pairs)
            best = tf.reduce_min(ranks)
            take = leftmost_matches(tf.equal(ranks, best))     # every non-overlapping occurrence, left to right
            merged = merge_pairs(symbols, take, symbols[:-1] + symbols[1:])
            return tf.cond(best < NO_RANK, lambda: (merged, False), lambda: (symbols, True))

        return tf.while_loop(lambda symbols, done: tf.logical_and(tf.size(symbols) > 1, tf.logical_not(done)), merge,
                             (symbols, tf.constant(False)),
                             shape_invariants=(tf.TensorShape([None]), tf.TensorShape([])))[0]

    def encode(self, text):
        """``ClipTokenizer.encode``: int64 [m] ids, no SOT/EOT."""
        pieces = self.pieces(self.clean(text))
        return tf.while_loop(
            lambda k, ids: k < tf.size(pieces),
            lambda k, ids: (k + 1, tf.concat([ids, self.encoder.lookup(self.bpe(pieces[k]))], 0)),
            (tf.constant(0), tf.zeros([0], tf.int64)),
            shape_invariants=(tf.TensorShape([]), tf.TensorShape([None])))[1]

    def __call__(self, text):
        ids = tf.concat([[clip_bpe.SOT_ID], self.encode(text), [clip_bpe.EOT_ID]], 0)[:self.length]
        ids = tf.concat([ids, tf.zeros([self.length - tf.size(ids)], tf.int64)], 0)
        return tf.ensure_shape(tf.cast(ids, tf.int32), [self.length])
