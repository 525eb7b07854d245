"""Benchmark of answering with cache augmentation (issue 8): latency of one coprocessor call + decoding
against the frozen decoder alone and against generating N extra "thinking" tokens (N = N_L) before the
answer. Random weights (latency does not depend on them); prints measured times and ratios side by side.
Nothing here is asserted; it only measures.

    python bench/generate.py                                  # tiny and small presets, N_L = 16 and 64
    python bench/generate.py --preset small --prompt-len 512 --answer-len 64 --latents 16 64 --repeats 5
"""

from __future__ import annotations

import argparse
import json

import torch

from dist_cacheaug import CacheAugmentedLM
from dist_cacheaug.core.generation import generate
from dist_cacheaug.train.benchmark import MODEL_PRESETS as PRESETS
from dist_cacheaug.train.benchmark import answering_device, random_answering_decoder, timed


def timed_interleaved(fns: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Best wall time (s) of each function over ``repeats`` rounds after one warm-up round, each call
    timed by ``train.benchmark.timed``. The variants run interleaved within each round, so a busy
    machine slows them alike."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            best[name] = min(best[name], timed(fn, device, repeats=1, warmup=0)[0])
    return best


def run_preset(name: str, args, device: torch.device) -> list[dict]:
    decoder = random_answering_decoder(name, device)
    hf = decoder.config
    params = sum(p.numel() for p in decoder.parameters())
    ids = torch.randint(3, hf.vocab_size, (args.batch, args.prompt_len), device=device)
    a = args.answer_len
    rows = []
    for n_l in args.latents:
        model = CacheAugmentedLM.from_decoder(decoder, num_latents=n_l, seed=0).eval()
        t = timed_interleaved(
            {
                "base": lambda m=model: generate(m, ids, a, augment=False),
                "aug": lambda m=model: generate(m, ids, a),
                "think": lambda m=model, n=n_l: generate(m, ids, n + a, augment=False),
                "ttft_base": lambda m=model: generate(m, ids, 1, augment=False),
                "ttft_aug": lambda m=model: generate(m, ids, 1),
            },
            args.repeats,
            device,
        )
        rows.append(
            dict(
                preset=name,
                params_m=round(params / 1e6, 1),
                n_l=n_l,
                baseline_ms=1e3 * t["base"],
                augmented_ms=1e3 * t["aug"],
                thinking_ms=1e3 * t["think"],
                first_token_baseline_ms=1e3 * t["ttft_base"],
                first_token_augmented_ms=1e3 * t["ttft_aug"],
                aug_over_base=t["aug"] / t["base"],
                think_over_base=t["think"] / t["base"],
                think_over_aug=t["think"] / t["aug"],
                ttft_aug_over_base=t["ttft_aug"] / t["ttft_base"],
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", nargs="+", default=["tiny", "small"], choices=sorted(PRESETS))
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--answer-len", type=int, default=32, help="answer tokens decoded after the prompt")
    ap.add_argument(
        "--latents", type=int, nargs="+", default=[16, 64], help="N_L values (= thinking tokens N)"
    )
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    device, where = answering_device(args.threads)
    print(
        f"# {where}; torch {torch.__version__}; prompt {args.prompt_len}, answer {args.answer_len} tokens, "
        f"batch {args.batch}, greedy, best of {args.repeats}"
    )
    rows = [r for name in args.preset for r in run_preset(name, args, device)]
    print(
        "\n| preset | params | N_L | baseline | augmented (1 coprocessor call) | N_L thinking tokens | "
        "augmented/baseline | thinking/baseline | thinking/augmented | time to first token aug/base |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['preset']} | {r['params_m']}M | {r['n_l']} | {r['baseline_ms']:.0f} ms | {r['augmented_ms']:.0f} ms | "
            f"{r['thinking_ms']:.0f} ms | {r['aug_over_base']:.2f}× | {r['think_over_base']:.2f}× | "
            f"{r['think_over_aug']:.2f}× | {r['ttft_aug_over_base']:.2f}× |"
        )


if __name__ == "__main__":
    main()
