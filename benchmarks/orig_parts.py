"""Where the ORIGINAL graphs spend their time: backbone, head, loss + backward, Adam update (CMPC, RRN).

Runs the original TF1 model code through ``../shared/tools/orig_timing`` (``orig_compat.original`` / ``build``: the
sources are read from the fetched bare git dirs at run time, nothing of them is stored here) under
``tf.compat.v1`` and times, in the TRAINING graph of each model at 320×320, batch 1 (the inputs of
``orig_compat.time_model``):

  backbone  ``sess.run`` of the DeepLab output ``res5c_relu``
  eval      ``sess.run(model.up)``
  grads     ``sess.run(tf.gradients(model.cost, tvars))`` (forward, losses, backward; no update)
  train     ``sess.run(model.train_step)`` (forward, backward, ``ApplyAdam``)

so head = eval − backbone, loss + backward = grads − eval, update = train − grads. The same parts of ours come from
``trainval_model.py -m bench --bench-parts``. Median of ``--runs`` after ``--warmup``; ``--clock cpu`` uses the
process CPU time (all threads) instead of the wall clock, which moves less while other jobs share the machine.

    python3 benchmarks/orig_parts.py --cmpc $CMPC_GIT_DIR --rrn $RRN_GIT_DIR [--runs 5] [--clock wall|cpu] [--out F]
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ORIG_TIMING = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "tools", "orig_timing"))
PARTS = ("backbone", "eval", "grads", "train")


def median_ms(fn, runs, warmup, clock):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = clock()
        fn()
        times.append((clock() - start) * 1e3)
    return statistics.median(times)


def training_graph(tf, orig_compat, mod, key):
    """The original's TRAINING graph of ``key`` at 320×320, batch 1, in the current default graph → (fetches
    {part: tensor or op}, feed dict) with the inputs of ``orig_compat.time_model``."""
    kw = dict(vocab_size=12112, mode="train")
    if key == "cmpc":
        kw["emb_name"] = "Gref"
    tf.set_random_seed(0)
    model, _ = orig_compat.build(tf, mod, key, kw, feed_backbone=False)
    graph = tf.get_default_graph()
    res5c = [op for op in graph.get_operations() if op.name.split("/")[-1] == "res5c_relu"][0].outputs[0]
    tvars = [v for v in tf.trainable_variables() if v.op.name.startswith("text_objseg")]
    grads = [g for g in tf.gradients(model.cost, tvars) if g is not None]
    rs = np.random.RandomState(0)
    words = np.zeros([1, model.num_steps], np.int32)
    words[0, -8:] = rs.randint(1, kw["vocab_size"], 8)
    feed = {model.words: words, model.im: rs.uniform(-120, 130, [1, model.H, model.W, 3]).astype(np.float32),
            model.target_fine: (rs.uniform(size=[1, model.H, model.W, 1]) > 0.7).astype(np.float32)}
    if hasattr(model, "valid_idx"):
        feed[model.valid_idx] = [[model.num_steps - 8]]
    return {"backbone": res5c, "eval": model.up, "grads": grads, "train": model.train_step}, feed


def time_parts(tf, orig_compat, mod, key, runs, warmup, clock):
    with tf.Graph().as_default():
        fetches, feed = training_graph(tf, orig_compat, mod, key)
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            return {part: round(median_ms(lambda: sess.run(fetches[part], feed), runs, warmup, clock), 1)
                    for part in PARTS}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cmpc", default=os.environ.get("CMPC_GIT_DIR"), help="bare git dir of spyflying/CMPC-Refseg")
    p.add_argument("--rrn", default=os.environ.get("RRN_GIT_DIR"), help="bare git dir of liruiyu/referseg_rrn")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    sys.path.insert(0, ORIG_TIMING)
    import orig_compat

    tf = orig_compat.tf1()
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    out = {"clock": args.clock, "runs": args.runs, "H": 320, "W": 320, "batch": 1,
           "loadavg_start": [round(x, 2) for x in os.getloadavg()]}
    for key in ("cmpc", "rrn"):
        git_dir = getattr(args, key)
        if not git_dir:
            continue
        with orig_compat.original(git_dir, key) as (mod, _, _):
            out[key] = time_parts(tf, orig_compat, mod, key, args.runs, args.warmup, clock)
    out["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    emit(out, args.out)
    return 0


def emit(result, path=None):
    """Print ``result`` as one JSON line and, with ``path``, also write it there (temporary file, then rename)."""
    text = json.dumps(result)
    print(text)
    if path:
        with open(path + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit(main())
