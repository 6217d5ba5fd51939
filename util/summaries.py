"""TensorBoard scalars of a test run (``-m test --logdir DIR``).

Written with the core ``tf.summary.write`` and TensorBoard's ``scalars`` plugin metadata (the layout
``tf.summary.scalar`` produces, as ``util.train.TrainSummaries`` does), so writing needs no ``tensorboard`` package.
"""
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

def plugin_metadata(plugin):
    """Summary metadata naming the TensorBoard plugin (``scalars``, ``images``) that displays a ``tf.summary.write``."""
    return summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin))


_SCALAR_METADATA = plugin_metadata("scalars")
_VARIANTS = ("without_dcrf", "with_dcrf")


def test_scalar_values(results):
    """{tag: float} of ``util.evaluate.test``'s ``results``.

    Tags ``test/<dataset>_<split>/<variant>/<metric>`` with variant ``without_dcrf`` and, when present,
    ``with_dcrf``; metric ``overall_iou``, ``mean_iou`` and ``precision@<t>`` for each threshold of the summary
    (0.5 … 0.9). Without ``dataset``/``split`` in ``results`` the middle part is left out (``test/<variant>/…``).
    """
    run = f"{results['dataset']}_{results['split']}/" if "dataset" in results and "split" in results else ""
    values = {}
    for variant in _VARIANTS:
        summary = results.get(variant)
        if summary is None:
            continue
        base = f"test/{run}{variant}"
        values[f"{base}/overall_iou"] = float(summary["overall_iou"])
        values[f"{base}/mean_iou"] = float(summary["mean_iou"])
        values.update({f"{base}/precision@{t}": float(p) for t, p in summary["precision"].items()})
    return values


def write_test_scalars(logdir, results, step):
    """Append ``test_scalar_values(results)`` at ``step`` (the snapshot's iteration) to an event file in ``logdir``
    as float32 scalars; the file is flushed and closed on return. Returns the {tag: value} written."""
    values = test_scalar_values(results)
    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        for tag, value in values.items():
            tf.summary.write(tag, tf.constant(value, tf.float32), step=int(step), metadata=_SCALAR_METADATA)
    writer.close()
    return values
