"""Baselines and ablations of the paper, as small modules beside the core (docs/design.md §3: writing one).

``model.variant`` picks what the trainer trains; :func:`build_trainable` builds it around the frozen
decoder and :func:`load_pretrained` reloads an export (``cacheaug_config.json`` records the variant).
Every variant has the surface the trainer, validation, evaluation and export use:
``training_loss(input_ids, positions, num_ahead) -> TrainingLossOutput``, ``.decoder``,
``.baseline_decoder`` (the frozen original, for baseline numbers), ``parameters()`` (what the engine
trains; LoRA's frozen base weights are there with ``requires_grad=False``), ``save_pretrained(dir)``,
``from_pretrained(dir, decoder=)``, ``enable_activation_checkpointing()``, and ``augment`` /
``latents_for_prompt`` where augmentation means something.

==============  =====================================================================================
coprocessor     the method (:class:`~dist_cacheaug.core.model.CacheAugmentedLM`); ``coprocessor_init:
                scratch`` is the from-scratch ablation
pause           N_L trainable pause embeddings fed to the frozen decoder after x[p]; no coprocessor
lora            LoRA adapters (peft) on a frozen copy of the decoder as the coprocessor
activations     the coprocessor reads the decoder's last-layer states (not its kv-cache)
async           latents for position p from the cache of x[0..p-d], inserted after x[p]
single_model    the decoder itself (finetuned jointly with the soft tokens) writes the latents
base_lm         plain next-token training of the decoder itself; exports an HF model directory
==============  =====================================================================================
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from ..config import RunConfig
from ..core.model import CONFIG_NAME, CacheAugmentedLM
from .activations import ActivationsInputLM
from .base_lm import BaseLM
from .delayed import AsyncLatentsLM
from .lora import LoraCoprocessorLM
from .pause import PauseTokensLM
from .single_model import SingleModelLM

VARIANTS: dict[str, type] = {
    "coprocessor": CacheAugmentedLM,
    "pause": PauseTokensLM,
    "lora": LoraCoprocessorLM,
    "activations": ActivationsInputLM,
    "async": AsyncLatentsLM,
    "single_model": SingleModelLM,
    "base_lm": BaseLM,
}


def build_trainable(cfg: RunConfig, decoder: nn.Module) -> nn.Module:
    """The trainable module of ``cfg.model.variant`` around ``decoder`` (frozen; never modified)."""
    m, seed = cfg.model, cfg.train.seed
    common = dict(
        convention=m.convention,
        soft_token_init=m.soft_token_init,
        loss_chunk_size=m.loss_chunk_size,
        seed=seed,
    )
    coprocessor = dict(coprocessor_init=m.coprocessor_init, latent_final_norm=m.latent_final_norm)
    if m.variant in ("coprocessor", "activations"):
        return VARIANTS[m.variant].from_decoder(decoder, m.num_latents, **coprocessor, **common)
    if m.variant == "async":
        return AsyncLatentsLM.from_decoder(
            decoder, m.num_latents, delay=m.async_delay, **coprocessor, **common
        )
    if m.variant == "lora":
        return LoraCoprocessorLM.from_decoder(
            decoder,
            m.num_latents,
            lora_rank=m.lora_rank,
            lora_alpha=m.lora_alpha or float(m.lora_rank),
            latent_final_norm=m.latent_final_norm,
            **common,
        )
    if m.variant == "pause":
        return PauseTokensLM.from_decoder(decoder, m.num_latents, **common)
    if m.variant == "single_model":
        return SingleModelLM.from_decoder(decoder, m.num_latents, **common)
    if m.variant == "base_lm":
        return BaseLM.from_decoder(decoder, seed=seed)
    raise ValueError(f"model.variant={m.variant!r} is not one of {sorted(VARIANTS)}")


def variant_of(directory: str | Path) -> str:
    """The variant an export directory holds ("coprocessor" for exports that predate variants)."""
    path = Path(directory) / CONFIG_NAME
    try:
        return json.loads(path.read_text()).get("variant", "coprocessor")
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable: {e}") from e


def load_pretrained(directory: str | Path, decoder: nn.Module) -> nn.Module:
    """Reload any variant's export around ``decoder`` (the frozen original)."""
    name = variant_of(directory)
    if name not in VARIANTS:
        raise ValueError(f"{directory}: unknown variant {name!r} (known: {sorted(VARIANTS)})")
    return VARIANTS[name].from_pretrained(directory, decoder=decoder)


__all__ = [
    "VARIANTS",
    "ActivationsInputLM",
    "AsyncLatentsLM",
    "BaseLM",
    "LoraCoprocessorLM",
    "PauseTokensLM",
    "SingleModelLM",
    "build_trainable",
    "load_pretrained",
    "variant_of",
]
