"""Generation through HF ``generate`` (core/generation.py) against the hand-written greedy loop it
replaced (``reference_helpers.reference_greedy_generate``): token ids equal and per-step logits within
1e-5 (fp32, eager attention, CPU), for every tiny family, both conventions, left-padded batches with a
one-token prompt, rows stopping early at EOS, re-augmentation and delayed latents. The frozen baseline
is ``decoder.generate`` itself; sampling is reproducible under a seed and top_k=1 equals greedy; the two
decoding paths (HF's loop from the latents, our re-augmenting loop under ``custom_generate``) agree under
every option; repetition penalty and stop strings have the effect HF documents."""

from __future__ import annotations

import pytest
import torch
from reference_helpers import reference_greedy_generate
from tiny_models import VOCAB, tiny_augmented
from tokenizers import Tokenizer, decoders, models
from transformers import GenerationConfig, PreTrainedTokenizerFast

from dist_cacheaug.core.generation import GenerationStats, generate

NEW = 10
ATOL = 1e-5
PAD = 0  # the tiny decoders' pad_token_id
EOS = 2  # ... and their eos_token_id (their generation_config's default EOS)
LENGTHS = [1, 6, 11]


def _model(family="gemma2", convention="insert", n_l=3):
    return tiny_augmented(family, convention, n_l)


def _padded(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.full((len(lengths), n), PAD, dtype=torch.long)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for r, k in enumerate(lengths):
        ids[r, n - k :] = torch.randint(3, VOCAB, (k,), generator=g)
        mask[r, n - k :] = 1
    return ids, mask


def _same_as_reference(model, ids, mask=None, eos=EOS, stats=None, **kwargs):
    """Our generate (pad = EOS, as the old loop filled finished rows) vs the old greedy loop."""
    got, want = [], []
    ours = generate(
        model,
        ids,
        NEW,
        attention_mask=mask,
        eos_token_id=eos,
        pad_token_id=eos,
        logits_out=got,
        stats=stats,
        **kwargs,
    )
    ref = reference_greedy_generate(
        model, ids, NEW, attention_mask=mask, eos_token_id=eos, logits_out=want, **kwargs
    )
    assert torch.equal(ours, ref), (ours, ref)
    assert len(got) == len(want)
    torch.testing.assert_close(torch.stack(got), torch.stack(want), atol=ATOL, rtol=0)
    return ours


@pytest.mark.parametrize("convention", ["insert", "refeed"])
@pytest.mark.parametrize("family", ["gemma2", "llama", "mistral"])
def test_greedy_equals_the_previous_loop(family, convention):
    model = _model(family, convention)
    ids, mask = _padded()
    _same_as_reference(model, ids[1:, -6:])  # two unpadded prompts
    _same_as_reference(model, ids, mask)  # lengths 1, 6, 11 left-padded
    _same_as_reference(model, ids, mask, augment=False)


def test_early_eos_per_row_equals_the_previous_loop():
    model = _model("llama")
    ids, mask = _padded(seed=3)
    free = reference_greedy_generate(model, ids, NEW, attention_mask=mask)[:, ids.shape[1] :]
    # a token row 0 emits at step 2 (first time) that another row never emits: row 0 stops early
    eos = int(free[0, 2])
    assert eos not in free[0, :2].tolist() and any(eos not in row.tolist() for row in free[1:])
    out = _same_as_reference(model, ids, mask, eos=eos)
    assert out.shape[1] == ids.shape[1] + NEW and out[0, -1] == eos  # others went on, row 0 kept EOS
    # HF's own fill for a finished row is the pad id: the same tokens, pads after each row's EOS
    expect = out.clone()
    for row in expect[:, ids.shape[1] :]:
        if eos in row.tolist():
            row[row.tolist().index(eos) + 1 :] = PAD
    assert torch.equal(generate(model, ids, NEW, attention_mask=mask, eos_token_id=eos), expect)
    assert expect[0, ids.shape[1] + 3 :].tolist() == [PAD] * (NEW - 3)


@pytest.mark.parametrize("convention", ["insert", "refeed"])
def test_reaugment_and_delay_equal_the_previous_loop(convention):
    model = _model("gemma2", convention)
    ids, mask = _padded([3, 6, 11], seed=4)
    stats = GenerationStats()
    _same_as_reference(model, ids, mask, reaugment_every=3, stats=stats)
    assert stats.augmentations == 4 and stats.new_tokens == NEW
    _same_as_reference(model, ids, mask, async_delay=2)
    _same_as_reference(model, ids, mask, async_delay=1, reaugment_every=4)


def test_frozen_baseline_is_the_decoders_hf_generate():
    model = _model("gemma2")
    dec = model.decoder
    ids, mask = _padded(seed=5)
    for options in ({}, {"repetition_penalty": 1.3, "eos_token_id": 7}, {"min_new_tokens": 4}):
        hf = dec.generate(ids, attention_mask=mask, max_new_tokens=NEW, **options)
        assert torch.equal(generate(model, ids, NEW, augment=False, attention_mask=mask, **options), hf)
    sample = dict(do_sample=True, top_k=5, temperature=0.7, max_new_tokens=NEW)
    torch.manual_seed(11)
    hf = dec.generate(ids, attention_mask=mask, **sample)
    torch.manual_seed(11)
    assert torch.equal(generate(model, ids, augment=False, attention_mask=mask, **sample), hf)


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = _model("llama", "refeed")
    ids, mask = _padded(seed=6)
    hot = GenerationConfig(do_sample=True, temperature=1.5, top_k=0, max_new_tokens=NEW)

    def sample(seed, **kwargs):
        return generate(
            model,
            ids,
            attention_mask=mask,
            generation_config=hot,
            generator=torch.Generator().manual_seed(seed),
            **kwargs,
        )

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))
    # the seed also reaches our re-augmenting loop, which draws exactly as HF's loop does
    assert torch.equal(sample(0), sample(0, reaugment_every=NEW))
    assert not torch.equal(sample(0, reaugment_every=3), sample(1, reaugment_every=3))
    greedy = generate(model, ids, NEW, attention_mask=mask)
    assert torch.equal(generate(model, ids, NEW, attention_mask=mask, do_sample=True, top_k=1), greedy)
    # the earlier API: temperature > 0 alone means sampling, temperature 0 greedy
    legacy = generate(
        model,
        ids,
        NEW,
        attention_mask=mask,
        temperature=1.5,
        top_k=0,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(legacy, sample(0))
    assert torch.equal(generate(model, ids, NEW, attention_mask=mask, temperature=0.0), greedy)


@pytest.mark.parametrize("convention", ["insert", "refeed"])
def test_our_reaugmenting_loop_decodes_as_hf_generate(convention):
    """K >= max_new_tokens: our loop (one augmentation) and HF's loop from the latents see the same
    scores and must choose, pad and stop alike, under any processor and criterion."""
    model = _model("mistral", convention)
    ids, mask = _padded(seed=7)
    for options in (
        {},
        {"repetition_penalty": 1.5, "eos_token_id": 9},
        {"no_repeat_ngram_size": 2, "min_new_tokens": 3},
        {"do_sample": True, "top_p": 0.8, "temperature": 0.9},
    ):
        a, b = [], []
        plain = generate(
            model,
            ids,
            NEW,
            attention_mask=mask,
            logits_out=a,
            generator=torch.Generator().manual_seed(3),
            **options,
        )
        ours = generate(
            model,
            ids,
            NEW,
            attention_mask=mask,
            reaugment_every=NEW,
            logits_out=b,
            generator=torch.Generator().manual_seed(3),
            **options,
        )
        assert torch.equal(plain, ours), options
        torch.testing.assert_close(torch.stack(a), torch.stack(b), atol=ATOL, rtol=0)


def test_repetition_penalty_equals_the_penalty_applied_by_hand():
    model = _model("gemma2", "refeed")
    ids, mask = _padded(seed=8)
    free = generate(model, ids, NEW, attention_mask=mask, eos_token_id=EOS, pad_token_id=EOS)
    for every in (None, 3):
        ours = generate(
            model,
            ids,
            NEW,
            attention_mask=mask,
            repetition_penalty=3.0,
            reaugment_every=every,
            eos_token_id=EOS,
            pad_token_id=EOS,
        )
        ref = reference_greedy_generate(
            model, ids, NEW, attention_mask=mask, penalty=3.0, reaugment_every=every, eos_token_id=EOS
        )
        assert torch.equal(ours, ref), every
    assert not torch.equal(
        ours[:, : free.shape[1]], free[:, : ours.shape[1]]
    )  # the penalty changed something


ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 .,:;!?ABCDEFGHIJKLMNO"  # ids 3..60: one character each


def char_hf_tokenizer() -> PreTrainedTokenizerFast:
    """An HF tokenizer over the tiny vocabulary (ids 3.. = one character each), built offline."""
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{c: 3 + i for i, c in enumerate(ALPHABET)}}
    assert len(vocab) == VOCAB
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


class DecodeOnly:
    """A tokenizer that can only decode (like this project's sentencepiece wrapper)."""

    def __init__(self, hf):
        self.decode = lambda ids: hf.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("every", [None, 4])
def test_stop_string_ends_generation_for_its_row(every):
    model = _model("llama")
    ids, mask = _padded(seed=9)
    hf = char_hf_tokenizer()
    free = generate(model, ids, NEW, attention_mask=mask, reaugment_every=every)[:, ids.shape[1] :]
    # the text row 0 generates at steps 2-3 and row 1 never does
    stop = hf.decode(free[0, 2:4])
    assert all(stop not in hf.decode(row) for row in free[1:2]), (stop, hf.batch_decode(free))
    first = next(t for t in range(2, NEW) if stop in hf.decode(free[0, : t + 1]))
    for tok in (hf, DecodeOnly(hf)):
        out = generate(
            model, ids, NEW, attention_mask=mask, reaugment_every=every, stop_strings=[stop], tokenizer=tok
        )
        new = out[:, ids.shape[1] :]
        assert new[0, : first + 1].tolist() == free[0, : first + 1].tolist()
        assert new[0, first + 1 :].tolist() == [PAD] * (new.shape[1] - first - 1)  # finished: padded
        assert torch.equal(new[1], free[1, : new.shape[1]])  # row 1 went on
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, ids, NEW, attention_mask=mask, stop_strings=[stop])


def test_stop_callback_and_bad_options():
    model = _model("llama")
    ids, _ = _padded([5, 5])
    assert generate(model, ids, NEW, stop=lambda g: g.shape[1] >= 4).shape[1] == 5 + 4
    assert generate(model, ids, NEW, stop=lambda g: g.shape[1] >= 4, reaugment_every=2).shape[1] == 5 + 4
    assert torch.equal(generate(model, ids, 0), ids)
    with pytest.raises(ValueError, match="unknown generation option"):
        generate(model, ids, 4, top_q=0.3)
    with pytest.raises(ValueError, match="num_beams=2"):
        generate(model, ids, 4, num_beams=2)
    with pytest.raises(ValueError, match="num_return_sequences=3"):
        model.generate(ids, 4, generation_config=GenerationConfig(do_sample=True, num_return_sequences=3))
    model.decoder.generation_config.cache_implementation = "hybrid"  # Gemma-2's old default: ignored by HF
    assert torch.equal(generate(model, ids, 4), generate(model, ids, 4, reaugment_every=4))
    model.decoder.generation_config.cache_implementation = "static"
    with pytest.raises(ValueError, match="cache_implementation='static' \\(from the decoder's"):
        generate(model, ids, 4)
    with pytest.raises(ValueError, match="stop_strings"):
        generate(model, ids, 4, stop_strings=[""], tokenizer=char_hf_tokenizer())
