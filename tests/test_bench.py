"""``util.bench.bench`` smoke run at 64×64 (the full 320×320 run is ``trainval_model.py -m bench``, not a test)."""
import json

from util.bench import bench
from util.config import RunConfig


def test_bench_smoke_writes_figures(tmp_path):
    baseline = tmp_path / "orig.json"  # orig_timing's layout for the LSTM baseline, RMI's entry ignored
    baseline.write_text(json.dumps({"lstm": {"eval": {"median_ms": 500.0}, "train": {"median_ms": 900.0}},
                                    "rmi": {"eval": {"median_ms": 1.0}}}))
    cfg = RunConfig(mode="bench", model="LSTM_model", image_size=64, bench_batch_sizes=(1, 2),
                    bench_json=str(tmp_path / "bench.json"), bench_parts=True, bench_baseline=str(baseline))
    cfg.bench_repeats, cfg.bench_xla = 2, (False,)
    result = bench(cfg)
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(result))
    flops = result["flops_per_image"]
    assert 0 < flops["backbone"] < flops["eval"] < flops["train_step"] and flops["head"] > 0
    assert result["matmul_gflops"] > 0
    kinds = ["eval", "backbone", "grads", "train"]
    assert [(r["kind"], r["batch"], r["xla"]) for r in result["runs"]] == [
        (k, b, False) for b in (1, 2) for k in kinds]
    for run in result["runs"]:
        assert run["images_per_s"] > 0 and run["peak_rss_mb"] > 0
        assert (run["kind"] == "grads") == ("percent_of_matmul" not in run)
        compared = run["batch"] == 1 and run["kind"] in ("eval", "train")
        assert ("speedup_vs_original" in run) == compared
        if compared:
            original = {"eval": 0.5, "train": 0.9}[run["kind"]]
            assert run["original_s"] == original
            assert abs(run["speedup_vs_original"] - original / run["median_s"]) < 1e-9
    assert result["baseline"]["seconds"] == {"eval": 0.5, "train": 0.9}
    for entry, batch in zip(result["parts"], (1, 2)):
        times = {r["kind"]: r["median_s"] for r in result["runs"] if r["batch"] == batch}
        parts = entry["seconds"]
        assert entry["batch"] == batch and set(parts) == {"backbone", "head", "loss_and_backward", "update"}
        assert abs(sum(parts.values()) - times["train"]) < 1e-9 and parts["backbone"] == times["backbone"]


def test_own_recipe_entries_are_timed_in_eval_only(tmp_path):
    """SaG (a ``train_loop`` entry): the eval forward is timed and its FLOPs counted; no generic train step."""
    cfg = RunConfig(mode="bench", model="SaG_tiny", image_size=64, bench_batch_sizes=(1,), bench_parts=True)
    cfg.bench_repeats, cfg.bench_xla = 2, (False,)
    result = bench(cfg)
    assert [(r["kind"], r["batch"]) for r in result["runs"]] == [("eval", 1)]
    assert result["runs"][0]["images_per_s"] > 0 and result["flops_per_image"]["eval"] > 0
    assert result["flops_per_image"]["train_step"] is None
    assert "parts" not in result
