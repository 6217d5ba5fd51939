"""SavedModel export (``trainval_model.py -m export``): one image of any size + one sentence → mask, in one graph.

The serving signature ``serving_default(image, sentence)`` takes ``image`` uint8 [H, W, 3] (RGB, any H, W ≥ 1) and
``sentence`` a scalar UTF-8 string and returns

* ``mask``: uint8 [H, W], 1 where the object is (the test loop's prediction: ``up ≥ 1e-9`` on the padded S×S
  frame, mapped back with ``resize_and_crop``; nonzero = foreground),
* ``probability``: float32 [S, S], the sigmoid of the upsampled score on the padded S×S frame (what DenseCRF
  refines),
* ``padded_image``: uint8 [S, S, 3], the resized and zero-padded RGB image the network saw,
* ``words``: int32, the token ids ([T] for the GloVe vocabulary, [20] for TRIS's CLIP BPE, [CLS] … [SEP] for
  SaG's WordPiece).

SaG's ``probability`` is its min-max normalised ``avg_cm`` map at [H, W] (what ≥ 0.5 thresholds); TRIS's is the
max-normalised response at the network's map size. For both, ``padded_image`` is the image stretched to S×S (no
padding) by Pillow's bilinear resize, reproduced exactly (``util.pil_resize``).

That is the TF1 models' evaluation. ReSTR's SavedModel (same signature) follows its own evaluation
(``models.restr.eval_input`` / ``eval_output``, through ``util.torch_image``'s resizes, which take the image's size
as a tensor here): ``mask`` = resized logits ≥ 1e-9, ``probability`` = the pixel sigmoid on the 480×480 frame,
``padded_image`` = the image resized with torch's bilinear and padded grey (its 0 after normalisation). The model's
registry entry supplies these steps (``serving_input`` / ``serving_output``).

Everything the test loop does in Python (``util.evaluate.prepare`` / ``predict_masks``, ``util.text``) is rebuilt
from TensorFlow ops, so the SavedModel needs no Python code of this repository:

Tokenizer (``in_graph_token_ids``): the exact ``util.text.preprocess_sentence`` — ``str.strip()`` (Python's
Unicode whitespace set, listed in ``PY_WHITESPACE``), split into maximal runs of ASCII word characters
``[A-Za-z0-9_]`` and of everything else (the ``re.ASCII`` ``(\\W+)`` split keeping delimiters), drop runs made only
of Python whitespace, lower-case the rest with ``tf.strings.lower(encoding='utf-8')`` (Unicode full case mapping, as
``str.lower``) without stripping, drop a final token equal to '.', look up the vocabulary
(``tf.lookup.StaticHashTable`` of ``load_vocab_dict_from_file``; unknown → 3), keep the first T, left-pad with 0.
Differences: where Python raises ValueError on a sentence without tokens (empty or whitespace only) the graph returns
T pads and the model runs on them; bytes that are not valid UTF-8 become U+FFFD (a Python ``str`` cannot hold them).

Image (``in_graph_preprocess``): ``img_as_ubyte(resize_and_pad(image, S, S))`` with scikit-image 0.13 ``resize``
semantics (``util.image.resize_legacy``): bilinear, neighbours floor/ceil of the source coordinate, pixels outside
read as 0 (mode='constant'), the same float64 expression order, clipping to the input's [min, max] with 0.13's
cval rule, ``np.round`` half-to-even sizes, ×255 + ``rint``. The one residual difference is the source coordinate:
0.13 maps output (col, row) through an affine matrix *estimated by SVD* from three corners, which carries ~1e-16
round-off, while the graph uses the exact ``scale·(col + 0.5) − 0.5`` (float64). Pixel values therefore differ by
~1e-16 before ``img_as_ubyte``, i.e. a padded pixel can differ by one grey level where ×255 lands within ~1e-13 of
a .5; and in the mask's ``resize_and_crop`` a source coordinate that is integral in one path and off by ~1e-16 in
the other switches a neighbour with weight ~1e-16 in or out, which matters there because any nonzero value is
foreground. tests/test_export.py measures both.

The text side and the forward also come from the registry entry: ``serving_tokenizer(cfg)`` returns the in-graph
tokenizer (a ``tf.Module`` called on the sentence; its tables are saved in the SavedModel, no file is read at
serving time): ``GloveTokenizer`` above for the TF1 models and ReSTR, ``WordPieceTokenizer`` (BERT's, below) for
SaG, ``util.clip_bpe_graph.ClipBPETokenizer`` for TRIS; ``serving_forward(model, images, words)`` runs the network
(SaG: with fixed slot noise, ``models.sag_spec``).

WordPiece (``WordPieceTokenizer``, SaG): ``util.wordpiece``'s ``caption_ids`` — per character (UTF-8, invalid bytes
→ U+FFFD): NUL, U+FFFD and category C except tab/newline/CR dropped, whitespace (space, tab, newline, CR, Zs) →
space, CJK ideographs spaced, every other character folded by a table built from Python's ``unicodedata`` at export
time (c → NFD(NFC(c).lower()) without category Mn; ``fold_table``); then category P and ASCII punctuation spaced;
split on Python's whitespace left (space, U+2028, U+2029); per word greedy longest match with ``##`` continuations
(a ``tf.lookup.StaticHashTable`` of ``vocab.txt``; an uncoverable word or one over 100 characters → [UNK]);
[CLS] + pieces + [SEP], no truncation (as SaG: a sentence beyond BERT's positions fails in both paths). The
character classes are regular expressions built from the same ``unicodedata``, so the graph agrees with
``util.wordpiece`` on the Unicode version of the exporting Python. Difference: folding is per character, where
Python lower-cases per word: a word-final capital sigma becomes σ, not ς (Python's Final_Sigma rule).
"""
import functools
import logging
import os
import shutil
import unicodedata

import tensorflow as tf

from util import data
from util.evaluate import SCORE_THRESHOLD
from util.metrics import write_json_atomic
from util.text import PAD_ID, T_DEFAULT, UNK_ID, load_vocab_dict_from_file

log = logging.getLogger("export")

# The characters Python's str.strip() / str.isspace() treat as whitespace (bidi WS/B/S or category Zs).
PY_WHITESPACE = "".join(chr(c) for c in range(0x110000) if chr(c).isspace())
_WS_CLASS = "[" + "".join(f"\\x{{{ord(c):x}}}" for c in PY_WHITESPACE) + "]"
_WORD_CHAR = "[A-Za-z0-9_]"


def vocab_table(vocab):
    """A ``tf.lookup.StaticHashTable`` word → id (int64) of the vocabulary dict, default ``<unk>`` = 3."""
    keys = tf.constant(list(vocab.keys()), tf.string)
    values = tf.constant(list(vocab.values()), tf.int64)
    return tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(keys, values), default_value=UNK_ID)


def in_graph_tokens(sentence):
    """String tokens [n] of a scalar string ``sentence``: ``util.text.tokenize`` in TensorFlow ops (module doc)."""
    stripped = tf.strings.regex_replace(sentence, f"^{_WS_CLASS}+|{_WS_CLASS}+$", "")
    chars = tf.strings.unicode_split(stripped, "UTF-8")
    is_word = tf.strings.regex_full_match(chars, _WORD_CHAR)
    starts = tf.concat([tf.ones_like(is_word[:1]), tf.not_equal(is_word[1:], is_word[:-1])], axis=0)
    run_index = tf.cumsum(tf.cast(starts, tf.int32)) - 1
    runs = tf.strings.unsorted_segment_join(chars, run_index, num_segments=tf.reduce_sum(tf.cast(starts, tf.int32)))
    tokens = tf.boolean_mask(runs, tf.logical_not(tf.strings.regex_full_match(runs, f"{_WS_CLASS}*")))
    tokens = tf.strings.lower(tokens, encoding="utf-8")
    final_dot = tf.reduce_any(tf.equal(tokens[-1:], "."))
    return tokens[:tf.size(tokens) - tf.cast(final_dot, tf.int32)]


def in_graph_token_ids(sentence, table, T=T_DEFAULT):
    """int32 [T]: ``util.text.preprocess_sentence`` in TensorFlow ops; all pads for a sentence without tokens."""
    ids = tf.cast(table.lookup(in_graph_tokens(sentence)), tf.int32)[:T]
    ids = tf.concat([tf.fill([T - tf.size(ids)], tf.constant(PAD_ID, tf.int32)), ids], axis=0)
    return tf.ensure_shape(ids, [T])


class GloveTokenizer(tf.Module):
    """The TF1 models' and ReSTR's in-graph tokenizer: ``in_graph_token_ids`` over the vocabulary dict ``vocab``
    (word → id) read from ``source``; called on a scalar string → int32 [T]."""

    def __init__(self, vocab, source, T=T_DEFAULT):
        super().__init__(name="glove_tokenizer")
        self.table = vocab_table(vocab)
        self.source, self.T = source, T

    def __call__(self, sentence):
        return in_graph_token_ids(sentence, self.table, self.T)


def glove_tokenizer(cfg):
    """``GloveTokenizer`` of ``cfg.vocab_file``; one-line FileNotFoundError / ValueError when the file is missing
    or holds ids beyond the model's embeddings (``cfg.vocab_size``)."""
    if not os.path.isfile(cfg.vocab_file):
        raise FileNotFoundError(f"vocabulary file {cfg.vocab_file} not found (set --vocab-file or --data-dir)")
    vocab = load_vocab_dict_from_file(cfg.vocab_file)
    if max(vocab.values()) >= cfg.vocab_size:
        raise ValueError(f"vocabulary file {cfg.vocab_file} has ids up to {max(vocab.values())}, beyond the "
                         f"model's {cfg.vocab_size} embeddings for -d {cfg.dataset}")
    return GloveTokenizer(vocab, cfg.vocab_file)


def _code_points():
    """Every Unicode code point except the surrogates, as characters."""
    return (chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF)


def char_class(predicate):
    """An RE2 character class "[…]" of the code points (surrogates excluded) for which ``predicate(char)`` holds,
    as ranges."""
    ranges, start, prev = [], None, None
    for char in _code_points():
        c = ord(char)
        if predicate(char):
            if start is None or c != prev + 1:
                if start is not None:
                    ranges.append((start, prev))
                start = c
            prev = c
    if start is not None:
        ranges.append((start, prev))
    return "[" + "".join(f"\\x{{{a:x}}}" if a == b else f"\\x{{{a:x}}}-\\x{{{b:x}}}" for a, b in ranges) + "]"


@functools.lru_cache(maxsize=None)
def wordpiece_classes():
    """(drop, whitespace, CJK, punctuation) RE2 classes of ``util.wordpiece``'s character tests."""
    from util import wordpiece

    return (char_class(lambda c: ord(c) in (0, 0xFFFD) or wordpiece._is_control(c)),
            char_class(wordpiece._is_whitespace), char_class(wordpiece._is_cjk),
            char_class(wordpiece._is_punctuation))


@functools.lru_cache(maxsize=None)
def fold_table():
    """{char: NFD(NFC(char).lower()) without category Mn} for every character it changes (module doc)."""
    out = {}
    for char in _code_points():
        folded = "".join(d for d in unicodedata.normalize("NFD", unicodedata.normalize("NFC", char).lower())
                         if unicodedata.category(d) != "Mn")
        if folded != char:
            out[char] = folded
    return out


_UNCHANGED = "<unchanged>"     # the fold table's default: never a folded character


class WordPieceTokenizer(tf.Module):
    """SaG's in-graph tokenizer: ``util.wordpiece.WordPiece(source).caption_ids`` (module doc); called on a scalar
    string → int32 [L] ([CLS] … [SEP])."""

    def __init__(self, source):
        from util.wordpiece import MAX_CHARS_PER_WORD, WordPiece

        super().__init__(name="wordpiece_tokenizer")
        reference = WordPiece(source)
        self.source, self.max_chars = source, MAX_CHARS_PER_WORD
        self.cls_id, self.sep_id, self.unk_id = reference.cls_id, reference.sep_id, reference.unk_id
        self.vocab = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
            tf.constant(list(reference.vocab), tf.string), tf.constant(list(reference.vocab.values()), tf.int64)), -1)
        fold = fold_table()
        self.fold = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
            tf.constant(list(fold), tf.string), tf.constant(list(fold.values()), tf.string)), _UNCHANGED)
        self.drop, self.space, self.cjk, self.punct = wordpiece_classes()

    def words(self, sentence):
        """``util.wordpiece.basic_tokens`` in graph ops: string [n]."""
        chars = tf.strings.unicode_split(sentence, "UTF-8", errors="replace")
        folded = self.fold.lookup(chars)
        folded = tf.where(tf.equal(folded, _UNCHANGED), chars, folded)
        folded = tf.where(tf.strings.regex_full_match(chars, self.cjk), " " + folded + " ", folded)
        folded = tf.where(tf.strings.regex_full_match(chars, self.space), " ", folded)
        text = tf.strings.reduce_join(tf.boolean_mask(folded, tf.logical_not(
            tf.strings.regex_full_match(chars, self.drop))))
        chars = tf.strings.unicode_split(text, "UTF-8")
        chars = tf.where(tf.strings.regex_full_match(chars, self.punct), " " + chars + " ", chars)
        text = tf.strings.regex_replace(tf.strings.reduce_join(chars), "[\\x{2028}\\x{2029}]", " ")
        words = tf.strings.split(text, sep=" ")
        return tf.boolean_mask(words, tf.strings.length(words) > 0)

    def word_ids(self, word):
        """``WordPiece.word_pieces`` + ids of one word: int64 [k] (greedy longest match; [UNK] when it fails)."""
        n = tf.strings.length(word, unit="UTF8_CHAR")
        start, end = tf.meshgrid(tf.range(n), tf.range(1, n + 1), indexing="ij")
        pieces = tf.strings.substr(tf.fill([n, n], word), start, tf.maximum(end - start, 0), unit="UTF8_CHAR")
        pieces = tf.where(start > 0, "##" + pieces, pieces)
        ids = tf.where(end > start, self.vocab.lookup(pieces), tf.constant(-1, tf.int64))
        found = ids >= 0
        longest = n - 1 - tf.argmax(tf.cast(tf.reverse(found, [1]), tf.int32), axis=1, output_type=tf.int32)

        def step(pos, out, ok):
            ok = tf.logical_and(ok, tf.reduce_any(found[pos]))
            stop = longest[pos]
            return tf.where(ok, stop + 1, n), tf.concat([out, ids[pos, stop:stop + 1]], 0), ok

        _, out, ok = tf.while_loop(lambda pos, out, ok: pos < n, step,
                                   (tf.constant(0), tf.zeros([0], tf.int64), tf.constant(True)),
                                   shape_invariants=(tf.TensorShape([]), tf.TensorShape([None]), tf.TensorShape([])))
        unknown = tf.logical_or(tf.logical_not(ok), n > self.max_chars)
        return tf.cond(unknown, lambda: tf.constant([self.unk_id], tf.int64), lambda: out)

    def __call__(self, sentence):
        words = self.words(sentence)
        ids = tf.while_loop(
            lambda k, ids: k < tf.size(words), lambda k, ids: (k + 1, tf.concat([ids, self.word_ids(words[k])], 0)),
            (tf.constant(0), tf.constant([self.cls_id], tf.int64)),
            shape_invariants=(tf.TensorShape([]), tf.TensorShape([None])))[1]
        return tf.cast(tf.concat([ids, [self.sep_id]], 0), tf.int32)


def _axis_sources(out_size, in_size, offset, count):
    """For outputs ``offset … offset+count−1`` of a 1-D resize in_size → out_size: (floor index, ceil index, fraction),
    with the source coordinate ``s·(i + 0.5) − 0.5``, s = in_size / out_size (float64). Indices are shifted by +1
    for an image zero-padded by one pixel on each side (the coordinate lies in [−0.5, in_size − 0.5])."""
    scale = tf.cast(in_size, tf.float64) / tf.cast(out_size, tf.float64)
    coord = scale * (tf.cast(tf.range(offset, offset + count), tf.float64) + 0.5) - 0.5
    low, high = tf.floor(coord), tf.math.ceil(coord)
    return tf.cast(low, tf.int32) + 1, tf.cast(high, tf.int32) + 1, coord - low


def resize_legacy_window(img, out_h, out_w, row_offset, col_offset, rows, cols):
    """Rows ``row_offset…+rows`` × cols ``col_offset…+cols`` of ``util.image.resize_legacy(img, out_h, out_w)`` for
    a float64 [H, W, C] image already converted with ``img_as_float``; float64 [rows, cols, C].

    Value = (1 − dr)·((1 − dc)·p00 + dc·p01) + dr·((1 − dc)·p10 + dc·p11) with outside pixels 0, then clipped to
    [min, max] of ``img``; when 0 lies outside that range, exact zeros (cval) stay 0 (0.13 ``_clip_warp_output``)."""
    in_h, in_w = tf.shape(img)[0], tf.shape(img)[1]
    padded = tf.pad(img, [[1, 1], [1, 1], [0, 0]])
    r0, r1, dr = _axis_sources(out_h, in_h, row_offset, rows)
    c0, c1, dc = _axis_sources(out_w, in_w, col_offset, cols)
    dr, dc = dr[:, None, None], dc[None, :, None]
    top_rows, bottom_rows = tf.gather(padded, r0, axis=0), tf.gather(padded, r1, axis=0)
    top = (1 - dc) * tf.gather(top_rows, c0, axis=1) + dc * tf.gather(top_rows, c1, axis=1)
    bottom = (1 - dc) * tf.gather(bottom_rows, c0, axis=1) + dc * tf.gather(bottom_rows, c1, axis=1)
    out = (1 - dr) * top + dr * bottom
    min_val, max_val = tf.reduce_min(img), tf.reduce_max(img)
    preserve_cval = tf.logical_not(tf.logical_and(min_val <= 0, max_val >= 0))
    clipped = tf.clip_by_value(out, min_val, max_val)
    return tf.where(tf.logical_and(preserve_cval, tf.equal(out, 0)), tf.zeros_like(out), clipped)


def _fit_size(in_h, in_w, h, w, fit):
    """(rh, rw) of ``resize_and_pad`` (fit=min) or ``resize_and_crop`` (fit=max): int(np.round(size·scale))."""
    in_h, in_w = tf.cast(in_h, tf.float64), tf.cast(in_w, tf.float64)
    scale = fit(tf.cast(h, tf.float64) / in_h, tf.cast(w, tf.float64) / in_w)
    return tf.cast(tf.round(in_h * scale), tf.int32), tf.cast(tf.round(in_w * scale), tf.int32)


def in_graph_preprocess(image, size):
    """uint8 [size, size, 3]: ``img_as_ubyte(resize_and_pad(image, size, size))`` of a uint8 [H, W, 3] image."""
    img = tf.cast(image, tf.float64) / 255.0
    rh, rw = _fit_size(tf.shape(img)[0], tf.shape(img)[1], size, size, tf.minimum)
    pad_h, pad_w = (size - rh) // 2, (size - rw) // 2
    resized = resize_legacy_window(img, rh, rw, 0, 0, rh, rw)
    padded = tf.pad(resized, [[pad_h, size - rh - pad_h], [pad_w, size - rw - pad_w], [0, 0]])
    ubyte = tf.clip_by_value(tf.math.rint(padded * 255), 0, 255)
    return tf.ensure_shape(tf.cast(ubyte, tf.uint8), [size, size, 3])


def in_graph_network_input(rgb_uint8, mu=data.MU):
    """``util.data.to_network_input``: float32(im)[..., ::-1] − mu in float64, cast to float32."""
    bgr = tf.reverse(tf.cast(rgb_uint8, tf.float64), axis=[-1])
    return tf.cast(bgr - tf.constant(mu, tf.float64), tf.float32)


def in_graph_mask(up, height, width):
    """uint8 [height, width]: nonzero of ``resize_and_crop(float32(up ≥ 1e-9), height, width)`` for ``up`` [S, S]."""
    size, height, width = tf.shape(up)[0], tf.cast(height, tf.int32), tf.cast(width, tf.int32)
    pred_raw = tf.cast(tf.cast(up >= SCORE_THRESHOLD, tf.float32), tf.float64)[:, :, None]
    rh, rw = _fit_size(size, size, height, width, tf.maximum)
    crop_h, crop_w = (rh - height) // 2, (rw - width) // 2
    resized = resize_legacy_window(pred_raw, rh, rw, crop_h, crop_w, height, width)
    return tf.cast(tf.not_equal(resized[:, :, 0], 0), tf.uint8)


class ServingModule(tf.Module):
    """The exported object: ``serve`` (the signature), ``tokenize`` and ``preprocess_image`` (module doc). The
    model's registry entry ``spec`` supplies the in-graph input and output steps (``serving_input``,
    ``serving_output``) and the forward pass (``serving_forward``); ``tokenizer`` is its ``serving_tokenizer``."""

    def __init__(self, model, tokenizer, image_size, spec):
        super().__init__(name="refseg_serving")
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.spec = spec

    @tf.function(input_signature=[tf.TensorSpec([], tf.string)], autograph=False)
    def tokenize(self, sentence):
        """int32 token ids of ``sentence`` ([T] for the GloVe vocabulary)."""
        return self.tokenizer(sentence)

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)], autograph=False)
    def preprocess_image(self, image):
        """uint8 [S, S, 3]: the resized, padded image the network sees."""
        return self.spec.serving_input(image, self.image_size)[1]

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8, name="image"),
                                  tf.TensorSpec([], tf.string, name="sentence")], autograph=False)
    def serve(self, image, sentence):
        """{mask, probability, padded_image, words} of one image and sentence (module doc)."""
        words = self.tokenizer(sentence)
        network_input, padded = self.spec.serving_input(image, self.image_size)
        outputs = self.spec.serving_forward(self.model, network_input, words[None])
        mask, probability = self.spec.serving_output(outputs, tf.shape(image)[0], tf.shape(image)[1])
        return {"mask": mask, "probability": probability, "padded_image": padded, "words": words}


# Written into every SavedModel of ours; ``-m export`` replaces an existing folder only when it holds this file.
EXPORT_MARKER = "refseg_export.json"


def _is_within(path, folder):
    """True if ``path`` is ``folder`` or lies inside it (both made absolute, symlinks resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def check_export_dir(export_dir, protected=()):
    """Raise ValueError (one line, naming the folder) unless ``export_dir`` may receive a SavedModel: it is absent,
    an empty folder, or a SavedModel written by ``-m export`` (it holds ``EXPORT_MARKER``); and it neither is nor
    contains the current folder or one of the snapshot folders ``protected``. Nothing else is ever
    replaced, so a folder of the user's files is never emptied."""
    for folder in (os.curdir, *protected):
        if folder and _is_within(folder, export_dir):
            what = "the current folder" if folder == os.curdir else f"the snapshot folder {folder}"
            raise ValueError(f"--export-dir {export_dir} is or contains {what}; refusing to replace it "
                             f"(choose a new folder for the SavedModel)")
    if os.path.isdir(export_dir):
        if os.listdir(export_dir) and not os.path.isfile(os.path.join(export_dir, EXPORT_MARKER)):
            raise ValueError(f"--export-dir {export_dir} is a non-empty folder that is not a SavedModel of ours (no "
                             f"{EXPORT_MARKER}); refusing to replace it (choose a new or empty folder)")
    elif os.path.lexists(export_dir):
        raise ValueError(f"--export-dir {export_dir} exists and is not a folder")


def save_atomic(module, export_dir, marker, protected=()):
    """``tf.saved_model.save`` into a hidden temporary folder beside ``export_dir`` with ``marker`` (a dict) written
    as ``EXPORT_MARKER`` inside, then rename it into place.

    ``export_dir`` must pass ``check_export_dir``; an existing SavedModel of ours there is replaced: moved aside, the
    new folder renamed in, the old one deleted; a reader never sees a half-written SavedModel at ``export_dir``. A
    failed write (disk full, interruption) removes the temporary folder and leaves ``export_dir`` as it was."""
    check_export_dir(export_dir, protected)
    final = os.path.abspath(export_dir)
    parent, name = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp{os.getpid()}")
    old = os.path.join(parent, f".{name}.old{os.getpid()}")
    for stale in (tmp, old):
        if os.path.exists(stale):
            shutil.rmtree(stale)
    try:
        tf.saved_model.save(module, tmp, signatures={"serving_default": module.serve.get_concrete_function()})
        write_json_atomic(marker, os.path.join(tmp, EXPORT_MARKER))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    if os.path.exists(old):
        shutil.rmtree(old)
    return final


def export(cfg):
    """``-m export``: restore ``-i`` of ``-f`` into ``-n`` at ``--img-size`` and write the SavedModel to
    ``--export-dir`` with the entry's tokenizer tables (``serving_tokenizer``: the vocabulary ``cfg.vocab_file``,
    SaG's ``vocab.txt``, TRIS's BPE merges) baked in. Returns the SavedModel folder."""
    if not cfg.export_dir:
        raise ValueError("-m export needs --export-dir DIR")
    check_export_dir(cfg.export_dir, (cfg.snapshot_folder,))
    tokenizer = cfg.spec.serving_tokenizer(cfg)
    prefix = cfg.spec.find_snapshot(cfg.snapshot_candidates(cfg.iteration))
    model = cfg.spec.load_trained(prefix, cfg)
    log.info("restored %s from %s", cfg.model, prefix)
    marker = {"model": cfg.model, "dataset": cfg.dataset, "image_size": cfg.image_size, "snapshot": prefix,
              "vocabulary": tokenizer.source, "seed": cfg.seed}
    final = save_atomic(ServingModule(model, tokenizer, cfg.image_size, cfg.spec), cfg.export_dir, marker,
                        (cfg.snapshot_folder,))
    log.info("wrote SavedModel %s (%s, %d×%d, vocabulary %s)", final, cfg.model, cfg.image_size, cfg.image_size,
             tokenizer.source)
    return final
