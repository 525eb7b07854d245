"""The one augmentation step, shared by ``CacheAugmentedLM.augment``, generation (augment at the end of
the prompt, re-augment every K tokens, asynchronous latents), evaluation and every variant.

Semantics: an augmentation at length L (last real token p = L-1) matches training exactly. The
coprocessor reads a cache of *real tokens only* (:class:`CleanCache`, never any latents), with a delay
d the cache of x[0..p-d]; the decoder then gets ``[x[0..p], latents]`` ("insert") or
``[x[0..p-1], latents, x[p]]`` ("refeed"). See ``generation.py`` for the decode loop around it.

``model`` here is any object with ``decoder``, ``num_latents``, ``aug_config.convention`` and
``latents_for_prompt(input_ids, cache)`` (``CacheAugmentedLM`` and its variants); this module imports
nothing from ``model.py``, so ``model.py`` builds on it.

Prompts of different lengths: LEFT-padded into one [B, L] batch with an ``attention_mask`` (1 = token,
0 = pad; :func:`check_attention_mask`). Every row then runs as if alone: its position ids are its
unpadded positions (``cumsum(mask) - 1``, first real token at 0), and every HF call (the decoder's
passes and the coprocessor's) gets the 2D mask extended with ones for the latents and generated tokens,
so no query attends to a pad key (HF builds the causal and sliding-window masks from it and the cache
length; with left padding a key's distance in cache indices equals its distance in positions). With
``attention_mask=None`` everything is exactly the unpadded code path.
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
    # Position id of the next token to feed (plain HF default for "insert"); with an attention mask a
    # LongTensor [B], one per row (rows are at different positions).
    next_position: int | torch.Tensor
    # Only with an attention mask: [B, L + N_L] mask over the augmented cache (the prompt's mask, ones
    # for the latents). Continue with ``cat([attention_mask, ones(B, 1)], 1)`` and
    # ``position_ids=next_position[:, None]`` for the next token.
    attention_mask: torch.Tensor | None = None


def check_prompt(input_ids: torch.Tensor) -> tuple[int, int]:
    """(batch, length) of a prompt, or a clear ValueError when it is not a non-empty [B, L] tensor."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"prompt must be a non-empty [batch, length] tensor of token ids, got {tuple(input_ids.shape)}"
        )
    return input_ids.shape


def check_attention_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask of a left-padded prompt as a long [B, L] tensor (None stays None), or a clear ValueError:
    wrong shape, values other than 0/1, a row with no token, or a pad after a token (right padding)."""
    if attention_mask is None:
        return None
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have the prompt's shape {tuple(input_ids.shape)}, "
            f"got {tuple(attention_mask.shape)}"
        )
    mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("attention_mask must hold only 0 (pad) and 1 (token)")
    empty = (mask.sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"attention_mask: row(s) {empty} hold no token (all padding)")
    right = (mask[:, :-1] > mask[:, 1:]).any(1).nonzero().flatten().tolist()
    if right:
        raise ValueError(
            f"attention_mask: row(s) {right} have a pad after a token; prompts must be LEFT-padded "
            "(pads first, then the tokens)"
        )
    return mask


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """[B, L] unpadded position ids of a left-padded batch: a row's first token at 0 (pads get 0)."""
    return (mask.cumsum(1) - 1).clamp(min=0)


def soft_token_inputs(view_mask: torch.Tensor, num_latents: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For N_L soft tokens appended after a padded cache with mask ``view_mask`` [B, V]: the extended 2D
    mask [B, V + N_L] and the soft tokens' position ids [B, N_L] (a row's tokens count, onwards)."""
    b = view_mask.shape[0]
    ones = view_mask.new_ones(b, num_latents)
    pos = view_mask.sum(1, keepdim=True) + torch.arange(num_latents, device=view_mask.device)
    return torch.cat([view_mask, ones], 1), pos


def check_delay(length: int, delay: int) -> None:
    """A clear ValueError unless latents ``delay`` tokens behind a ``length``-token prompt see a token."""
    if delay < 0:
        raise ValueError(f"async_delay must be >= 0, got {delay}")
    if length <= delay:
        raise ValueError(
            f"async_delay={delay} needs a prompt longer than {delay} tokens "
            f"(got {length}): the coprocessor must see at least one token"
        )


class CleanCache:
    """The decoder cache of real tokens only (no latents), advanced lazily; snapshots are cheap
    (``clone_cache`` shares tensors; layers rebind on update)."""

    def __init__(self, decoder):
        self.decoder = decoder
        self.cache = DynamicCache(config=decoder.config)
        self.length = 0

    def advance_to(self, ids: torch.Tensor, length: int, mask: torch.Tensor | None = None) -> DynamicCache:
        """A snapshot of the cache of ``ids[:, :length]`` (reads only the tokens not read yet); ``mask``:
        the left-padded batch's [B, >= length] attention mask (None: no padding)."""
        if length < self.length:
            raise RuntimeError(f"clean cache is at {self.length} tokens, cannot go back to {length}")
        if length > self.length:
            if mask is None:
                pos = torch.arange(self.length, length, device=ids.device)[None].expand(ids.shape[0], -1)
                extra = {}
            else:
                pos = mask_positions(mask[:, :length])[:, self.length :]
                extra = {"attention_mask": mask[:, :length]}
            self.decoder.base_model(
                input_ids=ids[:, self.length : length],
                **cache_arg(self.cache),
                use_cache=True,
                position_ids=pos,
                **extra,
            )
            self.length = length
        return clone_cache(self.cache)


@dataclass
class LatentInputs:
    """What the decoder reads to write an augmentation into its cache (everything before that pass)."""

    cache: DynamicCache  # the latent-free cache the inputs follow: x[0..p] ("insert") or x[0..p-1] ("refeed")
    inputs_embeds: torch.Tensor  # [B, n, H]: the N_L latents ("insert"), the latents then x[p] ("refeed")
    position_ids: torch.Tensor  # [B, n]
    attention_mask: torch.Tensor | None  # padded batches: [B, L + N_L] over cache + inputs; else None
    next_position: int | torch.Tensor  # position id of the token after the inputs (a [B] tensor if padded)
    latents: torch.Tensor  # [B, N_L, H]


def latent_inputs(
    model, clean: CleanCache, ids: torch.Tensor, delay: int, attention_mask: torch.Tensor | None = None
) -> LatentInputs:
    """The augmentation after ids[:, :L] up to (not including) the decoder's pass over the latents:
    :func:`augment_at` runs that pass itself, generation hands it to HF ``generate`` as its prefill."""
    b, length = ids.shape
    n_l, dec = model.num_latents, model.decoder
    dtype = next(dec.parameters()).dtype
    refeed = model.aug_config.convention == "refeed"
    padded = attention_mask is not None
    view_len = length - delay
    base_len = length - 1 if refeed else length
    snaps = {}
    for n in sorted({view_len, base_len}):
        snaps[n] = clean.advance_to(ids, n, attention_mask)
    view_kw = {"attention_mask": attention_mask[:, :view_len]} if padded else {}
    latents = model.latents_for_prompt(ids[:, :view_len], snaps[view_len], **view_kw).to(dtype)
    # [B] tokens per row = the position after the row's last token (every row alone, from the mask)
    real = attention_mask.sum(1) if padded else torch.full((b,), length, device=ids.device)
    lat_pos = real[:, None] + torch.arange(n_l, device=ids.device)
    if refeed:
        inputs = torch.cat([latents, dec.get_input_embeddings()(ids[:, -1:])], 1)
        pos = torch.cat([lat_pos, (real - 1)[:, None]], 1)
        next_pos = real if padded else length
    else:
        inputs, pos = latents, lat_pos
        next_pos = real + n_l if padded else length + n_l
    mask = augmented_mask(attention_mask, n_l) if padded else None
    return LatentInputs(snaps[base_len], inputs, pos, mask, next_pos, latents)


def augment_at(
    model,
    clean: CleanCache,
    ids: torch.Tensor,
    delay: int,
    return_latents: bool = False,
    attention_mask: torch.Tensor | None = None,
):
    """Augment after ids[:, :L]. Returns (decode cache, next-token logits [B, V], next position id),
    and the latents [B, N_L, H] last when ``return_latents``. ``attention_mask``: [B, L] of a left-padded
    batch (checked by the caller); the next position id is then a LongTensor [B] and the decode cache's
    mask is ``augmented_mask(attention_mask, N_L)``."""
    li = latent_inputs(model, clean, ids, delay, attention_mask)
    dec_kw = {"attention_mask": li.attention_mask} if li.attention_mask is not None else {}
    out = model.decoder(
        inputs_embeds=li.inputs_embeds,
        **dec_kw,
        **cache_arg(li.cache),
        use_cache=True,
        position_ids=li.position_ids,
    )
    if return_latents:
        return li.cache, out.logits[:, -1].float(), li.next_position, li.latents
    return li.cache, out.logits[:, -1].float(), li.next_position


def augmented_mask(mask: torch.Tensor, num_latents: int) -> torch.Tensor:
    """[B, L + N_L] mask of the decode cache after augmenting a left-padded [B, L] batch. For both
    conventions: "refeed" moves x[p] after the latents, but x[p] (the last column) is a token in every row."""
    return torch.cat([mask, mask.new_ones(mask.shape[0], num_latents)], 1)


def check_padded_delay(mask: torch.Tensor, delay: int) -> None:
    """:func:`check_delay` for the shortest row of a left-padded batch."""
    check_delay(int(mask.sum(1).min()), delay)


def augment_prompt(
    model, input_ids: torch.Tensor, delay: int = 0, attention_mask: torch.Tensor | None = None
) -> AugmentOutput:
    """One augmentation at the end of the prompt ``input_ids`` (latents ``delay`` tokens behind), from a
    fresh :class:`CleanCache`: what ``CacheAugmentedLM.augment`` returns. ``attention_mask``: [B, L] of
    left-padded prompts of different lengths (module docstring)."""
    _, n = check_prompt(input_ids)
    mask = check_attention_mask(input_ids, attention_mask)
    if mask is None:
        check_delay(n, delay)
    else:
        check_padded_delay(mask, delay)
    cache, logits, next_pos, latents = augment_at(
        model, CleanCache(model.decoder), input_ids, delay, return_latents=True, attention_mask=mask
    )
    if mask is None:
        return AugmentOutput(cache, logits, latents, next_pos)
    return AugmentOutput(cache, logits, latents, next_pos, augmented_mask(mask, model.num_latents))


def read_prompt(
    decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[DynamicCache, torch.Tensor]:
    """No augmentation: (the decoder's HF cache of the prompt, its next-token logits [B, V] in fp32).
    ``attention_mask``: [B, L] of a left-padded batch (checked by the caller); positions from it."""
    cache = DynamicCache(config=decoder.config)
    extra = {}
    if attention_mask is not None:
        extra = {"attention_mask": attention_mask, "position_ids": mask_positions(attention_mask)}
    logits = decoder(input_ids=input_ids, **cache_arg(cache), use_cache=True, **extra).logits[:, -1].float()
    return cache, logits
