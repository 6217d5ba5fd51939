"""TF1-faithful building blocks shared by every head.

Each function documents the exact semantics of the TF1 op it replaces. Weights are plain ``tf.Variable``s held by a
``TF1Module`` in a dict keyed by their TF1 name (``text_objseg/fusion_c5/DW``), so checkpoints of the originals load
by name. Computation follows the dtype of the activations: weights are cast to it, so the same code runs in float32
(the faithful default) and bfloat16/float16 with float32 master weights.
"""
import math

import numpy as np
import tensorflow as tf

L2_NORMALIZE_EPSILON = 1e-12
LAYER_NORM_EPSILON = 1e-12


def glorot_uniform(shape, rng):
    """``tf.glorot_uniform_initializer`` / ``xavier_initializer(_conv2d)`` with TF1's fan computation.

    For rank > 2 the receptive field is prod(shape[:-2]): fan_in = shape[-2]·rf, fan_out = shape[-1]·rf (so a
    ConvLSTM peephole [40, 40, 500] has fans 1600 and 20000). Rank 2: (shape[0], shape[1]). Limit sqrt(6 / (fi + fo)).
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        fan_in = fan_out = shape[0] if shape else 1
    else:
        receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
        fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(np.float32)


class TF1Module(tf.Module):
    """A ``tf.Module`` whose variables are registered under their TF1 names.

    ``self.tf1`` maps TF1 name → ``tf.Variable`` (the variable's own name is the TF1 name too). Initial values come
    from a seeded numpy generator, so two models built with the same seed are identical.
    """

    def __init__(self, seed=0, name=None):
        super().__init__(name=name)
        self.tf1 = {}
        self._rng = np.random.default_rng(seed)

    def tf1_variables(self):
        """{TF1 name: tf.Variable} of every variable of this module."""
        return dict(self.tf1)

    def add_variable(self, tf1_name, initial_value, trainable=True):
        if tf1_name in self.tf1:
            raise ValueError(f"variable {tf1_name} created twice")
        var = tf.Variable(np.asarray(initial_value, dtype=np.float32), name=tf1_name, trainable=trainable)
        self.tf1[tf1_name] = var
        return var

    def add_conv(self, scope, k, in_dim, out_dim):
        """``_conv`` of the originals: ``<scope>/DW`` [k,k,in,out] (xavier_initializer_conv2d), ``<scope>/biases`` [out] (0)."""
        self.add_variable(f"{scope}/DW", glorot_uniform((k, k, in_dim, out_dim), self._rng))
        self.add_variable(f"{scope}/biases", np.zeros((out_dim,), np.float32))

    def conv(self, scope, x):
        """``_conv``: ``tf.nn.conv2d(x, DW, stride 1, 'SAME') + biases`` (a broadcast add, not ``bias_add``)."""
        return conv2d(x, self.tf1[f"{scope}/DW"], self.tf1[f"{scope}/biases"])

    def add_layer_norm(self, scope, dim):
        """``tf.contrib.layers.layer_norm`` parameters: ``<scope>/beta`` (0) and ``<scope>/gamma`` (1), shape [dim]."""
        self.add_variable(f"{scope}/beta", np.zeros((dim,), np.float32))
        self.add_variable(f"{scope}/gamma", np.ones((dim,), np.float32))

    def layer_norm(self, scope, x):
        return layer_norm(x, self.tf1[f"{scope}/beta"], self.tf1[f"{scope}/gamma"])


def _like(w, x):
    return tf.cast(w, x.dtype) if w.dtype != x.dtype else w


def conv2d(x, kernel, biases=None, dilation=1):
    """TF1 ``tf.nn.conv2d(x, W, [1,1,1,1], 'SAME') + b`` (NHWC; TF 'SAME' padding, asymmetric where odd)."""
    y = tf.nn.conv2d(x, _like(kernel, x), strides=1, padding="SAME", dilations=dilation)
    return y if biases is None else y + _like(biases, x)


def resize_bilinear_legacy(x, size):
    """TF1 ``tf.image.resize_bilinear(x, size)``: align_corners=False, NO half-pixel centres.

    src = dst · (in / out); the bottom/right neighbour is clamped, so upsampling 40→320 repeats row/col 39 for
    312..319 and downsampling 320→40 picks pixel (8i, 8j) exactly. TF2's ``tf.image.resize`` differs (half-pixel).
    Runs in float32 (the op's output dtype) and returns the input dtype.
    """
    y = tf.raw_ops.ResizeBilinear(images=x, size=size, align_corners=False, half_pixel_centers=False)
    return tf.cast(y, x.dtype) if y.dtype != x.dtype else y


def l2_normalize(x, axis=None):
    """TF1 ``tf.nn.l2_normalize(x, dim)``: x · rsqrt(max(Σx², 1e-12)). ``axis=None`` normalises over ALL axes.

    The sum and rsqrt run in float32 whatever the activation dtype: 1e-12 is 0 in float16, and an all-zero vector
    (a pad word's feature) would give 0 · rsqrt(0) = NaN.
    """
    square_sum = tf.reduce_sum(tf.square(tf.cast(x, tf.float32)), axis=axis, keepdims=True)
    return x * tf.cast(tf.math.rsqrt(tf.maximum(square_sum, L2_NORMALIZE_EPSILON)), x.dtype)


def layer_norm(x, beta, gamma):
    """TF 1.5 ``tf.contrib.layers.layer_norm`` defaults (begin_norm_axis=1, begin_params_axis=-1).

    Mean and (biased) variance over ALL axes except the batch axis (``tf.nn.moments``); then
    ``tf.nn.batch_normalization(x, mean, var, beta, gamma, 1e-12)`` with per-channel beta/gamma [C].
    """
    axes = list(range(1, x.shape.rank))
    mean, variance = tf.nn.moments(x, axes=axes, keepdims=True)
    return tf.nn.batch_normalization(x, mean, variance, _like(beta, x), _like(gamma, x), LAYER_NORM_EPSILON)


def basic_lstm_cell(x, c, h, kernel, bias, forget_bias=1.0):
    """TF1 ``BasicLSTMCell`` (state_is_tuple=False) one step: returns (c', h').

    gates = concat([x, h]) · kernel + bias, split into 4 column blocks in the order **i, j, f, o**;
    c' = c·σ(f + forget_bias) + σ(i)·tanh(j); h' = tanh(c')·σ(o). The forget bias is added at run time (not stored).
    Kernel rows: the first ``input_dim`` multiply x, the last ``units`` multiply h.
    """
    gates = tf.matmul(tf.concat([x, h], axis=1), _like(kernel, x)) + _like(bias, x)
    i, j, f, o = tf.split(gates, 4, axis=1)
    new_c = c * tf.sigmoid(f + forget_bias) + tf.sigmoid(i) * tf.tanh(j)
    new_h = tf.tanh(new_c) * tf.sigmoid(o)
    return new_c, new_h


def word_lstm(embedded, words, kernel, bias, units):
    """The originals' word LSTM over ``num_steps`` tokens with pad skipping, for any batch size.

    TF1: ``for n: tf.cond(words[0, n] == 0, keep state, cell(emb[n], state))`` — a pad (id 0) at any position
    leaves the state unchanged. Here the skip is a per-sample ``tf.where``, so each sample of a batch gets what
    batch 1 gives, and the steps run in ``loop_over_words`` (the batch's shared leading pads not at all). The values
    equal running every step: the state of a skipped step is the zero initial state, its output zero; the forward
    is the same ops bit for bit, the kernel and bias gradients are the same terms summed in another order
    (last-bit differences).

    Args:
      embedded: [B, T, D] word embeddings.  words: [B, T] int ids (0 = pad).
    Returns:
      (outputs [B, T, units] with zeros at pad steps, final c [B, units], final h [B, units]).
    """
    batch, steps = tf.shape(embedded)[0], embedded.shape[1]
    time_major = tf.transpose(embedded, [1, 0, 2])

    def step(n, keep, state):
        c, h, outputs = state
        new_c, new_h = basic_lstm_cell(time_major[n], c, h, kernel, bias)
        out = tf.where(keep, new_h, tf.zeros_like(new_h))
        return (tf.where(keep, new_c, c), tf.where(keep, new_h, h),
                tf.tensor_scatter_nd_update(outputs, [[n]], out[None]))

    zeros = tf.zeros([batch, units], embedded.dtype)
    c, h, outputs = loop_over_words(tf.not_equal(words, 0), step,
                                    (zeros, zeros, tf.zeros([steps, batch, units], embedded.dtype)))
    return tf.transpose(outputs, [1, 0, 2]), c, h


def first_word_step(is_word):
    """The first step (int32 scalar) at which some sample of ``is_word`` [B, T] (bool) has a word; T when none has."""
    any_word = tf.reduce_any(is_word, axis=0)
    first = tf.cast(tf.argmax(tf.cast(any_word, tf.int32)), tf.int32)
    return tf.where(tf.reduce_any(any_word), first, tf.shape(is_word, out_type=tf.int32)[1])


def loop_over_words(is_word, step, state):
    """The originals' per-token loop with its pad skip, for any batch size: ``state = step(n, keep, state)`` for n
    from ``first_word_step(is_word)`` to T − 1, where ``keep`` = ``is_word[:, n]`` [B, 1] (bool) and ``step`` keeps a
    sample's state with ``tf.where(keep, new, old)``; returns the final ``state`` (a tuple of tensors).

    The originals run ``tf.cond(words[0, n] == 0, keep state, cell)`` per token (batch 1), so their pads cost
    nothing. Their sentences are left-padded (a pad never follows a word), so the steps where every sample of the
    batch has a pad are the leading ones the whole batch shares: the loop is a ``tf.while_loop`` that starts after
    them, and neither their forward nor their backward is computed. A ``tf.cond`` per step would skip them too, but
    a TF2 cond's gradient materialises a zero gradient for every variable the untaken branch captures (+0.45 GB peak
    in CMPC's train step for its word LSTM; a 32 MB kernel per untaken step for RMI's ALSTM), and 20 unrolled conds
    take 5–10 s longer to trace and optimise than one loop body. A pad elsewhere (none in the originals' data) is
    still skipped per sample by ``step``'s ``tf.where``. The loop also runs under XLA (static shapes, a
    data-dependent trip count).
    """
    steps = is_word.shape[1]

    def body(n, *state):
        return (n + 1, *step(n, is_word[:, n][:, None], state))

    return tuple(tf.while_loop(lambda n, *_: n < steps, body, (first_word_step(is_word), *state),
                               maximum_iterations=steps)[1:])


class ConvLSTMCell:
    """``util/cell.py`` ConvLSTMCell of RRN/CMPC with its defaults: forget_bias 1.0, tanh, normalize=True,
    peephole=True, channels last. Variables (under ``<scope>/``, default scope ``text_objseg/rnn/conv_lstm_cell``):
    ``kernel`` [k,k,2F,4F] (no bias: normalize=True), peepholes ``W_ci``, ``W_cf``, ``W_co`` [H,W,F] and layer norms
    ``LayerNorm``, ``LayerNorm_1`` … ``LayerNorm_4`` (for j, i, f, o and the new cell, in that order).

    Step with input x [B,H,W,F] and state (c, h):
      z = conv(concat[x, h], kernel, SAME, no bias) split into **j, i, f, o** (not BasicLSTMCell's i, j, f, o);
      i += W_ci⊙c; f += W_cf⊙c; j, i, f = LN(j), LN(i), LN(f); f = σ(f + 1); i = σ(i); c' = c⊙f + i⊙tanh(j);
      o += W_co⊙c' (peephole on the NEW, un-normalised cell); o = LN(o); c' = LN(c'); h' = σ(o)⊙tanh(c').
      The state carried on is the normalised (c', h').
    """

    def __init__(self, module, shape, filters, kernel_size=(1, 1), scope="text_objseg/rnn/conv_lstm_cell"):
        self.module, self.scope, self.filters = module, scope, filters
        rng = module._rng
        kh, kw = kernel_size
        module.add_variable(f"{scope}/kernel", glorot_uniform((kh, kw, 2 * filters, 4 * filters), rng))
        module.add_variable(f"{scope}/W_ci", glorot_uniform((shape[0], shape[1], filters), rng))
        module.add_variable(f"{scope}/W_cf", glorot_uniform((shape[0], shape[1], filters), rng))
        for suffix in ("", "_1", "_2"):
            module.add_layer_norm(f"{scope}/LayerNorm{suffix}", filters)
        module.add_variable(f"{scope}/W_co", glorot_uniform((shape[0], shape[1], filters), rng))
        for suffix in ("_3", "_4"):
            module.add_layer_norm(f"{scope}/LayerNorm{suffix}", filters)

    def _var(self, name):
        return self.module.tf1[f"{self.scope}/{name}"]

    def _ln(self, suffix, x):
        return self.module.layer_norm(f"{self.scope}/LayerNorm{suffix}", x)

    def __call__(self, x, state):
        c, h = state
        z = conv2d(tf.concat([x, h], axis=3), self._var("kernel"))
        j, i, f, o = tf.split(z, 4, axis=3)
        i = i + _like(self._var("W_ci"), c) * c
        f = f + _like(self._var("W_cf"), c) * c
        j, i, f = self._ln("", j), self._ln("_1", i), self._ln("_2", f)
        f = tf.sigmoid(f + 1.0)
        i = tf.sigmoid(i)
        new_c = c * f + i * tf.tanh(j)
        o = o + _like(self._var("W_co"), new_c) * new_c
        o = self._ln("_3", o)
        new_c = self._ln("_4", new_c)
        new_h = tf.sigmoid(o) * tf.tanh(new_c)
        return new_h, (new_c, new_h)

    def run(self, inputs):
        """``tf.nn.dynamic_rnn`` over a Python list of [B,H,W,F] inputs from a zero state; returns the last h."""
        c = tf.zeros_like(inputs[0])
        h = tf.zeros_like(inputs[0])
        for x in inputs:
            h, (c, h) = self(x, (c, h))
        return h


def weighted_logistic_loss(scores, labels):
    """``util/loss.py weighed_logistic_loss(scores, labels, 1, 1)``: per sample the SUM over (H, W, C) of
    ``sigmoid_cross_entropy_with_logits``, then the mean over the batch. Computed in float32."""
    scores = tf.cast(scores, tf.float32)
    labels = tf.cast(labels, tf.float32)
    per_pixel = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=scores)
    return tf.reduce_mean(tf.reduce_sum(per_pixel, axis=list(range(1, scores.shape.rank))))
