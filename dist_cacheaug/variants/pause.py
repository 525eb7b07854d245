"""Pause tokens (paper Table 3): N_L trainable embeddings inserted after x[p] and read by the frozen
decoder, trained with the same multi-position objective; no coprocessor.

Exactly the core's batched trace pass with latents := the pause embeddings (the same for every
position), so the masks, position ids and both conventions are the core's own.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import DynamicCache

from ..core.model import (
    SOFT_TOKENS_NAME,
    CacheAugmentedLM,
    TensorFileWriter,
    device_of,
    read_export_meta,
)
from ._common import NoCoprocessor


class PauseTokensLM(NoCoprocessor, CacheAugmentedLM):
    variant_name = "pause"

    @classmethod
    def around(cls, decoder, soft_tokens, config) -> PauseTokensLM:
        return cls(decoder, None, soft_tokens, config)

    def trace_latents(self, input_ids, positions, cache, prefix_hidden, view_end=None) -> torch.Tensor:
        b, p_count = positions.shape
        dtype = next(self.decoder.parameters()).dtype
        return self.soft_tokens.to(dtype)[None, None].expand(b, p_count, -1, -1)

    def latents_for_cache(self, cache: DynamicCache, batch: int, attention_mask=None) -> torch.Tensor:
        return self.soft_tokens[None].expand(batch, -1, -1)

    def save_pretrained(self, directory: str | Path, write_tensors: TensorFileWriter | None = None) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.save_soft_tokens(directory, write_tensors)
        self.write_meta(directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, decoder) -> PauseTokensLM:
        directory = Path(directory)
        _, config = read_export_meta(directory, decoder, cls.variant_name)
        try:
            soft = load_file(str(directory / SOFT_TOKENS_NAME))["soft_tokens"]
        except (OSError, KeyError) as e:
            raise ValueError(f"{directory}: cannot load the pause tokens: {e}") from e
        dtype = next(decoder.parameters()).dtype
        return cls(decoder, None, soft.to(dtype=dtype, device=device_of(decoder)), config)
