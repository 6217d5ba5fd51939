"""``models.layers`` pieces shared by the TF1 heads: the word LSTM's pad skip."""
import numpy as np
import tensorflow as tf

from models.layers import basic_lstm_cell, skip_pad_step, word_lstm


def test_skip_pad_step_runs_the_cell_only_when_some_sample_has_a_word():
    calls = []
    state = (tf.ones([2, 3]), tf.zeros([2, 3]))

    def step():
        calls.append(1)
        return state[1], state[0]

    assert [x.numpy().tolist() for x in skip_pad_step(tf.constant([[False], [False]]), step, state)] == \
        [x.numpy().tolist() for x in state]
    assert calls == []
    skip_pad_step(tf.constant([[False], [True]]), step, state)
    assert calls == [1]


def test_word_lstm_equals_the_unconditional_per_sample_form():
    """Left pads, a pad in the middle, a sentence of pads only: the same outputs and states, bit for bit, as the
    plain loop that runs the cell at every step and keeps the state with ``tf.where``."""
    rs = np.random.RandomState(0)
    words = tf.constant([[0, 0, 0, 5, 7, 0, 2], [0, 0, 3, 1, 4, 6, 2], [0] * 7], tf.int32)
    embedded = tf.constant(rs.normal(size=(3, 7, 4)).astype(np.float32))
    kernel = tf.constant(rs.normal(size=(4 + 5, 20)).astype(np.float32))
    bias = tf.constant(rs.normal(size=(20,)).astype(np.float32))
    outputs, c, h = tf.function(word_lstm, autograph=False)(embedded, words, kernel, bias, 5)
    ref_c = ref_h = tf.zeros([3, 5])
    ref_outputs = []
    for n in range(7):
        is_word = tf.not_equal(words[:, n], 0)[:, None]
        new_c, new_h = basic_lstm_cell(embedded[:, n], ref_c, ref_h, kernel, bias)
        ref_c, ref_h = tf.where(is_word, new_c, ref_c), tf.where(is_word, new_h, ref_h)
        ref_outputs.append(tf.where(is_word, new_h, tf.zeros_like(new_h)))
    np.testing.assert_array_equal(outputs.numpy(), tf.stack(ref_outputs, axis=1).numpy())
    np.testing.assert_array_equal(c.numpy(), ref_c.numpy())
    np.testing.assert_array_equal(h.numpy(), ref_h.numpy())
    assert not np.any(h.numpy()[2]) and np.all(outputs.numpy()[0, :3] == 0)
