"""Host memory of checkpoint, export and elastic resume on 4 gloo ranks: before (whole-model copies) vs now.

    python bench/checkpoint_memory.py [--ranks 4] [--layers 20] [--hidden 1024] [--out FILE]

Each rank (torch.multiprocessing, gloo, 1 thread) builds the coprocessor (default: about 318M
parameters; ``--layers``/``--hidden`` size it) and its soft tokens as ``cacheaug train`` does, a ZeRO-3
engine around them (``build_engine``) with the frozen decoder sharded over the ranks (``zero.shard_decoder``,
so that four decoders fit in memory), and takes one training step so that every optimizer state exists.
Then, one phase at a time, each rank measures the growth of its peak resident memory (VmHWM after
resetting it through ``/proc/self/clear_refs``, minus VmRSS before; freed memory is handed back to the
OS between phases with ``malloc_trim``) and the phase's wall time:

- ``deepspeed files`` / ``deepspeed load``: ``engine.save`` / ``engine.load`` (DeepSpeed's sharded module +
  optimizer states: an exact resume; the same before and now);
- ``consolidate``: the fp32 master weights into ``model_fp32.safetensors``. Before: every rank built the
  whole dict (``safe_get_full_fp32_param`` per parameter, all-gathered, copied to host) and rank 0 called
  ``save_file``. Now: ``checkpoint.write_consolidated`` (rank 0 gathers and writes one parameter at a time);
- ``export``: the variant's ``save_pretrained``. Before: the whole ZeRO-3 module gathered on every rank.
  Now: ``engine.streaming_writer`` (rank 0 receives one parameter's partitions at a time);
- ``elastic read``: an elastic resume's read of the consolidated file. Before: ``load_file`` of the whole
  file on every rank. Now: ``checkpoint.iter_weights`` (one tensor at a time, into one buffer).

Printed per phase and rank: peak growth in MiB, its share of the consolidated fp32 size, the estimate
beside it, and seconds; then the goals (rank != 0 <= 5 % of the consolidated size, rank 0 <= 1.2 x the
largest parameter) checked on the measured numbers. The files are checked equal before vs now.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ["deepspeed files", "deepspeed load", "consolidate before", "consolidate now", "export before", "export now",
          "elastic read before", "elastic read now"]  # fmt: skip


def config(args: argparse.Namespace):
    from dist_cacheaug import load_config

    h, layers = args.hidden, args.layers
    kinds = ", ".join(
        ["sliding_attention", "full_attention"] * (layers // 2) + ["full_attention"] * (layers % 2)
    )
    sets = [
        f"model.decoder_config.hidden_size={h}",
        f"model.decoder_config.intermediate_size={4 * h}",
        f"model.decoder_config.num_hidden_layers={layers}",
        "model.decoder_config.num_attention_heads=8",
        "model.decoder_config.num_key_value_heads=4",
        f"model.decoder_config.head_dim={h // 8}",
        f"model.decoder_config.query_pre_attn_scalar={h // 8}",
        f"model.decoder_config.layer_types=[{kinds}]",
        "model.num_positions=2",
        "data.seq_len=32",
        "train.micro_batch_size=1",
        f"train.global_batch_size={args.ranks}",
        "zero.stage=3",
        "zero.shard_decoder=true",
        "zero.activation_checkpointing=true",
    ]
    return load_config(ROOT / "configs" / "tiny_cpu.yaml", sets)


class Peak:
    """Growth of this process's peak RSS over a phase, from the kernel's own high-water mark."""

    def __init__(self):
        self._libc = ctypes.CDLL("libc.so.6")

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def start(self) -> None:
        gc.collect()
        self._libc.malloc_trim(0)  # memory freed by the last phase goes back to the OS: a clean baseline
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        self.base, self.t0 = self._status("VmRSS"), time.perf_counter()

    def stop(self) -> dict:
        return {"peak_growth": self._status("VmHWM") - self.base, "seconds": time.perf_counter() - self.t0}


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out_dir: str) -> None:
    import torch
    from deepspeed.utils import safe_get_full_fp32_param
    from safetensors.torch import load_file, save_file

    from dist_cacheaug import distributed
    from dist_cacheaug.core.decoder import build_decoder
    from dist_cacheaug.core.model import sample_positions
    from dist_cacheaug.train import checkpoint
    from dist_cacheaug.train.engine import build_engine, gathered, streaming_writer
    from dist_cacheaug.variants import build_trainable

    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    env = distributed.DistEnv(rank, world, rank, world, "127.0.0.1", port, "env")
    device = torch.device("cpu")
    distributed.init_process_group(env, device)
    main, out, peak, result = rank == 0, Path(out_dir), Peak(), {"rank": rank}
    try:
        cfg = config(args)
        decoder = build_decoder(cfg.model, device=device, seed=0, load_device="cpu")
        model = build_trainable(cfg, decoder)
        model.enable_activation_checkpointing()
        eng = build_engine(cfg, model, world_size=world, device=device)
        m = cfg.model
        gen = torch.Generator().manual_seed(rank)
        ids = torch.randint(3, m.decoder_config["vocab_size"], (1, cfg.data.seq_len), generator=gen)
        pos = sample_positions(1, cfg.data.seq_len, m.num_positions, m.num_ahead, gen)
        eng.backward(eng.forward(ids, pos, m.num_ahead).loss)
        eng.step()

        def phase(name: str, fn) -> None:
            distributed.barrier()
            peak.start()
            fn()
            result[name] = peak.stop()
            distributed.barrier()

        def consolidate_before() -> None:  # the code this change replaced (train/engine.py, checkpoint.py)
            weights = {
                n: safe_get_full_fp32_param(p).detach().float().cpu().clone()
                for n, p in eng.engine.module.named_parameters()
            }
            if main:
                save_file(weights, str(out / "before.safetensors"))

        def export_before() -> None:
            with gathered(eng.engine.module):
                if main:
                    model.save_pretrained(out / "export_before")

        def export_now() -> None:  # what trainer._export does
            if main:
                model.save_pretrained(out / "export_now", streaming_writer(True))
            else:
                with tempfile.TemporaryDirectory() as scratch:
                    model.save_pretrained(scratch, streaming_writer(False))

        names = sorted(eng.fp32_specs())

        def read_before() -> None:
            weights = load_file(str(out / "now.safetensors"))
            result["read_sum"] = float(sum(float(t.sum()) for t in weights.values()))

        def read_now() -> None:
            result["read_sum_now"] = float(
                sum(float(t.sum()) for _, t in checkpoint.iter_weights(out / "now.safetensors", names))
            )

        phase("deepspeed files", lambda: eng.save(str(out / "ds")))
        phase("deepspeed load", lambda: eng.load(str(out / "ds")))
        phase("consolidate before", consolidate_before)
        phase("consolidate now", lambda: checkpoint.write_consolidated(eng, out / "now.safetensors", main))
        phase("export before", export_before)
        phase("export now", export_now)
        phase("elastic read before", read_before)
        phase("elastic read now", read_now)
        specs = eng.fp32_specs()
        result["params"] = sum(torch.Size(s).numel() for _, s in specs.values())
        result["largest"] = max(torch.Size(s).numel() for _, s in specs.values())
    finally:
        distributed.destroy()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def _same_files(a: Path, b: Path) -> bool:
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return fa == fb and all((a / f).read_bytes() == (b / f).read_bytes() for f in fa)


def main() -> None:
    import torch.multiprocessing as mp

    from dist_cacheaug.distributed import free_port

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--dir", default=None, help="where the files go (default: a temporary directory)")
    p.add_argument("--out", default=None, help="also write the numbers as JSON")
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        mp.spawn(worker, args=(args.ranks, free_port(), args, d), nprocs=args.ranks, join=True)
        ranks = [json.loads(Path(d, f"rank{r}.json").read_text()) for r in range(args.ranks)]
        same_weights = Path(d, "before.safetensors").read_bytes() == Path(d, "now.safetensors").read_bytes()
        same_export = _same_files(Path(d, "export_before"), Path(d, "export_now"))
    total = time.perf_counter() - t0

    params, largest = ranks[0]["params"], ranks[0]["largest"]
    size, big = 4 * params, 4 * largest
    mib = 2**20
    print(
        f"coprocessor + soft tokens {params / 1e6:.1f}M params ({args.layers} layers, hidden {args.hidden}): "
        f"consolidated fp32 {size / mib:,.0f} MiB, largest parameter {big / mib:.1f} MiB; ZeRO-3 over "
        f"{args.ranks} gloo ranks (1 thread each) on {os.cpu_count()} CPU cores; decoder sharded; {total:.0f} s"
    )
    # What each phase should cost a rank (fp32 on CPU: the 16-bit export copy is fp32 here too).
    estimate = {
        "deepspeed files": (None, None),
        "deepspeed load": (None, None),
        "consolidate before": (size, size),
        "consolidate now": (big, 0),
        "export before": (size, size),
        "export now": (big, 0),
        "elastic read before": (size, size),
        "elastic read now": (big, big),
    }
    print(
        f"{'phase':<20} {'rank':>4} {'peak growth MiB':>16} {'of consolidated':>16} {'estimate MiB':>13} {'s':>7}"
    )
    for name in PHASES:
        for r in ranks:
            est = estimate[name][0 if r["rank"] == 0 else 1]
            g, s = r[name]["peak_growth"], r[name]["seconds"]
            shown = "–" if est is None else f"{est / mib:,.1f}"
            print(f"{name:<20} {r['rank']:>4} {g / mib:16,.1f} {100 * g / size:15.1f}% {shown:>13} {s:7.1f}")
    print("before / now, worst rank:")
    goals = []
    for what in ("consolidate", "export", "elastic read"):
        b = max(r[f"{what} before"]["peak_growth"] for r in ranks)
        n = max(r[f"{what} now"]["peak_growth"] for r in ranks)
        print(f"  {what:<13} {b / mib:9,.1f} MiB -> {n / mib:7,.1f} MiB  ({b / max(n, 1):.0f}x less)")
    others = max(r["consolidate now"]["peak_growth"] for r in ranks[1:])
    rank0 = ranks[0]["consolidate now"]["peak_growth"]
    goals.append(
        ("save: rank != 0 extra <= 5 % of the consolidated size", others <= 0.05 * size, others / size)
    )
    goals.append(("save: rank 0 extra <= 1.2 x the largest parameter", rank0 <= 1.2 * big, rank0 / big))
    for label, ok, ratio in goals:
        print(f"  goal {label}: {'met' if ok else 'NOT met'} ({ratio:.3f})")
    print(f"  files: consolidated before == now: {same_weights}; export before == now: {same_export}")
    print(
        f"  elastic read sums agree: {all(abs(r['read_sum'] - r['read_sum_now']) < 1e-6 * abs(r['read_sum']) + 1e-9 for r in ranks)}"
    )
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "ranks": ranks}, indent=1))


if __name__ == "__main__":
    main()
