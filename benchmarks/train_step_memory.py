"""Clean train-step time and peak RSS of one registry entry: one process, the model, the first step, ``--steps``
timed steps, no profiling (``-m bench`` also holds its FLOP profiling graphs and earlier cases, so its peak RSS is
an upper bound). Optionally the eval forward after it (batch 1).

    python3 benchmarks/train_step_memory.py -n CMPC_model --batch 8 [--size 320] [--steps 3] [--eval] [--out F]

The allocator is the environment's: run it as ``TF_CPU_ALLOCATOR_USE_BFC=true`` (what ``trainval_model.py`` sets,
``util/tf_env.py``) or ``=false`` (TensorFlow's default) to compare. Same inputs as ``-m bench``: a random image,
a sentence of 8 words left-padded to 20, seeded weights. Prints one JSON line.
"""
import argparse
import os
import resource
import sys

import numpy as np

import orig_parts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", dest="model", default="CMPC_model")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--eval", action="store_true", help="also time the eval forward (batch --batch)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    import tensorflow as tf
    from models import model_spec
    from util.bench import EMBEDDING_SHAPE, bench_inputs, median_seconds, model_train_step, seeded_model

    spec = model_spec(args.model)
    model = seeded_model(spec, EMBEDDING_SHAPE[0], args.size, "deeplab", 0, True)
    images, words, target = bench_inputs(np.random.RandomState(0), args.batch, args.size)
    variables = spec.train_variables(model, False)
    step = model_train_step(spec, model, variables, spec.make_optimizer(model, variables, 2.5e-4, 700000))
    out = {"model": args.model, "batch": args.batch, "size": args.size,
           "TF_CPU_ALLOCATOR_USE_BFC": os.environ.get("TF_CPU_ALLOCATOR_USE_BFC", "(unset: false)")}

    def run():
        step((images, words), target)[0]["cost"].numpy()

    out["first_step_s"] = round(median_seconds(run, 1, warmups=0), 2)
    out["train_step_s"] = round(median_seconds(run, args.steps, warmups=0), 3)
    if args.eval:
        forward = tf.function(lambda im, w: spec.forward(model, im, w, training=False)[spec.probability_key],
                              autograph=False)
        forward(images, words).numpy()
        out["eval_s"] = round(median_seconds(lambda: forward(images, words).numpy(), args.steps, warmups=0), 3)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.update(peak_rss_gb=round(usage.ru_maxrss / 2 ** 20, 2), system_s=round(usage.ru_stime, 1),
               user_s=round(usage.ru_utime, 1), loadavg=[round(x, 2) for x in os.getloadavg()])
    orig_parts.emit(out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
