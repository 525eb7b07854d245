"""Asynchronous latents (paper A.5): the latents for position p come from the cache of x[0..p-d], as if
the coprocessor lagged d tokens behind decoding, and are inserted after x[p] as usual.

Identical to ``generation.py`` at inference: the coprocessor's soft tokens take positions
p-d+1..p-d+N_L (what plain HF decoding from the cache of x[0..p-d] gives them); the decoder's trace is
the core's ("insert": latents at p+1..p+N_L; "refeed" likewise). Traces with p < d: the coprocessor
sees no prefix at all (training only; generation needs a prompt longer than d).
``augment`` and ``generate`` are the core's: they read ``async_delay`` from the model.
"""

from __future__ import annotations

import torch

from ..core.model import CacheAugmentedLM


class AsyncLatentsLM(CacheAugmentedLM):
    variant_name = "async"
    async_delay: int = 1  # read by the core's augmentation step (augment, generation)

    @classmethod
    def from_decoder(cls, decoder, num_latents: int = 16, *, delay: int = 1, **kwargs) -> AsyncLatentsLM:
        model = super().from_decoder(decoder, num_latents, **kwargs)
        model.apply_variant_options({"async_delay": delay})
        return model

    def variant_options(self) -> dict:
        return {"async_delay": self.async_delay}

    def apply_variant_options(self, options: dict) -> None:
        delay = int(options.get("async_delay", 1))
        if delay < 1:
            raise ValueError(f"async_delay must be >= 1, got {delay}")
        self.async_delay = delay

    def trace_latents(self, input_ids, positions, cache, prefix_hidden, view_end=None) -> torch.Tensor:
        lagged = (positions - self.async_delay).clamp(min=-1)
        return super().trace_latents(input_ids, positions, cache, prefix_hidden, view_end=lagged)
