"""The ``cacheaug`` command line. Subcommands load one config tree (``--config`` + ``--set``) and hand
it to the module that owns the work; heavy imports happen inside each subcommand."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .config import ConfigError, RunConfig, deepspeed_config, field_docs, load_config


def _add_config_args(p: argparse.ArgumentParser, positional: bool = False) -> None:
    if positional:
        p.add_argument("config", help="run config YAML (see configs/)")
    else:
        p.add_argument("--config", required=True, help="run config YAML (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=3e-4 (repeatable; values parsed as YAML)",
    )


def _fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def cmd_config(args) -> int:
    from .estimate import flops_per_sequence, memory_estimate, param_counts

    cfg = load_config(args.config, args.overrides)
    world = args.world_size or int(os.environ.get("WORLD_SIZE", 1))
    bf16 = not args.fp32
    ds = deepspeed_config(cfg, world, bf16=bf16)
    if args.json:
        print(json.dumps({"config": cfg.to_dict(), "deepspeed": ds}, indent=2))
        return 0
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
        "on the same tokens (analytic model, dist_cacheaug/estimate.py)"
    )
    print(
        f"\n# memory per GPU (estimate, {'bf16' if bf16 else 'fp32'}, ZeRO stage {cfg.zero.stage}, "
        f"activation checkpointing {'on' if cfg.zero.activation_checkpointing else 'off'})"
    )
    for k, v in mem.items():
        print(f"  {k:20s} {v / 2**30:8.2f} GiB")
    return 0


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
    from .trainer import train

    cfg = load_config(args.config, args.overrides)
    train(cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cacheaug", description="Differentiable cache augmentation at scale."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "config", help="dry run: resolved config, DeepSpeed JSON, parameter counts, memory estimate"
    )
    _add_config_args(p, positional=True)
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
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("fields", help="list every config field with its type, default and meaning")
    p.set_defaults(func=cmd_fields)

    p = sub.add_parser("train", help="train a coprocessor (resumes when run_dir has a checkpoint)")
    _add_config_args(p)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"cacheaug: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
