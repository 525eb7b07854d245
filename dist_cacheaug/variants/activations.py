"""Input variant: the coprocessor reads the decoder's last-layer activations instead of its kv-cache.

Our design (the paper gives one sentence): the coprocessor runs over the frozen decoder's final hidden
states h[0..n-1] (after its final norm) as input embeddings, building *its own* cache (with gradient:
the coprocessor is trainable), then over the soft tokens of every trace with the core's per-trace mask
on that cache (trace j sees h[0..p_j]). Latents, positions and the decoder's trace pass are the core's.
At inference the same: coprocessor over [h of the prompt, soft tokens], plain HF cached calls.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ..core.augment import mask_positions, soft_token_inputs
from ..core.hf_compat import cache_arg
from ..core.model import CacheAugmentedLM


class ActivationsInputLM(CacheAugmentedLM):
    variant_name = "activations"

    def _coprocessor_prefix(self, hidden: torch.Tensor, cache: DynamicCache, **padding) -> DynamicCache:
        self.coprocessor(
            inputs_embeds=hidden.to(self.soft_tokens.dtype), **cache_arg(cache), use_cache=True, **padding
        )
        return cache

    def trace_latents(self, input_ids, positions, cache, prefix_hidden, view_end=None) -> torch.Tensor:
        cop_cache = self._coprocessor_prefix(
            prefix_hidden, DynamicCache()
        )  # full layers: windowed by the mask
        return super().trace_latents(input_ids, positions, cop_cache, prefix_hidden, view_end)

    def latents_for_prompt(
        self, input_ids: torch.Tensor, cache: DynamicCache, attention_mask=None
    ) -> torch.Tensor:
        # Left-padded batch: positions and the 2D mask for the decoder and both coprocessor calls.
        padding = {}
        if attention_mask is not None:
            padding = {"attention_mask": attention_mask, "position_ids": mask_positions(attention_mask)}
        hidden = self.decoder.base_model(input_ids=input_ids, use_cache=False, **padding).last_hidden_state
        cop_cache = self._coprocessor_prefix(hidden, DynamicCache(config=self.coprocessor.config), **padding)
        soft = self.soft_tokens[None].expand(input_ids.shape[0], -1, -1)
        if attention_mask is None:
            return self.coprocessor_states(soft, cop_cache)
        mask, pos = soft_token_inputs(attention_mask, self.num_latents)
        return self.coprocessor_states(soft, cop_cache, mask, pos)

    def latents_for_cache(self, cache, batch, attention_mask=None):
        raise NotImplementedError(
            "the activations variant reads the prompt's hidden states: use latents_for_prompt"
        )
