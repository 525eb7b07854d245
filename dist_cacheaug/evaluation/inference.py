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
import sys
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


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
    """The ``--prompt`` texts followed by the lines of ``--prompts-file``; an InferenceError for an empty
    prompt, an empty line, a missing or non-UTF-8 file, or no prompt at all."""
    prompts = list(prompts)
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise InferenceError(f"--prompts-file {path} does not exist")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise InferenceError(f"--prompts-file {path}: not UTF-8 text ({e})") from e
        for i, line in enumerate(lines, 1):
            if not line.strip():
                raise InferenceError(
                    f"--prompts-file {path} line {i} is empty: one prompt per line, no empty lines"
                )
        if not lines:
            raise InferenceError(f"--prompts-file {path} holds no prompt")
        prompts += lines
    if not prompts:
        raise InferenceError("no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE")
    if any(not p.strip() for p in prompts):
        raise InferenceError("--prompt is empty: give some text to continue")
    return prompts


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, L] ids, [B, L] attention mask) of token lists LEFT-padded to the longest (1 = token)."""
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, n - len(r) :] = 1
    return ids.to(device), mask.to(device)


def completion_text(tokenizer, new_ids: list[int], eos_ids: list[int], stops: list[str]) -> str:
    """The text of one row's generated ids: up to its first EOS, and up to the end of the first stop
    string it contains (generation stops a row there; the batch's other rows may go on)."""
    for i, t in enumerate(new_ids):
        if t in eos_ids:
            new_ids = new_ids[:i]
            break
    text = tokenizer.decode(new_ids)
    ends = [text.index(s) + len(s) for s in stops if s in text]
    return text[: min(ends)] if ends else text


def generation_options(args, tokenizer) -> dict:
    """``generate`` keywords from the CLI: greedy at ``--temperature 0``, sampling above; HF's
    top-k / top-p / repetition penalty; stop strings with the tokenizer (an HF tokenizer gets HF's own
    stop-string criterion)."""
    from data_tools.tokenizer import HFTokenizer

    options = {}
    if tokenizer.eos_id is not None:
        options["eos_token_id"] = tokenizer.eos_id
    if args.temperature > 0:
        options.update(do_sample=True, temperature=args.temperature)
        if args.top_k is not None:
            options["top_k"] = args.top_k
        if args.top_p is not None:
            options["top_p"] = args.top_p
    elif args.top_k is not None or args.top_p is not None:
        raise InferenceError("--top-k and --top-p apply only when sampling: give --temperature > 0")
    if args.repetition_penalty is not None:
        options["repetition_penalty"] = args.repetition_penalty
    if args.stop:
        options["stop_strings"] = list(args.stop)
        options["tokenizer"] = tokenizer.tok if isinstance(tokenizer, HFTokenizer) else tokenizer
    return options


def run_generate_cli(args) -> int:
    """``cacheaug generate``: print the completion of every prompt (batches of ``--batch-size``)."""
    import time

    from ..core.generation import GenerationStats, generate

    prompts = read_prompts(args.prompt, args.prompts_file)
    if args.batch_size < 1:
        raise InferenceError(f"--batch-size must be >= 1, got {args.batch_size}")
    model, cfg = load_for_inference(args.checkpoint, decoder=args.decoder, device=args.device)
    tok = load_tokenizer_for(cfg, args.tokenizer, what="cacheaug generate")
    check_vocab(model, tok.vocab_size, f"tokenizer {tok.path}")
    options = generation_options(args, tok)
    bos = model.decoder.config.bos_token_id if args.bos else None
    rows = []
    for p in prompts:
        ids = tok.encode(p)
        if not ids:
            raise InferenceError(f"--prompt {p!r} encodes to no tokens")
        rows.append([bos, *ids] if bos is not None else ids)
    eos = options.get("eos_token_id", model.decoder.generation_config.eos_token_id)
    eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    device = next(model.decoder.parameters()).device
    pad = tok.pad_id if tok.pad_id is not None else 0
    gen = torch.Generator().manual_seed(args.seed)
    stats = GenerationStats()
    texts = []
    t0, cpu0 = time.perf_counter(), time.process_time()
    for start in range(0, len(rows), args.batch_size):
        ids, mask = left_pad(rows[start : start + args.batch_size], pad, device)
        try:
            out = generate(
                model,
                ids,
                args.max_new_tokens,
                attention_mask=mask,
                augment=not args.no_augment,
                reaugment_every=args.reaugment_every,
                async_delay=args.async_delay,
                generator=gen,
                stats=stats,
                **options,
            )
        except ValueError as e:
            raise InferenceError(str(e)) from e
        texts += [completion_text(tok, row.tolist(), eos_ids, args.stop) for row in out[:, ids.shape[1] :]]
    dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    for i, (prompt, text) in enumerate(zip(prompts, texts), 1):
        if len(prompts) > 1:
            print(f"### prompt {i}/{len(prompts)}")
        print(prompt + text)
    mode = "frozen decoder (no augmentation)" if args.no_augment else f"{model.num_latents} latents"
    batches = -(-len(prompts) // args.batch_size)
    print(
        f"\n[{len(prompts)} prompt(s) in {batches} batch(es), {stats.new_tokens} decoding steps in {dt:.2f}s "
        f"({cpu:.2f}s CPU); {mode}; augmentations {stats.augmentations}]",
        file=sys.stderr,
    )
    return 0
