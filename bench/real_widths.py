"""Real widths without a GPU: Gemma-2 2B/9B/27B and Llama-3 8B/70B shapes, cut to 2 layers, end to end.

    python bench/real_widths.py [--models gemma2-2b gemma2-9b llama3-8b gemma2-27b llama3-70b]
                                [--variant coprocessor|pause] [--ranks N] [--out DIR] [--keep] [--force]

For each model: a random decoder with the real per-layer shapes and vocabulary but ``num_hidden_layers=2``
is saved as a local HF directory (safetensors); the real ``cacheaug train`` trains a coprocessor on it for
2 steps (seq 512, P = 8, N_L = 16, N_A = 16, micro = global batch 1, ZeRO-3, fp32 on CPU) on synthetic
shards (bench/train.py's make_data); then the export is reloaded with ``CacheAugmentedLM.from_pretrained``,
``cacheaug eval`` and ``cacheaug generate`` run on the run directory. Every step is its own process.

Memory: the peak RSS of each child process (``os.wait4`` rusage, ``ru_maxrss``), and the ``peak_mem_gib``
column of the run's metrics.jsonl (the trainer's own peak RSS at its last logged step, i.e. after the
2nd optimizer step and before the final checkpoint + export). The baseline is the peak RSS of a process
that imports torch, transformers, deepspeed and dist_cacheaug and builds nothing. Both are printed beside
``estimate.memory_estimate(cfg, world_size=1, bf16=False)`` for the same config (the trainer runs fp32 on
CPU: decoder dtype "auto" = float32, DeepSpeed bf16 off).

Big bases (gemma2-27b, llama3-70b; ``SHARDED``) run as their configs do: 2 ranks (launchers/local.sh) with
the frozen decoder sharded (``zero.shard_decoder``), global batch 2; the estimate is then per rank,
``memory_estimate(cfg, world_size=2, bf16=False)``, and ``ru_maxrss`` is the largest rank's. Their random
decoders are written one tensor at a time (``save_streaming``), since a whole fp32 copy of them may not fit.
``--variant pause`` trains N_L soft tokens through the same sharded decoder (prefix pass, trace pass,
backward into the soft tokens) without a coprocessor, for machines too small for the 2-layer coprocessor's
optimizer state.

Each model needs roughly 9 GiB (gemma2-2b), 18 GiB (gemma2-9b), 20 GiB (llama3-8b) of RAM; the big bases
print their estimate. A model whose estimate (× ranks) does not fit in MemAvailable is skipped unless
--force. Results: docs/real_widths.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GiB = 1024**3

#: name -> (run config YAML whose training recipe is used, HF config kwargs with the real widths)
MODELS: dict[str, tuple[str, dict]] = {
    "gemma2-2b": ("configs/gemma2_2b_paper.yaml", {}),  # decoder_config from the YAML
    "gemma2-9b": ("configs/gemma2_9b_paper.yaml", {}),
    "llama3-8b": (
        "configs/gemma2_2b_paper.yaml",  # same recipe; decoder_path (a llama dir) overrides decoder_config
        {
            "model_type": "llama",
            "vocab_size": 128256,
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "rope_theta": 500000.0,
            "rms_norm_eps": 1e-5,
            "max_position_embeddings": 8192,
            "tie_word_embeddings": False,
            "bos_token_id": 128000,
            "eos_token_id": 128001,
        },
    ),
}
MODELS["gemma2-27b"] = ("configs/gemma2_27b_shard.yaml", {})
MODELS["llama3-70b"] = ("configs/llama3_70b_shard.yaml", {})
#: run on RANKS_SHARDED ranks with the frozen decoder sharded, as their configs do
SHARDED = {"gemma2-27b", "llama3-70b"}
RANKS_SHARDED = 2
NUM_LAYERS = 2
SHAPE = {"seq_len": 512, "num_positions": 8, "num_latents": 16, "num_ahead": 16}


def hf_kwargs(name: str) -> dict:
    """The decoder's HF config kwargs: real widths, depth cut to NUM_LAYERS (layer_types cut too)."""
    from dist_cacheaug import load_config

    yaml_path, extra = MODELS[name]
    kw = dict(extra or load_config(ROOT / yaml_path).model.decoder_config)
    kw["num_hidden_layers"] = NUM_LAYERS
    if kw["model_type"] == "gemma2":  # Gemma-2 alternates sliding / global attention, sliding first
        kw["layer_types"] = [
            "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(NUM_LAYERS)
        ]
    return kw


def ranks_of(name: str) -> int:
    return RANKS_SHARDED if name in SHARDED else 1


def overrides(
    decoder_dir: Path, shards: Path, tok: Path, run_dir: Path, *, ranks: int = 1, variant: str = "coprocessor"
) -> list[str]:
    sharded = [f"zero.shard_decoder={str(ranks > 1).lower()}"]
    return [
        *sharded,
        f"model.variant={variant}",
        f"model.decoder_path={decoder_dir}",
        f"model.num_positions={SHAPE['num_positions']}",
        f"model.num_latents={SHAPE['num_latents']}",
        f"model.num_ahead={SHAPE['num_ahead']}",
        # loss_chunk_size stays the YAML's 1024: min(1024, micro·P·N_A = 128) rows of logits per chunk
        f"data.seq_len={SHAPE['seq_len']}",
        f"data.train_shards=[{shards}]",
        f"data.val_shards=[{shards}]",
        f"data.tokenizer={tok}",
        "data.num_workers=0",
        "data.shuffle_buffer=16",
        f"train.run_dir={run_dir}",
        "train.max_steps=2",
        "train.micro_batch_size=1",
        f"train.global_batch_size={ranks}",
        "train.log_interval=1",
        "train.eval_interval=0",  # evaluation is `cacheaug eval` below
        "train.checkpoint_interval=2",
        "train.keep_checkpoints=1",
        "optim.warmup_steps=1",
        "logging.tensorboard=false",
        "logging.console=true",
    ]


# ---- child processes, each measured on its own -------------------------------------------------------


def _proc_status(pid: int) -> dict[str, int]:
    """VmRSS / RssAnon / RssFile of ``pid`` and its descendants (a launcher's ranks), summed, in KiB
    ({} once it is gone). Pages several processes map (a decoder's mmap'd safetensors in each rank)
    count once per process here."""
    total: dict[str, int] = {}
    keys = ("VmRSS", "RssAnon", "RssFile")
    for p in _tree(pid):
        try:
            text = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        for k, v in (ln.split(":", 1) for ln in text.splitlines()):
            if k in keys:
                total[k] = total.get(k, 0) + int(v.split()[0])
    return total


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (/proc/PID/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*") if Path(f"/proc/{p}/task").is_dir() else []:
            try:
                todo.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                pass
    return out


def run_measured(cmd: list[str], log: Path, timeout: float = 3600) -> dict:
    """Run ``cmd`` (DS_ACCELERATOR=cpu), output to ``log``; return rc, wall seconds, peak RSS in GiB.

    ``peak_rss_gib`` is the kernel's high-water mark (``ru_maxrss`` from ``os.wait4``; for a launcher,
    the largest of it and its ranks). The process tree is also sampled every 0.1 s (/proc/PID/status,
    summed over the ranks): ``sampled_peak`` splits the largest sampled RSS into anonymous memory and
    file-backed pages (safetensors weights are mmap'd: file-backed), and ``LOG.rss.tsv`` holds the
    timeline."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    peak: dict[str, int] = {}
    with log.open("w") as f, log.with_suffix(".rss.tsv").open("w") as tl:
        tl.write("t_s\trss_gib\tanon_gib\tfile_gib\n")
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        deadline = t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            st = _proc_status(proc.pid)
            if st.get("VmRSS", 0) > peak.get("VmRSS", 0):
                peak = st
            if st:
                tl.write(
                    f"{time.perf_counter() - t0:.1f}\t{st['VmRSS'] / 2**20:.3f}\t"
                    f"{st.get('RssAnon', 0) / 2**20:.3f}\t{st.get('RssFile', 0) / 2**20:.3f}\n"
                )
            time.sleep(0.1)
    proc.returncode = os.waitstatus_to_exitcode(status)  # keep Popen from waiting again
    return {
        "rc": proc.returncode,
        "wall_s": time.perf_counter() - t0,
        "peak_rss_gib": usage.ru_maxrss * 1024 / GiB,  # KiB on Linux
        "sampled_peak": {k: v / 2**20 for k, v in peak.items()},
        "log": str(log),
    }


def sampled_footprint(log: str) -> tuple[float, float] | None:
    """(max anonymous RSS, max file-backed RSS) in GiB over a run's 0.1 s samples. The frozen decoder's
    safetensors are mmap'd, so its weights are file-backed pages that the kernel may evict under memory
    pressure (and fault back in): their sum is the footprint that does not depend on that."""
    tsv = Path(log).with_suffix(".rss.tsv")
    if not tsv.is_file():
        return None
    rows = [line.split("\t") for line in tsv.read_text().splitlines()[1:]]
    if not rows:
        return None
    return max(float(r[2]) for r in rows), max(float(r[3]) for r in rows)


def tail(path: str, n: int = 3000) -> str:
    return Path(path).read_text(errors="replace")[-n:]


def child_baseline() -> None:
    import deepspeed  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import dist_cacheaug  # noqa: F401
    from dist_cacheaug.train import (
        trainer,  # noqa: F401
    )


def child_save(name: str, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from dist_cacheaug.core.decoder import hf_config_from_dict

    hf = hf_config_from_dict(hf_kwargs(name))
    if name in SHARDED:
        print(json.dumps({"params": save_streaming(hf, Path(out))}))
        return
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"params": n}))


def save_streaming(hf, out: Path, shard_bytes: int = 2 * GiB) -> int:
    """A random fp32 HF checkpoint of architecture ``hf`` written one tensor at a time into safetensors
    shards of about ``shard_bytes`` with an index, so no whole copy of the model is ever in memory.
    Weights: normal(0, ``initializer_range``) for matrices; norms 0 for Gemma-2 (its RMSNorm scales by
    1 + w) and 1 otherwise. Returns the number of parameters."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    shapes = {n: p.shape for n, p in model.named_parameters()}  # tied weights appear once
    gen = torch.Generator().manual_seed(0)
    norm = 0.0 if hf.model_type == "gemma2" else 1.0
    weight_map, shard, size, files, total = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, size, files
        if shard:
            files += 1
            name = f"model-{files:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    for name, shape in shapes.items():
        if len(shape) >= 2:
            t = torch.empty(shape).normal_(0.0, hf.initializer_range, generator=gen)
        else:
            t = torch.full(shape, norm)
        total += t.numel()
        if size and size + t.numel() * 4 > shard_bytes:
            flush()
        shard[name] = t
        size += t.numel() * 4
    flush()
    index = {"metadata": {"total_size": total * 4}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    hf.save_pretrained(out)
    return total


def child_reload(run_dir: str) -> None:
    import torch
    from safetensors.torch import load_file

    from dist_cacheaug import load_config
    from dist_cacheaug.core.decoder import build_decoder
    from dist_cacheaug.train import checkpoint
    from dist_cacheaug.variants import load_pretrained

    cfg = load_config(Path(run_dir) / "config.yaml")
    decoder = build_decoder(cfg.model, device="cpu")
    model = load_pretrained(Path(run_dir) / "export", decoder=decoder).eval()
    # the export is the trained state: compare with the final checkpoint's consolidated fp32 weights
    ckpt = checkpoint.latest(Path(run_dir) / "checkpoints")
    weights = load_file(str(ckpt / checkpoint.WEIGHTS))
    ours = dict(model.named_parameters())
    matched = [k for k in weights if k in ours]
    max_diff = max(float((weights[k] - ours[k].float()).abs().max()) for k in matched) if matched else None
    with torch.no_grad():
        out = model.augment(torch.randint(4, 400, (1, 32)))
    latents = getattr(out, "latents", None)
    print(
        json.dumps(
            {
                "coprocessor_params": sum(p.numel() for p in model.parameters()),  # trainable part
                "decoder_params": sum(p.numel() for p in decoder.parameters()),
                "checkpoint_tensors_matched": len(matched),
                "checkpoint_tensors": len(weights),
                "max_abs_diff_vs_checkpoint": max_diff,
                "latents_shape": list(latents.shape) if latents is not None else None,
                "latents_finite": bool(torch.isfinite(latents).all()) if latents is not None else None,
            }
        )
    )


# ---- one model ----------------------------------------------------------------------------------------


def mem_available_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def bench_model(
    name: str,
    out: Path,
    data: Path,
    baseline_gib: float,
    keep: bool,
    force: bool,
    variant: str = "coprocessor",
    ranks: int | None = None,
) -> dict:
    from dist_cacheaug import load_config
    from dist_cacheaug.train.estimate import memory_estimate, param_counts

    yaml_path = str(ROOT / MODELS[name][0])
    work = out / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    dec_dir, run_dir = work / "decoder_hf", work / "run"
    shards, tok = data / "shards", data / "tok"
    me = [sys.executable, str(Path(__file__).resolve())]
    cli = [sys.executable, "-m", "dist_cacheaug.cli"]
    ranks = ranks or ranks_of(name)
    row: dict = {"model": name, "steps": {}, "ranks": ranks, "variant": variant}

    sets = overrides(dec_dir, shards, tok, run_dir, ranks=ranks, variant=variant)
    # the 2-layer architecture, before its directory exists (decoder_path would fall back to the YAML's)
    cfg = load_config(yaml_path, sets)
    two_layers = dataclasses.replace(cfg.model, decoder_path=None, decoder_config=hf_kwargs(name))
    cfg = dataclasses.replace(cfg, model=two_layers)
    counts = param_counts(cfg)
    est = memory_estimate(cfg, world_size=ranks, bf16=False)
    row.update(
        decoder_params=counts.decoder,
        coprocessor_params=counts.coprocessor,
        embedding_params=counts.embedding,
        estimate_gib={k: v / GiB for k, v in est.items()},
    )
    need = ranks * (row["estimate_gib"]["total"] + baseline_gib) + 0.5
    avail = mem_available_gib()
    if avail is not None and avail < need and not force:
        print(
            f"[{name}] SKIPPED: {ranks} rank(s) x (estimate {row['estimate_gib']['total']:.1f} + baseline "
            f"{baseline_gib:.1f} GiB) = ~{need:.1f} GiB, {avail:.1f} GiB available (--force to run anyway)"
        )
        row["skipped"] = f"needs ~{need:.1f} GiB, {avail:.1f} GiB available"
        return row

    r = run_measured([*me, "--_child", "save", name, str(dec_dir)], work / "save.log")
    row["steps"]["save"] = r
    if r["rc"]:
        print(f"[{name}] save FAILED:\n{tail(r['log'])}")
        return row
    print(
        f"[{name}] saved random decoder to {dec_dir} in {r['wall_s']:.0f}s (peak {r['peak_rss_gib']:.2f} GiB)"
    )

    train_args = ["--config", yaml_path, *[a for s in sets for a in ("--set", s)]]
    if ranks == 1:
        train_cmd = [*cli, "train", *train_args]
    else:
        train_cmd = ["bash", str(ROOT / "launchers" / "local.sh"), str(ranks), *train_args[1:]]
    r = run_measured(train_cmd, work / "train.log")
    row["steps"]["train"] = r
    metrics_path = run_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics_path.read_text().splitlines()] if metrics_path.is_file() else []
    steps = [m for m in rows if "step_time" in m]
    row["metrics_peak_gib"] = max((m["peak_mem_gib"] for m in steps), default=None)
    row["step_times"] = [m["step_time"] for m in steps]
    row["losses"] = [m.get("loss") for m in steps]
    row["export_ok"] = (run_dir / "export" / "cacheaug_config.json").is_file()
    if r["rc"] or not row["export_ok"]:
        print(f"[{name}] train FAILED (rc {r['rc']}):\n{tail(r['log'])}")
        return row
    print(
        f"[{name}] trained 2 steps in {r['wall_s']:.0f}s (step times {', '.join(f'{t:.1f}' for t in row['step_times'])} s; "
        f"losses {row['losses']}); peak RSS {r['peak_rss_gib']:.2f} GiB (process), "
        f"{row['metrics_peak_gib']:.2f} GiB (metrics.jsonl, after step 2)"
    )

    r = run_measured([*me, "--_child", "reload", str(run_dir)], work / "reload.log")
    row["steps"]["reload"] = r
    if r["rc"] == 0:
        info = json.loads(Path(r["log"]).read_text().strip().splitlines()[-1])
        r["info"] = info
        ok = (
            info["coprocessor_params"] == counts.coprocessor
            and info["decoder_params"] == counts.decoder
            and info["checkpoint_tensors_matched"] == info["checkpoint_tensors"]
            and info["max_abs_diff_vs_checkpoint"] == 0.0
            and info["latents_finite"] is not False
        )
        r["ok"] = ok
        print(f"[{name}] reload {'ok' if ok else 'MISMATCH'}: {info}")
    else:
        print(f"[{name}] reload FAILED:\n{tail(r['log'])}")

    r = run_measured(
        [
            *cli,
            "eval",
            "--checkpoint",
            str(run_dir),
            "--data",
            str(shards),
            "--device",
            "cpu",
            "--max-sequences",
            "1",
            "--positions",
            "stride",
            "128",
            "--max-k",
            "16",
            "--out",
            str(work / "eval_out"),
            "--no-progress",
        ],
        work / "eval.log",
    )
    row["steps"]["eval"] = r
    if r["rc"] == 0 and (work / "eval_out" / "results.json").is_file():
        print(f"[{name}] eval ok in {r['wall_s']:.0f}s: {work / 'eval_out' / 'results.json'}")
    else:
        r["rc"] = r["rc"] or 1
        print(f"[{name}] eval FAILED:\n{tail(r['log'])}")

    r = run_measured(
        [
            *cli,
            "generate",
            "--checkpoint",
            str(run_dir),
            "--device",
            "cpu",
            "--tokenizer",
            str(tok),
            "--prompt",
            "the quick brown fox jumps over",
            "--max-new-tokens",
            "8",
        ],
        work / "generate.log",
    )
    row["steps"]["generate"] = r
    text = Path(r["log"]).read_text(errors="replace")
    if r["rc"] == 0 and "tokens in" in text:
        r["summary"] = [x for x in text.splitlines() if x.startswith("[") and "tokens in" in x][-1]
        print(f"[{name}] generate ok: {r['summary']}")
    else:
        r["rc"] = r["rc"] or 1
        print(f"[{name}] generate FAILED:\n{tail(r['log'])}")

    if not keep:  # GBs of weights, optimizer states and exports
        for d in (dec_dir, run_dir / "checkpoints", run_dir / "export"):
            shutil.rmtree(d, ignore_errors=True)
    return row


def fmt_table(rows: list[dict], baseline: float) -> str:
    cols = [
        "model (2 layers)",
        "decoder params",
        "coprocessor params",
        "peak RSS, whole train process (GiB)",
        "peak RSS at step 2, metrics.jsonl (GiB)",
        "baseline (GiB)",
        "step-2 peak − baseline (GiB)",
        "estimate (GiB)",
        "ratio (peak − baseline) / estimate",
        "max anon + max file-backed RSS, sampled (GiB)",
        "train wall (s)",
        "step times (s)",
        "train / export / reload / eval / generate",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        st = r["steps"]

        def ok(k, r=r, st=st):
            if k == "export":
                return "—" if "export_ok" not in r else ("ok" if r["export_ok"] else "FAIL")
            return "—" if k not in st else ("ok" if st[k]["rc"] == 0 and st[k].get("ok", True) else "FAIL")

        est = r.get("estimate_gib", {}).get("total")
        m = r.get("metrics_peak_gib")
        tr = st.get("train", {})
        nan = float("nan")
        fp = sampled_footprint(tr["log"]) if tr.get("log") else None
        label = r["model"]
        if r.get("ranks", 1) > 1 or r.get("variant", "coprocessor") != "coprocessor":
            label += f" ({r.get('ranks', 1)} ranks, decoder sharded, {r.get('variant', 'coprocessor')})"
        cells = [
            label,
            f"{r.get('decoder_params', 0) / 1e9:.3f}B",
            f"{r.get('coprocessor_params', 0) / 1e9:.3f}B",
            f"{tr.get('peak_rss_gib', nan):.2f}",
            f"{m:.2f}" if m else "—",
            f"{baseline:.2f}",
            f"{m - baseline:.2f}" if m else "—",
            f"{est:.2f}" if est else "—",
            f"{(m - baseline) / est:.2f}" if m and est else "—",
            f"{fp[0]:.2f} + {fp[1]:.2f} = {fp[0] + fp[1]:.2f}" if fp else "—",
            f"{tr.get('wall_s', nan):.0f}",
            ", ".join(f"{t:.1f}" for t in r.get("step_times", [])) or "—",
            " / ".join(ok(k) for k in ("train", "export", "reload", "eval", "generate")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fmt_parts(rows: list[dict]) -> str:
    keys = [
        "frozen_decoder",
        "decoder_gathered_layers",
        "coprocessor_params",
        "coprocessor_grads",
        "optimizer_state",
        "prefix_kv_cache",
        "activations",
        "loss_chunk",
        "optimizer_step_transient",
        "total",
    ]
    lines = [
        "| estimate part (GiB) | " + " | ".join(r["model"] for r in rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    for k in keys:
        lines.append(
            f"| {k} | "
            + " | ".join(f"{r.get('estimate_gib', {}).get(k, float('nan')):.2f}" for r in rows)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        what, *rest = sys.argv[2:]
        {"baseline": child_baseline, "save": child_save, "reload": child_reload}[what](*rest)
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--out", default=None, help="work dir (default: a temp dir, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep decoder weights, checkpoints and exports")
    p.add_argument("--force", action="store_true", help="train even when MemAvailable looks too small")
    p.add_argument(
        "--ranks",
        type=int,
        default=None,
        help="ranks for every model (2 or more: decoder sharded); default 1, big bases 2",
    )
    p.add_argument(
        "--variant",
        choices=["coprocessor", "pause"],
        default="coprocessor",
        help="what is trained (pause: soft tokens only, through the same frozen decoder)",
    )
    args = p.parse_args()
    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="real_widths_")
        out = Path(tmp.name)
    else:
        out = Path(args.out).resolve()
        out.mkdir(parents=True, exist_ok=True)
    try:
        from bench.train import make_data

        data = out / "data"
        if not (data / "shards" / "manifest.json").is_file():
            shutil.rmtree(data, ignore_errors=True)
            data.mkdir(parents=True)
            make_data(data, SHAPE["seq_len"])
        me = [sys.executable, str(Path(__file__).resolve())]
        b = run_measured([*me, "--_child", "baseline"], out / "baseline.log")
        if b["rc"]:
            raise SystemExit(f"baseline process failed:\n{tail(b['log'])}")
        baseline = b["peak_rss_gib"]
        print(
            f"baseline (imports torch, transformers, deepspeed, dist_cacheaug): peak RSS {baseline:.2f} GiB"
        )
        results = out / "results.json"  # with --out, rows of models run earlier into the same dir are kept
        rows = json.loads(results.read_text())["rows"] if results.is_file() else []
        for name in args.models:
            rows = [r for r in rows if r["model"] != name]
            rows.append(
                bench_model(name, out, data, baseline, args.keep, args.force, args.variant, args.ranks)
            )
            rows.sort(key=lambda r: list(MODELS).index(r["model"]))
            results.write_text(json.dumps({"baseline_gib": baseline, "rows": rows}, indent=1))
        print(
            f"\nreal widths, {NUM_LAYERS} layers; seq {SHAPE['seq_len']}, P={SHAPE['num_positions']}, "
            f"N_L={SHAPE['num_latents']}, N_A={SHAPE['num_ahead']}, micro batch 1 per rank, ZeRO-3, fp32, "
            f"{os.cpu_count()} cores; ranks per row (2 or more: decoder sharded); estimate = "
            "memory_estimate(cfg, world_size=ranks, bf16=False), per rank\n"
        )
        print(fmt_table(rows, baseline))
        print()
        print(fmt_parts(rows))
        print(f"\nresults: {out / 'results.json'}" if tmp is None else "")
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
