"""``--logdir``: a training run writes TensorBoard event files with the named scalars and images."""
import glob

import numpy as np
import tensorflow as tf
from tensorflow.core.util import event_pb2

from tests.test_trainval import common, logged_losses, run


def read_events(logdir):
    """{tag: {step: value}} for scalars (float) and images (list of encoded PNG strings) in ``logdir``."""
    out = {}
    for path in sorted(glob.glob(f"{logdir}/**/events.out.tfevents.*", recursive=True)):
        for record in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                tensor = tf.make_ndarray(value.tensor)
                out.setdefault(value.tag, {})[event.step] = tensor.item() if tensor.ndim == 0 else list(tensor[2:])
    return out


def read_scalars(logdir):
    return {tag: steps for tag, steps in read_events(logdir).items()
            if all(isinstance(v, float) for v in steps.values())}


def test_logdir_writes_losses_learning_rate_accuracies_and_images(sample, tmp_path):
    logdir = tmp_path / "logs"
    out = run(["-m", "train", "-t", "train", *common(sample, "CMPC_model", tmp_path), "-i", "4", "-s", "4",
               "--init-weights", "random", "--log-every", "1", "--logdir", str(logdir), "--summary-every", "2",
               "--image-summary-every", "3"]).stdout
    events = read_events(logdir)
    for tag in ("loss/cls_loss", "loss/cls_loss_c3", "loss/cls_loss_c4", "loss/cls_loss_c5", "loss/cls_loss_all",
                "loss/reg_loss", "loss/cost", "learning_rate", "accuracy/all", "accuracy/pos", "accuracy/neg",
                "accuracy_avg/all"):
        assert sorted(events[tag]) == [0, 2], tag
    losses = logged_losses(out)
    for step in (0, 2):
        assert np.isclose(events["loss/cls_loss"][step], losses[step], rtol=1e-6, atol=1e-6)
    assert np.isclose(events["learning_rate"][0], 0.00025)
    for tag in ("image", "ground_truth", "prediction"):
        assert sorted(events[tag]) == [0, 3], tag
        png = events[tag][0][0]
        image = tf.io.decode_png(png).numpy()
        assert image.shape[:2] == (64, 64), image.shape
