"""Fast paths against simple references: FlexAttention block masks vs the eager float mask, chunked
cross-entropy vs plain cross-entropy, flex forward vs eager forward."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, tiny_decoder

from dist_cacheaug import CacheAugmentedLM, sample_positions
from dist_cacheaug.core.losses import chunked_cross_entropy, plain_cross_entropy
from dist_cacheaug.core.masks import (
    TraceLayout,
    allowed_bqk,
    eager_mask,
    flex_block_mask,
    flex_block_mask_dense,
)


def random_layout(gen, b=2, n=40, p=5, t=6, refeed=False):
    pos = sample_positions(b, n, p, t, gen)
    rel = torch.arange(1, t + 1)
    layout = TraceLayout(
        prefix_len=n,
        trace_len=t,
        prefix_end_bp=pos - int(refeed),
        position_ids_bq=(pos[:, :, None] + rel).reshape(b, -1),
        window_pos_bq=(pos[:, :, None] + torch.arange(t)).reshape(b, -1) if refeed else None,
    )
    return layout


def dense_from_block_mask(block_mask, q_len, kv_len):
    """Evaluate a BlockMask densely as FlexAttention does: every (q, kv) in a full block is attended,
    mask_mod decides inside partial blocks, everything else is masked."""
    from torch.nn.attention.flex_attention import _ordered_to_dense

    b = block_mask.kv_num_blocks.shape[0]
    qb, kb = block_mask.BLOCK_SIZE
    q = torch.arange(q_len)[:, None].expand(q_len, kv_len)
    k = torch.arange(kv_len)[None, :].expand(q_len, kv_len)
    n_kv_blocks = block_mask.kv_indices.shape[-1]
    partial = _ordered_to_dense(block_mask.kv_num_blocks, block_mask.kv_indices, n_kv_blocks).bool()
    full = _ordered_to_dense(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, n_kv_blocks).bool()
    assert not (partial & full).any()
    out = torch.zeros(b, q_len, kv_len, dtype=torch.bool)
    for bi in range(b):
        bidx = torch.full_like(q, bi)
        vals = block_mask.mask_mod(bidx, torch.zeros_like(bidx), q, k)
        out[bi] = full[bi, 0][q // qb, k // kb] | (vals & partial[bi, 0][q // qb, k // kb])
    return out


BLOCK_FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")
BLOCK_FIELDS += ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


@pytest.mark.parametrize("window", [None, 5, 17])
@pytest.mark.parametrize("refeed", [False, True])
def test_flex_block_mask_equals_eager_mask(window, refeed):
    gen = torch.Generator().manual_seed(0 if window is None else window)
    layout = random_layout(gen, refeed=refeed)
    expected = allowed_bqk(layout, window)
    bm = flex_block_mask(layout, window, device="cpu")
    got = dense_from_block_mask(bm, layout.num_queries, layout.prefix_len + layout.num_queries)
    assert torch.equal(got, expected)
    # and the float rendering of the same mask: 0 where allowed, very negative elsewhere
    fm = eager_mask(layout, window, torch.float32)[:, 0]
    assert torch.equal(fm == 0, expected) and bool((fm[~expected] < -1e30).all())


def late_layout(b=1, n=1024, p=16, t=16, refeed=False):
    """Evenly spaced traces that all start late in the prefix: whole 128-tiles of the prefix are visible
    to whole 128-query tiles, so the BlockMask has full tiles (random layouts rarely do)."""
    pos = (n // 2 + t * torch.arange(p))[None].expand(b, p)
    rel = torch.arange(1, t + 1)
    return TraceLayout(
        prefix_len=n,
        trace_len=t,
        prefix_end_bp=pos - int(refeed),
        position_ids_bq=(pos[:, :, None] + rel).reshape(b, -1),
        window_pos_bq=(pos[:, :, None] + torch.arange(t)).reshape(b, -1) if refeed else None,
    )


# Shapes with many 128-tiles: full tiles, partial tiles, tiles cut by N and by the sequence end, traces
# straddling tile borders, windows shorter / longer than the prefix and than a tile.
@pytest.mark.parametrize(
    "shape", [(2, 300, 20, 16), (2, 200, 9, 31), (1, 1000, 40, 7), (2, 256, 16, 8), "late"]
)
@pytest.mark.parametrize("window", [None, 3, 100, 300, 4096])
@pytest.mark.parametrize("refeed", [False, True])
def test_flex_block_mask_block_structure(shape, window, refeed):
    """The block structure computed from the layout equals what create_block_mask finds by evaluating
    mask_mod on every pair, field by field; and the BlockMask as FlexAttention reads it (full tiles
    unmasked, mask_mod in partial tiles) equals the dense allowed_bqk."""
    if shape == "late":
        layout = late_layout(refeed=refeed)
    else:
        b, n, p, t = shape
        gen = torch.Generator().manual_seed(n + p + t + (window or 0))
        layout = random_layout(gen, b=b, n=n, p=p, t=t, refeed=refeed)
    q_len, kv_len = layout.num_queries, layout.prefix_len + layout.num_queries
    bm = flex_block_mask(layout, window)
    ref = flex_block_mask_dense(layout, window)
    assert bm.seq_lengths == ref.seq_lengths == (q_len, kv_len)
    assert bm.BLOCK_SIZE == ref.BLOCK_SIZE
    for field in BLOCK_FIELDS:
        got, want = getattr(bm, field), getattr(ref, field)
        assert got.dtype == want.dtype and torch.equal(got, want), field
    if shape == "late" and window in (None, 4096):
        assert int(bm.full_kv_num_blocks.sum()) > 0  # the full-tile path is exercised
    assert int(bm.kv_num_blocks.sum()) > 0
    assert torch.equal(dense_from_block_mask(bm, q_len, kv_len), allowed_bqk(layout, window))


def test_flex_mask_mod_captures_only_tensors():
    """A Python int in the closure is guarded by value in compiled flex attention: one compiled entry per
    window / prefix length / trace length. See tests/core/test_compile_counts.py."""
    gen = torch.Generator().manual_seed(0)
    for window in (None, 5):
        mask_mod = flex_block_mask(random_layout(gen), window).mask_mod
        cells = [c.cell_contents for c in mask_mod.__closure__]
        assert cells and all(isinstance(c, torch.Tensor) for c in cells)


def test_allowed_mask_semantics_on_a_hand_example():
    # N=4 prefix keys, 2 traces of 2 tokens at p=1 and p=2, insert convention, window 3.
    layout = TraceLayout(
        prefix_len=4,
        trace_len=2,
        prefix_end_bp=torch.tensor([[1, 2]]),
        position_ids_bq=torch.tensor([[2, 3, 3, 4]]),
    )
    allowed = allowed_bqk(layout, None)[0].int().tolist()
    assert allowed == [
        [1, 1, 0, 0, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 1, 0, 0],
        [1, 1, 1, 0, 0, 0, 1, 0],
        [1, 1, 1, 0, 0, 0, 1, 1],
    ]
    windowed = allowed_bqk(layout, 3)[0].int().tolist()  # keep keys with q_pos - k_pos < 3
    assert windowed[1] == [0, 1, 0, 0, 1, 1, 0, 0]  # q_pos 3 drops key 0
    assert windowed[3] == [0, 0, 1, 0, 0, 0, 1, 1]  # q_pos 4 drops keys 0, 1


@pytest.mark.numerics
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_cross_entropy_equals_plain(softcap, chunk):
    gen = torch.Generator().manual_seed(chunk)
    h = torch.randn(50, 16, generator=gen, requires_grad=True)
    w = torch.randn(300, 16, generator=gen, requires_grad=True)
    y = torch.randint(0, 300, (50,), generator=gen)
    ref = plain_cross_entropy(h, y, w, softcap)
    (gh_ref, gw_ref) = torch.autograd.grad(ref.sum(), (h, w))
    got = chunked_cross_entropy(h, y, w, softcap, chunk_size=chunk)
    (gh, gw) = torch.autograd.grad(got.sum(), (h, w))
    # same maths, other matmul shapes (1-row chunks: gemv): CE 1-26 from 16-term dot products with
    # sum |h_i w_i| <= ~30 is within 3.3e-6 of fp64, two paths within ~7e-6; a real bug is >= 1e-3
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh, gh_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, gw_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.numerics
@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_training_loss_chunk_size_does_not_change_the_loss(family):
    decoder = tiny_decoder(family)
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    pos = sample_positions(2, 20, 4, 3, torch.Generator().manual_seed(2))
    losses = []
    for chunk in (5, 4096):
        model = CacheAugmentedLM.from_decoder(decoder, num_latents=2, loss_chunk_size=chunk, seed=0)
        losses.append(model.training_loss(ids, pos, 3).loss_per_offset.detach())
    # same maths, other matmul shapes: a mean of positive CEs (~5) keeps each row's fp32 relative error
    # (<= ~7e-6 worst case, see tests/train/test_gpu_paths_cpu.py); a real bug is >= 1e-3
    torch.testing.assert_close(losses[0], losses[1], atol=0, rtol=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_flex_forward_equals_eager_forward(family, monkeypatch):
    """FlexAttention has no CPU backward, but its forward runs: same loss as eager. Flex runs uncompiled
    here: inductor's CPU flex kernels fail to build for some masks (torch 2.13), and the uncompiled flex
    path evaluates the very same BlockMask."""
    import transformers.integrations.flex_attention as hf_flex
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(
        hf_flex,
        "compile_friendly_flex_attention",
        lambda q, k, v, training=False, **kw: flex_attention(q, k, v, **kw),
    )
    eager = tiny_decoder(family)
    flex = tiny_decoder(family)
    flex.set_attn_implementation("flex_attention")
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    pos = sample_positions(2, 24, 5, 3, torch.Generator().manual_seed(4))
    out = []
    for dec in (eager, flex):
        model = CacheAugmentedLM.from_decoder(dec, num_latents=3, seed=0)
        with torch.no_grad():
            out.append(model.training_loss(ids, pos, 3).loss_per_offset)
    torch.testing.assert_close(out[1], out[0], atol=1e-4, rtol=1e-4)
