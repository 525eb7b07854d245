"""The one augmentation step, shared by ``CacheAugmentedLM.augment``, generation (augment at the end of
the prompt, re-augment every K tokens, asynchronous latents), evaluation and every variant.

Semantics: an augmentation at length L (last real token p = L-1) matches training exactly. The
coprocessor reads a cache of *real tokens only* (:class:`CleanCache`, never any latents), with a delay
d the cache of x[0..p-d]; the decoder then gets ``[x[0..p], latents]`` ("insert") or
``[x[0..p-1], latents, x[p]]`` ("refeed"). See ``generation.py`` for the decode loop around it.

``model`` here is any object with ``decoder``, ``num_latents``, ``aug_config.convention`` and
``latents_for_prompt(input_ids, cache)`` (``CacheAugmentedLM`` and its variants); this module imports
nothing from ``model.py``, so ``model.py`` builds on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .cache import clone_cache
from .hf_compat import cache_arg


@dataclass
class AugmentOutput:
    past_key_values: DynamicCache  # decoder cache of the prompt with the latents appended
    logits: torch.Tensor  # [B, V]: the decoder's next-token prediction after the latents
    latents: torch.Tensor  # [B, N_L, H]
    next_position: int  # position id of the next token to feed (plain HF default for "insert")


def check_prompt(input_ids: torch.Tensor) -> tuple[int, int]:
    """(batch, length) of a prompt, or a clear ValueError when it is not a non-empty [B, L] tensor."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"prompt must be a non-empty [batch, length] tensor of token ids, got {tuple(input_ids.shape)}"
        )
    return input_ids.shape


def check_delay(length: int, delay: int) -> None:
    """A clear ValueError unless latents ``delay`` tokens behind a ``length``-token prompt see a token."""
    if delay < 0:
        raise ValueError(f"async_delay must be >= 0, got {delay}")
    if length <= delay:
        raise ValueError(
            f"async_delay={delay} needs a prompt longer than {delay} tokens "
            f"(got {length}): the coprocessor must see at least one token"
        )


def sample_next_token(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """[B] next tokens from logits [B, V]: greedy at ``temperature <= 0``, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator)[:, 0]


class CleanCache:
    """The decoder cache of real tokens only (no latents), advanced lazily; snapshots are cheap
    (``clone_cache`` shares tensors; layers rebind on update)."""

    def __init__(self, decoder):
        self.decoder = decoder
        self.cache = DynamicCache(config=decoder.config)
        self.length = 0

    def advance_to(self, ids: torch.Tensor, length: int) -> DynamicCache:
        """A snapshot of the cache of ``ids[:, :length]`` (reads only the tokens not read yet)."""
        if length < self.length:
            raise RuntimeError(f"clean cache is at {self.length} tokens, cannot go back to {length}")
        if length > self.length:
            pos = torch.arange(self.length, length, device=ids.device)[None].expand(ids.shape[0], -1)
            self.decoder.base_model(
                input_ids=ids[:, self.length : length],
                **cache_arg(self.cache),
                use_cache=True,
                position_ids=pos,
            )
            self.length = length
        return clone_cache(self.cache)


def augment_at(model, clean: CleanCache, ids: torch.Tensor, delay: int, return_latents: bool = False):
    """Augment after ids[:, :L]. Returns (decode cache, next-token logits [B, V], next position id),
    and the latents [B, N_L, H] last when ``return_latents``."""
    b, length = ids.shape
    n_l, dec = model.num_latents, model.decoder
    dtype = next(dec.parameters()).dtype
    refeed = model.aug_config.convention == "refeed"
    view_len = length - delay
    base_len = length - 1 if refeed else length
    snaps = {}
    for n in sorted({view_len, base_len}):
        snaps[n] = clean.advance_to(ids, n)
    latents = model.latents_for_prompt(ids[:, :view_len], snaps[view_len]).to(dtype)
    cache = snaps[base_len]
    if refeed:
        inputs = torch.cat([latents, dec.get_input_embeddings()(ids[:, -1:])], 1)
        pos = torch.cat([torch.arange(length, length + n_l), torch.tensor([length - 1])])
        next_pos = length
    else:
        inputs, pos = latents, torch.arange(length, length + n_l)
        next_pos = length + n_l
    pos = pos.to(ids.device)[None].expand(b, -1)
    out = dec(inputs_embeds=inputs, **cache_arg(cache), use_cache=True, position_ids=pos)
    if return_latents:
        return cache, out.logits[:, -1].float(), next_pos, latents
    return cache, out.logits[:, -1].float(), next_pos


def augment_prompt(model, input_ids: torch.Tensor, delay: int = 0) -> AugmentOutput:
    """One augmentation at the end of the prompt ``input_ids`` (latents ``delay`` tokens behind), from a
    fresh :class:`CleanCache`: what ``CacheAugmentedLM.augment`` returns."""
    _, n = check_prompt(input_ids)
    check_delay(n, delay)
    cache, logits, next_pos, latents = augment_at(
        model, CleanCache(model.decoder), input_ids, delay, return_latents=True
    )
    return AugmentOutput(cache, logits, latents, next_pos)


def read_prompt(decoder, input_ids: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """No augmentation: (the decoder's HF cache of the prompt, its next-token logits [B, V] in fp32)."""
    cache = DynamicCache(config=decoder.config)
    logits = decoder(input_ids=input_ids, **cache_arg(cache), use_cache=True).logits[:, -1].float()
    return cache, logits
