"""``-m bench -n <model>``: throughput of the eval forward and of one train step, against this machine's matmul peak.

For each batch size of ``cfg.bench_batch_sizes`` and XLA off/on: the eval forward (the registry entry's
``probability_key`` output: ``sigm``, ReSTR ``pixel_pred``) and one full train step (forward, backward, the model's
optimizer update) on random images at ``cfg.image_size`` and a fixed sentence of 8 words left-padded to 20 tokens
(``bench_words``: what ``../shared/tools/orig_timing`` feeds the originals, whose word loops skip pads), with seeded
weights (no data
files: the entry's ``random`` initialisation — for the TF1 models the backbone gets
``models.backbone.seeded_weights`` —, and a seeded 12112×300 embedding for the GloVe models). Each is called once to
trace/compile and once to warm up, then timed ``repeats`` times (``cfg.bench_repeats``, default 5); the median is
reported.

FLOPs per image come from TensorFlow's profiler (``float_operation``: 2 per multiply-add of convolutions and
matmuls, 1 per element-wise op) on the batch-1 graphs: the backbone alone (ReSTR: the ViT), the whole forward
(head = difference) and the whole train step. The profiler does not look inside ``tf.cond`` branches or
``tf.while_loop`` bodies, so the word loops are left out: RMI's head figure misses its ALSTM (22 GFLOP per word
step at 320×320, ``models.layers.loop_over_words``) and its GFLOP/s is understated accordingly; the word LSTM of
CMPC, RRN and the LSTM baseline (``models.layers.word_lstm``) is ~16 MFLOP a step, negligible. Achieved GFLOP/s = FLOPs per image × images/s; the practical peak is
a 4096×4096 matmul in the compute dtype, timed (median of ``repeats``) in the same run. Peak RSS is ``getrusage``'s maximum resident set of
the process so far. Results are logged as a table and, with ``cfg.bench_json``, written as JSON.

With ``cfg.bench_parts`` two more cases are timed, so that the time splits into backbone, head, loss + backward and
optimizer update: ``backbone`` (the backbone's forward alone) and ``grads`` (the train step with an optimizer that
updates nothing: forward, losses and every gradient, which it sums so that none is pruned). head = eval − backbone,
loss + backward = grads − eval, update = train − grads; ``benchmarks/orig_parts.py`` times the same parts of the
original graphs. ``cfg.bench_baseline`` is a JSON of the originals' timings (``../shared/tools/orig_timing``'s
``timing`` output, or ``benchmarks/orig_parts.py``'s): each batch-1 figure without XLA is then printed beside the
original's, with the speed ratio (original time / ours).

Entries that train with their own recipe (a ``train_loop``: TRIS, SaG, whose steps need in-batch texts, negatives,
a frozen second network or loss scaling and clipping) are timed in eval only; their train steps are not modelled
here.
"""
import json
import logging
import resource
import statistics
import time

import numpy as np
import tensorflow as tf
from tensorflow.python.profiler.model_analyzer import profile
from tensorflow.python.profiler.option_builder import ProfileOptionBuilder

from models import RANDOM_INIT
from util.metrics import write_json_atomic
from util.train import COMPUTE_DTYPES, make_train_step

log = logging.getLogger("bench")
MATMUL_SIZE = 4096
SENTENCE_LENGTH = 20
SENTENCE_WORDS = 8
EMBEDDING_SHAPE = (12112, 300)
# The originals' keys in orig_timing's JSON (the TF1 models only: ReSTR has no TF original).
ORIGINAL_KEYS = {"CMPC_model": "cmpc", "RRN_model": "rrn", "RMI_model": "rmi", "LSTM_model": "lstm"}


def median_seconds(fn, repeats, warmups=2):
    """Call ``fn`` ``warmups`` times (trace/compile, warm-up), then ``repeats`` timed calls; returns the median in
    seconds."""
    for _ in range(warmups):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_gflops(dtype, repeats, n=MATMUL_SIZE):
    """GFLOP/s of an n×n by n×n matmul (2n³ FLOPs) in ``dtype``: the machine's practical peak."""
    a = tf.random.stateless_normal([n, n], seed=[1, 2], dtype=tf.float32)
    a = tf.cast(a, dtype)
    matmul = tf.function(lambda x: tf.reduce_sum(tf.cast(tf.matmul(x, x)[:1, :1], tf.float32)), autograph=False)
    return 2.0 * n ** 3 / median_seconds(lambda: matmul(a).numpy(), repeats) / 1e9


def graph_flops(fn, *specs):
    """Float operations of ``tf.function(fn)`` traced at ``specs`` (TF profiler, ``float_operation``)."""
    graph = tf.function(fn, autograph=False).get_concrete_function(*specs).graph
    options = ProfileOptionBuilder(ProfileOptionBuilder.float_operation()).with_empty_output().build()
    return profile(graph, options=options).total_float_ops


class GradientsOnly:
    """The optimizer of the ``grads`` case: consumes every gradient (their sum is its "learning rate", so none is
    pruned from the graph) and updates nothing."""

    @staticmethod
    def apply_gradients(grads):
        return tf.add_n([tf.reduce_sum(g) for g in grads.values()])


def load_baseline(path, model):
    """{case: seconds} of the original ``model`` from an orig_timing JSON (``{key: {eval: {median_ms}, train: …}}``)
    or an orig_parts JSON (``{key: {backbone: ms, eval: ms, grads: ms, train: ms}}``); {} if it has no entry."""
    try:
        with open(path) as f:
            entry = json.load(f).get(ORIGINAL_KEYS.get(model), {})
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a JSON of the originals' timings ({e})") from None
    return {case: (value["median_ms"] if isinstance(value, dict) else value) / 1e3
            for case, value in entry.items() if isinstance(value, (dict, int, float))}


def bench_words(batch):
    """[batch, SENTENCE_LENGTH] int32: ``SENTENCE_LENGTH − SENTENCE_WORDS`` pads (0), then the ids 1…SENTENCE_WORDS."""
    words = np.zeros([batch, SENTENCE_LENGTH], np.int32)
    words[:, SENTENCE_LENGTH - SENTENCE_WORDS:] = np.arange(1, SENTENCE_WORDS + 1)
    return words


def bench_inputs(rng, batch, size):
    """The bench's (images [batch, size, size, 3] float32 ~ N(0, 50), words ``bench_words``, target [batch, size,
    size, 1] float32 of uniform > 0.7) as tensors, images then target drawn from the ``np.random.RandomState``
    ``rng``."""
    images = tf.constant(rng.normal(0, 50, (batch, size, size, 3)).astype(np.float32))
    target = tf.constant((rng.uniform(size=(batch, size, size, 1)) > 0.7).astype(np.float32))
    return images, tf.constant(bench_words(batch)), target


def seeded_model(spec, vocab_size, size, weights, seed, emb):
    """The bench's model of registry entry ``spec``: its ``random`` initialisation from ``seed`` (the TF1 models'
    backbone: ``models.backbone.seeded_weights``) and, when the entry reads GloVe vectors (``emb``), a seeded
    uniform(−0.5, 0.5) embedding of ``EMBEDDING_SHAPE``."""
    embedding = (np.random.RandomState(seed).uniform(-0.5, 0.5, EMBEDDING_SHAPE).astype(np.float32)
                 if spec.needs_embedding(emb) else None)
    model = spec.build(vocab_size, embedding, size, weights, seed)
    spec.initialize(model, RANDOM_INIT, seed)
    return model


def model_train_step(spec, model, variables, update, dtype=tf.float32, jit_compile=False):
    """``util.train.make_train_step`` of ``spec``'s model with its losses, objective, regularisation and gradient
    multipliers, updating ``variables`` with ``update`` (its optimizer, or ``GradientsOnly``); images are cast to
    ``dtype`` before the forward."""
    def forward(inputs, training=True):
        return spec.forward(model, tf.cast(inputs[0], dtype), inputs[1], training=training)

    return make_train_step(forward, spec.losses(model), spec.objective(model), variables, update,
                           jit_compile=jit_compile, regularization=spec.regularization,
                           multiplier=spec.gradient_multiplier)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench(cfg):
    """Run the benchmark of ``cfg.model`` (see the module docstring); returns the result dict (also logged and,
    with ``cfg.bench_json``, written as JSON)."""
    repeats = cfg.bench_repeats
    dtype = COMPUTE_DTYPES[cfg.precision]
    size = cfg.image_size
    spec = cfg.spec
    model = seeded_model(spec, cfg.vocab_size, size, cfg.weights, cfg.seed, cfg.emb)
    own_recipe = spec.train_loop is not None
    tvars = {} if own_recipe else spec.train_variables(model, cfg.conv5)
    optimizer = None if own_recipe else spec.make_optimizer(model, tvars, cfg.lr, cfg.max_iter)

    def train_step(jit_compile=False, update=optimizer):
        return model_train_step(spec, model, tvars, update, dtype, jit_compile)

    def probability(im, w):
        return spec.forward(model, tf.cast(im, dtype), w, training=False)[spec.probability_key]

    image_spec = tf.TensorSpec([1, size, size, 3], tf.float32)
    words_spec = tf.TensorSpec([1, SENTENCE_LENGTH], tf.int32)
    target_spec = tf.TensorSpec([1, size, size, 1], tf.float32)
    backbone_flops = graph_flops(lambda im: spec.backbone(model, tf.cast(im, dtype)), image_spec)
    eval_flops = graph_flops(probability, image_spec, words_spec)
    train_flops = (float("nan") if own_recipe
                   else graph_flops(train_step().python_function, (image_spec, words_spec), target_spec))
    peak = matmul_gflops(dtype, repeats)
    result = {"model": cfg.model, "image_size": size, "precision": cfg.precision, "repeats": repeats,
              "flops_per_image": {"backbone": backbone_flops, "head": eval_flops - backbone_flops,
                                  "eval": eval_flops, "train_step": None if own_recipe else train_flops},
              "matmul_gflops": peak, "runs": []}
    log.info("%s %dx%d %s: GFLOP per image: backbone %.1f, head %.1f, eval %.1f, train step %.1f; "
             "%d×%d matmul %.0f GFLOP/s", cfg.model, size, size, cfg.precision, backbone_flops / 1e9,
             (eval_flops - backbone_flops) / 1e9, eval_flops / 1e9, train_flops / 1e9, MATMUL_SIZE, MATMUL_SIZE, peak)

    baseline = load_baseline(cfg.bench_baseline, cfg.model) if cfg.bench_baseline else {}
    if cfg.bench_baseline:
        result["baseline"] = {"file": cfg.bench_baseline, "seconds": baseline}
    rng = np.random.RandomState(cfg.seed)
    state = [v.numpy() for v in tvars.values()]
    for xla in cfg.bench_xla:
        eval_fn = tf.function(probability, jit_compile=xla, autograph=False)
        step_fn = None if own_recipe else train_step(xla)
        backbone_fn = tf.function(lambda im: spec.backbone(model, tf.cast(im, dtype)), jit_compile=xla,
                                  autograph=False)
        grads_fn = None if own_recipe else train_step(xla, GradientsOnly())
        for batch in cfg.bench_batch_sizes:
            images, words, target = bench_inputs(rng, batch, size)
            cases = [("eval", lambda: eval_fn(images, words).numpy(), eval_flops)]
            if not own_recipe:
                cases.append(("train", lambda: step_fn((images, words), target)[0]["cost"].numpy(), train_flops))
            if cfg.bench_parts and not own_recipe:
                cases[1:1] = [("backbone", lambda: [v.numpy() for v in backbone_fn(images).values()], backbone_flops),
                              ("grads", lambda: grads_fn((images, words), target)[0]["cost"].numpy(), None)]
            for kind, fn, flops in cases:
                seconds = median_seconds(fn, repeats)
                images_per_s = batch / seconds
                run = {"kind": kind, "batch": batch, "xla": xla, "median_s": seconds, "images_per_s": images_per_s,
                       "peak_rss_mb": peak_rss_mb()}
                if flops is not None:
                    run["gflops"] = flops * images_per_s / 1e9
                    run["percent_of_matmul"] = 100.0 * run["gflops"] / peak
                if kind == "eval":
                    run["backbone_gflops"] = backbone_flops * images_per_s / 1e9
                compared = ""
                if batch == 1 and not xla and kind in baseline:
                    run["original_s"] = baseline[kind]
                    run["speedup_vs_original"] = baseline[kind] / seconds
                    compared = f"  original {baseline[kind]:.3f} s: {run['speedup_vs_original']:.2f}x"
                result["runs"].append(run)
                log.info("%-8s batch %2d xla %-5s %8.3f s  %7.2f images/s  %7.1f GFLOP/s  %5.1f %% of matmul  "
                         "peak RSS %.0f MB%s", kind, batch, xla, seconds, images_per_s, run.get("gflops", float("nan")),
                         run.get("percent_of_matmul", float("nan")), run["peak_rss_mb"], compared)
            if cfg.bench_parts and not own_recipe:
                t = {r["kind"]: r["median_s"] for r in result["runs"] if r["batch"] == batch and r["xla"] == xla}
                parts = {"backbone": t["backbone"], "head": t["eval"] - t["backbone"],
                         "loss_and_backward": t["grads"] - t["eval"], "update": t["train"] - t["grads"]}
                result.setdefault("parts", []).append({"batch": batch, "xla": xla, "seconds": parts})
                log.info("parts, batch %d xla %s: %s", batch, xla,
                         ", ".join(f"{k} {v:.3f} s" for k, v in parts.items()))
        for var, value in zip(tvars.values(), state):
            var.assign(value)
    if cfg.bench_json:
        write_json_atomic(result, cfg.bench_json)
        log.info("wrote %s", cfg.bench_json)
    return result
