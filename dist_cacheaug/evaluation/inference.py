"""Load a trained coprocessor for evaluation and generation: from a run directory or an export directory.

A run directory (``cacheaug train``) holds ``config.yaml``, ``export/`` (``CacheAugmentedLM.save_pretrained``)
and ``decoder/`` (the frozen decoder's HF weights when it was randomly initialised; only its config and a
``SOURCE`` note when ``model.decoder_path`` named an existing model). The decoder is, in order: the
``decoder=`` argument (a path or a module), ``RUN_DIR/decoder`` when it holds weights, the config's
``model.decoder_path``. Every failure is an :class:`InferenceError` naming the path at fault.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from ..config import ConfigError, ModelConfig, RunConfig, load_config
from ..core.model import CONFIG_NAME, CacheAugmentedLM
from ..errors import UserError

WEIGHT_SUFFIXES = (".safetensors", ".bin")


class InferenceError(UserError, ValueError):
    """A checkpoint, decoder, tokenizer or input cannot be used; the message names what and where."""


def _has_weights(d: Path) -> bool:
    return (d / "config.json").is_file() and any(
        f.name.endswith(WEIGHT_SUFFIXES) for f in d.iterdir() if f.is_file()
    )


def resolve_checkpoint(checkpoint: str | os.PathLike) -> tuple[Path, Path | None]:
    """(export dir, run dir or None) for a run directory or an export directory."""
    path = Path(checkpoint)
    if not path.exists():
        raise InferenceError(f"checkpoint {path} does not exist (expected a run directory or an export/ dir)")
    if (path / CONFIG_NAME).is_file():  # an export dir; its parent may be the run dir
        run_dir = path.parent if (path.parent / "config.yaml").is_file() else None
        return path, run_dir
    if (path / "export" / CONFIG_NAME).is_file():
        return path / "export", path
    if (path / "config.yaml").is_file():
        raise InferenceError(
            f"run directory {path} has no export/{CONFIG_NAME}: training has not finished (the trainer writes "
            "export/ at the end), or the export was removed"
        )
    raise InferenceError(
        f"{path} is neither a run directory (config.yaml + export/) nor an export directory ({CONFIG_NAME})"
    )


def load_run_config(run_dir: Path | None) -> RunConfig | None:
    if run_dir is None:
        return None
    try:
        return load_config(run_dir / "config.yaml")
    except ConfigError as e:
        raise InferenceError(f"{run_dir / 'config.yaml'}: {e}") from e


def _decoder_source(run_dir: Path | None, cfg: RunConfig | None, decoder: str | os.PathLike | None) -> Path:
    if decoder is not None:
        d = Path(decoder)
        if not (d / "config.json").is_file():
            raise InferenceError(f"--decoder {d}: not an HF model directory (no config.json)")
        return d
    if run_dir is not None and (run_dir / "decoder").is_dir() and _has_weights(run_dir / "decoder"):
        return run_dir / "decoder"
    if cfg is not None and cfg.model.decoder_path:
        d = Path(cfg.model.decoder_path)
        if not (d / "config.json").is_file():
            raise InferenceError(
                f"{run_dir / 'config.yaml'}: model.decoder_path={d} does not exist on this machine; "
                "pass the decoder with --decoder PATH"
            )
        return d
    where = (
        f"run directory {run_dir}" if run_dir is not None else "an export directory outside a run directory"
    )
    raise InferenceError(f"no decoder weights found for {where}; pass the frozen decoder with --decoder PATH")


def load_for_inference(
    checkpoint: str | os.PathLike,
    decoder: str | os.PathLike | torch.nn.Module | None = None,
    device: str | torch.device | None = None,
    *,
    dtype: str | None = None,
    attn_implementation: str = "eager",
) -> tuple[CacheAugmentedLM, RunConfig | None]:
    """The model (eval mode, no grad needed) and the run config (None for a bare export dir).

    ``decoder``: an HF model directory or an already built module that overrides the run's decoder.
    ``dtype``: "auto" | "float32" | "bfloat16" | "float16"; default: the run config's ``model.dtype``.
    ``attn_implementation``: "eager" (default: works for every family, CPU and GPU) or "flex_attention".
    """
    from ..core.decoder import build_decoder

    export_dir, run_dir = resolve_checkpoint(checkpoint)
    cfg = load_run_config(run_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(decoder, torch.nn.Module):
        dec, source = decoder.to(device), "the given decoder module"
    else:
        source = _decoder_source(run_dir, cfg, decoder)
        base = cfg.model if cfg is not None else ModelConfig()
        mcfg = dataclasses.replace(
            base,
            decoder_path=str(source),
            dtype=dtype or base.dtype,
            attn_implementation=attn_implementation,
        )
        try:
            dec = build_decoder(mcfg, device=device)
        except ConfigError as e:
            raise InferenceError(f"decoder {source}: {e}") from e
    from ..variants import load_pretrained

    try:
        model = load_pretrained(export_dir, decoder=dec)
    except FileNotFoundError as e:
        raise InferenceError(str(e)) from e
    except ValueError as e:
        raise InferenceError(f"checkpoint {export_dir} does not fit decoder {source}: {e}") from e
    if cfg is not None and model.num_latents and cfg.model.num_latents != model.num_latents:
        raise InferenceError(
            f"{export_dir}: holds {model.num_latents} latents but {run_dir / 'config.yaml'} says "
            f"model.num_latents={cfg.model.num_latents}"
        )
    model.eval()
    return model, cfg


def load_tokenizer_for(cfg: RunConfig | None, tokenizer: str | None, *, what: str = "this command"):
    """The tokenizer: ``tokenizer`` when given, else the run config's ``data.tokenizer``."""
    from data_tools.errors import DataError
    from data_tools.tokenizer import load_tokenizer

    path = tokenizer or (cfg.data.tokenizer if cfg is not None else None)
    if not path:
        raise InferenceError(
            f"{what} needs a tokenizer: pass --tokenizer PATH (the run config has no data.tokenizer)"
        )
    try:
        return load_tokenizer(path)
    except DataError as e:
        raise InferenceError(str(e)) from e


def check_vocab(model: CacheAugmentedLM, tokenizer_vocab: int, what: str) -> None:
    """Token ids of ``what`` must be valid for the decoder's embedding table."""
    v = model.decoder.config.vocab_size
    if tokenizer_vocab > v:
        raise InferenceError(
            f"{what}: tokenizer vocabulary ({tokenizer_vocab}) is larger than the decoder's ({v}); "
            "it was made with another tokenizer"
        )
