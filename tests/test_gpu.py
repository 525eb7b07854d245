"""GPU-only checks (skip cleanly without CUDA): the flex training pass against eager, in bf16."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, tiny_decoder

from dist_cacheaug import CacheAugmentedLM, sample_positions

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_flex_training_pass_matches_eager_in_bf16(family):
    device = torch.device("cuda")
    ids = torch.randint(3, VOCAB, (2, 48), generator=torch.Generator().manual_seed(0)).to(device)
    pos = sample_positions(2, 48, 6, 4, torch.Generator().manual_seed(1), device=device)
    results = {}
    for attn in ("eager", "flex_attention"):
        decoder = tiny_decoder(family).to(device=device, dtype=torch.bfloat16)
        decoder.set_attn_implementation(attn)
        model = CacheAugmentedLM.from_decoder(decoder, num_latents=3, seed=0)
        out = model.training_loss(ids, pos, 4)
        out.loss.backward()
        results[attn] = (out.loss_per_offset.float().detach(), model.soft_tokens.grad.float())
    torch.testing.assert_close(results["flex_attention"][0], results["eager"][0], atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(results["flex_attention"][1], results["eager"][1], atol=5e-2, rtol=5e-2)
