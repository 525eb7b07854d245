"""GPU-only checks (skipped without CUDA), at shapes Inductor's flex kernels accept (head_dim >= 16).

* the flex training pass equals eager on the GPU: fp32 tightly, bf16 within bf16 rounding, with and
  without activation checkpointing, for each attention family (sliding window and full);
* the trainer end to end on one GPU: `cacheaug train` under DeepSpeed ZeRO-3 with NCCL, bf16, flex
  masks and activation checkpointing; its export reloads around a flex decoder and trains;
* the golden curve: 50 steps of bf16 + flex on the GPU follow 50 steps of fp32 + eager on the CPU
  (same data, same seed) within the tolerance stated in GOLDEN_TOLERANCE.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_decoder
from train_helpers import tiny_run_config

from dist_cacheaug import CacheAugmentedLM, load_config, sample_positions

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]
# Inductor's flex-attention kernels need head_dim >= 16; the CPU tiny models use 8.
GPU_SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, head_dim=16)
# Golden curve: mean relative gap of the per-step losses over 50 steps, and the largest single gap.
# bf16 rounding of a 2-layer model moves single steps by ~1e-2; the curves must not drift apart.
GOLDEN_TOLERANCE = dict(mean=0.02, max=0.06)


def _model(family: str, attn: str, dtype: torch.dtype, checkpointing: bool) -> CacheAugmentedLM:
    extra = {"query_pre_attn_scalar": 16} if family == "gemma2" else {}
    decoder = tiny_decoder(family, **GPU_SHAPE, **extra).to(device="cuda", dtype=dtype)
    decoder.set_attn_implementation(attn)
    model = CacheAugmentedLM.from_decoder(decoder, num_latents=3, seed=0)
    if checkpointing:
        model.enable_activation_checkpointing()
    return model


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["gemma2", "llama", "mistral"])
def test_flex_training_pass_matches_eager(family, dtype, tol, checkpointing):
    ids = torch.randint(3, 61, (2, 96), generator=torch.Generator().manual_seed(0)).cuda()
    pos = sample_positions(2, 96, 12, 4, torch.Generator().manual_seed(1), device="cuda")
    results = {}
    for attn in ("eager", "flex_attention"):
        model = _model(family, attn, dtype, checkpointing)
        out = model.training_loss(ids, pos, 4)
        out.loss.backward()
        grad = model.soft_tokens.grad.float()
        results[attn] = (out.loss_per_offset.float().detach(), grad / grad.norm())
    torch.testing.assert_close(results["flex_attention"][0], results["eager"][0], atol=tol, rtol=tol)
    torch.testing.assert_close(results["flex_attention"][1], results["eager"][1], atol=2 * tol, rtol=2 * tol)


def _train(cfg: Path, accelerator: str, *sets: str) -> subprocess.CompletedProcess:
    args = [a for s in sets for a in ("--set", s)]
    env = dict(os.environ, DS_ACCELERATOR=accelerator, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "dist_cacheaug.cli", "train", "--config", str(cfg), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, (
        f"train exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_trainer_end_to_end_on_gpu_zero3_bf16_flex_checkpointing(shards, tmp_path):
    cfg = tiny_run_config(tmp_path, shards, max_steps=12, eval_interval=6, checkpoint_interval=6)
    resolved = load_config(cfg)
    assert resolved.zero.stage == 3 and resolved.zero.activation_checkpointing
    _train(cfg, "cuda")
    run = tmp_path / "run"
    rows = _metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert sum(r["loss"] for r in rows[-3:]) < sum(r["loss"] for r in rows[:3])
    assert all(r["mfu"] is not None and r["mfu"] > 0 and r["peak_mem_gib"] > 0 for r in rows)

    # Resume: a longer run on the same directory continues from step 12.
    _train(cfg, "cuda", "train.max_steps=14")
    assert [r["step"] for r in _metrics(run)][-2:] == [13, 14]

    # The export reloads around a flex decoder (the coprocessor follows the decoder's attention
    # implementation) and the reloaded model trains on the GPU.
    from dist_cacheaug.core.decoder import build_decoder

    decoder = build_decoder(load_config(cfg).model, device=torch.device("cuda"))
    assert decoder.config._attn_implementation == "flex_attention"
    model = CacheAugmentedLM.from_pretrained(run / "export", decoder=decoder)
    assert model.coprocessor.config._attn_implementation == "flex_attention"
    ids = torch.randint(3, 320, (2, 64), device="cuda")
    pos = sample_positions(2, 64, 8, 4, torch.Generator().manual_seed(0), device="cuda")
    out = model.training_loss(ids, pos, 4)
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.soft_tokens.grad is not None


def test_golden_curve_bf16_flex_gpu_follows_fp32_eager_cpu(shards, tmp_path):
    curves = {}
    for accel in ("cpu", "cuda"):
        d = tmp_path / accel
        d.mkdir()
        cfg = tiny_run_config(d, shards, max_steps=50, eval_interval=0, checkpoint_interval=100)
        _train(cfg, accel)
        rows = _metrics(d / "run")
        assert [r["step"] for r in rows] == list(range(1, 51))
        curves[accel] = torch.tensor([r["loss"] for r in rows], dtype=torch.float64)
    gap = (curves["cuda"] - curves["cpu"]).abs() / curves["cpu"]
    summary = {
        "mean_rel_gap": gap.mean().item(),
        "max_rel_gap": gap.max().item(),
        "cpu_first_last": (curves["cpu"][0].item(), curves["cpu"][-1].item()),
        "gpu_first_last": (curves["cuda"][0].item(), curves["cuda"][-1].item()),
    }
    print("golden curve:", json.dumps(summary))
    out = os.environ.get("CACHEAUG_GOLDEN_OUT")
    if out:
        Path(out).write_text(json.dumps({**summary, **{k: v.tolist() for k, v in curves.items()}}))
    assert gap.mean() < GOLDEN_TOLERANCE["mean"] and gap.max() < GOLDEN_TOLERANCE["max"], summary


def test_straggler_clock_times_the_decoder_passes_on_the_device():
    """On GPU the host only queues kernels: the compute phases are timed by CUDA events, so a long
    matmul chain in ``prefix`` counts as compute even though the host returns at once."""
    from dist_cacheaug.train.stragglers import PhaseClock

    clock = PhaseClock(torch.device("cuda"))
    x = torch.randn(2048, 2048, device="cuda")
    torch.cuda.synchronize()
    clock.enter("prefix")
    for _ in range(50):
        x = (x @ x).tanh()
    clock.enter("backward")
    torch.cuda.synchronize()  # the step's device->host sync
    clock.step_done()
    _, compute = clock.take()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(50):
        x = (x @ x).tanh()
    end.record()
    torch.cuda.synchronize()
    assert compute == pytest.approx(start.elapsed_time(end) / 1000, rel=0.5)
