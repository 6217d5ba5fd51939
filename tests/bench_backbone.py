"""Benchmark (a script, not a test): DeepLab-ResNet-101 forward time and achieved conv GFLOP/s.

Usage: ``python tests/bench_backbone.py [--size 320] [--batch 1] [--repeats 5] [--matmul 2048]``

Times the forward pass at ``size``×``size`` (median of ``repeats`` runs after one warm-up), as a plain
``tf.function`` and with XLA (``jit_compile=True``); counts the convolution FLOPs analytically
(2·k·k·cin·cout·Hout·Wout per conv, batch norm and ReLU not counted) and compares the achieved rate with a large fp32
matmul (n×n by n×n, 2n³ FLOPs) timed in the same run. The weights are random: speed does not depend on them.
"""
import argparse
import math
import pathlib
import sys

import numpy as np
import tensorflow as tf

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from models.backbone import STAGES, Backbone, unit_names, variable_shapes  # noqa: E402
from util.bench import median_seconds  # noqa: E402


def conv_flops(height, width, batch=1):
    """Analytic conv FLOPs of one forward: conv1 at ⌈/2⌉, stage 2 at ⌈/4⌉ (after pool1), stages 3–5 at ⌈/8⌉."""
    def out(div):
        h, w = height, width
        for _ in range(int(math.log2(div))):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        return h * w

    stage_of = {unit: stage for stage, units, *_ in STAGES for unit in unit_names(stage, units)}
    total = 0
    for name, shape in variable_shapes().items():
        if not name.endswith("/weights"):
            continue
        scope = name.split("/")[0]
        stage = stage_of[scope.split("_")[0]] if scope != "conv1" else 1
        pixels = out(2) if stage == 1 else out(4) if stage == 2 else out(8)
        k, _, cin, cout = shape
        total += 2 * k * k * cin * cout * pixels
    return batch * total


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--matmul", type=int, default=2048, help="n of the reference n×n fp32 matmul")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    backbone = Backbone()
    for name, var in backbone.tf1_variables().items():
        shape = var.shape.as_list()
        if name.endswith("/weights"):
            value = rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[:-1]))
        elif name.endswith(("/gamma", "/moving_variance")):
            value = np.ones(shape)
        else:
            value = np.zeros(shape)
        var.assign(value.astype(np.float32))
    images = tf.constant(rng.uniform(-120, 140, [args.batch, args.size, args.size, 3]).astype(np.float32))

    n = args.matmul
    a, b = (tf.constant(rng.standard_normal([n, n]).astype(np.float32)) for _ in range(2))
    matmul = tf.function(lambda: tf.matmul(a, b))
    t_mm = median_seconds(lambda: matmul().numpy(), max(args.repeats, 5))
    peak = 2 * n ** 3 / t_mm / 1e9

    flops = conv_flops(args.size, args.size, args.batch)
    print(f"device: {tf.config.list_logical_devices()[-1].device_type}, threads: intra "
          f"{tf.config.threading.get_intra_op_parallelism_threads() or 'default'}")
    print(f"reference fp32 matmul {n}x{n}: {t_mm * 1e3:.1f} ms, {peak:.1f} GFLOP/s")
    print(f"forward {args.batch}x{args.size}x{args.size}: {flops / 1e9:.1f} GFLOP (convs)")
    for label, jit in (("tf.function", False), ("tf.function(jit_compile=True)", True)):
        forward = tf.function(lambda x: backbone(x)["res5c_relu"], jit_compile=jit)
        seconds = median_seconds(lambda: forward(images).numpy(), args.repeats)
        rate = flops / seconds / 1e9
        print(f"{label:32s} median {seconds * 1e3:8.1f} ms  {rate:7.1f} GFLOP/s  {rate / peak:5.2f} × matmul")


if __name__ == "__main__":
    main()
