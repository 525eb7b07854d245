"""The benchmark harness runs on CPU at tiny shapes and reports what it measured."""

from __future__ import annotations

from pathlib import Path

from dist_cacheaug.benchmark import bench_train, format_report
from dist_cacheaug.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_bench_train_reports_measured_ratios_on_cpu():
    cfg = load_config(
        ROOT / "configs/tiny_cpu.yaml",
        ["data.seq_len=64", "model.num_positions=4", "train.micro_batch_size=2", "train.global_batch_size=2"],
    )
    r = bench_train(cfg, steps=1, warmup=1, naive_positions=3)
    assert r["step_s"] > 0 and r["tokens_per_s"] == 2 * 64 / r["step_s"]
    assert r["aug_over_plain"] == r["aug_fwd_bwd_s"] / r["plain_fwd_bwd_s"]
    assert r["naive_over_batched"] == r["naive_loop_s"] / r["batched_small_s"]
    assert r["mfu"] is None and r["flex_over_eager"] is None  # no GPU peak / no CPU flex backward
    text = format_report(r)
    assert "augmented / plain LM step" in text and "naive loop / batched pass at P=3" in text
