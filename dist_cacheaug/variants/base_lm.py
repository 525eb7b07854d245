"""Plain LM training of the decoder itself, under the same trainer: how a tiny base is pretrained from
scratch (``decoder_config``, random init) and how the "base trained the same extra steps" compute
control is made (``decoder_path`` = the base).

``training_loss(input_ids, positions, num_ahead)``: ``loss`` is the mean next-token CE over the whole
sequence (what is trained); ``loss_per_offset[k-1]`` is the CE of x[p+k] given x[0..p+k-1] at the
sampled positions (read from the same forward), i.e. exactly what validation's baseline measures for
the frozen original, so ``val_loss_k*`` vs ``val_baseline_k*`` compare the trained and original LM.
The export is an HF model directory (``config.json`` + weights; usable as ``model.decoder_path`` and by
``AutoModelForCausalLM.from_pretrained``) plus ``cacheaug_config.json`` naming the variant.
There are no latents: ``augment`` is plain reading of the prompt (for evaluators), ``num_latents`` 0.
"""

from __future__ import annotations

import copy
import json
import types
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM

from ..core.augment import AugmentOutput, check_attention_mask, check_prompt, read_prompt
from ..core.model import (
    CONFIG_NAME,
    TrainingLossOutput,
    check_positions,
    checkpoint_layers,
    decoder_fingerprint,
    device_of,
)
from ._common import head_cross_entropy, unfreeze


class BaseLM(nn.Module):
    variant_name = "base_lm"
    num_latents = 0

    def __init__(self, lm: nn.Module, baseline: nn.Module):
        super().__init__()
        self.lm = unfreeze(lm)
        object.__setattr__(self, "baseline_decoder", baseline)  # frozen original, outside the engine
        self.aug_config = types.SimpleNamespace(num_latents=0, convention="none")

    @property
    def decoder(self) -> nn.Module:
        return self.lm

    @classmethod
    def from_decoder(cls, decoder: nn.Module, seed: int = 0) -> BaseLM:
        return cls(copy.deepcopy(decoder), decoder)

    def training_loss(
        self, input_ids: torch.Tensor, positions: torch.Tensor, num_ahead: int
    ) -> TrainingLossOutput:
        b, n = input_ids.shape
        positions = check_positions(positions, b, n, num_ahead)
        hidden = self.lm.base_model(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
        ce = head_cross_entropy(self.lm, hidden.reshape(-1, hidden.shape[-1]), input_ids[:, 1:].reshape(-1))
        ce_bn = ce.view(b, n - 1)  # row t: CE of x[t+1]
        rows = (positions[:, :, None] + torch.arange(num_ahead, device=input_ids.device)).reshape(b, -1)
        per_offset = torch.gather(ce_bn, 1, rows).view(-1, num_ahead).mean(0)
        return TrainingLossOutput(loss=ce.mean(), loss_per_offset=per_offset, num_predictions=ce.numel())

    def forward(self, input_ids, positions, num_ahead) -> TrainingLossOutput:
        return self.training_loss(input_ids, positions, num_ahead)

    def enable_activation_checkpointing(self) -> None:
        checkpoint_layers(self.lm.base_model.layers)

    @torch.no_grad()
    def augment(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> AugmentOutput:
        """No latents: the trained LM's cache of the prompt and its next-token logits (what the core's
        decode loop does for ``augment=False``, and for this model whatever ``augment`` says).
        ``attention_mask``: left-padded prompts, as ``CacheAugmentedLM.augment``."""
        b, n = check_prompt(input_ids)
        mask = check_attention_mask(input_ids, attention_mask)
        cache, logits = read_prompt(self.lm, input_ids, mask)
        dtype = next(self.lm.parameters()).dtype
        empty = torch.zeros(b, 0, self.lm.config.hidden_size, dtype=dtype, device=logits.device)
        if mask is None:
            return AugmentOutput(cache, logits, empty, n)
        return AugmentOutput(cache, logits, empty, mask.sum(1), mask)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.lm.save_pretrained(directory)
        meta = {"variant": self.variant_name, "decoder": decoder_fingerprint(self.lm.config)}
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path, decoder: nn.Module) -> BaseLM:
        """``decoder``: the original (the baseline); the trained LM is read from ``directory``."""
        directory = Path(directory)
        dtype = next(decoder.parameters()).dtype
        attn = getattr(decoder.config, "_attn_implementation", None) or "eager"
        try:
            lm = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation=attn)
        except (OSError, ValueError) as e:
            raise ValueError(f"{directory}: cannot load the trained LM: {e}") from e
        if decoder_fingerprint(lm.config) != decoder_fingerprint(decoder.config):
            raise ValueError(f"{directory}: was trained from another decoder architecture")
        return cls(lm.to(device_of(decoder)), decoder)
