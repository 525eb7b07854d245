"""Single-model latents (Coda-Forno et al. 2025): no second model. The decoder itself, finetuned jointly
with N_L trainable soft tokens, reads its own cache of x[0..p] and writes the latents, then reads
[latents, ahead tokens] as in the core's trace pass. Same objective (ahead-token CE); the gradient
reaches the decoder through all three passes (its prefix pass runs with grad too).

So the decoder is part of the trainable module here (registered as ``lm``; ``.decoder`` returns it);
the frozen original is kept as ``baseline_decoder`` for the baseline numbers. Latents are the decoder's
final-norm states (``latent_final_norm`` does not apply: the norm is shared with the LM head).
The export is the finetuned decoder (an HF model dir under ``decoder/``) + soft tokens.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache

from ..core.hf_compat import cache_arg
from ..core.model import (
    SOFT_TOKENS_NAME,
    AugmentConfig,
    CacheAugmentedLM,
    device_of,
    read_export_meta,
)
from ._common import NoCoprocessor, head_cross_entropy, unfreeze

DECODER_DIR = "decoder"


class SingleModelLM(NoCoprocessor, CacheAugmentedLM):
    variant_name = "single_model"

    def __init__(self, lm: nn.Module, soft_tokens: torch.Tensor, config: AugmentConfig, baseline: nn.Module):
        nn.Module.__init__(self)
        self.lm = unfreeze(lm)
        self.soft_tokens = nn.Parameter(soft_tokens)
        self.aug_config = config
        object.__setattr__(self, "_baseline", baseline)  # frozen, outside the engine

    @property
    def decoder(self) -> nn.Module:
        return self.lm

    @property
    def coprocessor(self) -> nn.Module:
        return self.lm.base_model

    @property
    def baseline_decoder(self) -> nn.Module:
        return self._baseline

    @classmethod
    def around(cls, decoder, soft_tokens, config) -> SingleModelLM:
        return cls(copy.deepcopy(decoder), soft_tokens, config, decoder)

    def prefix_pass(self, input_ids: torch.Tensor):
        cache = DynamicCache()  # with grad: joint finetuning reaches the decoder through its cache too
        hidden = self.lm.base_model(input_ids=input_ids, **cache_arg(cache), use_cache=True).last_hidden_state
        return cache, hidden

    def token_ce(self, hidden_mh, targets_m):
        return head_cross_entropy(self.lm, hidden_mh, targets_m)

    streamed_export = False  # the decoder goes through Hugging Face's save_pretrained

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(directory / DECODER_DIR)
        self.save_soft_tokens(directory)
        self.write_meta(directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, decoder) -> SingleModelLM:
        """``decoder``: the original (frozen) decoder; the finetuned one is read from the export."""
        directory = Path(directory)
        _, config = read_export_meta(directory, decoder, cls.variant_name)
        dtype = next(decoder.parameters()).dtype
        attn = getattr(decoder.config, "_attn_implementation", None) or "eager"
        try:
            lm = AutoModelForCausalLM.from_pretrained(
                directory / DECODER_DIR, dtype=dtype, attn_implementation=attn
            )
            soft = load_file(str(directory / SOFT_TOKENS_NAME))["soft_tokens"]
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"{directory}: cannot load the finetuned decoder or soft tokens: {e}") from e
        device = device_of(decoder)
        return cls(lm.to(device), soft.to(dtype=dtype, device=device), config, decoder)
