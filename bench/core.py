"""Benchmark of the core training step (issue 4): the batched multi-position pass against
(a) a plain LM training step of the same model on the same sequence and (b) the naive loop that runs
each trace on its own. Prints measured times, peak memory and ratios side by side, next to the analytic
FLOP ratio from ``dist_cacheaug.train.estimate``. Nothing here is asserted; it only measures.

    python bench/core.py                      # tiny and small presets on this machine
    python bench/core.py --preset small --positions 32 --seq-len 512 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM

from dist_cacheaug import CacheAugmentedLM, sample_positions
from dist_cacheaug.config import config_from_dict
from dist_cacheaug.core.decoder import freeze, hf_config_from_dict
from dist_cacheaug.train.benchmark import MODEL_PRESETS as PRESETS
from dist_cacheaug.train.benchmark import naive_loop_step, plain_lm_step, timed
from dist_cacheaug.train.estimate import flops_per_sequence


def run_preset(name, args, device):
    arch = dict(PRESETS[name])
    hf = hf_config_from_dict(arch)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    attn = "flex_attention" if device.type == "cuda" else "eager"
    decoder = freeze(AutoModelForCausalLM.from_config(hf, dtype=dtype, attn_implementation=attn).to(device))
    n, p_count, n_l, n_a = args.seq_len, args.positions, args.num_latents, args.num_ahead
    model = CacheAugmentedLM.from_decoder(decoder, num_latents=n_l, seed=0)
    ids = torch.randint(3, hf.vocab_size, (args.batch, n), device=device)
    gen = torch.Generator().manual_seed(0)
    positions = sample_positions(args.batch, n, p_count, n_a, gen, device=device)

    def batched():
        model.zero_grad(set_to_none=True)
        model.training_loss(ids, positions, n_a).loss.backward()

    def naive():
        model.zero_grad(set_to_none=True)
        naive_loop_step(model, ids, positions, n_a)

    plain_model = copy.deepcopy(decoder).train()
    for prm in plain_model.parameters():
        prm.requires_grad_(True)

    def plain():
        plain_model.zero_grad(set_to_none=True)
        plain_lm_step(plain_model, ids, chunk=4096)

    variants = {"batched": batched, "plain_lm": plain, "naive_loop": naive}
    if args.variant:  # one variant in this process (CPU peak-RSS isolation)
        return {
            args.variant: timed(
                variants[args.variant], device, args.repeats if args.variant != "naive_loop" else 1
            )
        }
    results = {}
    for label in variants:
        if label == "naive_loop" and args.skip_naive:
            continue
        if device.type == "cpu":
            cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", label, "--preset", name]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[label] = tuple(json.loads(out.strip().splitlines()[-1])[label])
        else:
            results[label] = timed(variants[label], device, args.repeats if label != "naive_loop" else 1)
    cfg = config_from_dict(
        {
            "model": {"decoder_config": arch, "num_latents": n_l, "num_ahead": n_a, "num_positions": p_count},
            "data": {"seq_len": n},
        }
    )
    analytic = flops_per_sequence(cfg)["ratio_to_plain_lm"]
    params = sum(x.numel() for x in decoder.parameters())
    return dict(
        preset=name,
        params_M=round(params / 1e6, 1),
        seq_len=n,
        positions=p_count,
        num_latents=n_l,
        num_ahead=n_a,
        batch=args.batch,
        results=results,
        analytic_ratio=analytic,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=[*PRESETS, "all"], default="all")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--positions", type=int, default=32)
    ap.add_argument("--num-latents", type=int, default=8)
    ap.add_argument("--num-ahead", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--variant", choices=["batched", "plain_lm", "naive_loop"], help=argparse.SUPPRESS)
    args, _ = ap.parse_known_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(torch.get_num_threads())
    names = list(PRESETS) if args.preset == "all" else [args.preset]
    if args.variant:
        print(json.dumps(run_preset(names[0], args, device)))
        return
    rows = [run_preset(name, args, device) for name in names]
    where = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    if args.json:
        print(json.dumps({"device": where, "rows": rows}, indent=2))
        return
    print(f"device: {where}; torch {torch.__version__}")
    print(
        "| preset | params | N | P | N_L | N_A | batched step | plain LM step | naive loop | batched/plain "
        "(analytic) | naive/batched | peak MiB batched/plain/naive |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        res = r["results"]
        tb, mb = res["batched"]
        tp, mp = res["plain_lm"]
        tn, mn = res.get("naive_loop", (float("nan"), None))
        mem = "/".join("-" if m is None else f"{m:.0f}" for m in (mb, mp, mn))
        print(
            f"| {r['preset']} | {r['params_M']}M | {r['seq_len']} | {r['positions']} | {r['num_latents']} | "
            f"{r['num_ahead']} | {tb * 1e3:.0f} ms | {tp * 1e3:.0f} ms | {tn * 1e3:.0f} ms | "
            f"{tb / tp:.2f}× ({r['analytic_ratio']:.2f}×) | {tn / tb:.1f}× | {mem} |"
        )


if __name__ == "__main__":
    main()
