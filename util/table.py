"""``trainval_model.py -m table``: every split the papers report, evaluated with the ``-m test`` path, printed in the
papers' layout beside the published figures (``benchmarks/published.json``), written as JSON and Markdown.

Splits (``TABLE_SPLITS``): UNC val/testA/testB, UNC+ val/testA/testB, G-Ref val (Google), G-Ref val/test (UMD:
``Gref_umd``, built with ``build_batches.py -d Gref --split-by umd``), ReferIt test. A split is evaluated when its
batch folder holds ``<dataset>_<split>_0.npz`` and the snapshot ``-i`` of ``-f`` exists for that dataset; otherwise it
is listed as missing with the command that makes what is missing. Each split is evaluated by
``util.evaluate.test`` (so its ``<snapshot>.<dataset>_<split>.json`` is written as in ``-m test``), with DenseCRF too
when ``-c`` is given and the model has it.

Cache: each split's result is kept in ``<snapshot>.<dataset>_<split>.table.json`` beside the snapshot with a
fingerprint (``fingerprint``): SHA-256 of the name, size and modification time (ns) of every snapshot file and every
file of the batch folder, and of the settings that change the figures (image size, DenseCRF, embedding, weights).
A re-run reuses a result whose fingerprint is unchanged and evaluates the split again otherwise. Sizes and times,
not contents, are hashed: a snapshot is hundreds of MB, and every writer here (snapshots, ``build_batches.py``)
replaces files by renaming, which changes the time.

Outputs: ``<folder>/table_<model>_iter_<N>.json`` and ``.md`` (``-f``; RMI/LSTM without ``-f``: ``--batch-root``),
written atomically. The printed table is the Markdown one.
"""
import dataclasses
import glob
import hashlib
import json
import logging
import os

from tqdm import tqdm

from util.files import atomic_output
from util.metrics import THRESHOLDS, write_json_atomic

log = logging.getLogger("table")

PUBLISHED_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                              "published.json")
TABLE_SPLITS = (("unc", "val"), ("unc", "testA"), ("unc", "testB"), ("unc+", "val"), ("unc+", "testA"),
                ("unc+", "testB"), ("Gref", "val"), ("Gref_umd", "val"), ("Gref_umd", "test"), ("referit", "test"))
DATASET_TITLES = {"unc": "UNC", "unc+": "UNC+", "Gref": "G-Ref (Google)", "Gref_umd": "G-Ref (UMD)",
                  "referit": "ReferIt"}
METRICS = ("overall_iou", "mean_iou") + tuple(f"precision@{t}" for t in THRESHOLDS)
METRIC_TITLES = {"overall_iou": "overall IoU", "mean_iou": "mean IoU",
                 **{f"precision@{t}": f"prec@{t}" for t in THRESHOLDS}}
ROW_KEYS = {"model", "paper", "variant", "dataset", "split", "metric", "value", "dcrf", "status", "source"}
STATUSES = ("verified", "unverified")
PUBLISHED_NOTE = "pub = published, in %; ? = not verified against the paper; Δ = ours − published"


def load_published(path=PUBLISHED_FILE):
    """The published-figures document (``benchmarks/published.json``) as a dict."""
    with open(path) as f:
        return json.load(f)


def published_problems(doc):
    """Schema problems of a published-figures document, as one line each (empty when none): every row has exactly
    the keys of ``ROW_KEYS`` (plus an optional ``note``), a known metric, a status of ``STATUSES``, a non-empty
    source, ``dcrf`` true / false / null, and a numeric value in [0, 100] (null only when unverified); every
    ``default_variant`` names a variant with rows; every ``not_published`` entry has model, dataset, split, reason."""
    problems = []
    for k, row in enumerate(doc.get("rows", [])):
        keys = set(row) - {"note"}
        if keys != ROW_KEYS:
            problems.append(f"rows[{k}]: keys {sorted(keys ^ ROW_KEYS)} missing or unexpected")
            continue
        value = row["value"]
        if row["metric"] not in METRICS:
            problems.append(f"rows[{k}]: unknown metric {row['metric']!r}")
        if row["status"] not in STATUSES:
            problems.append(f"rows[{k}]: status {row['status']!r} is not one of {STATUSES}")
        if not (isinstance(row["source"], str) and row["source"].strip()):
            problems.append(f"rows[{k}]: no source")
        if row["dcrf"] not in (True, False, None):
            problems.append(f"rows[{k}]: dcrf must be true, false or null")
        if value is None and row["status"] != "unverified":
            problems.append(f"rows[{k}]: a null value must be marked unverified")
        if value is not None and not (isinstance(value, (int, float)) and 0 <= value <= 100):
            problems.append(f"rows[{k}]: value {value!r} is not a percentage")
    variants = {(r.get("model"), r.get("variant")) for r in doc.get("rows", [])}
    for model, variant in doc.get("default_variant", {}).items():
        if (model, variant) not in variants:
            problems.append(f"default_variant {model}: no rows of variant {variant!r}")
    for k, entry in enumerate(doc.get("not_published", [])):
        if set(entry) != {"model", "dataset", "split", "reason"} or not entry["reason"]:
            problems.append(f"not_published[{k}]: expected model, dataset, split and a reason")
    return problems


def coverage(doc, model, dataset, split):
    """How ``doc`` covers one (model, dataset, split): ``"rows"``, ``"not published"`` (an entry, ``*`` matching
    any dataset or split) or None."""
    if any(r["model"] == model and r["dataset"] == dataset and r["split"] == split for r in doc["rows"]):
        return "rows"
    for entry in doc["not_published"]:
        if entry["model"] == model and entry["dataset"] in (dataset, "*") and entry["split"] in (split, "*"):
            return "not published"
    return None


def published_for(doc, model, dataset, split, dcrf):
    """{metric: row} of the model's ``default_variant`` for one split, for our run with (``dcrf`` True) or without
    DenseCRF: a row matches when its ``dcrf`` equals ours or is null (the source does not say)."""
    variant = doc["default_variant"].get(model)
    return {r["metric"]: r for r in doc["rows"]
            if (r["model"], r["variant"], r["dataset"], r["split"]) == (model, variant, dataset, split)
            and r["dcrf"] in (dcrf, None)}


def snapshot_files(prefix):
    """The files of the snapshot ``prefix``: the file itself (a ``.pth``), or ``<prefix>.index``,
    ``<prefix>.data-*`` and ``<prefix>.meta`` (sorted)."""
    if os.path.isfile(prefix):
        return [prefix]
    return sorted(glob.glob(glob.escape(prefix) + ".index") + glob.glob(glob.escape(prefix) + ".data-*")
                  + glob.glob(glob.escape(prefix) + ".meta"))


def fingerprint(paths, settings):
    """SHA-256 (hex) of (base name, size, mtime in ns) of each of ``paths`` in the given order, and of the JSON of
    ``settings`` (sorted keys)."""
    h = hashlib.sha256()
    for path in paths:
        st = os.stat(path)
        h.update(f"{os.path.basename(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


def folder_files(folder):
    """Every file directly in ``folder`` (sorted paths)."""
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)))


def split_config(cfg, dataset, split):
    """The ``-m test`` configuration of one split of a ``-m table`` configuration (vocabulary path recomputed for
    the dataset; no visualisation, no TensorBoard)."""
    return dataclasses.replace(cfg, mode="test", dataset=dataset, split=split, vocab_file=None, vis_folder=None,
                               visualize=False, logdir=None)


def build_command(dataset, split, family):
    """The ``build_batches.py`` command that writes the batches of ``dataset`` (``Gref_umd``: ``-d Gref --split-by
    umd``) and ``split`` in the batch ``family``'s format."""
    args = "-d Gref --split-by umd" if dataset == "Gref_umd" else f"-d {dataset}"
    return f"python build_batches.py {args} -t {split}" + ("" if family == "tf1" else f" --family {family}")


def train_command(cfg, dataset):
    """The ``trainval_model.py`` command that trains ``cfg.model`` on ``dataset`` (ReferIt: ``trainval``) up to the
    snapshot of ``cfg.iteration``."""
    split = "trainval" if dataset == "referit" else "train"
    folder = f" -f {cfg.folder}" if cfg.folder else ""
    emb = " -emb" if cfg.emb else ""
    return f"python trainval_model.py -m train -d {dataset} -t {split} -n {cfg.model}{folder} -i {cfg.iteration}{emb}"


def locate(scfg):
    """(snapshot prefix, batch folder files, None) of one split's configuration, or (None, None, {"missing": what,
    "command": how to make it}) when its batches or its snapshot are missing (batches are reported first)."""
    from util import data

    try:
        files = data.batch_files(scfg.batch_folder, scfg.batch_prefix)
    except FileNotFoundError:
        return None, None, {"missing": f"batches {scfg.batch_folder}/{scfg.batch_prefix}_0.npz",
                            "command": build_command(scfg.dataset, scfg.split,
                                                     scfg.spec.batch_family)}
    try:
        prefix = scfg.spec.find_snapshot(scfg.snapshot_candidates(scfg.iteration))
    except FileNotFoundError:
        return None, None, {"missing": f"snapshot {scfg.snapshot_candidates(scfg.iteration)[0]}",
                            "command": train_command(scfg, scfg.dataset)}
    return prefix, files, None


def split_result(scfg, prefix, batch_folder):
    """One split's figures: the cached ones (``<prefix>.<dataset>_<split>.table.json``) when their fingerprint
    matches, else ``util.evaluate.test(scfg)``'s, cached. Returns (results, "cached" or "evaluated")."""
    from util.evaluate import test

    settings = {"image_size": scfg.image_size, "dcrf": scfg.dcrf, "emb": scfg.emb, "weights": scfg.weights,
                "model": scfg.model, "iteration": scfg.iteration}
    fp = fingerprint(snapshot_files(prefix) + folder_files(batch_folder), settings)
    cache_path = f"{prefix}.{scfg.dataset}_{scfg.split}.table.json"
    if os.path.isfile(cache_path):
        try:
            with open(cache_path) as f:
                cached = json.load(f)
            if cached.get("fingerprint") == fp:
                log.info("%s %s: cached result reused (%s; snapshot and batches unchanged)", scfg.dataset,
                         scfg.split, cache_path)
                return cached["results"], "cached"
        except (OSError, ValueError, KeyError):
            log.warning("%s: unreadable cache, evaluating again", cache_path)
    log.info("%s %s: evaluating snapshot %s", scfg.dataset, scfg.split, prefix)
    results = test(scfg)
    write_json_atomic({"fingerprint": fp, "settings": settings, "results": results}, cache_path)
    return results, "evaluated"


def percent(value):
    """A fraction as a percentage with 2 decimals (``0.5 → "50.00"``); ``–`` for None."""
    return "–" if value is None else f"{100 * value:.2f}"


def ours_value(summary, metric):
    """A metric of a ``SegmentationMetrics.summary()`` (fraction), by its ``METRICS`` name."""
    if metric.startswith("precision@"):
        return summary["precision"][metric.split("@")[1]]
    return summary[metric]


def cell(ours, row):
    """``ours`` (fraction) as a percentage, with the published row's value and ours − published beside it:
    ``12.34 (pub 62.47, Δ −50.13)``; ``?`` marks an unverified published value, ``–`` an absent one."""
    text = percent(ours)
    if row is None:
        return text
    mark = "" if row["status"] == "verified" else "?"
    if row["value"] is None:
        return f"{text} (pub ?)"
    return f"{text} (pub {row['value']:.2f}{mark}, Δ {100 * ours - row['value']:+.2f})"


def markdown(report):
    """The Markdown lines of a table report (``table``'s dict): one table per DenseCRF setting in the papers'
    layout (metrics down, dataset/split across), then the missing splits with their commands."""
    done = [s for s in report["splits"] if "missing" not in s]
    lines = [f"# {report['model']}, iteration {report['iteration']}", "",
             f"Published: {report['paper']} — variant {report['variant']!r} ({PUBLISHED_NOTE}).", ""]
    for key, title in (("without_dcrf", "without DenseCRF"), ("with_dcrf", "with DenseCRF")):
        columns = [s for s in done if key in s["results"]]
        if not columns:
            continue
        lines += [f"## {title}", "",
                  "| metric | " + " | ".join(f"{DATASET_TITLES[s['dataset']]} {s['split']}" for s in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for metric in METRICS:
            cells = [cell(ours_value(s["results"][key], metric), s["published"][key].get(metric)) for s in columns]
            lines.append(f"| {METRIC_TITLES[metric]} | " + " | ".join(cells) + " |")
        lines.append("| samples | " + " | ".join(str(s["results"][key]["samples"]) for s in columns) + " |")
        lines.append("")
    missing = [s for s in report["splits"] if "missing" in s]
    if missing:
        lines += ["## missing", ""]
        lines += [f"- {DATASET_TITLES[s['dataset']]} {s['split']}: {s['missing']} — `{s['command']}`"
                  for s in missing]
    return lines



def output_folder(cfg):
    """Where the table files go: ``-f``, or ``--batch-root`` for a model whose snapshots default to a folder per
    dataset (RMI/LSTM)."""
    return cfg.folder or cfg.batch_root


def table(cfg, published_path=PUBLISHED_FILE):
    """Evaluate (or take from the cache) every split of ``TABLE_SPLITS`` whose batches and snapshot are present,
    print the Markdown table, write ``table_<model>_iter_<N>.json`` / ``.md`` atomically; returns the report."""
    doc = load_published(published_path)
    dcrf = cfg.dcrf and cfg.spec.supports_crf
    if cfg.dcrf and not dcrf:
        log.info("-c: %s has no DenseCRF (its original evaluation has none); evaluating without", cfg.model)
    splits = []
    for dataset, split in tqdm(TABLE_SPLITS, desc="splits", unit="split", disable=not cfg.progress):
        scfg = split_config(dataclasses.replace(cfg, dcrf=dcrf), dataset, split)
        prefix, files, missing = locate(scfg)
        entry = {"dataset": dataset, "split": split}
        if missing:
            log.info("%s %s: missing %s; make it with: %s", dataset, split, missing["missing"], missing["command"])
            splits.append({**entry, **missing})
            continue
        results, how = split_result(scfg, prefix, scfg.batch_folder)
        entry.update(snapshot=prefix, source=how, results=results,
                     published={key: published_for(doc, cfg.model, dataset, split, key == "with_dcrf")
                                for key in ("without_dcrf", "with_dcrf")})
        splits.append(entry)
    variant = doc["default_variant"].get(cfg.model)
    papers = {r["paper"] for r in doc["rows"] if r["model"] == cfg.model}
    report = {"model": cfg.model, "iteration": cfg.iteration, "dcrf": dcrf, "variant": variant,
              "paper": "; ".join(sorted(papers)) or "not published", "published_file": published_path,
              "splits": splits}
    lines = markdown(report)
    log.info("%s", "\n".join(lines))
    base = os.path.join(output_folder(cfg), f"table_{cfg.model}_iter_{cfg.iteration}")
    os.makedirs(output_folder(cfg), exist_ok=True)
    write_json_atomic(report, base + ".json")
    with atomic_output(base + ".md") as tmp, open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    log.info("table written to %s.json and %s.md", base, base)
    return report
