"""The ``cacheaug`` command line. Subcommands load one config tree (``--config`` + ``--set``) and hand
it to the module that owns the work; heavy imports happen inside each subcommand."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .config import ConfigError, RunConfig, deepspeed_config, field_docs, load_config
from .errors import UserError


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=3e-4 (repeatable; values parsed as YAML)",
    )


def _add_config_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        p.add_argument("config", help="run config YAML (see configs/)")
    else:
        p.add_argument("--config", required=True, help="run config YAML (see configs/)")
    _add_overrides(p)


def _fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def cmd_config(args) -> int:
    import dataclasses

    from .train.estimate import (
        checkpoint_estimate,
        compute_seconds_per_micro,
        decoder_comm,
        flops_per_sequence,
        memory_estimate,
        param_counts,
        zero_comm,
    )

    path = args.config_opt or args.config
    if path is None:
        raise ConfigError("config: give the run config YAML (cacheaug config PATH or --config PATH)")
    if args.config_opt and args.config and args.config_opt != args.config:
        raise ConfigError(
            f"config: two config files given ({args.config} and --config {args.config_opt}); give one"
        )
    cfg = load_config(path, args.overrides)
    if args.get:  # one resolved value, for scripts (e.g. slurm/train.sbatch reads train.run_dir)
        value = cfg.to_dict()
        for part in args.get.split("."):
            if not isinstance(value, dict) or part not in value:
                raise ConfigError(f"--get {args.get}: no such config key")
            value = value[part]
        print(value if isinstance(value, (str, int, float)) else json.dumps(value))
        return 0
    world = args.world_size or int(os.environ.get("WORLD_SIZE", 1))
    bf16 = not args.fp32
    ds = deepspeed_config(cfg, world, bf16=bf16)
    if args.json:
        print(json.dumps({"config": cfg.to_dict(), "deepspeed": ds}, indent=2))
        return 0
    for flag, value in (
        ("--gpus-per-node", args.gpus_per_node),
        ("--intra-node-gbs", args.intra_node_gbs),
        ("--inter-node-gbs", args.inter_node_gbs),
        ("--peak-tflops", args.peak_tflops),
    ):
        if not value > 0:
            raise ConfigError(f"{flag} must be > 0, got {value}")
    if not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {args.mfu}")
    counts = param_counts(cfg)
    mem = memory_estimate(cfg, world, bf16=bf16)
    flops = flops_per_sequence(cfg)
    accum = cfg.grad_accum_steps(world)
    print("# resolved config\n" + cfg.to_yaml())
    print("# DeepSpeed config (generated)\n" + json.dumps(ds, indent=2))
    print("\n# run size")
    print(
        f"world size {world} × micro batch {cfg.train.micro_batch_size} × grad accumulation {accum} "
        f"= global batch {cfg.train.global_batch_size} sequences of {cfg.data.seq_len} tokens"
    )
    print(
        f"tokens per step {cfg.tokens_per_step():,}; steps {cfg.train.max_steps:,}; "
        f"training tokens {cfg.total_tokens():,} ({cfg.total_tokens() / 1e9:.1f}B)"
    )
    print(
        f"parameters: frozen decoder {_fmt_count(counts.decoder)}, trainable coprocessor "
        f"{_fmt_count(counts.coprocessor)} (incl. {counts.soft_tokens:,} soft-token values; its unused input "
        f"embeddings, {_fmt_count(counts.embedding)}, are dropped)"
    )
    print(
        f"FLOPs per sequence {flops['total']:.3e} = {flops['ratio_to_plain_lm']:.2f}× a plain LM training step "
        "on the same tokens (analytic model, dist_cacheaug/train/estimate.py)"
    )
    z = cfg.zero
    hpz = f" + hpZ {z.hpz_partition_size}" if z.hpz_partition_size > 1 else ""
    print(
        f"\n# memory per GPU (estimate, {'bf16' if bf16 else 'fp32'}, ZeRO stage {z.stage}{hpz}, "
        f"activation checkpointing {'on' if z.activation_checkpointing else 'off'}, frozen decoder "
        f"{_decoder_layout_name(cfg, world)})"
    )
    for k, v in mem.items():
        print(f"  {k:24s} {v / 2**30:8.2f} GiB")
    ck = checkpoint_estimate(cfg, world)
    print(
        f"\n# checkpoint (estimate, dist_cacheaug/train/checkpoint.py): {ck['bytes_per_save'] / 2**30:,.2f} GiB "
        f"written per save (DeepSpeed's states {ck['deepspeed_bytes_per_rank'] / 2**30:,.2f} GiB per rank + the "
        f"consolidated fp32 {ck['consolidated_bytes'] / 2**30:,.2f} GiB); extra host memory during a save: "
        f"rank 0 {ck['save_peak_rank0'] / 2**30:,.3f} GiB (its largest parameter), other ranks "
        f"{ck['save_peak_other_ranks'] / 2**30:,.3f} GiB (a whole fp32 copy per rank would be "
        f"{ck['whole_copy'] / 2**30:,.2f} GiB)"
    )

    # ---- communication: bytes each GPU moves, time at stated bandwidths, next to compute ----------
    gpn, intra, inter = args.gpus_per_node, args.intra_node_gbs, args.inter_node_gbs
    peak = args.peak_tflops * 1e12
    compute = compute_seconds_per_micro(cfg, peak_flops=peak, mfu=args.mfu)
    print(
        f"\n# communication per GPU (estimate: coprocessor {_fmt_count(counts.coprocessor)} params, "
        f"{'bf16' if bf16 else 'fp32'}, ring collectives; bandwidth per GPU: intra-node {intra:g} GB/s, "
        f"inter-node {inter:g} GB/s, {gpn} GPUs per node; GB = 1e9 B)"
    )
    print(
        f"compute per micro-step {compute:.3f} s = {flops['total']:.3e} FLOPs × {cfg.train.micro_batch_size} "
        f"sequence{'s' if cfg.train.micro_batch_size > 1 else ''} at {args.mfu:.0%} MFU of {args.peak_tflops:g} TFLOP/s "
        f"(--peak-tflops, --mfu){'' if z.shard_decoder else '; the frozen decoder replica moves nothing'}"
    )
    worlds = [world] if world > 1 else []
    if not worlds:
        glob, micro = cfg.train.global_batch_size, cfg.train.micro_batch_size
        worlds = [w for w in (gpn, 8 * gpn) if glob % (micro * w) == 0]
        print(
            f"world size 1 moves nothing; shown for world sizes {', '.join(map(str, worlds)) or '(none fit)'} "
            "instead (--world-size N for yours)"
        )

    def layout_cfg(stage, h):
        return dataclasses.replace(
            cfg,
            zero=dataclasses.replace(
                z, stage=stage, hpz_partition_size=h, offload_params=z.offload_params and stage == 3
            ),
        )

    for w in worlds:
        acc = cfg.grad_accum_steps(w)
        nodes = -(-w // gpn)
        comm = zero_comm(
            counts.coprocessor,
            w,
            z.stage,
            acc,
            hpz_partition_size=z.hpz_partition_size,
            bf16=bf16,
            gpus_per_node=gpn,
        )
        print(
            f"\nworld size {w} ({nodes} node{'s' if nodes > 1 else ''} of <= {gpn}), grad accumulation {acc}, "
            f"ZeRO stage {z.stage}{hpz}:"
        )
        dec = decoder_comm(cfg, w, acc, bf16=bf16, gpus_per_node=gpn)
        both = type(comm)(comm.collectives + dec.collectives)
        print(f"  {'collective':58s} {'GB each':>8s} {'/micro':>6s} {'/step':>6s}  link")
        for c in both.collectives:
            link = f"{'inter' if c.inter_node else 'intra'}-node, {c.group} ranks"
            print(f"  {c.what:58s} {c.nbytes / 1e9:8.2f} {c.per_micro:6d} {c.per_step:6d}  {link}")
        print(
            f"  per micro-step: {both.bytes_per_micro() / 1e9:.2f} GB, {both.seconds_per_micro(intra, inter):.3f} s "
            f"(compute {compute:.3f} s); per optimizer step: {both.bytes_per_step() / 1e9:.2f} GB, "
            f"{both.seconds_per_step(intra, inter):.3f} s (compute {compute * acc:.3f} s)"
        )
        layouts = [(3, 1), (2, 1)]
        if w > gpn and w % gpn == 0:
            layouts.insert(1, (3, gpn))
        if (z.stage, z.hpz_partition_size) not in layouts:
            layouts.insert(0, (z.stage, z.hpz_partition_size))
        extra = " (+ the sharded decoder's gathers, the same in every row)" if dec.collectives else ""
        print(f"  layouts at world size {w} (memory per GPU vs bytes moved per GPU{extra}; * = this config):")
        print(
            f"    {'layout':16s} {'memory GiB':>10s} {'GB/micro':>9s} {'GB/step':>8s} {'comm s/step':>11s} {'compute s/step':>14s}"
        )
        for stage, h in layouts:
            if stage == 0 and bf16:
                continue
            alt = zero_comm(
                counts.coprocessor, w, stage, acc, hpz_partition_size=h, bf16=bf16, gpus_per_node=gpn
            )
            m = memory_estimate(layout_cfg(stage, h), w, bf16=bf16)["total"]
            name = f"stage {stage}" + (f" + hpZ {h}" if h > 1 else "")
            mark = "*" if (stage, h) == (z.stage, z.hpz_partition_size) else " "
            alt = type(alt)(alt.collectives + dec.collectives)
            print(
                f"  {mark} {name:16s} {m / 2**30:10.2f} {alt.bytes_per_micro() / 1e9:9.2f} "
                f"{alt.bytes_per_step() / 1e9:8.2f} {alt.seconds_per_step(intra, inter):11.3f} {compute * acc:14.3f}"
            )
        _print_decoder_layouts(
            cfg, w, bf16=bf16, gpus_per_node=gpn, intra=intra, inter=inter, compute=compute
        )
    print(
        "comm overlaps compute (overlap_comm, prefetch) where it can: it is exposed only beyond the compute "
        "time; see docs/zero_layouts.md"
    )
    return 0


def _decoder_layout_name(cfg: RunConfig, world: int) -> str:
    from .train.estimate import decoder_shard_group

    g = decoder_shard_group(cfg, world)
    return "replicated" if g <= 1 else f"sharded over {g} ranks"


def _print_decoder_layouts(
    cfg: RunConfig, w: int, *, bf16: bool, gpus_per_node: int, intra: float, inter: float, compute: float
) -> None:
    """The frozen decoder replicated vs sharded (``zero.shard_decoder``) at world size ``w``: memory
    per GPU (the decoder's part and the whole estimate) and the bytes its gathers add."""
    import dataclasses

    from .train.estimate import decoder_comm, decoder_shard_group, memory_estimate, param_counts

    counts = param_counts(cfg)
    acc = cfg.grad_accum_steps(w)
    here = decoder_shard_group(cfg, w)
    layouts = [(False, 0)]
    if w > gpus_per_node and w % gpus_per_node == 0:
        layouts.append((True, gpus_per_node))
    layouts.append((True, 0))
    print(
        f"  frozen decoder at world size {w}: {_fmt_count(counts.decoder_layers)} params in "
        f"{counts.num_layers} layers (split when sharded), {_fmt_count(counts.decoder - counts.decoder_layers)} "
        "in embeddings, norm and head (always whole); * = this config:"
    )
    print(
        f"    {'layout':28s} {'decoder GiB':>11s} {'total GiB':>9s} {'GB/micro':>9s} {'GB/step':>8s} "
        f"{'comm s/step':>11s} {'compute s/step':>14s}"
    )
    for shard, size in layouts:
        lay = dataclasses.replace(
            cfg, zero=dataclasses.replace(cfg.zero, shard_decoder=shard, decoder_shard_size=size)
        )
        g = decoder_shard_group(lay, w)
        mem = memory_estimate(lay, w, bf16=bf16)
        comm = decoder_comm(lay, w, acc, bf16=bf16, gpus_per_node=gpus_per_node)
        if g <= 1:
            name = "replicated"
        else:
            name = f"sharded over {g} ({'1 node' if g <= gpus_per_node else 'all ranks'})"
        mark = "*" if g == here else " "
        print(
            f"  {mark} {name:28s} {(mem['frozen_decoder'] + mem['decoder_gathered_layers']) / 2**30:11.2f} "
            f"{mem['total'] / 2**30:9.2f} {comm.bytes_per_micro() / 1e9:9.2f} {comm.bytes_per_step() / 1e9:8.2f} "
            f"{comm.seconds_per_step(intra, inter):11.3f} {compute * acc:14.3f}"
        )


def cmd_fields(args) -> int:
    import dataclasses
    import typing

    def walk(cls, prefix):
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            print(f"{prefix}{f.name} = {default!r}\n    {docs.get(f.name, '')}")

    walk(RunConfig, "")
    return 0


def cmd_train(args) -> int:
    from .train.trainer import train

    cfg = load_config(args.config, args.overrides)
    train(cfg)
    return 0


def cmd_slurm(args) -> int:
    from .train.slurm import JobSpec, submit

    spec = JobSpec(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task,
        time=args.time,
        partition=args.partition,
        account=args.account,
        job_name=args.job_name,
        extra=tuple(args.sbatch),
    )
    try:
        print(submit(args.config, args.overrides, spec, dry_run=args.dry_run))
    except RuntimeError as e:
        print(f"cacheaug slurm: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_bench(args) -> int:
    from .train.benchmark import bench_train, format_report

    cfg = load_config(args.config, args.overrides)
    report = bench_train(
        cfg,
        steps=args.steps,
        warmup=args.warmup,
        naive_positions=args.naive_positions,
        eager_positions=args.eager_positions,
        skip=tuple(args.skip),
        profile=args.profile,
    )
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


# Handlers import their module when called, so `cacheaug --help` and `cacheaug config` stay quick.
def cmd_eval(args) -> int:
    from .evaluation.loss_at_k import run_eval_cli

    return run_eval_cli(args)


def cmd_generate(args) -> int:
    from .evaluation.generate_cmd import run_generate_cli

    return run_generate_cli(args)


def cmd_downstream(args) -> int:
    from .evaluation.downstream import run_downstream_cli

    return run_downstream_cli(args)


def _add_checkpoint_args(p: argparse.ArgumentParser, several: bool = False) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        nargs="+" if several else None,
        help="run directory (config.yaml + export/) or export directory"
        + ("; several for one line each in the table and plot" if several else ""),
    )
    p.add_argument("--decoder", default=None, help="frozen decoder (HF model dir); default: the run's own")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")


def _add_eval_parsers(sub) -> None:
    """``eval`` (Table 1), ``generate`` and ``downstream`` (local task files)."""
    p = sub.add_parser(
        "eval",
        help="Table 1: perplexity of the k-th token after inserting latents, vs baseline",
        description="Table 1: perplexity of the k-th token after inserting latents, vs baseline. "
        "Data parallel under a launcher, one process per device (sequences split by rank, rank 0 "
        "writes): torchrun --standalone --nproc_per_node N -m dist_cacheaug.cli eval ... "
        "(or deepspeed --num_gpus N --no_local_rank --module dist_cacheaug.cli eval ..., or srun).",
    )
    _add_checkpoint_args(p, several=True)
    p.add_argument(
        "--data", required=True, nargs="+", help="held-out shard directories (data_tools make-shards)"
    )
    p.add_argument("--split", default="val", help="manifest split to read (default val)")
    p.add_argument(
        "--positions",
        nargs="+",
        default=["stride", "16"],
        metavar="SPEC",
        help="insertion positions per sequence: 'all', 'stride S' or 'random R' (default: stride 16)",
    )
    p.add_argument("--max-k", type=int, default=32, help="measure k = 1..MAX_K tokens after the insertion")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per pass")
    p.add_argument("--positions-per-pass", type=int, default=64, help="insertion traces per batched pass")
    p.add_argument("--max-sequences", type=int, default=None, help="evaluate at most this many sequences")
    p.add_argument("--seed", type=int, default=0, help="seed for --positions random")
    p.add_argument(
        "--out", default="eval_out", help="output dir: results.json, results.md, ppl_change.png, tb/"
    )
    p.add_argument("--no-augment", action="store_true", help="check mode: insert zero latents (= baseline)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "generate",
        help="continue prompts with cache augmentation (or the frozen baseline)",
        description="Continue one or more prompts with cache augmentation, decoded by transformers' "
        "generate (greedy unless --temperature > 0). Several prompts run as left-padded batches of "
        "--batch-size; each prints as it would alone (greedy).",
    )
    _add_checkpoint_args(p)
    p.add_argument(
        "--prompt", action="append", default=[], help="text to continue (repeatable: one batch of prompts)"
    )
    p.add_argument(
        "--prompts-file",
        default=None,
        metavar="FILE",
        help="more prompts, one per line (UTF-8; no empty lines)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="prompts per left-padded batch (default 8)")
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer path (default: the run config's data.tokenizer)"
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples at this temperature"
    )
    p.add_argument(
        "--top-k", type=int, default=None, help="sampling: keep the K most likely tokens (0 = all)"
    )
    p.add_argument("--top-p", type=float, default=None, help="sampling: nucleus probability mass")
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        help="HF repetition penalty (> 1 discourages tokens already in the prompt or output)",
    )
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop string: a prompt's generation ends once its output contains it (repeatable; shown included)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for sampling")
    p.add_argument("--no-augment", action="store_true", help="the frozen decoder alone")
    p.add_argument(
        "--reaugment-every", type=int, default=None, metavar="K", help="augment again every K tokens"
    )
    p.add_argument(
        "--async-delay",
        type=int,
        default=None,
        metavar="D",
        help="latents from the cache D tokens behind (A.5; default: the model's own, 0 unless variant async)",
    )
    p.add_argument("--bos", action="store_true", help="prepend the decoder's BOS token to every prompt")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "downstream",
        help="local task files: GSM8K-format jsonl (exact match) and multiple-choice jsonl",
        description="Local task files: GSM8K-format jsonl (exact match) and multiple-choice jsonl. "
        "--batch-size N prompts per pass (left-padded, longest first; the same numbers as one at a time). "
        "Data parallel under a launcher, one process per device (batches split by rank, rank 0 writes): "
        "torchrun --standalone --nproc_per_node N -m dist_cacheaug.cli downstream ... "
        "(or deepspeed --num_gpus N --no_local_rank --module dist_cacheaug.cli downstream ..., or srun).",
    )
    _add_checkpoint_args(p)
    p.add_argument("--gsm8k", default=None, help="GSM8K-format jsonl (question, answer with '#### N')")
    p.add_argument("--mc", default=None, help="multiple-choice jsonl (question, choices, answer)")
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer path (default: the run config's data.tokenizer)"
    )
    p.add_argument(
        "--num-fewshot",
        type=int,
        default=None,
        help="GSM8K exemplars in the prompt (default 8; 0 with --cot)",
    )
    p.add_argument(
        "--fewshot-file", default=None, help="exemplars from this file (default: first lines of --gsm8k)"
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="GSM8K generation budget (default 256; 512 with --cot)",
    )
    p.add_argument(
        "--cot",
        action="store_true",
        help="zero-shot chain-of-thought baseline (paper Table 4): append --cot-prompt after 'Answer:', "
        "0 exemplars and a larger generation budget unless given",
    )
    p.add_argument(
        "--cot-prompt", default=None, help='the CoT suffix (default: "Let\'s think step by step.")'
    )
    p.add_argument("--limit", type=int, default=None, help="evaluate at most this many items per task")
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="prompts per pass: GSM8K problems, or multiple-choice (question, choice) pairs (default 1)",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="positions a prompt + latents + answer may use (default: the decoder's max_position_embeddings); "
        "longer prompts are left-truncated, with a warning, and counted in the results",
    )
    p.add_argument("--no-augment", action="store_true", help="the frozen decoder alone (baseline)")
    p.add_argument(
        "--reaugment-every", type=int, default=None, metavar="K", help="GSM8K: augment again every K tokens"
    )
    p.add_argument(
        "--async-delay",
        type=int,
        default=None,
        metavar="D",
        help="latents from the cache D tokens behind, for both tasks (default: the model's own)",
    )
    p.add_argument("--out", default=None, help="write results (and per-item predictions) as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_downstream)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cacheaug",
        description="Differentiable cache augmentation at scale.",
        epilog="Errors a user can fix (config, data, tokenizer, checkpoint, prompt, launch environment) print "
        "one line, 'error: ...', and exit 2. --debug anywhere on the command line (or CACHEAUG_DEBUG=1) "
        "shows their tracebacks.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "config", help="dry run: resolved config, DeepSpeed JSON, parameter counts, memory estimate"
    )
    p.add_argument("config", nargs="?", default=None, help="run config YAML (see configs/)")
    p.add_argument("--config", dest="config_opt", metavar="CONFIG", help="the same, as an option")
    _add_overrides(p)
    p.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="GPUs/ranks to size the run for (default $WORLD_SIZE or 1)",
    )
    p.add_argument("--fp32", action="store_true", help="estimate for fp32 instead of bf16")
    p.add_argument(
        "--json", action="store_true", help="print the resolved config and DeepSpeed JSON as JSON only"
    )
    p.add_argument("--get", metavar="DOTTED.KEY", help="print only this resolved value (e.g. train.run_dir)")
    p.add_argument(
        "--gpus-per-node", type=int, default=8, help="GPUs per node for the comm estimate (default 8)"
    )
    p.add_argument(
        "--intra-node-gbs",
        type=float,
        default=300.0,
        help="effective intra-node (NVLink) collective bandwidth per GPU, GB/s (default 300)",
    )
    p.add_argument(
        "--inter-node-gbs",
        type=float,
        default=25.0,
        help="effective inter-node bandwidth per GPU, GB/s (default 25 = 200 Gb/s NIC per GPU; 50 for 400 Gb/s)",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=989.0,
        help="GPU dense bf16 peak, TFLOP/s (default 989: H100/H200)",
    )
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("fields", help="list every config field with its type, default and meaning")
    p.set_defaults(func=cmd_fields)

    p = sub.add_parser("train", help="train a coprocessor (resumes when run_dir has a checkpoint)")
    _add_config_args(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench", help="measure a training step at a config's shapes (random init, one device)")
    p.add_argument(
        "what", choices=["train"], help="train: augmented step, ratios to plain LM / naive loop / eager"
    )
    _add_config_args(p)
    p.add_argument("--steps", type=int, default=5, help="timed steps (best is reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--naive-positions", type=int, default=8, help="P for the batched-vs-naive-loop ratio")
    p.add_argument("--eager-positions", type=int, default=None, help="P for the flex-vs-eager ratio (GPU)")
    p.add_argument("--skip", nargs="*", default=[], choices=["plain", "naive", "eager"])
    p.add_argument(
        "--profile", action="store_true", help="print a torch.profiler table of one augmented step"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)
    _add_eval_parsers(sub)

    p = sub.add_parser(
        "demo",
        add_help=False,
        help="the main job: corpus -> tokenizer -> base -> coprocessors + baselines -> report (--budget quick|full)",
    )
    # Listed here for `cacheaug --help` only: main() hands `cacheaug demo ...` to the demo's own parser.
    p.add_argument("demo_args", nargs=argparse.REMAINDER, help="see `cacheaug demo --help`")

    p = sub.add_parser("slurm", help="render an sbatch job for a run and submit it (or print it: --dry-run)")
    _add_config_args(p, positional=True)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one task per GPU")
    p.add_argument(
        "--tasks-per-node", type=int, default=None, help="ranks per node (default: GPUs per node, or 1)"
    )
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument(
        "--time", default="24:00:00", help="time limit; SIGUSR1 300 s before it checkpoints + requeues"
    )
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--job-name", default="cacheaug")
    p.add_argument(
        "--sbatch", action="append", default=[], metavar="OPT", help="extra #SBATCH option (repeatable)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the job script; write and submit nothing")
    p.set_defaults(func=cmd_slurm)
    return parser


#: Seconds a rank other than 0 waits before reporting its error: the launcher (deepspeed, torchrun) stops
#: every rank as soon as one exits, so when rank 0 has the same error, only rank 0's line is printed.
OTHER_RANK_DELAY_S = 10.0


def is_user_error(e: BaseException) -> bool:
    """Errors a user can fix (a bad config, data, tokenizer, checkpoint, prompt or launch environment: every
    subclass of errors.UserError) print one line, ``error: <what, naming the file or field, and what to
    do>``, and exit 2; anything else is a bug and keeps its traceback (as do these with --debug)."""
    return isinstance(e, UserError)


def _launch_rank(environ=os.environ) -> int:
    """This process's rank as the launcher set it (distributed.resolve's order), 0 when unreadable."""
    for key in ("RANK", "SLURM_PROCID"):
        if key == "SLURM_PROCID" and "SLURM_STEP_NUM_TASKS" not in environ:
            continue
        if str(environ.get(key, "")).isdigit():
            return int(environ[key])
    return 0


def report_user_error(e: BaseException, environ=os.environ) -> None:
    """``error: ...`` on stderr, once: from rank 0, or from another rank only if it outlives rank 0's exit
    (the error was its own)."""
    rank = _launch_rank(environ)
    if rank != 0:
        time.sleep(OTHER_RANK_DELAY_S)
        print(f"error (rank {rank}): {e}", file=sys.stderr, flush=True)
        return
    print(f"error: {e}", file=sys.stderr, flush=True)


def quiet_libraries(environ=os.environ, stderr=None) -> None:
    """Set before any library is imported, so the subprocesses a command starts inherit it (a user's own
    setting wins): no weight-loading/-writing progress bars from transformers (milliseconds for these
    models, and frames in every log file), none of its advisory notices, and no tqdm bars at all when
    stderr is not a terminal; a terminal keeps the bars of long evaluations."""
    environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if not (stderr or sys.stderr).isatty():
        environ.setdefault("TQDM_DISABLE", "1")
    if environ is os.environ and "transformers" in sys.modules:  # imported already (dist_cacheaug's API):
        from transformers.utils import logging as hf_logging  # its settings were read at import time

        if environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
            hf_logging.disable_progress_bar()
        if environ["TRANSFORMERS_VERBOSITY"] == "error":
            hf_logging.set_verbosity_error()


def _dispatch(argv: list[str]) -> int:
    if argv[:1] == ["demo"]:  # its own parser (argparse's REMAINDER drops leading options such as --help)
        from .demo.pipeline import main as demo_main

        return demo_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("CACHEAUG_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    if debug:
        os.environ["CACHEAUG_DEBUG"] = "1"  # the demo's subprocesses inherit it
    quiet_libraries()
    try:
        return _dispatch(argv)
    except Exception as e:
        if debug or not is_user_error(e):
            raise
        report_user_error(e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
