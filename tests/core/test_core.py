"""The core equivalence: the batched multi-position pass equals running each trace alone with plain HF
calls (prefix -> cache -> coprocessor -> latents -> decoder), in loss and in gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from reference_helpers import (
    check_batched_equals_reference,
    reference_trace_ce,
    trainable_grads,
)
from tiny_models import VOCAB, tiny_decoder

from dist_cacheaug import CacheAugmentedLM, sample_positions
from dist_cacheaug.core.hf_compat import cache_arg

FAMILIES = ["gemma2", "llama", "mistral", "qwen2"]
CASES = [  # (family, convention, n_l, n_a, P)
    *[(f, "insert", n_l, n_a, 8) for f in FAMILIES for n_l, n_a in [(1, 1), (4, 3)]],
    ("gemma2", "insert", 4, 1, 5),
    ("gemma2", "insert", 1, 3, 3),
    *[(f, "refeed", 4, 3, 6) for f in FAMILIES],
    ("gemma2", "refeed", 1, 1, 8),
]


@pytest.mark.numerics
@pytest.mark.parametrize("family,convention,n_l,n_a,num_pos", CASES)
def test_batched_pass_equals_one_trace_at_a_time(family, convention, n_l, n_a, num_pos):
    model = CacheAugmentedLM.from_decoder(
        tiny_decoder(family), num_latents=n_l, convention=convention, seed=1
    )
    # seq 24: the tiny sliding windows (7 / 9) are crossed within the sequence
    check_batched_equals_reference(
        model, reference_trace_ce, n_a=n_a, num_pos=num_pos, seed=hash((family, convention, n_l, n_a)) % 1000
    )


def test_mask_mistake_is_detected():
    """Guard the guard: a trace allowed to see one prefix token too many changes the loss."""
    from dist_cacheaug.core import masks

    decoder = tiny_decoder("llama")
    model = CacheAugmentedLM.from_decoder(decoder, num_latents=2)
    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.tensor([[3, 8]])
    good = model.training_loss(ids, positions, 2).loss_per_offset.detach()
    original = masks.allowed_bqk

    def leaky(layout, window):
        leaked = masks.TraceLayout(
            layout.prefix_len,
            layout.trace_len,
            layout.prefix_end_bp + 1,
            layout.position_ids_bq,
            layout.window_pos_bq,
        )
        return original(leaked, window)

    masks.allowed_bqk = leaky
    try:
        bad = model.training_loss(ids, positions, 2).loss_per_offset.detach()
    finally:
        masks.allowed_bqk = original
    assert (good - bad).abs().max() > 1e-4


@pytest.mark.parametrize("convention", ["insert", "refeed"])
@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_augment_then_plain_hf_continuation_reproduces_training_loss(family, convention):
    decoder = tiny_decoder(family)
    model = CacheAugmentedLM.from_decoder(decoder, num_latents=3, convention=convention, seed=2)
    n_a, p = 4, 10
    ids = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        loss = model.training_loss(ids, torch.tensor([[p]]), n_a).loss_per_offset
    aug = model.augment(ids[:, : p + 1])
    logits = [aug.logits[0]]
    cache, pos = aug.past_key_values, aug.next_position
    for i in range(n_a - 1):  # teacher-forced plain HF decoding from the augmented cache
        tok = ids[:, p + 1 + i : p + 2 + i]
        out = decoder(
            input_ids=tok, **cache_arg(cache), use_cache=True, position_ids=torch.tensor([[pos + i]])
        )
        logits.append(out.logits[0, -1].float())
    ce = F.cross_entropy(torch.stack(logits), ids[0, p + 1 : p + 1 + n_a], reduction="none")
    torch.testing.assert_close(ce, loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("convention", ["insert", "refeed"])
def test_augment_accepts_a_one_token_prompt(convention):
    model = CacheAugmentedLM.from_decoder(tiny_decoder("gemma2"), num_latents=2, convention=convention)
    ids = torch.tensor([[5]])
    aug = model.augment(ids)
    assert aug.logits.shape == (1, VOCAB) and torch.isfinite(aug.logits).all()
    assert model.generate(ids, max_new_tokens=3).shape == (1, 4)


def test_insert_augment_continues_with_hf_defaults():
    decoder = tiny_decoder("llama")
    model = CacheAugmentedLM.from_decoder(decoder, num_latents=3)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    aug = model.augment(ids)
    nxt = aug.logits.argmax(-1, keepdim=True)
    explicit = model.augment(ids)
    a = decoder(input_ids=nxt, **cache_arg(aug.past_key_values)).logits
    b = decoder(
        input_ids=nxt,
        **cache_arg(explicit.past_key_values),
        position_ids=torch.full((2, 1), explicit.next_position),
    ).logits
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_generate_without_augmentation_equals_hf_greedy(family):
    decoder = tiny_decoder(family)
    model = CacheAugmentedLM.from_decoder(decoder, num_latents=2)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    ours = model.generate(ids, max_new_tokens=12, augment=False)
    hf = decoder.generate(
        ids, max_new_tokens=12, do_sample=False, min_new_tokens=12, pad_token_id=0, eos_token_id=None
    )
    assert torch.equal(ours, hf)
    with torch.no_grad():
        plain = decoder(ids).logits
    out = model.decoder(ids).logits
    # exact: model.decoder is the decoder itself (not a copy), run on the same input and shapes
    torch.testing.assert_close(out, plain, atol=0, rtol=0)


def test_augmented_generate_follows_augment_logits():
    decoder = tiny_decoder("gemma2")
    model = CacheAugmentedLM.from_decoder(decoder, num_latents=4)
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(6))
    aug = model.augment(ids)
    gen = model.generate(ids, max_new_tokens=5)
    assert gen.shape == (1, 17) and torch.equal(gen[:, :12], ids)
    assert int(gen[0, 12]) == int(aug.logits.argmax(-1))


@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_no_latent_trace_pass_equals_the_plain_decoder(family):
    """The shared trace pass with zero latents ("refeed", N_L = 0) = the decoder's own CE of x[p+k]."""
    from dist_cacheaug.core.model import no_latent_trace_loss

    decoder = tiny_decoder(family)
    ids = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(7))
    positions, n_a = torch.tensor([[0, 5, 30], [2, 17, 33]]), 4
    got = no_latent_trace_loss(decoder, ids, positions, n_a).loss_per_offset
    with torch.no_grad():
        logits = decoder(ids).logits.float()
    rows = (positions[:, :, None] + torch.arange(n_a)).reshape(2, -1)  # row t predicts x[t+1]
    ce = F.cross_entropy(
        torch.gather(logits, 1, rows[..., None].expand(-1, -1, logits.shape[-1])).reshape(-1, VOCAB),
        torch.gather(ids, 1, rows + 1).reshape(-1),
        reduction="none",
    )
    torch.testing.assert_close(got, ce.view(-1, n_a).mean(0), atol=1e-5, rtol=1e-5)


def test_frozen_decoder_gets_no_grad_and_is_unchanged_by_a_step():
    decoder = tiny_decoder("gemma2")
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    model = CacheAugmentedLM.from_decoder(decoder, num_latents=2)
    names = {n for n, _ in model.named_parameters()}
    assert names and not any(n.startswith("decoder") for n in names)
    assert all(p.requires_grad for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(3, VOCAB, (2, 16))
    model.training_loss(ids, sample_positions(2, 16, 4, 2), 2).loss.backward()
    opt.step()
    assert all(p.grad is None for p in decoder.parameters())
    for k, v in decoder.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.soft_tokens.grad is not None and model.soft_tokens.grad.abs().sum() > 0


def test_bad_positions_are_rejected_with_a_clear_error():
    model = CacheAugmentedLM.from_decoder(tiny_decoder("llama"), num_latents=2)
    ids = torch.randint(3, VOCAB, (1, 10))
    with pytest.raises(ValueError, match=r"\[0, 6\].*num_ahead=3.*\[7\]"):
        model.training_loss(ids, torch.tensor([[2, 7]]), 3)
    with pytest.raises(ValueError, match="positions must be"):
        model.training_loss(ids, torch.tensor([2, 3]), 3)
    with pytest.raises(ValueError, match="cannot sample"):
        sample_positions(1, 10, 8, 3)
    with pytest.raises(ValueError, match="non-empty"):
        model.augment(torch.zeros(1, 0, dtype=torch.long))


def test_sample_positions_are_valid_distinct_and_seeded():
    a = sample_positions(3, 50, 10, 4, torch.Generator().manual_seed(0))
    b = sample_positions(3, 50, 10, 4, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (3, 10)
    assert int(a.min()) >= 0 and int(a.max()) <= 50 - 1 - 4
    assert all(len(set(row.tolist())) == 10 for row in a)


@pytest.mark.parametrize("init", ["decoder", "scratch"])
def test_coprocessor_init(init):
    decoder = tiny_decoder("gemma2")
    model = CacheAugmentedLM.from_decoder(decoder, num_latents=2, coprocessor_init=init)
    dec_state = decoder.base_model.state_dict()
    cop_state = model.coprocessor.state_dict()
    assert not any("embed_tokens" in k for k in cop_state)  # unused input embeddings are dropped
    same = all(torch.equal(v, dec_state[k]) for k, v in cop_state.items())
    assert same == (init == "decoder")
    # the coprocessor is a copy, not an alias: training it never touches the decoder
    assert all(v.data_ptr() != dec_state[k].data_ptr() for k, v in cop_state.items())


def test_save_and_load_roundtrip(tmp_path):
    decoder = tiny_decoder("gemma2")
    model = CacheAugmentedLM.from_decoder(
        decoder, num_latents=3, convention="refeed", latent_final_norm=False
    )
    with torch.no_grad():
        model.soft_tokens.add_(1.0)
        next(model.coprocessor.parameters()).mul_(1.5)
    model.save_pretrained(tmp_path / "export")
    loaded = CacheAugmentedLM.from_pretrained(tmp_path / "export", decoder=decoder)
    assert loaded.aug_config == model.aug_config
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(7))
    pos = torch.tensor([[1, 5], [0, 9]])
    with torch.no_grad():  # exact: reloaded fp32 weights, the same kernels on the same shapes
        torch.testing.assert_close(
            loaded.training_loss(ids, pos, 3).loss_per_offset,
            model.training_loss(ids, pos, 3).loss_per_offset,
            atol=0,
            rtol=0,
        )
    other = tiny_decoder("gemma2", hidden_size=48)
    with pytest.raises(ValueError, match="another decoder.*hidden_size"):
        CacheAugmentedLM.from_pretrained(tmp_path / "export", decoder=other)
    with pytest.raises(FileNotFoundError, match="cacheaug_config.json"):
        CacheAugmentedLM.from_pretrained(tmp_path, decoder=decoder)


@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_activation_checkpointing_gives_the_same_loss_and_grads(family):
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(8))
    pos = sample_positions(2, 20, 5, 3, torch.Generator().manual_seed(9))
    results = []
    for ckpt in (False, True):
        model = CacheAugmentedLM.from_decoder(tiny_decoder(family), num_latents=3, seed=0)
        if ckpt:
            model.enable_activation_checkpointing()
        calls = []
        model.coprocessor.layers[0].mlp.register_forward_pre_hook(lambda *a, c=calls: c.append(1))
        out = model.training_loss(ids, pos, 3)
        out.loss.backward()
        assert len(calls) == (2 if ckpt else 1)  # recomputed in backward only when checkpointing
        results.append((out.loss_per_offset.detach(), trainable_grads(model)))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=1e-6)
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, atol=1e-6, rtol=1e-5)


def test_checkpointed_layers_stay_correct_when_copied_or_used_with_a_growing_cache():
    decoder = tiny_decoder("llama")
    model = CacheAugmentedLM.from_decoder(decoder, num_latents=2)
    model.enable_activation_checkpointing()
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(10))
    reference = tiny_decoder("llama")  # same seed, never wrapped
    # a deep copy computes with its own weights, not the original's
    copied = copy.deepcopy(decoder)
    with torch.no_grad():
        for prm in copied.parameters():
            prm.mul_(0.5)
    assert not torch.allclose(copied(ids).logits, decoder(ids).logits)
    # under autograd with HF's default (growing) cache, layers run unwrapped: same as an unwrapped model
    trainable = copy.deepcopy(decoder).train()
    for prm in trainable.parameters():
        prm.requires_grad_(True)
    loss = trainable(ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(loss, reference(ids, labels=ids).loss)
