"""Helpers shared by the variants."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.model import AugmentConfig, checkpoint_layers, device_of, init_soft_tokens


def head_cross_entropy(lm: nn.Module, hidden_mh: torch.Tensor, targets_m: torch.Tensor) -> torch.Tensor:
    """Per-row CE [M] through ``lm``'s LM head *called as a module* (not its weight read directly):
    for variants that train the decoder, whose head ZeRO-3 partitions and gathers only through the
    module's hooks. Unchunked: full logits [M, V] (fine at the tiny scale these variants run at)."""
    logits = lm.get_output_embeddings()(hidden_mh).float()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets_m, reduction="none")


class NoCoprocessor:
    """Mixin for variants without a separate coprocessor (pause tokens, single-model latents): the
    shared ``from_decoder`` (config + soft tokens on the decoder's device and dtype, then
    :meth:`around`) and activation checkpointing of the decoder's layers only."""

    @classmethod
    def from_decoder(
        cls,
        decoder: nn.Module,
        num_latents: int = 16,
        *,
        convention: str = "insert",
        soft_token_init: str = "embedding_sample",
        loss_chunk_size: int = 4096,
        seed: int = 0,
    ):
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
        return cls.around(decoder, soft, config)

    @classmethod
    def around(cls, decoder: nn.Module, soft_tokens: torch.Tensor, config: AugmentConfig):
        """The variant built around ``decoder`` (the frozen original) with these soft tokens."""
        raise NotImplementedError

    def enable_activation_checkpointing(self) -> None:
        checkpoint_layers(self.decoder.base_model.layers)


def unfreeze(module: nn.Module) -> nn.Module:
    module.train()
    for p in module.parameters():
        p.requires_grad_(True)
    return module
