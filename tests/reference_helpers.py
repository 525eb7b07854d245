"""Slow references the batched passes are checked against (one trace at a time through plain HF
cached decoding) and the hand-written greedy loop generation is checked against, shared by the core,
variant and evaluation tests."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from tiny_models import VOCAB
from transformers import DynamicCache

from dist_cacheaug import CacheAugmentedLM, sample_positions
from dist_cacheaug.core.augment import CleanCache, augment_at, augmented_mask, read_prompt
from dist_cacheaug.core.hf_compat import cache_arg


def reference_trace_ce(model: CacheAugmentedLM, ids_1n: torch.Tensor, p: int, num_ahead: int) -> torch.Tensor:
    """CE [num_ahead] of one trace at position p, computed the slow, obvious way with HF's own caches
    and masks (sliding-window layers crop their cache as in ordinary generation)."""
    dec, n_l = model.decoder, model.num_latents
    emb = dec.get_input_embeddings()
    targets = ids_1n[0, p + 1 : p + 1 + num_ahead]
    soft = model.soft_tokens[None]
    if model.aug_config.convention == "insert":
        cache = DynamicCache(config=dec.config)
        dec(input_ids=ids_1n[:, : p + 1], **cache_arg(cache), use_cache=True)
        z = model.coprocessor(inputs_embeds=soft, **cache_arg(copy.deepcopy(cache)), use_cache=True)
        trace = torch.cat([z.last_hidden_state, emb(ids_1n[:, p + 1 : p + num_ahead])], dim=1)
        logits = dec(inputs_embeds=trace, **cache_arg(cache), use_cache=True).logits[0]
        preds = logits[n_l - 1 : n_l - 1 + num_ahead]
    else:  # refeed
        cache = DynamicCache(config=dec.config)
        if p > 0:
            dec(input_ids=ids_1n[:, :p], **cache_arg(cache), use_cache=True)
        seen = copy.deepcopy(cache)
        dec(input_ids=ids_1n[:, p : p + 1], **cache_arg(seen), use_cache=True)
        z = model.coprocessor(inputs_embeds=soft, **cache_arg(seen), use_cache=True).last_hidden_state
        trace = torch.cat([z, emb(ids_1n[:, p : p + num_ahead])], dim=1)
        pos = torch.cat([torch.arange(p + 1, p + 1 + n_l), torch.arange(p, p + num_ahead)])[None]
        logits = dec(inputs_embeds=trace, **cache_arg(cache), use_cache=True, position_ids=pos).logits[0]
        preds = logits[n_l : n_l + num_ahead]
    return F.cross_entropy(preds.float(), targets, reduction="none")


def positions_with_edges(batch, seq_len, count, num_ahead, gen):
    """Random valid positions that always include the first (0) and last valid one."""
    pos = sample_positions(batch, seq_len, count, num_ahead, gen)
    pos[:, 0] = 0
    pos[:, -1] = seq_len - 1 - num_ahead
    return pos.sort(dim=1).values


def trainable_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def check_batched_equals_reference(model, reference, n_a=3, num_pos=6, seq_len=24, batch=2, seed=0):
    """Loss per offset and gradients of the batched pass equal the mean over one-trace ``reference``
    runs (``reference(model, ids_1n, p, n_a) -> CE [n_a]``), first and last valid positions included."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq_len), generator=gen)
    positions = positions_with_edges(batch, seq_len, num_pos, n_a, gen)
    out = model.training_loss(ids, positions, n_a)
    out.loss.backward()
    batched = trainable_grads(model)
    model.zero_grad(set_to_none=True)
    ref = torch.stack(
        [reference(model, ids[b : b + 1], int(p), n_a) for b in range(batch) for p in positions[b]]
    )
    ref.mean(0).mean().backward()
    ref_grads = trainable_grads(model)
    torch.testing.assert_close(out.loss_per_offset, ref.mean(0), atol=1e-5, rtol=1e-5)
    assert out.loss_per_offset.shape == (n_a,)
    assert batched.keys() == ref_grads.keys() and "soft_tokens" in batched
    for name, g in batched.items():
        torch.testing.assert_close(
            g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
        )


@torch.no_grad()
def reference_greedy_generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    augment: bool = True,
    reaugment_every: int | None = None,
    async_delay: int = 0,
    eos_token_id: int | None = None,
    attention_mask: torch.Tensor | None = None,
    logits_out: list | None = None,
    penalty: float | None = None,
) -> torch.Tensor:
    """The hand-written greedy decode loop that generation used before it went through HF ``generate``:
    the reference the HF path must reproduce. A finished row (after ``eos_token_id``) keeps emitting EOS
    while the others go on. ``penalty``: HF's repetition penalty applied by hand (a logit of a token
    already in the row, prompt included, is divided by it when positive, multiplied when negative)."""
    mask = attention_mask
    b, n = input_ids.shape
    dec = model.decoder
    clean = CleanCache(dec)
    augment = augment and model.num_latents > 0
    if augment:
        cache, logits, next_pos = augment_at(model, clean, input_ids, async_delay, attention_mask=mask)
    else:
        cache, logits = read_prompt(dec, input_ids, mask)
        next_pos = n if mask is None else mask.sum(1)
    cache_mask = None
    if mask is not None:
        cache_mask = augmented_mask(mask, model.num_latents) if augment else mask
    ids = input_ids
    done = torch.zeros(b, dtype=torch.bool)
    for step in range(max_new_tokens):
        if logits_out is not None:
            logits_out.append(logits)
        scores = logits
        if penalty is not None:
            seen = torch.gather(logits, 1, ids)
            scores = logits.scatter(1, ids, torch.where(seen > 0, seen / penalty, seen * penalty))
        tok = scores.argmax(-1)
        if eos_token_id is not None:
            tok = torch.where(done, torch.full_like(tok, eos_token_id), tok)
            done |= tok == eos_token_id
        ids = torch.cat([ids, tok[:, None]], 1)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(b, 1)], 1)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if augment and reaugment_every and (step + 1) % reaugment_every == 0:
            cache, logits, next_pos = augment_at(model, clean, ids, async_delay, attention_mask=mask)
            if mask is not None:
                cache_mask = augmented_mask(mask, model.num_latents)
            continue
        if cache_mask is None:
            pos, extra = torch.full((b, 1), next_pos), {}
        else:
            cache_mask = torch.cat([cache_mask, cache_mask.new_ones(b, 1)], 1)
            pos, extra = next_pos[:, None], {"attention_mask": cache_mask}
        out = dec(input_ids=tok[:, None], **cache_arg(cache), use_cache=True, position_ids=pos, **extra)
        logits = out.logits[:, -1].float()
        next_pos = next_pos + 1
    return ids
