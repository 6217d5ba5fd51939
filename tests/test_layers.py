"""``models.layers`` pieces shared by the TF1 heads: the pad skip of RMI's word loop."""
import tensorflow as tf

from models.layers import skip_pad_step


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
