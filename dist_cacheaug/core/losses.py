"""Cross-entropy through the decoder's LM head without materialising all logits at once.

Gemma-2's vocabulary is 256k: fp32 logits for P×N_A = 2048 trace predictions per sequence would be
2 GB per sequence. We compute CE in chunks of rows; under autograd each chunk is checkpointed, so its
logits are recomputed in backward instead of being kept.

Also here, because training (validation) and evaluation (loss at k) both need them: the frozen
decoder's own next-token CE (``baseline_ce``) and the per-offset summary of summed CEs
(``summarize_offsets``).
"""

from __future__ import annotations

import math

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


@torch.no_grad()
def baseline_ce(
    decoder, input_ids: torch.Tensor, chunk_size: int = 4096, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """The plain (frozen) decoder's CE of x[t+1] given x[0..t] from one forward over ``input_ids`` [B, n],
    through its LM head ``chunk_size`` rows of logits at a time (the model's ``loss_chunk_size``: a 256k
    vocabulary makes full fp32 logits of every prediction GBs).

    ``rows`` None: every row, [B, n-1] (row t predicts x[t+1]). ``rows`` [B, M] (values <= n-2): only
    those rows, [B, M] -- the baseline at ahead offset k of position p is row p+k-1."""
    hidden = decoder.base_model(input_ids=input_ids).last_hidden_state  # [B, n, H]
    if rows is None:
        hidden, targets = hidden[:, :-1], input_ids[:, 1:]
    else:
        hidden = torch.gather(hidden, 1, rows[..., None].expand(-1, -1, hidden.shape[-1]))
        targets = torch.gather(input_ids, 1, rows + 1)
    weight, softcap = lm_head_of(decoder)
    ce = chunked_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1), weight, softcap, chunk_size
    )
    return ce.view(input_ids.shape[0], -1)


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:  # CE past ~709.78 (a diverged model): infinite perplexity, not a crash
        return math.inf


def summarize_offsets(aug_sum: torch.Tensor, base_sum: torch.Tensor, traces: float) -> dict:
    """Per-offset numbers from CE summed over ``traces`` traces at offsets k = 1..len(aug_sum): mean CE
    augmented and baseline (float64, as lists), their perplexities and the relative change in percent
    (``100 * (ppl_aug / ppl_base - 1)``). Used by the trainer's validation and by the loss-at-k eval."""
    n = max(traces, 1)
    aug = (aug_sum.detach().cpu().double() / n).tolist()
    base = (base_sum.detach().cpu().double() / n).tolist()
    aug_ppl = [_exp(x) for x in aug]
    base_ppl = [_exp(x) for x in base]
    return {
        "k": list(range(1, len(aug) + 1)),
        "baseline_ce": base,
        "augmented_ce": aug,
        "baseline_ppl": base_ppl,
        "augmented_ppl": aug_ppl,
        "ppl_change_pct": [100.0 * (a / b - 1.0) for a, b in zip(aug_ppl, base_ppl)],
        "num_traces": traces,
    }
