"""Compiled FlexAttention must not recompile per mask layout.

transformers compiles ``flex_attention`` once (``torch.compile(flex_attention)``, automatic dynamic
shapes) and dynamo guards on everything the BlockMask's ``mask_mod`` closure captures: a Python int
(prefix length, trace length, window) is guarded by value, so each value gets its own compiled entry,
and past ``torch._dynamo.config.recompile_limit`` (8) flex runs unfused and materialises full score
matrices. The masks of dist_cacheaug/core/masks.py capture only tensors (guarded on shape and dtype), so the
coprocessor pass, the decoder pass, sliding and full layers and every step's positions share entries.

CPU stand-in for the GPU run: the same dynamo front end (which is what guards and recompiles) with the
"eager" backend, which runs the traced flex_attention higher-order op through its eager reference
implementation (inductor's CPU flex kernels are not what is under test here).
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend
from torch.nn.attention.flex_attention import flex_attention

from dist_cacheaug import sample_positions
from dist_cacheaug.core.masks import TraceLayout, flex_block_mask

B, N, P, HEADS, DIM = 2, 40, 5, 2, 8
NUM_LATENTS, NUM_AHEAD, WINDOW = 4, 4, 16  # coprocessor pass T = N_L = 4, decoder pass T = N_L + N_A - 1 = 7


def step_layouts(gen: torch.Generator) -> list[TraceLayout]:
    """The layouts of one micro-step with fresh positions, as model.py builds them: the coprocessor pass
    (insert) and the decoder pass in both conventions (refeed adds window positions)."""
    pos = sample_positions(B, N, P, NUM_AHEAD, gen)
    cop_t, dec_t = NUM_LATENTS, NUM_LATENTS + NUM_AHEAD - 1
    out = [TraceLayout(N, cop_t, pos, (pos[:, :, None] + torch.arange(1, cop_t + 1)).reshape(B, -1))]
    for refeed in (False, True):
        out.append(
            TraceLayout(
                N,
                dec_t,
                pos - int(refeed),
                (pos[:, :, None] + torch.arange(1, dec_t + 1)).reshape(B, -1),
                (pos[:, :, None] + torch.arange(dec_t)).reshape(B, -1) if refeed else None,
            )
        )
    return out


def run_step(fa, gen: torch.Generator) -> None:
    """Every mask of a micro-step (each layout × sliding and full layers) through compiled flex attention,
    with and without grad (training and evaluation: dynamo guards on grad mode)."""
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            for layout in step_layouts(gen):
                for window in (WINDOW, None):
                    block_mask = flex_block_mask(layout, window)
                    q_len = layout.num_queries
                    q = torch.randn(B, HEADS, q_len, DIM, generator=gen)
                    kv = torch.randn(B, HEADS, N + q_len, DIM, generator=gen)
                    out = fa(q, kv, kv, block_mask=block_mask)
                    assert out.shape == q.shape and bool(torch.isfinite(out).all())


@pytest.fixture
def counted_flex():
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=256):
        yield counter, torch.compile(flex_attention, backend=counter)
    torch._dynamo.reset()


def test_one_shape_compiles_once_for_every_layout(counted_flex):
    """Same (Q, KV) shape, sliding and full layers, three sets of positions: one compiled entry."""
    counter, fa = counted_flex
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        layout = step_layouts(gen)[1]
        for window in (WINDOW, None, 7):
            q = torch.randn(B, HEADS, layout.num_queries, DIM, generator=gen)
            kv = torch.randn(B, HEADS, N + layout.num_queries, DIM, generator=gen)
            fa(q, kv, kv, block_mask=flex_block_mask(layout, window))
    assert counter.frame_count == 1


def test_training_steps_compile_a_fixed_number_of_times(counted_flex):
    counter, fa = counted_flex
    gen = torch.Generator().manual_seed(0)
    run_step(fa, gen)
    # At most 2 compiles per grad mode, whatever the layouts: one static entry for the first (Q, KV)
    # shape, then dynamo's automatic-dynamic recompile on the second shape, whose dynamic-shape entry
    # serves every later shape. Sliding vs full, insert vs refeed and the positions add none. (A mask_mod
    # capturing ints for N, T and the window needs 4 per grad mode here, 8 in all: the recompile limit.)
    first = counter.frame_count
    assert 1 <= first <= 4
    run_step(fa, gen)  # a second step: new positions, same shapes
    run_step(fa, gen)
    assert counter.frame_count == first
