"""The benchmark harness runs on CPU at tiny shapes and reports what it measured."""

from __future__ import annotations

from pathlib import Path

from dist_cacheaug.config import load_config
from dist_cacheaug.train.benchmark import bench_train, format_report

ROOT = Path(__file__).resolve().parents[2]


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
    # eager attention on CPU: nothing is compiled; the masks are built (4 per step: 2 passes x 2 kinds)
    assert r["compiled_graphs_after_step"] == 0 and r["recompiles_in_steady_step"] == 0
    assert 0 < r["mask_build_s"] < r["step_s"]
    text = format_report(r)
    assert "augmented / plain LM step" in text and "naive loop / batched pass at P=3" in text
    assert "attention masks built per step" in text and "torch.compile graphs: 0" in text


def test_mask_build_seconds_counts_only_mask_building(monkeypatch):
    import time

    import torch

    from dist_cacheaug.core import model as model_module
    from dist_cacheaug.train.benchmark import mask_build_seconds

    def fake_build(*args, **kwargs):
        time.sleep(0.05)
        return "mask"

    monkeypatch.setattr(model_module, "attention_masks", fake_build)

    def step():
        time.sleep(0.3)  # work that is not mask building
        assert [model_module.attention_masks(), model_module.attention_masks()] == ["mask", "mask"]

    spent = mask_build_seconds(step, torch.device("cpu"))
    assert 0.1 <= spent < 0.3
    assert model_module.attention_masks is fake_build  # restored
