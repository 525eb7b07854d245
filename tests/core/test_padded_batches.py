"""Prompts of different lengths in one batch: LEFT padding with an attention mask. Every row's latents,
next-token logits and greedy continuation equal those of the same prompt run alone (fp32, eager
attention, CPU: atol 3e-5), for every tiny family and both position conventions, with prompts of one
token, rows that stop early at EOS (the decoder's own, id 2, or a given one; HF ``generate`` then fills
the row with the pad id), delayed latents and re-augmentation; bad masks are refused."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, tiny_augmented, tiny_decoder

from dist_cacheaug import CacheAugmentedLM
from dist_cacheaug.core.generation import generate
from dist_cacheaug.core.hf_compat import cache_arg
from dist_cacheaug.variants import VARIANTS

FAMILIES = ["gemma2", "llama", "mistral", "qwen2"]
CONVENTIONS = ["insert", "refeed"]
LENGTHS = [1, 5, 9]  # gemma2's window is 7, mistral's 9: latents and new tokens cross them
NEW = 6
# Same maths, other shapes (a padded batch vs each prompt alone: other matmul and softmax kernels):
# logits and latents (|x| <= ~5) after 2-4 layers differ from an fp64 run by <= 6e-6, so two fp32 paths
# by up to ~1.2e-5 (7e-6 measured); a pad that is seen or a position off by one is >= 1e-3.
ATOL = 3e-5
PAD = 0


def _model(family: str, convention: str, n_l: int = 3, cls=CacheAugmentedLM, **kwargs):
    return tiny_augmented(family, convention, n_l, cls=cls, **kwargs)


@pytest.fixture(
    scope="module", params=[(f, c) for f in FAMILIES for c in CONVENTIONS], ids=lambda p: "-".join(p)
)
def model(request):
    return _model(*request.param)


def _prompts(lengths=LENGTHS, seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (1, n), generator=g) for n in lengths]


def _left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), n), PAD, dtype=torch.long)
    mask = torch.zeros(len(prompts), n, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, n - p.shape[1] :] = p[0]
        mask[r, n - p.shape[1] :] = 1
    return ids, mask


def _assert_rows_equal_alone(new: torch.Tensor, alone: list[list[int]], what=None) -> None:
    """``new`` [B, t]: the batch's generated ids; ``alone[r]``: row r's prompt generated alone. Each row
    is its run alone up to where that stopped (EOS), then pad (what HF ``generate`` writes into finished
    rows); the batch stops when its longest row does."""
    assert new.shape[1] == max(len(a) for a in alone), (what, new, alone)
    for r, a in enumerate(alone):
        assert new[r].tolist() == a + [PAD] * (new.shape[1] - len(a)), (what, r, new[r].tolist(), a)


@pytest.mark.numerics
def test_augment_rows_equal_each_prompt_alone(model):
    prompts = _prompts()
    ids, mask = _left_pad(prompts)
    out = model.augment(ids, attention_mask=mask)
    n_l = model.num_latents
    assert out.attention_mask.shape == (3, ids.shape[1] + n_l)
    for r, p in enumerate(prompts):
        alone = model.augment(p)
        torch.testing.assert_close(out.logits[r], alone.logits[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(out.latents[r], alone.latents[0], atol=ATOL, rtol=0)
        assert int(out.next_position[r]) == alone.next_position
    # Plain HF continuation from the padded augmented cache, per the documented recipe.
    tok = out.logits.argmax(-1)
    step_mask = torch.cat([out.attention_mask, torch.ones(3, 1, dtype=torch.long)], 1)
    nxt = model.decoder(
        input_ids=tok[:, None],
        attention_mask=step_mask,
        position_ids=out.next_position[:, None],
        **cache_arg(out.past_key_values),
    ).logits[:, -1]
    for r, p in enumerate(prompts):
        alone = model.augment(p)
        ref = model.decoder(
            input_ids=alone.logits.argmax(-1)[:, None],
            position_ids=torch.tensor([[alone.next_position]]),
            **cache_arg(alone.past_key_values),
        ).logits[:, -1]
        torch.testing.assert_close(nxt[r], ref[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("augment", [True, False])
def test_generate_rows_equal_each_prompt_alone(model, augment):
    prompts = _prompts(seed=1)
    ids, mask = _left_pad(prompts)
    out = generate(model, ids, NEW, augment=augment, attention_mask=mask)
    assert torch.equal(out[:, : ids.shape[1]], ids)
    alone = [generate(model, p, NEW, augment=augment)[0, p.shape[1] :].tolist() for p in prompts]
    _assert_rows_equal_alone(out[:, ids.shape[1] :], alone)


def test_generate_row_stopping_at_a_given_eos_is_padded_and_others_go_on(model):
    prompts = _prompts(seed=2)
    ids, mask = _left_pad(prompts)
    free = [generate(model, p, NEW)[0, p.shape[1] :].tolist() for p in prompts]
    # An EOS id that row 0 emits early (not first) and some other row never emits.
    eos = next(
        (
            t
            for t in free[0][1:4]
            if t not in free[0][: free[0].index(t)] and any(t not in f for f in free[1:])
        ),
        None,
    )
    assert eos is not None, free
    out = model.generate(ids, NEW, eos_token_id=eos, attention_mask=mask)
    new = out[:, ids.shape[1] :]
    assert new.shape[1] == NEW  # a row without EOS keeps the loop going
    alone = [model.generate(p, NEW, eos_token_id=eos)[0, p.shape[1] :].tolist() for p in prompts]
    _assert_rows_equal_alone(new, alone)
    assert new[0].tolist().index(eos) < NEW - 1 and new[0, -1] == PAD  # row 0 stopped early, then pads


@pytest.mark.numerics
def test_all_ones_mask_equals_no_mask():
    model = _model("gemma2", "refeed")
    ids = _prompts([7, 7, 7])
    ids = torch.cat(ids, 0)
    a, b = model.augment(ids), model.augment(ids, attention_mask=torch.ones_like(ids))
    torch.testing.assert_close(a.logits, b.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(a.latents, b.latents, atol=ATOL, rtol=0)
    assert b.next_position.tolist() == [a.next_position] * 3
    assert torch.equal(
        generate(model, ids, NEW), generate(model, ids, NEW, attention_mask=torch.ones_like(ids))
    )


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_padded_reaugment_and_delay_equal_each_prompt_alone(family, convention):
    model = _model(family, convention)
    prompts = _prompts([3, 6, 9], seed=3)
    ids, mask = _left_pad(prompts)
    for kwargs in ({"reaugment_every": 2}, {"async_delay": 2}, {"async_delay": 1, "reaugment_every": 3}):
        out = generate(model, ids, NEW, attention_mask=mask, **kwargs)
        alone = [generate(model, p, NEW, **kwargs)[0, p.shape[1] :].tolist() for p in prompts]
        _assert_rows_equal_alone(out[:, ids.shape[1] :], alone, kwargs)


@pytest.mark.numerics
@pytest.mark.parametrize("variant", ["activations", "pause", "async", "base_lm"])
def test_variants_padded_rows_equal_each_prompt_alone(variant):
    cls = VARIANTS[variant]
    if variant == "base_lm":
        model = cls.from_decoder(tiny_decoder("gemma2")).eval()
    else:
        model = _model("gemma2", "insert", cls=cls)
    prompts = _prompts([2, 5, 9], seed=4)
    ids, mask = _left_pad(prompts)
    out = model.augment(ids, attention_mask=mask)
    gen = generate(model, ids, NEW, attention_mask=mask)
    for r, p in enumerate(prompts):
        alone = model.augment(p)
        torch.testing.assert_close(out.logits[r], alone.logits[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(out.latents[r], alone.latents[0], atol=ATOL, rtol=0)
    alone = [generate(model, p, NEW)[0, p.shape[1] :].tolist() for p in prompts]
    _assert_rows_equal_alone(gen[:, ids.shape[1] :], alone)


def test_bad_masks_are_refused():
    model = _model("llama", "insert")
    ids, mask = _left_pad(_prompts())
    all_pad = mask.clone()
    all_pad[0] = 0
    right = mask.clone()
    right[2, -1] = 0  # row 2 (the full-length one) ends with a pad: right padding
    holes = mask.clone()
    holes[1, -2] = 0  # a pad between tokens
    cases = {
        "no token": all_pad,
        "LEFT-padded": right,
        "LEFT-padded ": holes,
        "shape": mask[:, 1:],
        "only 0": mask * 2,
    }
    for match, bad in cases.items():
        with pytest.raises(ValueError, match=match.strip()):
            model.augment(ids, attention_mask=bad)
        with pytest.raises(ValueError, match=match.strip()):
            generate(model, ids, 2, attention_mask=bad)
    with pytest.raises(ValueError, match="async_delay=1"):  # the one-token row sees nothing behind
        generate(model, ids, 2, attention_mask=mask, async_delay=1)
