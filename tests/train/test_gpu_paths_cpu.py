"""GPU-path logic checked on a CPU: process-group backends, device choice, collectives on the training
device, the attention implementation of a reloaded coprocessor, chunked validation CE, the MFU peak
table and the SLURM CPU request. None of these needs a GPU to be tested; tests/test_gpu.py covers what
does."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tiny_models import VOCAB, tiny_decoder

from dist_cacheaug import CacheAugmentedLM, distributed, load_config, sample_positions
from dist_cacheaug.core.losses import lm_head_of, plain_cross_entropy

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------- 1. process-group backends
def test_process_group_backend_serves_host_tensors_on_cuda():
    cuda = distributed.process_group_backend("cuda")
    mapping = dict(part.split(":") for part in cuda.split(","))
    assert mapping == {"cpu": "gloo", "cuda": "nccl"}  # nccl for device tensors, gloo for host ones
    assert distributed.process_group_backend("cpu") == "gloo"


def _fake_run(rank: int, world: int, na: int, accum: int, device: torch.device, *, stop: bool = False):
    """A ``trainer.Run`` and a data iterator for ``trainer._train_step`` without DeepSpeed or a model:
    micro-batch m of rank r has loss r + m + 1 and per-offset losses (r + m + 1) * (k + 1)."""
    from dist_cacheaug.train import trainer

    cfg = SimpleNamespace(
        model=SimpleNamespace(num_ahead=na, num_positions=2, anchor_fraction=0.0),
        data=SimpleNamespace(seq_len=12),
    )

    class Engine:
        micro = 0

        def forward(self, ids, positions, num_ahead):
            assert ids.device == device and positions.device == device
            value = float(rank + self.micro + 1)
            per = torch.arange(1, num_ahead + 1, dtype=torch.float32, device=device) * value
            return SimpleNamespace(loss=torch.tensor(value, device=device), loss_per_offset=per)

        def backward(self, loss):
            pass

        def step(self):
            self.micro += 1
            return self.micro == accum  # the update is applied at the accumulation boundary

    run = trainer.Run(
        cfg=cfg,
        env=distributed.DistEnv(rank, world, rank, world, "127.0.0.1", 0, "env"),
        device=device,
        eng=Engine(),
        model=None,
        loader=None,
        positions=torch.Generator().manual_seed(rank),
        log=None,
        accum=accum,
        anchor_id=None,
        stop=trainer.StopSignal(received=signal.SIGTERM if stop else None),
    )
    data = iter([{"input_ids": torch.randint(3, 50, (2, 12))} for _ in range(accum)])
    return run, data


def _expected_step(na: int, accum: int, world: int) -> tuple[float, list[float]]:
    values = [r + m + 1 for r in range(world) for m in range(accum)]
    mean = sum(values) / len(values)
    return mean, [mean * (k + 1) for k in range(na)]


def test_train_step_keeps_loss_sums_on_device_and_reads_them_once(monkeypatch):
    """The per-step sums live on the training device: each collective gets a device tensor, and the
    host reads the step's numbers once (not twice per micro-batch plus an isfinite sync)."""
    from dist_cacheaug.train import trainer

    device, na, accum = torch.device("cpu"), 3, 4
    reduced = []
    monkeypatch.setattr(distributed, "all_reduce_", lambda t, op="sum": reduced.append(t) or t)
    host_reads = []
    for name in ("cpu", "item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _name=name, _original=original, **k):
            host_reads.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    run, data = _fake_run(0, 1, na, accum, device)
    out = trainer._train_step(run, data)
    monkeypatch.undo()
    assert len(reduced) == 1 and reduced[0].device == device
    assert len(host_reads) == 1, host_reads  # one device->host transfer for the whole step
    loss, per_offset = _expected_step(na, accum, 1)
    assert out.loss == pytest.approx(loss) and out.per_offset == pytest.approx(per_offset)
    assert out.applied and not out.nonfinite and not out.stop and not out.skipped
    assert run.state.step == 0  # the loop advances the state, not the step


def _two_rank_worker(rank: int, port: int, out_dir: str) -> None:
    """One of two gloo ranks (spawned by the test below)."""
    from dist_cacheaug.train import trainer

    env = distributed.DistEnv(rank, 2, rank, 2, "127.0.0.1", port, "env")
    device = torch.device("cpu")
    distributed.init_process_group(env, device)
    result = {"backend": str(dist.get_backend())}
    try:
        devices, real_all_reduce = [], dist.all_reduce

        def recording_all_reduce(tensor, *a, **k):
            devices.append(str(tensor.device))
            return real_all_reduce(tensor, *a, **k)

        dist.all_reduce = recording_all_reduce
        na, accum = 3, 2
        run, data = _fake_run(rank, 2, na, accum, device, stop=rank == 1)
        step = dataclasses.asdict(trainer._train_step(run, data))
        result["step"] = {k: step[k] for k in ("loss", "per_offset", "nonfinite", "applied", "stop")}
        result["min_batches"] = trainer._min_over_ranks(5 + rank, device)  # what _evaluate agrees on
        result["collective_devices"] = devices
        dist.all_reduce = real_all_reduce

        # The failure mode itself, with gloo standing in for nccl: a group that serves one device type
        # only refuses a tensor of another type, with the error a cuda:nccl-only group gives for a host
        # tensor. The mapping the trainer now asks for on CUDA (nccl swapped for gloo, which CPU-only
        # torch has) serves host tensors.
        device_only = dist.new_group([0, 1], backend="cuda:gloo")
        try:
            dist.all_reduce(torch.ones(2), group=device_only)
            result["device_only_group"] = "reduced"
        except RuntimeError as e:
            result["device_only_group"] = str(e)
        mixed = dist.new_group(
            [0, 1], backend=distributed.process_group_backend("cuda").replace("nccl", "gloo")
        )
        host = torch.full((2,), float(rank + 1))
        dist.all_reduce(host, group=mixed)
        result["mixed_group_host_sum"] = host.tolist()
    finally:
        distributed.destroy()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.distributed
def test_two_ranks_reduce_loss_sums_on_the_training_device(tmp_path):
    """Two gloo processes run the trainer's step reduction and its validation batch-count agreement.

    What this CPU stand-in shows: the trainer's collectives receive tensors on the training device
    (recorded per call), the per-step numbers are the all-rank means, the stop flag of one rank reaches
    every rank, and the group layout the trainer asks for on CUDA ("cpu:gloo,cuda:nccl") is a valid
    device->backend mapping whose cpu entry serves host tensors, while a device-only group ("cuda:gloo",
    standing in for plain "nccl") rejects them with "No backend type associated with device type cpu".
    What it cannot show: on a CPU machine the training device *is* the host, so it cannot tell a host
    tensor from a device tensor in the trainer's own reductions, and it never runs NCCL. The real check
    is a 2-GPU run (tests/test_gpu.py runs one GPU only)."""
    import torch.multiprocessing as mp

    port = distributed.free_port()
    mp.spawn(_two_rank_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    loss, per_offset = _expected_step(3, 2, 2)
    for r in results:
        assert r["backend"] == "gloo"
        assert r["step"]["loss"] == pytest.approx(loss)
        assert r["step"]["per_offset"] == pytest.approx(per_offset)
        assert r["step"]["stop"] is True and r["step"]["applied"] is True and r["step"]["nonfinite"] is False
        assert r["min_batches"] == 5
        assert r["collective_devices"] and set(r["collective_devices"]) == {"cpu"}
        assert "No backend type associated with device type cpu" in r["device_only_group"]
        assert r["mixed_group_host_sum"] == [3.0, 3.0]


# --------------------------------------------------------------------------------- 2. device choice
def test_device_for_respects_ds_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    env = distributed.DistEnv(5, 8, 5, 8, "127.0.0.1", 1234, "env")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert distributed.device_for(env) == torch.device("cpu")
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    assert distributed.device_for(env) == torch.device("cuda", 1)
    monkeypatch.delenv("DS_ACCELERATOR")
    assert distributed.device_for(env) == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.device_for(env) == torch.device("cpu")
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    with pytest.raises(RuntimeError, match="DS_ACCELERATOR=cuda"):
        distributed.device_for(env)


# ------------------------------------------------------------ 3. attention implementation on reload
@pytest.mark.parametrize("saved,loaded", [("eager", "sdpa"), ("sdpa", "eager")])
def test_reloaded_coprocessor_uses_the_decoders_attention_implementation(tmp_path, saved, loaded):
    decoder = tiny_decoder("llama")
    decoder.set_attn_implementation(saved)
    model = CacheAugmentedLM.from_decoder(decoder, num_latents=2, seed=0)
    assert model.coprocessor.config._attn_implementation == saved
    model.save_pretrained(tmp_path / "export")

    decoder.set_attn_implementation(loaded)
    again = CacheAugmentedLM.from_pretrained(tmp_path / "export", decoder=decoder)
    assert again.coprocessor.config._attn_implementation == loaded == again.attn_implementation()
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    pos = sample_positions(2, 24, 4, 3, torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            again.training_loss(ids, pos, 3).loss, model.training_loss(ids, pos, 3).loss, atol=1e-5, rtol=1e-5
        )


# --------------------------------------------------------------------------- 4. chunked validation CE
# Same maths, other matmul shapes: BLAS picks other kernels (and thread splits) for [7, H] and [30, H]
# rows, so each row's CE (3-7 nats: a 32-64-term dot product per logit, sum |h_i w_i| <= ~6) differs by
# fp32 rounding, 1 ulp measured, <= ~7e-6 relative in the worst case; a sum of these positive CEs keeps
# the relative error. A real bug (a row dropped, chunked twice or misaligned) is >= 1e-3.
CE_RTOL = 1e-5


def _record_vocab_logits(monkeypatch, vocab: int) -> list[tuple[int, ...]]:
    """Shapes of every [rows, vocab] logits tensor F.linear produces from now on."""
    shapes, real_linear = [], F.linear

    def linear(x, w, b=None):
        out = real_linear(x, w, b)
        if out.shape[-1] == vocab:
            shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(F, "linear", linear)
    return shapes


@pytest.mark.numerics
def test_torch_runs_on_omp_num_threads():
    """CI runs the numerics tests at OMP_NUM_THREADS=1 and 2 (.ci/run): torch reads it at import, and
    nothing the package or the tests ran before this may have replaced it (torch.set_num_threads)."""
    if not os.environ.get("OMP_NUM_THREADS"):
        pytest.skip("OMP_NUM_THREADS is not set")
    assert torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"])


@pytest.mark.numerics
def test_baseline_ce_is_chunked_and_equals_the_unchunked_ce(monkeypatch):
    from dist_cacheaug.core.losses import baseline_ce

    decoder, na = tiny_decoder("gemma2"), 3
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    pos = sample_positions(2, 20, 5, na, torch.Generator().manual_seed(1))  # 2 * 5 * 3 = 30 rows
    with torch.no_grad():  # the reference: full [30, V] logits at once
        hidden = decoder.base_model(input_ids=ids).last_hidden_state
        rows = (pos[:, :, None] + torch.arange(na)).reshape(2, -1)
        h = torch.gather(hidden, 1, rows[..., None].expand(-1, -1, hidden.shape[-1]))
        weight, softcap = lm_head_of(decoder)
        ref = plain_cross_entropy(
            h.reshape(-1, h.shape[-1]), torch.gather(ids, 1, rows + 1).reshape(-1), weight, softcap
        )
        ref = ref.view(-1, na).double().sum(0)
    shapes = _record_vocab_logits(monkeypatch, VOCAB)
    got = baseline_ce(decoder, ids, chunk_size=7, rows=rows).view(-1, na).double().sum(0)
    torch.testing.assert_close(got, ref, atol=0, rtol=CE_RTOL)
    assert shapes and max(s[0] for s in shapes) <= 7 and sum(s[0] for s in shapes) == 30, shapes
    every = baseline_ce(decoder, ids, chunk_size=7)  # [2, 19]: every row, as the loss-at-k eval reads it
    assert every.shape == (2, 19)
    torch.testing.assert_close(
        torch.gather(every, 1, rows).view(-1, na).double().sum(0), ref, atol=0, rtol=CE_RTOL
    )


@pytest.mark.numerics
def test_validation_uses_the_models_loss_chunk_size(monkeypatch, shards, tmp_path):
    from train_helpers import tiny_run_config

    from dist_cacheaug.core.decoder import build_decoder
    from dist_cacheaug.train.validation import validation_sums

    cfg = load_config(tiny_run_config(tmp_path, shards), ["model.loss_chunk_size=50"])
    decoder = build_decoder(cfg.model, seed=0)
    na = cfg.model.num_ahead
    rows_per_batch = cfg.train.micro_batch_size * cfg.model.num_positions * na  # 4 * 60 * 4 = 960

    def loss_fn(ids, positions, num_ahead):
        return SimpleNamespace(loss_per_offset=torch.arange(1.0, num_ahead + 1))

    def run(chunk: int):
        c = load_config(tiny_run_config(tmp_path, shards), [f"model.loss_chunk_size={chunk}"])
        kwargs = dict(rank=0, world_size=1, eval_samples=4, device=torch.device("cpu"))
        return validation_sums(loss_fn, decoder, c, **kwargs)

    unchunked = run(100_000)
    shapes = _record_vocab_logits(monkeypatch, cfg.model.decoder_config["vocab_size"])
    chunked = run(cfg.model.loss_chunk_size)
    assert shapes and max(s[0] for s in shapes) <= 50 < rows_per_batch, shapes[:3]
    torch.testing.assert_close(chunked, unchunked, atol=0, rtol=CE_RTOL)  # CE sums, then a trace count
    assert chunked[-1] == 4 * cfg.model.num_positions


# -------------------------------------------------------------------------------------- 5. MFU peaks
@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),  # SXM5
        ("NVIDIA H100 SXM5 80GB", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA A10", 125e12),
        ("NVIDIA RTX A6000", 155e12),
        ("NVIDIA L40", None),  # not "L4"
        ("NVIDIA A10G", None),  # not "A10"
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_flops_by_device_name(monkeypatch, name, peak):
    from dist_cacheaug.train.metrics import peak_flops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0)) == peak
    assert peak_flops(torch.device("cpu")) is None


# ---------------------------------------------------------------------------- 6. SLURM CPU request
def test_sbatch_requests_cpus_for_the_loader_workers():
    text = (ROOT / "slurm" / "train.sbatch").read_text()
    cpus = [int(v) for v in re.findall(r"^#SBATCH --cpus-per-task=(\d+)\s*$", text, re.M)]
    assert len(cpus) == 1
    for config in sorted((ROOT / "configs").glob("*.yaml")):
        workers = load_config(config).data.num_workers
        assert cpus[0] >= workers + 2, (config.name, workers, cpus[0])  # workers + main process + headroom


# ------------------------------------------------------------------ 7. the GPU checklist's train section
@pytest.mark.slow
def test_gpu_check_train_section_runs_on_cpu_with_a_tiny_config(tmp_path):
    """bench/gpu_check.sh's `train` section (2 runs of `cacheaug train`: 4 steps + checkpoint, then a
    resume to 6) on the CPU with configs/tiny_cpu.yaml: the script a GPU session runs works end to end
    and reports checkpoint save and resume times."""
    import subprocess
    import sys

    env = dict(
        os.environ,
        CONFIG="configs/tiny_cpu.yaml",
        DS_ACCELERATOR="cpu",
        MICRO="2",
        PYTHON=sys.executable,
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    )
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", str(tmp_path), "train"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = (tmp_path / "train.log").read_text() if (tmp_path / "train.log").exists() else ""
    assert proc.returncode == 0, proc.stdout + proc.stderr + log[-3000:]
    assert re.search(r"checkpoint of step 4 saved in [\d.]+ s", proc.stdout)
    assert re.search(r"resumed from .*step_000004 at step 4 \(exact\) in [\d.]+ s", proc.stdout)
    rows = [json.loads(line) for line in (tmp_path / "train_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
