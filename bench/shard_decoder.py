"""The frozen decoder replicated vs sharded (``zero.shard_decoder``) on 2 CPU ranks: step time and traffic.

    python bench/shard_decoder.py [--preset tiny|small] [--steps 6] [--warmup 1] [--ranks 2] [--out FILE]

Each rank (torch.multiprocessing, gloo) builds the same model twice from the preset's config: once with
the decoder replicated, once sharded over all ranks (FSDP2, ``train/engine.py: shard_decoder``), each in
its own ZeRO-3 engine (``build_engine``, what ``cacheaug train`` uses). Then it runs training steps
(forward, backward, optimizer step) on random token ids, alternating replicated and sharded steps so
that load from other processes on the machine hits both alike. Per step it records the wall time, the
process CPU time (user + sys of every thread) and the bytes of every all-gather FSDP2 issues (counted
by wrapping ``torch.distributed.all_gather_single`` / ``all_gather_into_tensor`` after the engines
exist; DeepSpeed keeps its own reference, so the coprocessor's ZeRO-3 traffic is not in the count).

Printed (medians over the steps after ``--warmup``, per rank, then the slowest rank): step time of each
layout and their ratio, CPU time, the all-gather calls and bytes the sharded decoder adds per step
(received = the gathered layers; sent = (W-1)/W of that, a ring), beside ``estimate.decoder_comm``, and
the decoder bytes each rank holds. The losses of the two layouts are printed too: they must be equal.

Presets: ``tiny`` is configs/tiny_cpu.yaml (4 layers, hidden 192, vocab 4096, seq 256, P=16);
``small`` widens it (8 layers, hidden 512, vocab 8192).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS: dict[str, list[str]] = {
    "tiny": [],
    "small": [
        "model.decoder_config.hidden_size=512",
        "model.decoder_config.intermediate_size=1536",
        "model.decoder_config.num_hidden_layers=8",
        "model.decoder_config.num_attention_heads=8",
        "model.decoder_config.num_key_value_heads=4",
        "model.decoder_config.head_dim=64",
        "model.decoder_config.query_pre_attn_scalar=64",
        "model.decoder_config.vocab_size=8192",
        "model.decoder_config.layer_types=[sliding_attention, full_attention, sliding_attention, "
        "full_attention, sliding_attention, full_attention, sliding_attention, full_attention]",
        "train.micro_batch_size=2",
    ],
}


def config(preset: str, world: int, shard: bool):
    from dist_cacheaug import load_config

    sets = [
        *PRESETS[preset],
        "zero.activation_checkpointing=true",
        f"zero.shard_decoder={str(shard).lower()}",
    ]
    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", sets)
    micro = cfg.train.micro_batch_size
    return load_config(
        ROOT / "configs" / "tiny_cpu.yaml", [*sets, f"train.global_batch_size={micro * world}"]
    )


class Gathers:
    """All-gathers issued through torch.distributed's functions (FSDP2's), counted while installed."""

    def __init__(self):
        import torch.distributed as dist

        self.dist, self.calls, self.bytes = dist, 0, 0
        for name in ("all_gather_single", "all_gather_into_tensor"):
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(getattr(dist, name)))

    def _wrap(self, real):
        def counting(out, inp, *a, **k):
            self.calls += 1
            self.bytes += out.numel() * out.element_size()
            return real(out, inp, *a, **k)

        return counting

    def take(self) -> tuple[int, int]:
        out = (self.calls, self.bytes)
        self.calls = self.bytes = 0
        return out


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    import torch

    from dist_cacheaug import distributed
    from dist_cacheaug.core.decoder import build_decoder
    from dist_cacheaug.core.model import sample_positions
    from dist_cacheaug.train.engine import build_engine
    from dist_cacheaug.variants import build_trainable

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed deprecations, each step
    torch.set_num_threads(1)
    started = time.perf_counter()
    env = distributed.DistEnv(rank, world, rank, world, "127.0.0.1", port, "env")
    device = torch.device("cpu")
    distributed.init_process_group(env, device)
    try:
        engines, held = {}, {}
        for name, shard in (("replicated", False), ("sharded", True)):
            cfg = config(args.preset, world, shard)
            model = build_trainable(cfg, build_decoder(cfg.model, device=device, seed=cfg.train.seed))
            model.enable_activation_checkpointing()
            engines[name] = build_engine(cfg, model, world_size=world, device=device)
            held[name] = sum(
                (p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
                for p in model.decoder.parameters()
            )
        result = {"rank": rank, "build_s": time.perf_counter() - started}
        gathers = Gathers()
        m, n = cfg.model, cfg.data.seq_len
        gen = torch.Generator().manual_seed(rank)
        rows = {name: [] for name in engines}
        for step in range(args.warmup + args.steps):
            ids = torch.randint(
                3, m.decoder_config["vocab_size"], (cfg.train.micro_batch_size, n), generator=gen
            )
            pos = sample_positions(ids.shape[0], n, m.num_positions, m.num_ahead, gen)
            for name, eng in engines.items():
                gathers.take()
                distributed.barrier()
                wall, cpu = time.perf_counter(), time.process_time()
                out = eng.forward(ids, pos, m.num_ahead)
                eng.backward(out.loss)
                eng.step()
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                calls, nbytes = gathers.take()
                if step >= args.warmup:
                    rows[name].append(
                        {"wall": wall, "cpu": cpu, "calls": calls, "bytes": nbytes, "loss": out.loss.item()}
                    )
        result.update(rows=rows, held=held)
    finally:
        distributed.destroy()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def main() -> None:
    import tempfile

    import torch.multiprocessing as mp

    from dist_cacheaug.distributed import free_port
    from dist_cacheaug.train.estimate import decoder_comm, param_counts

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=6, help="measured steps per layout")
    p.add_argument("--warmup", type=int, default=1, help="steps per layout left out of the medians")
    p.add_argument("--out", default=None, help="also write the per-step numbers as JSON")
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(worker, args=(args.ranks, free_port(), args, d), nprocs=args.ranks, join=True)
        ranks = [json.loads(Path(d, f"rank{r}.json").read_text()) for r in range(args.ranks)]
    total = time.perf_counter() - t0

    cfg = config(args.preset, args.ranks, True)
    counts = param_counts(cfg)
    est = decoder_comm(cfg, args.ranks, cfg.grad_accum_steps(args.ranks), bf16=False)
    d = cfg.model.decoder_config
    print(
        f"preset {args.preset}: decoder {counts.decoder / 1e6:.1f}M params ({d['num_hidden_layers']} layers, "
        f"hidden {d['hidden_size']}, vocab {d['vocab_size']}; layers {counts.decoder_layers / 1e6:.1f}M), "
        f"micro batch {cfg.train.micro_batch_size} x seq {cfg.data.seq_len}, P={cfg.model.num_positions}, "
        f"N_L={cfg.model.num_latents}, N_A={cfg.model.num_ahead}, fp32, ZeRO-3 coprocessor, activation "
        f"checkpointing; {args.ranks} ranks (gloo, 1 thread each) on {os.cpu_count()} CPU cores; medians over "
        f"{args.steps} steps per layout after {args.warmup} warm-up, layouts alternating"
    )
    print(
        f"{'rank':>4} {'layout':>10} {'step s':>8} {'cpu s':>7} {'gathers':>8} {'MB recv':>8} {'decoder MB held':>16}"
    )
    med = {}
    for r in ranks:
        for name, rows in r["rows"].items():
            wall = statistics.median(x["wall"] for x in rows)
            cpu = statistics.median(x["cpu"] for x in rows)
            calls = statistics.median(x["calls"] for x in rows)
            recv = statistics.median(x["bytes"] for x in rows)
            med.setdefault(name, []).append((wall, cpu, calls, recv))
            print(
                f"{r['rank']:>4} {name:>10} {wall:8.3f} {cpu:7.3f} {calls:8.0f} {recv / 1e6:8.2f} "
                f"{r['held'][name] / 1e6:16.2f}"
            )
    slow = {name: max(v[0] for v in vals) for name, vals in med.items()}
    cpu = {name: max(v[1] for v in vals) for name, vals in med.items()}
    recv = max(v[3] for v in med["sharded"])
    sent = recv * (args.ranks - 1) / args.ranks
    print(
        f"step time (slowest rank): replicated {slow['replicated']:.3f} s, sharded {slow['sharded']:.3f} s, "
        f"ratio sharded/replicated {slow['sharded'] / slow['replicated']:.2f} "
        f"(CPU time per step {cpu['replicated']:.3f} vs {cpu['sharded']:.3f} s, ratio "
        f"{cpu['sharded'] / cpu['replicated']:.2f})"
    )
    print(
        f"traffic the sharded decoder adds per step and rank: {max(v[2] for v in med['sharded']):.0f} all-gathers "
        f"({3} per layer x {d['num_hidden_layers']} layers expected), {recv / 1e6:.2f} MB received, "
        f"{sent / 1e6:.2f} MB sent; estimate.decoder_comm: {est.bytes_per_step() / 1e6:.2f} MB sent"
    )
    losses = [
        (a["loss"], b["loss"]) for r in ranks for a, b in zip(r["rows"]["replicated"], r["rows"]["sharded"])
    ]
    worst = max(abs(a - b) / abs(a) for a, b in losses)
    print(f"losses replicated vs sharded, every measured step and rank: max relative difference {worst:.2e}")
    build = max(r["build_s"] for r in ranks)
    print(f"whole benchmark {total:.0f} s wall (start and build of both engines: {build:.0f} s)")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "ranks": ranks}, indent=1))


if __name__ == "__main__":
    main()
