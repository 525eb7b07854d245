"""``zero.shard_decoder``: the frozen decoder's layers partitioned across ranks (FSDP2, gloo on CPU).

Reference: the same model with the decoder replicated. Every number of the sharded run must equal it:
the all-gathers copy the parameters bit for bit and the arithmetic is the same, so the tolerance is
fp32 rounding (rel 1e-5); in practice the differences are 0.

1. config checks and the estimate (one process);
2. the engine, 2 ranks (torch.multiprocessing, gloo): losses and full coprocessor gradients at every
   step, the weights after the steps, the frozen decoder's share per rank, and the all-gathers each
   pass makes (one per layer in the prefix pass, the trace pass and the backward), with and without
   activation checkpointing;
3. HSDP, 4 ranks: two copies of the decoder, each split over 2 ranks (with ZeRO++ hpZ);
4. the real ``cacheaug train``, 2 ranks: replicated and sharded runs give the same metrics, validation
   and export; checkpoints hold no decoder tensor; a sharded run resumes exactly, and a replicated
   run's checkpoint resumes sharded.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from train_helpers import metrics, run_train
from train_helpers import tiny_run_config as _config

from dist_cacheaug import distributed, load_config
from dist_cacheaug.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]
REL = 1e-5  # fp32: the sharded and replicated runs do the same arithmetic on the same values


def _cfg(tmp_path: Path, *sets: str):
    tmp_path.mkdir(parents=True, exist_ok=True)
    return load_config(_config(tmp_path, tmp_path / "no-shards"), list(sets))


# ------------------------------------------------------------------------------- 1. config, estimate
def test_config_checks_name_the_field(tmp_path):
    cfg = _cfg(tmp_path, "zero.shard_decoder=true", "zero.decoder_shard_size=4")
    with pytest.raises(ConfigError, match=r"zero\.decoder_shard_size=4 does not divide the world size 6"):
        cfg.grad_accum_steps(6)
    assert _cfg(tmp_path, "zero.shard_decoder=true", "zero.decoder_shard_size=2").grad_accum_steps(2) == 1
    with pytest.raises(ConfigError, match=r"zero\.decoder_shard_size must be 0 \(all ranks\) or >= 2"):
        _cfg(tmp_path, "zero.decoder_shard_size=1")
    for variant in ("single_model", "base_lm"):
        with pytest.raises(ConfigError, match=rf"model\.variant={variant} trains the decoder itself"):
            _cfg(tmp_path, "zero.shard_decoder=true", f"model.variant={variant}")


def test_estimate_splits_the_layers_and_counts_their_gathers(tmp_path):
    from dist_cacheaug.train.estimate import decoder_comm, memory_estimate, param_counts

    rep = _cfg(tmp_path)
    shard = _cfg(tmp_path, "zero.shard_decoder=true")
    c = param_counts(rep)
    layers = c.decoder_layers
    assert 0 < layers < c.decoder
    for w in (2, 8):
        m_rep, m_sh = memory_estimate(rep, w, bf16=True), memory_estimate(shard, w, bf16=True)
        assert m_rep["frozen_decoder"] == c.decoder * 2
        assert m_sh["frozen_decoder"] == (c.decoder - layers) * 2 + layers * 2 / w
        assert (
            m_sh["decoder_gathered_layers"] == 3 * layers * 2 / rep.model.decoder_config["num_hidden_layers"]
        )
        assert m_rep["decoder_gathered_layers"] == 0
    comm = decoder_comm(shard, 8, accum=2, bf16=True, gpus_per_node=8)
    assert [c_.per_micro for c_ in comm.collectives] == [1, 1, 1]
    assert [c_.per_step for c_ in comm.collectives] == [2, 2, 2]
    assert comm.bytes_per_micro() == pytest.approx(3 * 7 / 8 * layers * 2)
    assert not any(c_.inter_node for c_ in comm.collectives)
    assert decoder_comm(rep, 8, accum=2).collectives == []
    # 16 ranks: over all of them the gathers cross nodes; split over one node's 8 (HSDP) they do not
    across = decoder_comm(shard, 16, accum=1, gpus_per_node=8)
    node = decoder_comm(_cfg(tmp_path, "zero.shard_decoder=true", "zero.decoder_shard_size=8"), 16, accum=1)
    assert all(c_.inter_node for c_ in across.collectives) and not any(
        c_.inter_node for c_ in node.collectives
    )
    assert node.bytes_per_micro() == pytest.approx(3 * 7 / 8 * layers * 2)
    assert memory_estimate(_cfg(tmp_path, "zero.shard_decoder=true", "zero.decoder_shard_size=8"), 16)[
        "frozen_decoder"
    ] == pytest.approx((c.decoder - layers) * 2 + layers * 2 / 8)


# ------------------------------------------------------------------------------------ 2./3. engine
class GatherCounter:
    """Counts the all-gathers FSDP2 issues (torch 2.13 calls ``all_gather_single``, older releases
    ``all_gather_into_tensor``; DeepSpeed keeps its own reference, taken when its engine was built, so
    its gathers of the coprocessor are not counted when this is installed after the engines exist)."""

    NAMES = ("all_gather_single", "all_gather_into_tensor")

    def __init__(self):
        self.calls, self.bytes, self.saved = 0, 0, {}

    def install(self):
        for name in self.NAMES:
            if hasattr(dist, name):
                real = self.saved[name] = getattr(dist, name)

                def counting(out, inp, *a, _real=real, **k):
                    self.calls += 1
                    self.bytes += out.numel() * out.element_size()
                    return _real(out, inp, *a, **k)

                setattr(dist, name, counting)
        return self

    def take(self) -> tuple[int, int]:
        out = (self.calls, self.bytes)
        self.calls = self.bytes = 0
        return out


def _engine_worker(
    rank: int, world: int, port: int, out_dir: str, cases: list, shard_size: int, extra: list
) -> None:
    """Per case: a replicated and a sharded engine around the same model; 3 identical steps each."""
    from deepspeed.utils import safe_get_full_grad

    from dist_cacheaug.core.decoder import build_decoder
    from dist_cacheaug.core.losses import baseline_ce
    from dist_cacheaug.core.model import sample_positions
    from dist_cacheaug.train.engine import build_engine, is_sharded
    from dist_cacheaug.variants import build_trainable

    env = distributed.DistEnv(rank, world, rank, world, "127.0.0.1", port, "env")
    device = torch.device("cpu")
    distributed.init_process_group(env, device)
    results = []
    try:
        for variant, checkpointing in cases:
            sets = [
                f"model.variant={variant}",
                f"zero.activation_checkpointing={str(checkpointing).lower()}",
                f"train.global_batch_size={2 * world}",
                "train.micro_batch_size=2",
                "model.num_positions=6",
                *extra,
            ]
            tmp = Path(out_dir)
            rep_cfg = _cfg(tmp / f"{variant}-{rank}", *sets)
            sh_cfg = _cfg(
                tmp / f"{variant}-{rank}-s",
                *sets,
                "zero.shard_decoder=true",
                f"zero.decoder_shard_size={shard_size}",
            )
            engines, models = [None, None], [None, None]
            # The sharded engine first: with hpZ, its deepspeed.zero.Init creates DeepSpeed's hpZ
            # groups, which refuses to run after another engine of this process made them (the
            # engine itself reuses existing ones). One trainer process builds one engine.
            for i, cfg in ((1, sh_cfg), (0, rep_cfg)):
                decoder = build_decoder(cfg.model, device=device, seed=cfg.train.seed)
                model = build_trainable(cfg, decoder)
                if checkpointing:
                    model.enable_activation_checkpointing()
                engines[i] = build_engine(cfg, model, world_size=world, device=device)
                models[i] = model
            rep, sh = engines
            decoder = models[1].decoder
            result = {
                "variant": variant,
                "checkpointing": checkpointing,
                "sharded": [is_sharded(m.decoder) for m in models],
                "shards": vars(sh.decoder_shards),
                "layers_whole": sum(p.numel() for p in models[0].decoder.base_model.layers.parameters()),
                "layer_bytes": [
                    sum(p.numel() * p.element_size() for p in layer.parameters())
                    for layer in models[0].decoder.base_model.layers
                ],
                "decoder_requires_grad": any(p.requires_grad for p in decoder.parameters()),
                "engine_params": sorted(n for n, _ in sh.engine.module.named_parameters()),
                "trainable": sorted(n for n, p in models[1].named_parameters()),
                "steps": [],
            }
            counter = GatherCounter().install()
            gen = torch.Generator().manual_seed(100 + rank)
            c = rep_cfg
            for _ in range(3):
                ids = torch.randint(3, 320, (2, c.data.seq_len), generator=gen)
                pos = sample_positions(2, c.data.seq_len, c.model.num_positions, c.model.num_ahead, gen)
                step = {}
                for name, eng in (("rep", rep), ("sh", sh)):
                    counter.take()
                    out = eng.forward(ids, pos, c.model.num_ahead)
                    fwd = counter.take()
                    eng.backward(out.loss)
                    bwd = counter.take()
                    grads = {
                        n: safe_get_full_grad(p).clone()
                        for n, p in eng.engine.module.named_parameters()
                        if p.requires_grad
                    }
                    counter.take()
                    eng.step()
                    step[name] = {"loss": out.loss.item(), "per_offset": out.loss_per_offset.tolist()}
                    step[name + "_grads"] = grads
                    step[name + "_gathers"] = (fwd, bwd)
                with torch.no_grad():  # validation's baseline: a no-grad pass through the decoder alone
                    counter.take()
                    step["baseline"] = [baseline_ce(m.decoder, ids).sum().item() for m in models]
                    step["baseline_gathers"] = counter.take()
                result["steps"].append(step)
            result["weights"] = [e.consolidated_fp32() for e in engines]
            results.append(result)
            for saved_name, real in counter.saved.items():
                setattr(dist, saved_name, real)
    finally:
        distributed.destroy()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def _spawn_engines(tmp_path: Path, world: int, cases: list, shard_size: int = 0, extra=()) -> list:
    import torch.multiprocessing as mp

    port = distributed.free_port()
    args = (world, port, str(tmp_path), cases, shard_size, list(extra))
    mp.spawn(_engine_worker, args=args, nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _check_equal_to_replicated(result: dict, world: int, shard_size: int) -> None:
    s = shard_size or world
    shards, whole = result["shards"], result["layers_whole"]
    assert result["sharded"] == [False, True]
    assert (shards["shard_size"], shards["replicas"], shards["layer_params"]) == (s, world // s, whole)
    # this rank holds 1/s of every layer (FSDP2 pads dim 0 to a multiple of s: a few rows at most)
    assert whole / s <= shards["local_layer_params"] < whole / s * 1.05
    assert not result["decoder_requires_grad"]
    # the engine (optimizer state, checkpoints) sees the trainable part only
    assert result["engine_params"] == result["trainable"]
    n_layers, layer_bytes = shards["layers"], sum(result["layer_bytes"])
    for i, step in enumerate(result["steps"]):
        assert step["sh"]["loss"] == pytest.approx(step["rep"]["loss"], rel=REL), i
        assert step["sh"]["per_offset"] == pytest.approx(step["rep"]["per_offset"], rel=REL), i
        assert step["sh_grads"].keys() == step["rep_grads"].keys() and step["rep_grads"]
        assert all(g.abs().sum() > 0 for g in step["rep_grads"].values())  # the gradient reached them
        for name, g in step["rep_grads"].items():
            torch.testing.assert_close(step["sh_grads"][name], g, rtol=REL, atol=1e-7, msg=name)
        assert step["baseline"][1] == pytest.approx(step["baseline"][0], rel=REL)
        # gathered layer by layer: prefix + trace pass in forward, the trace pass again in backward
        assert step["rep_gathers"] == ((0, 0), (0, 0))
        (fwd_calls, fwd_bytes), (bwd_calls, bwd_bytes) = step["sh_gathers"]
        assert (fwd_calls, bwd_calls) == (2 * n_layers, n_layers), i
        assert layer_bytes <= bwd_bytes < layer_bytes * 1.05 and fwd_bytes == 2 * bwd_bytes
        assert step["baseline_gathers"][0] == n_layers
    rep_w, sh_w = result["weights"]
    assert rep_w.keys() == sh_w.keys()
    for name in rep_w:
        torch.testing.assert_close(sh_w[name], rep_w[name], rtol=REL, atol=1e-7, msg=name)


@pytest.mark.distributed
@pytest.mark.slow
def test_sharded_engine_equals_replicated_two_ranks(tmp_path):
    """2 ranks, the decoder split over both: the coprocessor with activation checkpointing (the
    layers are recomputed in backward) and pause tokens without it (backward reuses the forward's
    saved tensors; FSDP2 gathers the layer's parameters again), 3 steps each."""
    cases = [("coprocessor", True), ("pause", False)]
    results = _spawn_engines(tmp_path, 2, cases)
    for rank_results in results:
        for result in rank_results:
            _check_equal_to_replicated(result, 2, 0)
    assert all(r["weights"][0] for r in results[0]) and not any(
        r["weights"][0] for r in results[1]
    )  # rank 0 only
    # both ranks computed the same global numbers
    assert results[0][0]["steps"][2]["sh_grads"].keys() == results[1][0]["steps"][2]["sh_grads"].keys()


@pytest.mark.distributed
@pytest.mark.slow
def test_sharded_engine_hsdp_four_ranks(tmp_path):
    """4 ranks, ``zero.decoder_shard_size=2``: two copies of the decoder, each split over 2 ranks (a
    2-D mesh, as on nodes of 2 GPUs). Every gather stays inside a pair. The coprocessor uses ZeRO++ hpZ
    over the same pairs (``zero.hpz_partition_size=2``), as the big-base configs are launched, so the
    coprocessor's partitioning before the engine (``deepspeed.zero.Init``) builds hpZ groups too."""
    results = _spawn_engines(
        tmp_path, 4, [("coprocessor", True)], shard_size=2, extra=["zero.hpz_partition_size=2"]
    )
    for rank_results in results:
        _check_equal_to_replicated(rank_results[0], 4, 2)
    assert results[0][0]["weights"][0] and not results[3][0]["weights"][0]  # consolidated on rank 0 only


# ------------------------------------------------------------------------------ 4. cacheaug train
def _tensor_keys(obj, prefix="") -> set[str]:
    """Names of every tensor inside a (nested) checkpoint object."""
    if isinstance(obj, torch.Tensor):
        return {prefix}
    if isinstance(obj, dict):
        return set().union(*(_tensor_keys(v, f"{prefix}{k}.") for k, v in obj.items())) if obj else set()
    if isinstance(obj, (list, tuple)):
        return set().union(*(_tensor_keys(v, f"{prefix}{i}.") for i, v in enumerate(obj))) if obj else set()
    return set()


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    """The same 4 steps (validation at 2 and 4, checkpoints at 2 and 4) replicated and sharded."""
    tmp = tmp_path_factory.mktemp("shard_runs")
    cfg = _config(tmp, shards, max_steps=4, eval_interval=2, checkpoint_interval=2)
    rep = run_train(2, cfg, f"train.run_dir={tmp / 'rep'}")
    sh = run_train(2, cfg, f"train.run_dir={tmp / 'sh'}", "zero.shard_decoder=true")
    return tmp, cfg, rep, sh


DETERMINISTIC = ("loss", "loss_k1", "loss_k2", "loss_k4", "lr", "grad_norm")


@pytest.mark.distributed
@pytest.mark.slow
def test_trainer_sharded_equals_replicated_and_checkpoints_hold_no_decoder(runs):
    from safetensors.torch import load_file

    from dist_cacheaug.core.decoder import build_decoder
    from dist_cacheaug.train.checkpoint import decoder_digest

    tmp, cfg_path, _, sh_proc = runs
    assert "frozen decoder sharded (FSDP2): 2 layers over all ranks" in sh_proc.stdout
    rep, sh = metrics(tmp / "rep"), metrics(tmp / "sh")
    assert [r["step"] for r in sh] == [1, 2, 3, 4]
    for a, b in zip(rep, sh):
        for key in DETERMINISTIC + ("val_loss", "val_baseline", "val_loss_k1", "val_baseline_k4"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=REL), (a["step"], key)
    assert "val_loss" in sh[1] and "val_loss" in sh[3]
    for name in ("coprocessor/model.safetensors", "soft_tokens.safetensors"):
        want, got = load_file(tmp / "rep" / "export" / name), load_file(tmp / "sh" / "export" / name)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=REL, atol=1e-7, msg=key)

    # Checkpoints: the trainable part and its optimizer state, nothing of the decoder.
    cfg = load_config(cfg_path)
    decoder = build_decoder(cfg.model, seed=cfg.train.seed)
    decoder_names = {n for n, _ in decoder.named_parameters()}
    trainable = set(load_file(tmp / "sh" / "checkpoints" / "step_000002" / "model_fp32.safetensors"))
    assert trainable and all(n.startswith(("coprocessor.", "soft_tokens")) for n in trainable)
    for step_dir in sorted((tmp / "sh" / "checkpoints").glob("step_*")):
        for f in sorted(step_dir.rglob("*")):
            if f.suffix == ".pt":
                keys = _tensor_keys(torch.load(f, map_location="cpu", weights_only=False))
            elif f.suffix == ".safetensors":
                keys = set(load_file(f))
            else:
                continue
            module_keys = {k.split("module.", 1)[1].rstrip(".") for k in keys if k.startswith("module.")}
            assert module_keys <= trainable, (f, sorted(module_keys - trainable)[:3])
            leaked = {
                k for k in keys for d in decoder_names if k.rstrip(".").endswith(d) and "coprocessor" not in k
            }
            assert not leaked, (f, sorted(leaked)[:3])
    # The frozen decoder never changed: the digest every rank took (gathering its shards) at the end.
    state = torch.load(tmp / "sh" / "checkpoints" / "step_000004" / "train_state.pt", weights_only=False)
    assert [r["decoder_digest"] for r in state["ranks"]] == [decoder_digest(decoder)] * 2


@pytest.mark.distributed
@pytest.mark.slow
def test_trainer_sharded_resumes_exactly(runs, tmp_path):
    """A sharded run stopped after step 2 continues exactly. A replicated run's checkpoint resumes
    sharded too: checkpoints hold no decoder, so the layout is free to change."""
    tmp, cfg_path, _, _ = runs
    want = metrics(tmp / "sh")
    for source in ("sh", "rep"):
        run_dir = tmp_path / f"resumed-{source}"
        shutil.copytree(tmp / source, run_dir)
        shutil.rmtree(run_dir / "checkpoints" / "step_000004")
        shutil.rmtree(run_dir / "export")
        (run_dir / "checkpoints" / "latest").write_text("step_000002\n")
        proc = run_train(2, cfg_path, f"train.run_dir={run_dir}", "zero.shard_decoder=true")
        assert "resumed from" in proc.stdout and "at step 2 (exact)" in proc.stdout
        assert "frozen decoder sharded (FSDP2)" in proc.stdout
        got = metrics(run_dir)
        assert [r["step"] for r in got] == [1, 2, 3, 4]
        assert "val_loss" in got[3]
        rel = 1e-6 if source == "sh" else REL
        for a, b in zip(want[2:], got[2:]):
            for key in DETERMINISTIC + ("val_loss", "val_baseline"):
                if key in a:
                    assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-9), (source, a["step"], key)
        assert (run_dir / "export" / "cacheaug_config.json").is_file()


def test_cacheaug_config_prints_both_decoder_layouts(capsys):
    """`cacheaug config` on the 27B config: per-GPU memory and per-step traffic of the frozen decoder,
    replicated and sharded, as estimate.py computes them."""
    import dataclasses

    from dist_cacheaug.cli import main as cli_main
    from dist_cacheaug.train.estimate import decoder_comm, memory_estimate

    path = ROOT / "configs" / "gemma2_27b_shard.yaml"
    assert cli_main(["config", str(path), "--world-size", "128"]) == 0
    out = capsys.readouterr().out
    assert "frozen decoder sharded over 8 ranks)" in out  # the memory section names the layout
    cfg = load_config(path)
    rows = {}
    for line in out.split("frozen decoder at world size 128:")[1].splitlines()[2:5]:
        name, nums = line[:32].strip(" *"), line[32:].split()
        rows[name] = [float(x) for x in nums]
    assert set(rows) == {"replicated", "sharded over 8 (1 node)", "sharded over 128 (all ranks)"}
    for name, (shard, size) in {
        "replicated": (False, 0),
        "sharded over 8 (1 node)": (True, 8),
        "sharded over 128 (all ranks)": (True, 0),
    }.items():
        lay = dataclasses.replace(
            cfg, zero=dataclasses.replace(cfg.zero, shard_decoder=shard, decoder_shard_size=size)
        )
        mem = memory_estimate(lay, 128)
        comm = decoder_comm(lay, 128, lay.grad_accum_steps(128))
        decoder_gib, total_gib, gb_micro, gb_step = rows[name][:4]
        assert decoder_gib == pytest.approx(
            (mem["frozen_decoder"] + mem["decoder_gathered_layers"]) / 2**30, abs=0.01
        )
        assert total_gib == pytest.approx(mem["total"] / 2**30, abs=0.01)
        assert gb_micro == pytest.approx(comm.bytes_per_micro() / 1e9, abs=0.01)
        assert gb_step == pytest.approx(comm.bytes_per_step() / 1e9, abs=0.01)
    assert rows["replicated"][2] == 0 and rows["sharded over 8 (1 node)"][0] < rows["replicated"][0] / 4
    assert "all-gather decoder layers (backward)" in out
