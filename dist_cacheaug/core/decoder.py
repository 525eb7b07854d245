"""Build the frozen decoder (an HF causal LM) from the model config: a local checkpoint or an
architecture-only config with random weights. Nothing here knows about DeepSpeed."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from ..config import ConfigError, ModelConfig

SUPPORTED_MODEL_TYPES = ("gemma2", "llama", "qwen2", "mistral")


def resolve_dtype(name: str, device: torch.device | str | None = None) -> torch.dtype:
    if name == "auto":
        dev = torch.device(device) if device is not None else None
        return torch.bfloat16 if dev is not None and dev.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_attn_implementation(name: str, device: torch.device | str | None = None) -> str:
    if name == "auto":
        dev = torch.device(device) if device is not None else None
        return "flex_attention" if dev is not None and dev.type == "cuda" else "eager"
    return name


def hf_config_from_dict(kwargs: dict) -> PretrainedConfig:
    kwargs = dict(kwargs)
    model_type = kwargs.pop("model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"model.decoder_config.model_type={model_type!r} is not supported; use one of {SUPPORTED_MODEL_TYPES}"
        )
    try:
        return AutoConfig.for_model(model_type, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.decoder_config is not a valid {model_type} config: {e}") from e


def decoder_hf_config(model_cfg: ModelConfig, *, require_weights: bool = False) -> PretrainedConfig:
    """The decoder's HF config: from ``decoder_path`` when it exists, else from ``decoder_config``."""
    path = Path(model_cfg.decoder_path) if model_cfg.decoder_path else None
    if path is not None and (path / "config.json").is_file():
        try:
            hf = AutoConfig.from_pretrained(path)
        except (OSError, ValueError, json.JSONDecodeError) as e:
            raise ConfigError(f"model.decoder_path={path}: unreadable config.json: {e}") from e
        if hf.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model.decoder_path={path}: model_type {hf.model_type!r} is not supported "
                f"({', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        return hf
    if path is not None and (require_weights or not model_cfg.decoder_config):
        raise ConfigError(f"model.decoder_path={path} does not exist or has no config.json")
    return hf_config_from_dict(model_cfg.decoder_config)


def build_decoder(
    model_cfg: ModelConfig,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    load_device: torch.device | str | None = None,
) -> torch.nn.Module:
    """The frozen decoder: loaded from ``decoder_path`` or randomly initialised (seeded) from
    ``decoder_config``. Returned in eval mode with ``requires_grad=False`` on every parameter.

    ``device``: where it will run (picks the dtype and attention implementation). ``load_device``:
    where its weights are put now (default ``device``): a decoder that will be partitioned across GPUs
    is built in host memory, so that no GPU ever holds a full copy."""
    dtype = resolve_dtype(model_cfg.dtype, device)
    attn = resolve_attn_implementation(model_cfg.attn_implementation, device)
    if model_cfg.decoder_path:
        path = Path(model_cfg.decoder_path)
        decoder_hf_config(model_cfg, require_weights=True)  # clear error for a bad path
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.decoder_path={path}: cannot load weights: {e}") from e
    else:
        hf = hf_config_from_dict(model_cfg.decoder_config)
        hf._attn_implementation = attn
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(hf, dtype=dtype, attn_implementation=attn)
    model.to(device if load_device is None else load_device)
    return freeze(model)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
