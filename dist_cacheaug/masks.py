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
FlexAttention ``BlockMask`` (GPU). Tests check one against the other.
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


def flex_block_mask(layout: TraceLayout, window: int | None, device: torch.device | str | None = None):
    """FlexAttention ``BlockMask`` with the same semantics as :func:`allowed_bqk`."""
    from torch.nn.attention.flex_attention import create_block_mask

    n, t = layout.prefix_len, layout.trace_len
    q_pos = layout.window_positions()
    device = device or q_pos.device
    q_pos = q_pos.to(device)
    prefix_end = layout.prefix_end_bp.to(device)
    b, q = q_pos.shape

    def mask_mod(bi, hi, qi, ki):
        trace = qi // t
        is_prefix = ki < n
        kt = (ki - n).clamp(min=0)  # trace-token index of the key (when not prefix)
        prefix_ok = ki <= prefix_end[bi, trace]
        trace_ok = ((kt // t) == trace) & (kt <= qi)
        ok = torch.where(is_prefix, prefix_ok, trace_ok)
        if window is not None:
            k_pos = torch.where(is_prefix, ki, q_pos[bi, kt])
            ok = ok & ((q_pos[bi, qi] - k_pos) < window)
        return ok

    return create_block_mask(mask_mod, B=b, H=None, Q_LEN=q, KV_LEN=n + q, device=device)


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
