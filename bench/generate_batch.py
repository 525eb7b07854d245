"""Benchmark of batched answering (issue 18): prompts/s and generated tokens/s at batch 1, 8, 32 for the
frozen decoder (baseline), cache augmentation (one coprocessor call, N_L latents) and decoding N_L
"thinking" tokens before the answer, over prompts of varied lengths (left-padded, longest first, as
``cacheaug downstream`` batches them: ``evaluation.batching.generate_batch``). Random weights (speed does
not depend on them); no EOS, so every prompt decodes exactly its budget. Prints what it measured and the
speed-up of batch B over batch 1 of the same mode, measured in the same run; the modes and batch sizes
run interleaved within each round, so a busy machine slows them alike. Nothing here is asserted.

    python bench/generate_batch.py                                   # tiny preset, 32 prompts of 32-160 tokens
    python bench/generate_batch.py --preset small --prompts 64 --batches 1 8 32 64 --repeats 3

Wall time and this process's CPU time (user+sys, all threads) are both reported: on a shared machine
the CPU time is the steadier of the two.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dist_cacheaug import CacheAugmentedLM
from dist_cacheaug.evaluation.batching import generate_batch
from dist_cacheaug.train.benchmark import MODEL_PRESETS as PRESETS
from dist_cacheaug.train.benchmark import answering_device, random_answering_decoder


def answer_all(model, prompts: list[list[int]], batch: int, new_tokens: int, augment: bool) -> None:
    """Every prompt answered, ``batch`` at a time (prompts already sorted longest first)."""
    for i in range(0, len(prompts), batch):
        generate_batch(model, prompts[i : i + batch], new_tokens, augment=augment)


def measure(fns: dict, repeats: int, device: torch.device) -> dict[str, tuple[float, float]]:
    """(best wall s, best CPU s) of each function over ``repeats`` interleaved rounds after a warm-up."""
    for fn in fns.values():
        fn()
    best = {k: (float("inf"), float("inf")) for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def run_preset(name: str, args, device: torch.device) -> list[dict]:
    decoder = random_answering_decoder(name, device)
    hf = decoder.config
    params = sum(p.numel() for p in decoder.parameters())
    model = CacheAugmentedLM.from_decoder(decoder, num_latents=args.latents, seed=0).eval()
    g = torch.Generator().manual_seed(1)
    lo, hi = args.prompt_len
    lengths = torch.randint(lo, hi + 1, (args.prompts,), generator=g).tolist()
    prompts = sorted(
        (torch.randint(3, hf.vocab_size, (n,), generator=g).tolist() for n in lengths), key=len, reverse=True
    )
    a, n_l = args.answer_len, args.latents
    modes = {  # name -> (tokens decoded per prompt, augment)
        "baseline": (a, False),
        "augmented": (a, True),
        f"{n_l} thinking tokens": (n_l + a, False),
    }
    fns = {
        (mode, b): (lambda b=b, new=new, aug=aug: answer_all(model, prompts, b, new, aug))
        for mode, (new, aug) in modes.items()
        for b in args.batches
    }
    t = measure(fns, args.repeats, device)
    rows = []
    for mode, (new, _) in modes.items():
        wall1, cpu1 = t[(mode, args.batches[0])]
        for b in args.batches:
            wall, cpu = t[(mode, b)]
            rows.append(
                dict(
                    preset=name,
                    params_m=round(params / 1e6, 1),
                    mode=mode,
                    batch=b,
                    prompts_per_s=args.prompts / wall,
                    generated_tokens_per_s=args.prompts * new / wall,
                    wall_s=wall,
                    cpu_s=cpu,
                    speedup_wall=wall1 / wall,
                    speedup_cpu=cpu1 / cpu,
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", nargs="+", default=["tiny"], choices=sorted(PRESETS))
    ap.add_argument("--prompts", type=int, default=32, help="prompts answered per measurement")
    ap.add_argument("--prompt-len", type=int, nargs=2, default=[32, 160], metavar=("MIN", "MAX"))
    ap.add_argument("--answer-len", type=int, default=32, help="answer tokens decoded per prompt")
    ap.add_argument("--latents", type=int, default=16, help="N_L (= thinking tokens)")
    ap.add_argument(
        "--batches", type=int, nargs="+", default=[1, 8, 32], help="batch sizes; the first is the reference"
    )
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    device, where = answering_device(args.threads)
    lo, hi = args.prompt_len
    print(
        f"# {where}; torch {torch.__version__}; {args.prompts} prompts of {lo}-{hi} tokens (left-padded, longest "
        f"first), answer {args.answer_len} tokens, N_L {args.latents}, greedy, best of {args.repeats}"
    )
    t0 = time.perf_counter()
    rows = [r for name in args.preset for r in run_preset(name, args, device)]
    b1 = args.batches[0]
    print(
        f"\n| preset | mode | batch | prompts/s | generated tokens/s | wall | CPU (user+sys) | "
        f"speed-up vs batch {b1}: wall | CPU |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['preset']} {r['params_m']}M | {r['mode']} | {r['batch']} | {r['prompts_per_s']:.1f} | "
            f"{r['generated_tokens_per_s']:.0f} | {r['wall_s']:.2f} s | {r['cpu_s']:.2f} s | "
            f"{r['speedup_wall']:.2f}× | {r['speedup_cpu']:.2f}× |"
        )
    print(f"\n# total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
