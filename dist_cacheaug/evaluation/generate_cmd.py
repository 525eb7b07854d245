"""``cacheaug generate``: print the completion of every prompt, decoded in batches.

Generation goes through the evaluators' one entry point (:func:`~.batching.generate_texts`), so a
prompt's text ends by the same :class:`~dist_cacheaug.core.stopping.StopRule` as GSM8K and lm-eval. Here
the rule is EOS plus the ``--stop`` strings, and a stop string stays in the printed text (HF's rule).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch

from ..core.generation import GenerationStats
from ..core.stopping import StopRule
from .batching import generate_texts
from .inference import InferenceError, check_vocab, load_for_inference, load_tokenizer_for


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


def sampling_options(args) -> dict:
    """``generate`` keywords from the CLI: greedy at ``--temperature 0``, sampling above; HF's top-k /
    top-p / repetition penalty. Where the text stops is the :class:`StopRule`, not an option here."""
    options = {}
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
    return options


def run_generate_cli(args) -> int:
    """``cacheaug generate``: print the completion of every prompt (batches of ``--batch-size``, in the
    order given, so a seeded sampling run repeats)."""
    prompts = read_prompts(args.prompt, args.prompts_file)
    if args.batch_size < 1:
        raise InferenceError(f"--batch-size must be >= 1, got {args.batch_size}")
    options = sampling_options(args)
    try:
        rule = StopRule(strings=tuple(args.stop or ()), keep_string=True)  # fails before the model loads
    except ValueError as e:
        raise InferenceError(f"--stop: {e}") from e
    model, cfg = load_for_inference(args.checkpoint, decoder=args.decoder, device=args.device)
    tok = load_tokenizer_for(cfg, args.tokenizer, what="cacheaug generate")
    check_vocab(model, tok.vocab_size, f"tokenizer {tok.path}")
    if tok.eos_id is not None:  # the tokenizer's EOS, else the decoder's (generate_texts)
        rule = dataclasses.replace(rule, eos_ids=(tok.eos_id,))
    bos = model.decoder.config.bos_token_id if args.bos else None
    rows = []
    for p in prompts:
        ids = tok.encode(p)
        if not ids:
            raise InferenceError(f"--prompt {p!r} encodes to no tokens")
        rows.append([bos, *ids] if bos is not None else ids)
    pad = tok.pad_id if tok.pad_id is not None else 0
    gen = torch.Generator().manual_seed(args.seed)
    stats = GenerationStats()
    texts = []
    t0, cpu0 = time.perf_counter(), time.process_time()
    for start in range(0, len(rows), args.batch_size):
        try:
            texts += generate_texts(
                model,
                tok,
                rows[start : start + args.batch_size],
                args.max_new_tokens,
                rule,
                pad_id=pad,
                augment=not args.no_augment,
                reaugment_every=args.reaugment_every,
                async_delay=args.async_delay,
                generator=gen,
                stats=stats,
                **options,
            )
        except ValueError as e:
            raise InferenceError(str(e)) from e
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
