"""Attention masks for the extended (multi-trace) passes.

An extended pass appends P traces of T tokens each after an N-token prefix whose keys are already in
the cache. Query token i of trace j may attend to

* prefix key k   iff k <= prefix_end[j]                         (the trace's visible prefix)
* trace key i'   iff i' is in trace j and i' <= i               (causal within its own trace)

and, on sliding-window layers, only to keys within the window (q_pos - k_pos < W), where a token's
window position is the cache index it would have if its trace were decoded alone with HF: trace j's
tokens continue from its own p_j, never from their index in the extended batch. For the default
"insert" convention that is the token's position id.

Two renderings with the same semantics: a float additive mask for eager attention (CPU), and a
FlexAttention ``BlockMask`` (GPU). Tests check one against the other. The BlockMask's tile structure is
computed from the layout with tensor ops (no dense [Q, KV] mask, no compile: ~100× cheaper than
``create_block_mask``, see bench/masks.py), and its mask_mod closes over tensors only, so compiled
FlexAttention keeps one entry for every layout of a shape (tests/core/test_compile_counts.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FULL = "full_attention"
SLIDING = "sliding_attention"


def layer_kinds(config) -> list[str]:
    """Attention kind of each decoder layer: ``full_attention`` or ``sliding_attention``."""
    kinds = getattr(config, "layer_types", None)
    if kinds:
        return list(kinds[: config.num_hidden_layers])
    kind = SLIDING if getattr(config, "sliding_window", None) else FULL
    return [kind] * config.num_hidden_layers


@dataclass
class TraceLayout:
    """The appended tokens of one extended pass."""

    prefix_len: int
    #: N: prefix keys already in the cache (positions 0..N-1).
    trace_len: int
    #: T: tokens per trace.
    prefix_end_bp: torch.Tensor
    #: [B, P] long: last prefix index each trace may see (inclusive; -1 = none).
    position_ids_bq: torch.Tensor
    #: [B, P*T] long: position id of every appended token.
    window_pos_bq: torch.Tensor | None = None
    #: [B, P*T] long: where each appended token sits for the sliding window: the cache index it would
    #: have if its trace were decoded alone with HF (prefix keys sit at their own index). Defaults to
    #: the position ids, which is the same thing for the "insert" convention.

    def window_positions(self) -> torch.Tensor:
        return self.position_ids_bq if self.window_pos_bq is None else self.window_pos_bq

    @property
    def num_queries(self) -> int:
        return self.position_ids_bq.shape[1]


def allowed_bqk(layout: TraceLayout, window: int | None) -> torch.Tensor:
    """Dense boolean [B, Q, N+Q]: True where query q may attend to key k."""
    n, t = layout.prefix_len, layout.trace_len
    q_pos = layout.window_positions()  # [B, Q]
    device = q_pos.device
    b, q = q_pos.shape
    trace_of_q = torch.arange(q, device=device) // t  # [Q]
    prefix_end_bq = layout.prefix_end_bp[:, trace_of_q]  # [B, Q]

    k_prefix = torch.arange(n, device=device)
    prefix_ok = k_prefix[None, None, :] <= prefix_end_bq[:, :, None]  # [B, Q, N]

    q_idx = torch.arange(q, device=device)
    same_trace = trace_of_q[:, None] == trace_of_q[None, :]  # [Q, Q]
    causal = q_idx[None, :] <= q_idx[:, None]
    trace_ok = (same_trace & causal)[None].expand(b, q, q)  # [B, Q, Q]

    if window is not None:
        prefix_ok = prefix_ok & ((q_pos[:, :, None] - k_prefix[None, None, :]) < window)
        trace_ok = trace_ok & ((q_pos[:, :, None] - q_pos[:, None, :]) < window)
    return torch.cat([prefix_ok, trace_ok], dim=-1)


def eager_mask(layout: TraceLayout, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Float additive mask [B, 1, Q, N+Q] for eager attention: 0 where allowed, dtype-min elsewhere.
    (A bool mask would be taken as-is by HF's eager path and silently give wrong results.)"""
    allowed = allowed_bqk(layout, window)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


#: Block size of the ``BlockMask`` (FlexAttention's default: 128 × 128 tiles).
BLOCK_SIZE = 128
#: Window used on full-attention layers: larger than any position difference, so the same mask_mod
#: (one compiled FlexAttention entry) serves sliding and full layers.
NO_WINDOW = 2**62


@dataclass
class FlexMaskTensors:
    """Everything :func:`flex_mask_mod` reads, as tensors on the attention's device. Only tensors: the
    compiled FlexAttention guards on the closure's contents, and a captured Python int (prefix length,
    trace length, window) would give one compiled entry per value; tensors are guarded on shape and
    dtype only, so one entry serves every layout of the same shapes (and, with automatic dynamic
    shapes, of every shape after the first recompile)."""

    prefix_hi: torch.Tensor
    #: [B, Q] long: last prefix key query q may see: min(prefix_end of its trace, N - 1).
    trace_lo: torch.Tensor
    #: [Q] long: key index of the first token of q's trace (N + trace * T).
    trace_hi: torch.Tensor
    #: [Q] long: key index of q itself (N + q): causal bound within its trace.
    q_pos: torch.Tensor
    #: [B, Q] long: window position of every query.
    k_pos: torch.Tensor
    #: [B, N + Q] long: window position of every key (prefix keys: their index; trace keys: q_pos).
    window: torch.Tensor
    #: 0-dim long: sliding window W (keep q_pos - k_pos < W), or NO_WINDOW on full layers.


def flex_mask_tensors(
    layout: TraceLayout, window: int | None, device: torch.device | str | None = None
) -> FlexMaskTensors:
    n, t = layout.prefix_len, layout.trace_len
    q_pos = layout.window_positions()
    device = torch.device(device) if device is not None else q_pos.device
    q_pos = q_pos.to(device=device, dtype=torch.long)
    b, q = q_pos.shape
    q_idx = torch.arange(q, device=device)
    trace_of_q = q_idx // t
    prefix_end = layout.prefix_end_bp.to(device=device, dtype=torch.long)
    return FlexMaskTensors(
        prefix_hi=prefix_end[:, trace_of_q].clamp(max=n - 1),
        trace_lo=n + trace_of_q * t,
        trace_hi=n + q_idx,
        q_pos=q_pos,
        k_pos=torch.cat([torch.arange(n, device=device).expand(b, n), q_pos], dim=1),
        window=torch.full((), NO_WINDOW if window is None else window, dtype=torch.long, device=device),
    )


def flex_mask_mod(mt: FlexMaskTensors):
    """The FlexAttention ``mask_mod`` of :func:`allowed_bqk`. Its closure holds tensors only."""
    prefix_hi, trace_lo, trace_hi = mt.prefix_hi, mt.trace_lo, mt.trace_hi
    q_pos, k_pos, window = mt.q_pos, mt.k_pos, mt.window

    def mask_mod(bi, hi, qi, ki):
        # prefix keys 0..prefix_hi (all < N), or trace keys from the trace's start up to q itself
        ok = (ki <= prefix_hi[bi, qi]) | ((ki >= trace_lo[qi]) & (ki <= trace_hi[qi]))
        return ok & ((q_pos[bi, qi] - k_pos[bi, ki]) < window)

    return mask_mod


def _block_counts(layout: TraceLayout, mt: FlexMaskTensors, block: int) -> torch.Tensor:
    """[B, Q_blocks, KV_blocks] int: number of allowed (q, k) pairs in every block tile, straight from
    the layout. Query q's allowed keys are the prefix interval [max(0, q_pos - W + 1), prefix_hi]
    (windowed prefix keys sit at their own index) plus the causal part of its own trace, whose T keys
    are enumerated (their window positions are arbitrary). Cost O(B·Q·(N/block + T)), not O(B·Q·KV)."""
    n, t = layout.prefix_len, layout.trace_len
    b, q = mt.q_pos.shape
    device = mt.q_pos.device
    q_blocks, kv_blocks, prefix_blocks = -(-q // block), -(-(n + q) // block), -(-n // block)

    # trace part: the T keys of q's trace, up to q, inside the window, summed into their tiles
    keys = mt.trace_lo[:, None] + torch.arange(t, device=device)  # [Q, T] key indices
    ok = (keys <= mt.trace_hi[:, None]) & ((mt.q_pos[:, :, None] - mt.q_pos[:, keys - n]) < mt.window)
    tile = (torch.arange(q, device=device) // block)[:, None] * kv_blocks + keys // block  # [Q, T]
    counts = torch.zeros(b, q_blocks * kv_blocks, dtype=torch.long, device=device)
    counts.scatter_add_(1, tile.reshape(1, -1).expand(b, -1), ok.reshape(b, -1).long())
    counts = counts.view(b, q_blocks, kv_blocks)

    # prefix part: interval ∩ each prefix key tile (closed intervals), summed over the tile's queries
    lo = (mt.q_pos - mt.window + 1).clamp(min=0)  # [B, Q]
    k0 = torch.arange(prefix_blocks, device=device) * block
    per_q = (
        torch.minimum(mt.prefix_hi[:, :, None], k0 + block - 1) - torch.maximum(lo[:, :, None], k0) + 1
    ).clamp_(min=0)  # [B, Q, prefix tiles]
    per_q = torch.nn.functional.pad(per_q, (0, 0, 0, q_blocks * block - q))  # padding queries: none
    counts[:, :, :prefix_blocks] += per_q.view(b, q_blocks, block, prefix_blocks).sum(2)
    return counts


def _dense_to_ordered(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block tiles [..., KV_blocks] (0/1) to (num_blocks, indices), kept blocks first in ascending order,
    as ``create_block_mask`` lays them out."""
    dense = dense.to(torch.int32)
    order = torch.argsort(dense, dim=-1, descending=True, stable=True)
    return dense.sum(-1, dtype=torch.int32), order.to(torch.int32)


def flex_block_mask(layout: TraceLayout, window: int | None, device: torch.device | str | None = None):
    """FlexAttention ``BlockMask`` with the same semantics as :func:`allowed_bqk`, built on ``device``
    (default: the layout's) from the layout's block structure with tensor ops: no dense [Q, KV] mask,
    no compilation, no host sync. Identical (partial/full blocks, order) to
    ``create_block_mask(flex_mask_mod(...), B, None, Q, N+Q)``: a tile is full when every one of its
    BLOCK_SIZE² pairs is allowed (tiles cut by the sequence end never are), partial when some are."""
    from torch.nn.attention.flex_attention import BlockMask

    mt = flex_mask_tensors(layout, window, device)
    b, q = mt.q_pos.shape
    counts = _block_counts(layout, mt, BLOCK_SIZE)[:, None]  # [B, 1, Q_blocks, KV_blocks]
    full = counts == BLOCK_SIZE * BLOCK_SIZE
    partial = (counts > 0) & ~full
    kv_num, kv_idx = _dense_to_ordered(partial)
    full_num, full_idx = _dense_to_ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=(BLOCK_SIZE, BLOCK_SIZE),
        mask_mod=flex_mask_mod(mt),
        seq_lengths=(q, layout.prefix_len + q),
    )


def flex_block_mask_dense(layout: TraceLayout, window: int | None, device: torch.device | str | None = None):
    """Reference: the same ``BlockMask`` via ``create_block_mask`` (evaluates mask_mod on all B·Q·KV
    pairs, uncompiled). For tests and benchmarks."""
    from torch.nn.attention.flex_attention import create_block_mask

    mt = flex_mask_tensors(layout, window, device)
    b, q = mt.q_pos.shape
    return create_block_mask(
        flex_mask_mod(mt),
        B=b,
        H=None,
        Q_LEN=q,
        KV_LEN=layout.prefix_len + q,
        device=mt.q_pos.device,
        BLOCK_SIZE=BLOCK_SIZE,
    )


def attention_masks(config, layout: TraceLayout, *, dtype: torch.dtype, implementation: str):
    """What to pass as ``attention_mask`` to an HF model for this layout: one mask when every layer has
    the same kind, else a ``{kind: mask}`` mapping (Gemma-2 / Qwen2 accept prepared mappings)."""
    kinds = layer_kinds(config)
    window = getattr(config, "sliding_window", None)
    masks = {}
    for kind in sorted(set(kinds)):
        w = window if kind == SLIDING else None
        if implementation == "flex_attention":
            masks[kind] = flex_block_mask(layout, w)
        else:
            masks[kind] = eager_mask(layout, w, dtype)
    if len(masks) == 1:
        return next(iter(masks.values()))
    return masks
