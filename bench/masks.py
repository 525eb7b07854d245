"""Benchmark of FlexAttention BlockMask construction for one micro-step: the 4 masks of a training step
(coprocessor pass T = N_L and decoder pass T = N_L + N_A - 1, each for sliding-window and full layers, as
for Gemma-2), built

* dense: ``create_block_mask`` uncompiled, evaluating mask_mod on every (b, q, kv) pair (the old path,
  ``masks.flex_block_mask_dense``);
* direct: the block structure computed from the layout with tensor ops (``masks.flex_block_mask``);
* compiled (``--compiled``): ``create_block_mask(..., _compile=True)``, first build and steady state.

Prints ms per build and the ratio, whether the BlockMasks are identical, and the fraction of 128×128
tiles FlexAttention computes against the fraction of (q, kv) pairs allowed. Everything printed is
measured; nothing is asserted.

    python bench/masks.py                                  # paper shape on CPU
    python bench/masks.py --device cuda --threads 0 --compiled
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from dist_cacheaug import sample_positions
from dist_cacheaug.core.masks import (
    BLOCK_SIZE,
    TraceLayout,
    allowed_bqk,
    flex_block_mask,
    flex_block_mask_dense,
    flex_mask_mod,
    flex_mask_tensors,
)

FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")
FIELDS += ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


def step_layouts(args, device) -> dict[str, TraceLayout]:
    """The coprocessor and decoder layouts of one micro-step, as dist_cacheaug/core/model.py builds them."""
    b, n, p, n_l, n_a = args.micro_batch, args.seq, args.positions, args.num_latents, args.num_ahead
    pos = sample_positions(b, n, p, n_a, torch.Generator().manual_seed(0)).to(device)
    ar = lambda lo, hi: torch.arange(lo, hi, device=device)  # noqa: E731
    cop = TraceLayout(n, n_l, pos, (pos[:, :, None] + ar(1, n_l + 1)).reshape(b, -1))
    if args.convention == "insert":
        dec = TraceLayout(n, n_l + n_a - 1, pos, (pos[:, :, None] + ar(1, n_l + n_a)).reshape(b, -1))
    else:
        rel = torch.cat([ar(1, n_l + 1), ar(0, n_a)])
        dec = TraceLayout(
            n,
            n_l + n_a,
            pos - 1,
            (pos[:, :, None] + rel).reshape(b, -1),
            (pos[:, :, None] + ar(0, n_l + n_a)).reshape(b, -1),
        )
    return {"coprocessor": cop, "decoder": dec}


def timed(fn, fn_args: tuple, repeats: int, device) -> list[float]:
    """Wall time of ``repeats`` calls ``fn(*fn_args)`` (synchronised on CUDA)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(*fn_args)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def compiled_build(layout, window, device):
    mt = flex_mask_tensors(layout, window, device)
    b, q = mt.q_pos.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.nn.attention.flex_attention import create_block_mask

        return create_block_mask(
            flex_mask_mod(mt), b, None, q, layout.prefix_len + q, device=device, _compile=True
        )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048, help="prefix length N")
    ap.add_argument("--positions", type=int, default=128, help="traces per sequence P")
    ap.add_argument("--num-latents", type=int, default=16)
    ap.add_argument("--num-ahead", type=int, default=16)
    ap.add_argument("--window", type=int, default=4096, help="sliding window of the sliding layers")
    ap.add_argument("--convention", choices=("insert", "refeed"), default="insert")
    ap.add_argument("--repeats", type=int, default=5, help="timed builds per mask (direct path)")
    ap.add_argument("--dense-repeats", type=int, default=2, help="timed builds per mask (dense path)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave torch's default)")
    ap.add_argument("--compiled", action="store_true", help="also time create_block_mask(_compile=True)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    print(
        f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU thread(s); micro batch "
        f"{args.micro_batch}, N={args.seq}, P={args.positions}, N_L={args.num_latents}, "
        f"N_A={args.num_ahead}, window {args.window}, {args.convention}; tile {BLOCK_SIZE}×{BLOCK_SIZE}"
    )
    totals = {"dense": 0.0, "direct": 0.0, "compiled": 0.0}
    header = f"{'mask':<22}{'Q×KV':>12}{'dense ms':>10}{'direct ms':>11}{'ratio':>8}"
    header += f"{'compiled ms (1st)':>21}" if args.compiled else ""
    header += f"{'same':>6}{'tiles computed':>16}{'(full)':>8}{'pairs allowed':>15}"
    print(header)
    for name, layout in step_layouts(args, device).items():
        q = layout.num_queries
        kv = layout.prefix_len + q
        for kind, window in (("sliding", args.window), ("full", None)):
            direct = flex_block_mask(layout, window, device)  # warm-up
            t_direct = statistics.median(
                timed(flex_block_mask, (layout, window, device), args.repeats, device)
            )
            dense = flex_block_mask_dense(layout, window, device)  # warm-up
            t_dense = statistics.median(
                timed(flex_block_mask_dense, (layout, window, device), args.dense_repeats, device)
            )
            same = all(torch.equal(getattr(direct, f), getattr(dense, f)) for f in FIELDS)
            totals["dense"] += t_dense
            totals["direct"] += t_direct
            row = f"{name + ' ' + kind:<22}{f'{q}×{kv}':>12}{t_dense * 1e3:>10.1f}{t_direct * 1e3:>11.2f}"
            row += f"{t_dense / t_direct:>7.0f}×"
            if args.compiled:
                first = timed(compiled_build, (layout, window, device), 1, device)[0]
                t_comp = statistics.median(
                    timed(compiled_build, (layout, window, device), args.repeats, device)
                )
                totals["compiled"] += t_comp
                row += f"{t_comp * 1e3:>11.1f} ({first:>6.1f} s)"
            tiles = direct.kv_num_blocks.sum() + direct.full_kv_num_blocks.sum()
            n_tiles = direct.kv_indices.numel()  # B × H × Q_tiles × KV_tiles
            full = direct.full_kv_num_blocks.sum() / n_tiles
            allowed = allowed_bqk(layout, window).float().mean()
            row += f"{str(same):>6}{float(tiles / n_tiles):>16.3f}{float(full):>8.3f}{float(allowed):>15.4f}"
            print(row)
    line = (
        f"micro-step (4 masks): dense {totals['dense'] * 1e3:.1f} ms, direct {totals['direct'] * 1e3:.2f} ms "
        f"({totals['dense'] / totals['direct']:.0f}× faster)"
    )
    if args.compiled:
        line += f", compiled (steady) {totals['compiled'] * 1e3:.1f} ms"
    print(line)


if __name__ == "__main__":
    main()
