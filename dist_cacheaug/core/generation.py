"""The one decode loop: augment at the end of the prompt, optionally re-augment every K generated
tokens, optionally asynchronously (latents computed from the cache d tokens behind). The augmentation
step itself is :func:`~dist_cacheaug.core.augment.augment_at`; ``CacheAugmentedLM.generate`` is this loop.

Semantics (our reading of the paper; its appendix on asynchronous augmentation gives no pseudo-code):

* Every augmentation at the current length L (last real token p = L-1) matches training exactly: the
  coprocessor reads a cache of *real tokens only*, computed without any latents, and the decoder gets
  ``[real tokens 0..p, latents]`` ("insert"; "refeed": ``[0..p-1, latents, x[p]]``). Earlier latents are
  dropped at a re-augmentation: no training trace ever saw two sets of latents. So re-augmenting every
  K tokens equals calling ``augment()`` on the whole text so far every K tokens, but costs only a
  K-token decoder pass (to bring the latent-free cache up to date) plus the coprocessor call.
* Asynchronous, delay d: the coprocessor reads the cache of x[0..p-d] (its soft tokens take the
  positions they would have at p-d) while the decoder reads on to x[p]; the latents are inserted after
  x[p] as usual. With d=0 this is the synchronous case.
* Prompts of different lengths: left-padded with an ``attention_mask`` (``augment.py``); every row
  generates what it would alone (positions per row, the mask extended with ones for the latents and
  every generated token), with re-augmentation and delays too. With ``eos_token_id`` a finished row
  keeps emitting EOS while the others go on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .augment import (
    CleanCache,
    augment_at,
    augmented_mask,
    check_attention_mask,
    check_delay,
    check_padded_delay,
    check_prompt,
    read_prompt,
    sample_next_token,
)
from .hf_compat import cache_arg


@dataclass
class GenerationStats:
    augmentations: int = 0
    new_tokens: int = 0


@torch.no_grad()
def generate(
    model: nn.Module,  # a CacheAugmentedLM (model.py imports this module, so no import back)
    input_ids: torch.Tensor,
    max_new_tokens: int = 32,
    *,
    augment: bool = True,
    reaugment_every: int | None = None,
    async_delay: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    stop=None,
    stats: GenerationStats | None = None,
    logits_out: list | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, L + new] prompt followed by generated tokens (prompts of equal length L, or left-padded to L
    with ``attention_mask`` [B, L], 1 = token, 0 = pad: each row then generates what it would alone).

    ``augment=False``: the frozen decoder alone. ``reaugment_every=K``: augment again after every K
    generated tokens. ``async_delay=d``: latents come from the cache d tokens behind (default: the
    model's own ``async_delay``, set by the "async" variant, else 0). ``stop``: optional
    callable ``stop(generated_ids [B, t]) -> bool`` checked after each token (e.g. stop strings).
    ``logits_out``: a list that receives the next-token logits [B, V] of every step (for tests/analysis).
    """
    check_prompt(input_ids)
    mask = check_attention_mask(input_ids, attention_mask)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if async_delay is None:
        async_delay = int(getattr(model, "async_delay", 0))
    if reaugment_every is not None and reaugment_every < 1:
        raise ValueError(f"reaugment_every must be >= 1, got {reaugment_every}")
    if async_delay < 0:
        raise ValueError(f"async_delay must be >= 0, got {async_delay}")
    augment = augment and model.num_latents > 0  # nothing to write (base_lm): plain decoding
    if augment:
        if mask is None:
            check_delay(input_ids.shape[1], async_delay)
        else:
            check_padded_delay(mask, async_delay)
    stats = stats if stats is not None else GenerationStats()
    b, n = input_ids.shape
    dec = model.decoder
    clean = CleanCache(dec)
    if augment:
        cache, logits, next_pos = augment_at(model, clean, input_ids, async_delay, attention_mask=mask)
        stats.augmentations += 1
    else:
        cache, logits = read_prompt(dec, input_ids, mask)
        next_pos = n if mask is None else mask.sum(1)
    # Padded: ``mask`` covers ids (prompt + generated), ``cache_mask`` the decode cache (+ latents).
    cache_mask = None
    if mask is not None:
        cache_mask = augmented_mask(mask, model.num_latents) if augment else mask
    ids = input_ids
    done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        if logits_out is not None:
            logits_out.append(logits)
        tok = sample_next_token(logits, temperature, top_p, generator)
        if eos_token_id is not None:
            tok = torch.where(done, torch.full_like(tok, eos_token_id), tok)
            done |= tok == eos_token_id
        ids = torch.cat([ids, tok[:, None]], 1)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(b, 1)], 1)
        stats.new_tokens += 1
        if step == max_new_tokens - 1 or (eos_token_id is not None and bool(done.all())):
            break
        if stop is not None and stop(ids[:, n:]):
            break
        if augment and reaugment_every and (step + 1) % reaugment_every == 0:
            cache, logits, next_pos = augment_at(model, clean, ids, async_delay, attention_mask=mask)
            if mask is not None:
                cache_mask = augmented_mask(mask, model.num_latents)
            stats.augmentations += 1
            continue
        if cache_mask is None:
            pos, extra = torch.full((b, 1), next_pos, device=ids.device), {}
        else:
            cache_mask = torch.cat([cache_mask, cache_mask.new_ones(b, 1)], 1)
            pos, extra = next_pos[:, None], {"attention_mask": cache_mask}
        logits = (
            dec(input_ids=tok[:, None], **cache_arg(cache), use_cache=True, position_ids=pos, **extra)
            .logits[:, -1]
            .float()
        )
        next_pos = next_pos + 1  # an int, or a [B] tensor (padded): never in place
    return ids
