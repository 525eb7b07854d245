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


def coprocessor_free_setup(decoder, num_latents, convention, soft_token_init, loss_chunk_size, seed):
    """(AugmentConfig, soft tokens on the decoder's device and dtype) for variants without a separate
    coprocessor (pause tokens, single-model latents)."""
    from ..core.model import AugmentConfig, device_of, init_soft_tokens

    config = AugmentConfig(
        num_latents=num_latents,
        convention=convention,
        soft_token_init=soft_token_init,
        loss_chunk_size=loss_chunk_size,
    )
    gen = torch.Generator().manual_seed(seed)
    dtype = next(decoder.parameters()).dtype
    soft = init_soft_tokens(decoder, num_latents, soft_token_init, gen).to(
        dtype=dtype, device=device_of(decoder)
    )
    return config, soft


def unfreeze(module: nn.Module) -> nn.Module:
    module.train()
    for p in module.parameters():
        p.requires_grad_(True)
    return module
