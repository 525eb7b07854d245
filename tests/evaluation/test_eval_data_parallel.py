"""``cacheaug eval`` data parallel: 2 ranks (gloo on CPU, under ``torchrun``) give the numbers 1 rank gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from inference_helpers import SEQ_LEN, tiny_world  # noqa: F401  (fixture)
from tiny_models import tiny_decoder

from dist_cacheaug import CacheAugmentedLM
from dist_cacheaug.distributed import free_port
from dist_cacheaug.evaluation.loss_at_k import evaluate_insertion

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))
NUMBERS = ("baseline_ce", "augmented_ce", "baseline_ppl", "augmented_ppl", "ppl_change_pct", "num_traces")


def _eval_args(world, out: Path, *extra: str) -> list[str]:
    run = world["run"]
    return ["eval", "--checkpoint", str(run), "--data", str(world["shards"]), "--max-k", "6",
            "--positions", "random", "5", "--seed", "3", "--max-sequences", "7", "--out", str(out),
            "--no-progress", "--device", "cpu", *extra]  # fmt: skip


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())["checkpoints"]["run"]


def _launcher(name: str) -> list[str]:
    if name == "torchrun":
        return [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "dist_cacheaug.cli"]
    # what launchers/local.sh runs for `train`
    return [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "--no_local_rank",
            "--module", "dist_cacheaug.cli"]  # fmt: skip


@pytest.mark.distributed
@pytest.mark.parametrize(
    "launcher",
    [
        pytest.param("torchrun", marks=pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="no torchrun")),
        pytest.param(
            "deepspeed",
            marks=[pytest.mark.slow, pytest.mark.skipif(not Path(DEEPSPEED).exists(), reason="no deepspeed")],
        ),
    ],
)
def test_two_ranks_equal_one_rank(tiny_world, tmp_path, launcher):  # noqa: F811
    one, two = tmp_path / "one", tmp_path / "two"
    p1 = _run([sys.executable, "-m", "dist_cacheaug.cli", *_eval_args(tiny_world, one)])
    p2 = _run([*_launcher(launcher), *_eval_args(tiny_world, two)])
    r1, r2 = _results(one), _results(two)
    assert r1["num_sequences"] == r2["num_sequences"] == 7 and r2["world_size"] == 2
    assert r1["num_traces"] == 7 * 5
    for key in NUMBERS:  # batch size 1: every sequence's sums are the same, added in the same order
        assert r2[key] == r1[key], key
    assert max(abs(x) for x in r1["ppl_change_pct"]) > 0  # the augmentation does something here
    # rank 0 alone prints the table and writes the report
    assert p2.stdout.count("Relative perplexity change") == 1 == p1.stdout.count("Relative perplexity change")
    assert (two / "results.md").exists()


def test_rank_shares_combine_to_the_one_rank_sums(monkeypatch):
    """Two ranks simulated in one process (the all-gather faked): rank r reads samples r, r+2, ...;
    random positions are seeded by the global sample index and the per-batch sums are added in global
    order, so the combined numbers equal a 1-rank pass over all samples exactly (batch size 1)."""
    from dist_cacheaug.evaluation import loss_at_k

    torch.manual_seed(0)
    model = CacheAugmentedLM.from_decoder(tiny_decoder("gemma2", vocab_size=40), num_latents=2, seed=1)
    with torch.no_grad():
        for p in model.coprocessor.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    ids = torch.randint(3, 40, (5, 24))

    def batches(rank, world):
        return [{"input_ids": ids[i : i + 1]} for i in range(rank, len(ids), world)]

    def evaluate(rank, world, **kw):
        return evaluate_insertion(model, batches(rank, world), "random 3", 4, progress=False,
                                  shard=(rank, world), **kw)  # fmt: skip

    full = evaluate(0, 1)
    with pytest.raises(RuntimeError, match="not initialised"):  # a partial sum is never returned
        evaluate(1, 2)
    fake = type("FakeDist", (), {"is_initialized": staticmethod(lambda: True),
                                 "get_world_size": staticmethod(lambda: 2)})  # fmt: skip
    monkeypatch.setattr(loss_at_k, "dist", fake)
    parts = {}

    def keep_rank1(obj):  # rank 1's own share; its (partial) result is not looked at
        parts[1] = obj
        return [obj]

    monkeypatch.setattr(loss_at_k, "all_gather_object", keep_rank1)
    evaluate(1, 2)
    monkeypatch.setattr(loss_at_k, "all_gather_object", lambda obj: [obj, parts[1]])
    both = evaluate(0, 2)
    assert both["num_sequences"] == 5 and both["num_traces"] == 15 and both["seq_len"] == 24
    for key in NUMBERS:
        assert both[key] == full[key], key
    assert max(abs(x) for x in full["ppl_change_pct"]) > 0


# ---- cacheaug downstream ------------------------------------------------------------------------------
def _downstream_args(world, out: Path) -> list[str]:
    fixtures = ROOT / "tests" / "fixtures"
    return ["downstream", "--checkpoint", str(world["run"]), "--gsm8k", str(fixtures / "gsm8k_tiny.jsonl"),
            "--num-fewshot", "1", "--max-new-tokens", "4", "--mc", str(fixtures / "mc_tiny.jsonl"),
            "--batch-size", "2", "--out", str(out), "--device", "cpu"]  # fmt: skip


@pytest.mark.distributed
@pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="no torchrun")
def test_downstream_two_ranks_equal_one_rank(tiny_world, tmp_path):  # noqa: F811
    """Batches are planned the same for any world size (rank r runs batches r, r+W, ...), so every
    score and completion equals the one-process run's exactly; rank 0 alone prints and writes."""
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    p1 = _run(
        [sys.executable, "-m", "dist_cacheaug.cli", *_downstream_args(tiny_world, one), "--no-progress"]
    )
    p2 = _run([*_launcher("torchrun"), *_downstream_args(tiny_world, two)])
    r1, r2 = json.loads(one.read_text()), json.loads(two.read_text())
    assert (r1.pop("world_size"), r2.pop("world_size")) == (1, 2)
    assert r2 == r1  # predictions included: log-likelihoods and completions, item by item
    assert r1["gsm8k"]["n"] == 4 and r1["multiple_choice"]["n"] == 3
    assert p2.stdout.count("multiple choice (3 items)") == 1 == p1.stdout.count("multiple choice (3 items)")
    # stderr is a pipe here, as in a log file: no progress bar from any rank (tests/evaluation/
    # test_batched_eval.py: a terminal gets rank 0's bar only)
    assert "\r" not in p2.stderr and "rank 1 of 2" not in p2.stderr
