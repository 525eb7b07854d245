"""Generation with cache augmentation: augment at the end of the prompt, optionally re-augment every K
generated tokens, optionally asynchronously (latents computed from the cache d tokens behind).

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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .hf_compat import cache_arg
from .model import CacheAugmentedLM, clone_cache, sample_next_token


@dataclass
class GenerationStats:
    augmentations: int = 0
    new_tokens: int = 0


class CleanCache:
    """The decoder cache of real tokens only (no latents), advanced lazily; snapshots are cheap
    (``clone_cache`` shares tensors; layers rebind on update)."""

    def __init__(self, decoder):
        self.decoder = decoder
        self.cache = DynamicCache(config=decoder.config)
        self.length = 0

    def advance_to(self, ids: torch.Tensor, length: int) -> DynamicCache:
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


def augment_at(
    model: CacheAugmentedLM, clean: CleanCache, ids: torch.Tensor, delay: int, return_latents: bool = False
):
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


@torch.no_grad()
def generate(
    model: CacheAugmentedLM,
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
) -> torch.Tensor:
    """[B, L + new] prompt followed by generated tokens (prompts of equal length L).

    ``augment=False``: the frozen decoder alone. ``reaugment_every=K``: augment again after every K
    generated tokens. ``async_delay=d``: latents come from the cache d tokens behind (default: the
    model's own ``async_delay``, set by the "async" variant, else 0). ``stop``: optional
    callable ``stop(generated_ids [B, t]) -> bool`` checked after each token (e.g. stop strings).
    ``logits_out``: a list that receives the next-token logits [B, V] of every step (for tests/analysis).
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"prompt must be a non-empty [batch, length] tensor, got {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if async_delay is None:
        async_delay = int(getattr(model, "async_delay", 0))
    if reaugment_every is not None and reaugment_every < 1:
        raise ValueError(f"reaugment_every must be >= 1, got {reaugment_every}")
    if async_delay < 0:
        raise ValueError(f"async_delay must be >= 0, got {async_delay}")
    if augment and input_ids.shape[1] <= async_delay:
        raise ValueError(
            f"async_delay={async_delay} needs a prompt longer than {async_delay} tokens "
            f"(got {input_ids.shape[1]}): the coprocessor must see at least one token"
        )
    stats = stats if stats is not None else GenerationStats()
    b, n = input_ids.shape
    dec = model.decoder
    clean = CleanCache(dec)
    if augment:
        cache, logits, next_pos = augment_at(model, clean, input_ids, async_delay)
        stats.augmentations += 1
    else:
        cache = DynamicCache(config=dec.config)
        logits = dec(input_ids=input_ids, **cache_arg(cache), use_cache=True).logits[:, -1].float()
        next_pos = n
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
        stats.new_tokens += 1
        if step == max_new_tokens - 1 or (eos_token_id is not None and bool(done.all())):
            break
        if stop is not None and stop(ids[:, n:]):
            break
        if augment and reaugment_every and (step + 1) % reaugment_every == 0:
            cache, logits, next_pos = augment_at(model, clean, ids, async_delay)
            stats.augmentations += 1
            continue
        pos = torch.full((b, 1), next_pos, device=ids.device)
        logits = (
            dec(input_ids=tok[:, None], **cache_arg(cache), use_cache=True, position_ids=pos)
            .logits[:, -1]
            .float()
        )
        next_pos += 1
    return ids
