"""Slow references the batched passes are checked against (one trace at a time through plain HF
cached decoding), shared by the core, variant and evaluation tests."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from tiny_models import VOCAB
from transformers import DynamicCache

from dist_cacheaug import CacheAugmentedLM, sample_positions
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
