"""Tiny random HF decoders of each supported family, for CPU tests."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dist_cacheaug.core.decoder import freeze
from dist_cacheaug.core.model import CacheAugmentedLM

VOCAB = 61

TINY = {
    # Gemma-2: softcapping, alternating sliding/full layers (tiny window so tests cross it), scaled embeddings.
    "gemma2": dict(
        model_type="gemma2",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=7,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=256,
        query_pre_attn_scalar=8,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "llama": dict(
        model_type="llama",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "mistral": dict(
        model_type="mistral",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=9,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "qwen2": dict(
        model_type="qwen2",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
}


def tiny_decoder(family: str = "gemma2", seed: int = 0, **overrides) -> torch.nn.Module:
    kwargs = dict(TINY[family])
    kwargs.update(overrides)
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    # Larger-than-default weights so attention patterns (and mask mistakes) matter numerically.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return freeze(model)


def perturb(module: torch.nn.Module, scale: float = 0.3) -> None:
    """Seeded noise on every matrix: a coprocessor initialised from the decoder becomes unlike it, so its
    latents matter numerically (a mistake in their positions or masks changes the outputs)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * scale)


def tiny_augmented(
    family: str = "gemma2",
    convention: str = "insert",
    n_l: int = 3,
    cls=CacheAugmentedLM,
    decoder_kw=None,
    **kw,
):
    """A tiny cache-augmented model in eval mode with a perturbed coprocessor (when it has one)."""
    model = cls.from_decoder(
        tiny_decoder(family, **(decoder_kw or {})), num_latents=n_l, convention=convention, seed=1, **kw
    )
    if getattr(model, "coprocessor", None) is not None:
        perturb(model.coprocessor)
    return model.eval()
