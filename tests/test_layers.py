"""``models.layers`` pieces shared by the TF1 heads: the word loop with its pad skip (RMI's, ``word_lstm``)."""
import numpy as np
import pytest
import tensorflow as tf

from models.layers import basic_lstm_cell, first_word_step, loop_over_words, word_lstm


def test_loop_over_words_runs_from_the_first_step_with_a_word():
    is_word = tf.constant([[False, False, True, True], [False, False, False, True]])
    seen = []

    def step(n, keep, state):
        seen.append((int(n), keep.numpy()[:, 0].tolist()))
        return (state[0] + tf.cast(keep[:, 0], tf.float32),)

    assert loop_over_words(is_word, step, (tf.zeros([2]),))[0].numpy().tolist() == [2, 1]
    assert seen == [(2, [True, False]), (3, [True, True])]
    seen.clear()
    assert loop_over_words(tf.zeros([2, 4], tf.bool), step, (tf.ones([2]),))[0].numpy().tolist() == [1, 1]
    assert seen == []


def every_step_lstm(embedded, words, kernel, bias, units):
    """The word LSTM with every step run (the per-sample ``tf.where`` form, no step skipped): the reference."""
    c = h = tf.zeros([embedded.shape[0], units])
    outputs = []
    for n in range(embedded.shape[1]):
        is_word = tf.not_equal(words[:, n], 0)[:, None]
        new_c, new_h = basic_lstm_cell(embedded[:, n], c, h, kernel, bias)
        c, h = tf.where(is_word, new_c, c), tf.where(is_word, new_h, h)
        outputs.append(tf.where(is_word, new_h, tf.zeros_like(new_h)))
    return tf.stack(outputs, axis=1), c, h


WORDS = {"left-padded": [[0] * 12 + list(range(1, 9)), [0] * 5 + list(range(1, 16))],
         "a pad inside": [[0] * 3 + [4, 0, 6] + [7] * 14, [0] * 9 + list(range(1, 12))],
         "no pad": [list(range(1, 21)), list(range(21, 41))],
         "all pads": [[0] * 20, [0] * 20]}


@pytest.mark.parametrize("case", sorted(WORDS))
def test_word_lstm_skips_shared_leading_pads_and_equals_every_step(case):
    rng = np.random.RandomState(0)
    units, dim = 6, 5
    words = tf.constant(WORDS[case], tf.int32)
    embedded = tf.constant(rng.normal(size=(2, 20, dim)).astype(np.float32))
    kernel = tf.Variable(rng.normal(0, 0.3, (dim + units, 4 * units)).astype(np.float32))
    bias = tf.Variable(rng.normal(0, 0.1, 4 * units).astype(np.float32))
    first = {"left-padded": 5, "a pad inside": 3, "no pad": 0, "all pads": 20}[case]
    assert first_word_step(tf.not_equal(words, 0)).numpy() == first

    def loss_and_grads(fn):
        with tf.GradientTape() as tape:
            outputs, c, h = fn(embedded, words, kernel, bias, units)
            loss = tf.reduce_sum(outputs ** 2) + tf.reduce_sum(c * h)
        # eagerly, a loop that runs no step leaves the kernel unconnected (None); in a tf.function, as in the
        # train step, the while loop's gradient is zeros
        return [outputs, c, h] + tape.gradient(loss, [kernel, bias],
                                               unconnected_gradients=tf.UnconnectedGradients.ZERO)

    expected = loss_and_grads(every_step_lstm)
    eager = loss_and_grads(word_lstm)
    assert eager[0].shape == (2, 20, units)
    assert all(np.array_equal(a, b) for a, b in zip(eager[:3], expected[:3]))    # the same ops, bit for bit
    for got in (eager, tf.function(loss_and_grads)(word_lstm),
                tf.function(loss_and_grads, jit_compile=True)(word_lstm)):        # the train step's use under XLA
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
