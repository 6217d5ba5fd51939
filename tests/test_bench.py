"""``util.bench.bench`` smoke run at 64×64 (the full 320×320 run is ``trainval_model.py -m bench``, not a test)."""
import json

from util.bench import bench
from util.config import RunConfig


def test_bench_smoke_writes_figures(tmp_path):
    cfg = RunConfig(mode="bench", model="LSTM_model", image_size=64, bench_batch_sizes=(1, 2),
                    bench_json=str(tmp_path / "bench.json"))
    cfg.bench_repeats, cfg.bench_xla = 2, (False,)
    result = bench(cfg)
    assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(result))
    flops = result["flops_per_image"]
    assert 0 < flops["backbone"] < flops["eval"] < flops["train_step"] and flops["head"] > 0
    assert result["matmul_gflops"] > 0
    assert [(r["kind"], r["batch"], r["xla"]) for r in result["runs"]] == [
        ("eval", 1, False), ("train", 1, False), ("eval", 2, False), ("train", 2, False)]
    for run in result["runs"]:
        assert run["images_per_s"] > 0 and run["peak_rss_mb"] > 0 and 0 < run["percent_of_matmul"]
