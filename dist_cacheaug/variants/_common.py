"""Helpers shared by the variants."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def head_cross_entropy(lm: nn.Module, hidden_mh: torch.Tensor, targets_m: torch.Tensor) -> torch.Tensor:
    """Per-row CE [M] through ``lm``'s LM head *called as a module* (not its weight read directly):
    for variants that train the decoder, whose head ZeRO-3 partitions and gathers only through the
    module's hooks. Unchunked: full logits [M, V] (fine at the tiny scale these variants run at)."""
    logits = lm.get_output_embeddings()(hidden_mh).float()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets_m, reduction="none")


def unfreeze(module: nn.Module) -> nn.Module:
    module.train()
    for p in module.parameters():
        p.requires_grad_(True)
    return module
