"""Where the time goes, op by op: a TF profiler trace of the eval forward and of the train step, ours or the
ORIGINAL graph's, summed per op type.

    python3 benchmarks/op_profile.py --side ours -n CMPC_model [--kind eval|train] [--steps 3] [--out F]
    ~/.cache/orig-compat-venv/bin/python benchmarks/op_profile.py --side orig --cmpc $CMPC_GIT_DIR [--rrn ..]

Same inputs as ``-m bench`` / ``benchmarks/orig_parts.py``: 320×320, batch 1, a random image, a sentence of 8 words
left-padded to 20, seeded weights. Each case runs twice untraced, then ``--steps`` times under
``tf.profiler.experimental``; the trace (XSpace) is read back and every op execution on TensorFlow's executor
threads (the ``tf_Compute`` lines: an op's duration there includes the intra-op work it hands to Eigen's pool) is
summed per op type and divided by the number of steps. With two inter-op threads ops can overlap, so the sum can
exceed the wall time; the shares, not the sums, are what to compare. The original side needs the venv and the
bare git dirs of ``../shared/tools/orig_timing`` (its README).
"""
import argparse
import collections
import glob
import os
import sys
import tempfile

import numpy as np

import orig_parts

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
IMAGE_SIZE = 320


def op_seconds(logdir, steps):
    """{op type: seconds per step} from the newest ``*.xplane.pb`` under ``logdir`` (host executor threads)."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))[-1], "rb") as f:
        space.ParseFromString(f.read())
    totals = collections.Counter()
    for plane in space.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ":" in name and "::" not in name:  # "<op name>:<op type>"; "Executor::…" is bookkeeping
                    totals[name.rsplit(":", 1)[1]] += event.duration_ps / 1e12 / steps
    return dict(totals)


def profile(run, steps):
    """Two untraced calls of ``run``, then ``steps`` traced ones → {op type: seconds per step}."""
    import tensorflow as tf

    for _ in range(2):
        run()
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        for _ in range(steps):
            run()
        tf.profiler.experimental.stop()
        return op_seconds(logdir, steps)


def ours(name, kinds, steps):
    """Our eval forward / train step of registry entry ``name`` (the cases of ``util.bench``)."""
    sys.path.insert(0, ROOT)
    import tensorflow as tf
    from models import model_spec
    from util.bench import EMBEDDING_SHAPE, bench_inputs, model_train_step, seeded_model

    spec = model_spec(name)
    model = seeded_model(spec, EMBEDDING_SHAPE[0], IMAGE_SIZE, "deeplab", 0, True)
    images, words, target = bench_inputs(np.random.RandomState(0), 1, IMAGE_SIZE)
    out = {}
    if "eval" in kinds:
        forward = tf.function(lambda im, w: spec.forward(model, im, w, training=False)[spec.probability_key])
        out["eval"] = profile(lambda: forward(images, words).numpy(), steps)
    if "train" in kinds:
        variables = spec.train_variables(model, False)
        step = model_train_step(spec, model, variables, spec.make_optimizer(model, variables, 2.5e-4, 700000))
        out["train"] = profile(lambda: step((images, words), target)[0]["cost"].numpy(), steps)
    return out


def original(key, git_dir, kinds, steps):
    """The original's eval (``sess.run(model.up)``) / train step (``sess.run(model.train_step)``) of ``key``."""
    sys.path.insert(0, orig_parts.ORIG_TIMING)
    import orig_compat

    tf = orig_compat.tf1()
    out = {}
    with orig_compat.original(git_dir, key) as (mod, _, _):
        with tf.Graph().as_default():
            fetches, feed = orig_parts.training_graph(tf, orig_compat, mod, key)
            with tf.Session() as sess:
                sess.run(tf.global_variables_initializer())
                for kind in kinds:
                    out[kind] = profile(lambda: sess.run(fetches[kind], feed), steps)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--side", choices=("ours", "orig"), required=True)
    p.add_argument("-n", dest="model", default="CMPC_model", help="ours: the registry name (-n of trainval_model)")
    p.add_argument("--cmpc", default=os.environ.get("CMPC_GIT_DIR"), help="orig: bare git dir of spyflying/CMPC-Refseg")
    p.add_argument("--rrn", default=os.environ.get("RRN_GIT_DIR"), help="orig: bare git dir of liruiyu/referseg_rrn")
    p.add_argument("--kind", choices=("eval", "train", "both"), default="both")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    kinds = ("eval", "train") if args.kind == "both" else (args.kind,)
    if args.side == "ours":
        result = {args.model: ours(args.model, kinds, args.steps)}
    else:
        result = {key: original(key, git_dir, kinds, args.steps)
                  for key, git_dir in (("cmpc", args.cmpc), ("rrn", args.rrn)) if git_dir}
        if not result:
            p.error("--side orig needs --cmpc and/or --rrn (bare git dirs; ../shared/tools/orig_timing/README.md)")
    result = {model: {kind: dict(sorted(((op, round(s, 4)) for op, s in ops.items()), key=lambda kv: -kv[1]))
                      for kind, ops in kinds_.items()} for model, kinds_ in result.items()}
    orig_parts.emit({"side": args.side, "steps": args.steps, "loadavg": [round(x, 2) for x in os.getloadavg()],
                     "seconds_per_step_by_op_type": result}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
