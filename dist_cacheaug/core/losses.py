"""Cross-entropy through the decoder's LM head without materialising all logits at once.

Gemma-2's vocabulary is 256k: fp32 logits for P×N_A = 2048 trace predictions per sequence would be
2 GB per sequence. We compute CE in chunks of rows; under autograd each chunk is checkpointed, so its
logits are recomputed in backward instead of being kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_ce(
    hidden_mh: torch.Tensor, targets_m: torch.Tensor, weight_vh: torch.Tensor, softcap: float | None
):
    logits = F.linear(hidden_mh, weight_vh).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets_m, reduction="none")


def plain_cross_entropy(hidden_mh, targets_m, weight_vh, softcap: float | None = None) -> torch.Tensor:
    """Reference: full logits at once. Per-row CE [M]."""
    return _chunk_ce(hidden_mh, targets_m, weight_vh, softcap)


def chunked_cross_entropy(
    hidden_mh: torch.Tensor,
    targets_m: torch.Tensor,
    weight_vh: torch.Tensor,
    softcap: float | None = None,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Per-row CE [M] of ``softcap(hidden @ weight.T)`` against ``targets``, ``chunk_size`` rows at a time."""
    if hidden_mh.shape[0] <= chunk_size:
        chunks = [(hidden_mh, targets_m)]
    else:
        chunks = list(zip(hidden_mh.split(chunk_size), targets_m.split(chunk_size)))
    needs_grad = torch.is_grad_enabled() and (hidden_mh.requires_grad or weight_vh.requires_grad)
    out = []
    for h, y in chunks:
        if needs_grad and len(chunks) > 1:
            out.append(checkpoint(_chunk_ce, h, y, weight_vh, softcap, use_reentrant=False))
        else:
            out.append(_chunk_ce(h, y, weight_vh, softcap))
    return torch.cat(out)


def lm_head_of(decoder) -> tuple[torch.Tensor, float | None]:
    """(output-embedding weight [V, H], final logit softcap or None) of an HF causal LM."""
    head = decoder.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError("LM heads with a bias are not supported by the chunked loss")
    return head.weight, getattr(decoder.config, "final_logit_softcapping", None)
