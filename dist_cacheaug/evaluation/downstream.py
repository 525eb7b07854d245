"""Downstream tasks from local files, with augmentation at the end of the context (paper Table 2).

* GSM8K-format jsonl: one problem per line, ``{"question": ..., "answer": "...worked steps...\\n#### 42"}``
  (GSM8K's own format) or ``{"question": ..., "steps": ..., "answer": 42}`` (``data_tools/synthetic.py``'s
  ``.problems.jsonl``). k-shot prompt of ``Question: ...\\nAnswer: ...\\n#### N`` exemplars, greedy
  generation, exact match of the final number (strict: the number after ``####``; flexible: the last
  number in the completion, as lm-evaluation-harness reports both).
* Multiple-choice jsonl (ARC/MMLU style): ``{"question": ..., "choices": [...], "answer": 0 | "B"}``;
  ARC's own ``{"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}`` works too. Each
  choice is scored by the log-likelihood of ``" " + choice`` after ``Question: ...\\nAnswer:``; ``acc``
  takes the highest sum, ``acc_norm`` the highest sum per character of the choice.

The context is augmented once (one coprocessor call), then every continuation is read from a copy of
the augmented cache.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..core.cache import clone_cache
from ..core.hf_compat import cache_arg
from ..core.model import CacheAugmentedLM
from ..core.stopping import StopRule
from .batching import (
    check_batch_size,
    decoder_max_length,
    fit_context,
    generate_texts,
    pad_id_for,
    run_batched,
    score_batch,
    tokens_after_context,
)
from .inference import InferenceError

COT_PROMPT = "Let's think step by step."
DEFAULT_FEWSHOT, DEFAULT_NEW_TOKENS, COT_NEW_TOKENS = 8, 256, 512
NUMBER = re.compile(r"-?[$]?\d[\d,]*(?:\.\d+)?")
STOP_STRINGS = ("\nQuestion:", "Question:", "\n\n\n")


def gsm8k_stop(eos_id=None) -> StopRule:
    """Where a GSM8K completion ends: at EOS, before the next question (or a blank run), and after its
    final answer line ``#### N`` (in k-shot prompting the model goes on to write the next question)."""
    return StopRule.with_eos(
        eos_id, strings=STOP_STRINGS, keep_string=False, final=r"####\s*" + NUMBER.pattern
    )


# ---- files -----------------------------------------------------------------------------------------
def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise InferenceError(f"task file {path} does not exist")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InferenceError(f"{path}:{i}: not valid JSON: {e}") from e
        if not isinstance(row, dict):
            raise InferenceError(f"{path}:{i}: each line must be a JSON object")
        rows.append(row)
    if not rows:
        raise InferenceError(f"task file {path} has no items")
    return rows


def normalize_number(text: str) -> str:
    s = text.replace(",", "").replace("$", "").strip().rstrip(".")
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    return s


def load_gsm8k(path: str | Path) -> list[dict]:
    """Items ``{"question", "solution", "target"}``: ``solution`` is the exemplar text after "Answer:"."""
    items = []
    for i, row in enumerate(read_jsonl(path), 1):
        if "question" not in row or "answer" not in row:
            raise InferenceError(f"{path}: item {i} needs fields 'question' and 'answer'")
        if not str(row["question"]).strip():
            raise InferenceError(f"{path}: item {i}: 'question' is empty")
        ans = row["answer"]
        if isinstance(ans, str) and "####" in ans:
            work, target = ans.split("####", 1)
            solution = f"{work.strip()}\n#### {target.strip()}".lstrip("\n")
        elif isinstance(ans, (int, float)) or (isinstance(ans, str) and NUMBER.fullmatch(ans.strip())):
            target = str(ans)
            steps = str(row.get("steps", "")).strip()
            solution = f"{steps}\n#### {target}" if steps else f"#### {target}"
        else:
            raise InferenceError(f"{path}: item {i}: 'answer' must be a number or text ending in '#### N'")
        items.append(
            {"question": str(row["question"]), "solution": solution, "target": normalize_number(target)}
        )
    return items


def extract_answer(completion: str) -> tuple[str | None, str | None]:
    """(strict, flexible): the number after the first ``####``, and the last number in the text."""
    strict = None
    if "####" in completion:
        m = NUMBER.search(completion.split("####", 1)[1])
        strict = normalize_number(m.group()) if m else None
    nums = NUMBER.findall(completion)
    flexible = normalize_number(nums[-1]) if nums else None
    return strict, flexible


def gsm8k_prompt(exemplars: list[dict], question: str, cot: str | None = None) -> str:
    """k-shot prompt ending in ``Answer:``; ``cot``: a zero-shot chain-of-thought suffix after it
    (e.g. "Let's think step by step.", Kojima et al. 2022)."""
    shots = "".join(f"Question: {e['question']}\nAnswer: {e['solution']}\n\n" for e in exemplars)
    suffix = f" {cot.strip()}" if cot else ""
    return f"{shots}Question: {question}\nAnswer:{suffix}"


def load_mc(path: str | Path) -> list[dict]:
    """Items ``{"question", "choices": [str], "label": int}``."""
    items = []
    for i, row in enumerate(read_jsonl(path), 1):
        q, choices = row.get("question"), row.get("choices")
        if isinstance(q, dict):  # ARC: {"stem", "choices": [{"text", "label"}]}
            choices, q = q.get("choices"), q.get("stem")
        labels = None
        if isinstance(choices, dict):  # HF ARC: {"text": [...], "label": [...]}
            labels, choices = choices.get("label"), choices.get("text")
        elif isinstance(choices, list) and choices and isinstance(choices[0], dict):
            labels, choices = [c.get("label") for c in choices], [c.get("text") for c in choices]
        if not isinstance(q, str) or not isinstance(choices, list) or len(choices) < 2:
            raise InferenceError(f"{path}: item {i} needs 'question' and a list of at least 2 'choices'")
        if not q.strip():
            raise InferenceError(f"{path}: item {i}: 'question' is empty")
        empty = [j for j, c in enumerate(choices) if c is None or not str(c).strip()]
        if empty:
            raise InferenceError(f"{path}: item {i}: choice {empty[0]} is empty")
        labels = labels or [chr(ord("A") + j) for j in range(len(choices))]
        ans = row.get("answer", row.get("answerKey"))
        if isinstance(ans, int) and not isinstance(ans, bool) and 0 <= ans < len(choices):
            label = ans
        elif isinstance(ans, str) and ans.strip() in labels:
            label = labels.index(ans.strip())
        elif isinstance(ans, str) and ans.strip().isdigit() and int(ans) < len(choices):
            label = int(ans)
        else:
            raise InferenceError(
                f"{path}: item {i}: 'answer' must be a choice index 0..{len(choices) - 1} or a label in {labels}"
            )
        items.append({"question": q, "choices": [str(c) for c in choices], "label": label})
    return items


def mc_context(question: str) -> str:
    return f"Question: {question}\nAnswer:"


# ---- scoring ---------------------------------------------------------------------------------------
def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids; trailing context spaces move to the continuation, and the
    continuation's ids are those of the whole text after the context's (lm-evaluation-harness's rule)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    if whole[: len(ctx)] != ctx:  # the tokenizer merged across the boundary: encode separately
        return ctx, tokenizer.encode(continuation)
    return ctx, whole[len(ctx) :]


def context_prefix(tokenizer, model: CacheAugmentedLM) -> list[int]:
    """What to read when a context is empty: BOS (else EOS), as lm-evaluation-harness does."""
    for tid in (getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None)):
        if tid is not None:
            return [int(tid)]
    tid = model.decoder.config.bos_token_id
    if tid is None:
        raise InferenceError("empty context and the tokenizer has neither BOS nor EOS to stand for it")
    return [int(tid)]


@torch.no_grad()
def continuation_token_logprobs(
    model: CacheAugmentedLM, context_ids: list[int], continuations: list[list[int]], *, augment: bool = True
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per continuation: (log-prob of each of its tokens [len], greedy? per token [len] bool) after the
    context; the context is read (and augmented) once, each continuation from a copy of that cache."""
    if not context_ids:
        raise ValueError("context_ids must not be empty")
    dec = model.decoder
    device = next(dec.parameters()).device
    ctx = torch.tensor([context_ids], device=device)
    if augment:
        a = model.augment(ctx)
        cache, first, next_pos = a.past_key_values, a.logits, a.next_position
    else:
        cache = DynamicCache(config=dec.config)
        first = dec(input_ids=ctx, **cache_arg(cache), use_cache=True).logits[:, -1].float()
        next_pos = len(context_ids)
    out = []
    for cont in continuations:
        if not cont:
            raise ValueError("a continuation encodes to no tokens")
        logits = first
        if len(cont) > 1:
            ids = torch.tensor([cont[:-1]], device=device)
            pos = torch.arange(next_pos, next_pos + len(cont) - 1, device=device)[None]
            rest = dec(input_ids=ids, **cache_arg(clone_cache(cache)), use_cache=True, position_ids=pos)
            logits = torch.cat([first, rest.logits[0].float()], 0)
        logp = F.log_softmax(logits, -1)
        target = torch.tensor(cont, device=device)
        out.append((logp.gather(1, target[:, None])[:, 0].cpu(), (logp.argmax(-1) == target).cpu()))
    return out


def continuation_logprobs(
    model: CacheAugmentedLM, context_ids: list[int], continuations: list[list[int]], *, augment: bool = True
) -> list[tuple[float, bool]]:
    """(sum of log-probs, greedy?) of each continuation after the context (lm-evaluation-harness's pair)."""
    per_token = continuation_token_logprobs(model, context_ids, continuations, augment=augment)
    return [(float(lp.sum()), bool(g.all())) for lp, g in per_token]


def loglikelihood(model, tokenizer, context: str, continuation: str, *, augment: bool = True):
    """(log p(continuation | context), greedy?) for strings, as lm-evaluation-harness defines it."""
    ctx, cont = encode_pair(tokenizer, context, continuation)
    ctx = ctx or context_prefix(tokenizer, model)
    return continuation_logprobs(model, ctx, [cont], augment=augment)[0]


# ---- evaluators ------------------------------------------------------------------------------------
def _warn_truncated(count: int, total: int, what: str, max_length: int, after: str, shard) -> None:
    if count and shard[0] == 0:
        print(
            f"warning: {count} of {total} {what} did not fit max_length {max_length} (with {after}) and "
            "were left-truncated (their most recent tokens kept); counted in the results as 'truncated'",
            file=sys.stderr,
        )


def evaluate_mc(
    model,
    tokenizer,
    items: list[dict],
    *,
    augment: bool = True,
    async_delay: int | None = None,
    batch_size: int = 1,
    max_length: int | None = None,
    shard: tuple[int, int] = (0, 1),
    progress: bool = False,
) -> dict:
    """acc / acc_norm on multiple-choice items. Every (question, choice) pair is one request;
    ``batch_size`` pairs are scored per pass (a question's context is read once per batch), equal to
    one at a time to float rounding. ``max_length`` (default: the decoder's positions): a context
    longer than it allows after the latents and the longest choice is left-truncated, the same for
    every choice of the item, and counted in ``truncated``. ``shard=(rank, world)``: data parallel
    (:func:`~dist_cacheaug.evaluation.batching.run_batched`); every rank gets the full result."""
    max_length = max_length or decoder_max_length(model)
    pairs, truncated = [], 0
    for n, it in enumerate(items, 1):
        context = mc_context(it["question"])
        encoded = [encode_pair(tokenizer, context, " " + c) for c in it["choices"]]
        for j, (_, cont) in enumerate(encoded):
            if not cont:
                raise InferenceError(
                    f"multiple choice item {n}: choice {j} ({it['choices'][j]!r}) encodes to no tokens"
                )
        longest = max(len(cont) for _, cont in encoded)
        ctx, cut = fit_context(
            encoded[0][0] or context_prefix(tokenizer, model),
            tokens_after_context(model, augment, longest - 1),
            max_length,
            f"multiple choice item {n}",
        )
        truncated += cut
        pairs += [(ctx, cont) for _, cont in encoded]
    pad = pad_id_for(tokenizer, model.decoder.config.vocab_size)
    scores = run_batched(
        lambda batch: score_batch(model, batch, augment=augment, pad_id=pad, async_delay=async_delay),
        pairs,
        [(-len(c), tuple(c), -len(x)) for c, x in pairs],  # longest context first, its choices together
        batch_size,
        shard=shard,
        progress=progress,
        desc="multiple choice",
    )
    _warn_truncated(
        truncated, len(items), "multiple-choice contexts", max_length, "the latents and choices", shard
    )
    preds, correct, correct_norm, k = [], 0, 0, 0
    for it in items:
        ll = [s for s, _ in scores[k : k + len(it["choices"])]]
        k += len(it["choices"])
        norm = [s / max(len(c), 1) for s, c in zip(ll, it["choices"])]
        pick, pick_norm = max(range(len(ll)), key=ll.__getitem__), max(range(len(norm)), key=norm.__getitem__)
        correct += pick == it["label"]
        correct_norm += pick_norm == it["label"]
        preds.append(
            {
                "question": it["question"],
                "loglikelihoods": ll,
                "pred": pick,
                "pred_norm": pick_norm,
                "label": it["label"],
            }
        )
    n = len(items)
    return {
        "task": "multiple_choice",
        "n": n,
        "acc": correct / n,
        "acc_norm": correct_norm / n,
        "truncated": truncated,
        "predictions": preds,
    }


def evaluate_gsm8k(
    model,
    tokenizer,
    items: list[dict],
    *,
    fewshot: list[dict] = (),
    augment: bool = True,
    max_new_tokens: int = 256,
    reaugment_every: int | None = None,
    async_delay: int | None = None,
    cot: str | None = None,
    batch_size: int = 1,
    max_length: int | None = None,
    shard: tuple[int, int] = (0, 1),
    progress: bool = False,
) -> dict:
    """Exact match on GSM8K-format items. ``cot``: zero-shot CoT suffix after "Answer:" (the answer is
    then read from the generated reasoning: after ``####`` when present, else its last number).
    ``batch_size`` problems are decoded together (left-padded; greedy completions equal one at a time).
    ``max_length`` (default: the decoder's positions): a prompt longer than it allows after the latents
    and ``max_new_tokens`` is left-truncated and counted in ``truncated``. ``shard``: as
    :func:`evaluate_mc`."""
    max_length = max_length or decoder_max_length(model)
    after = tokens_after_context(model, augment, max_new_tokens - 1)
    prompts, truncated = [], 0
    for n, it in enumerate(items, 1):
        ids, cut = fit_context(
            tokenizer.encode(gsm8k_prompt(list(fewshot), it["question"], cot)),
            after,
            max_length,
            f"gsm8k item {n}",
        )
        truncated += cut
        prompts.append(ids)
    pad = pad_id_for(tokenizer, model.decoder.config.vocab_size)
    rule = gsm8k_stop(getattr(tokenizer, "eos_id", None))
    gen_kw = dict(augment=augment, reaugment_every=reaugment_every, async_delay=async_delay)
    completions = run_batched(
        lambda batch: generate_texts(model, tokenizer, batch, max_new_tokens, rule, pad_id=pad, **gen_kw),
        prompts,
        [-len(p) for p in prompts],
        batch_size,
        shard=shard,
        progress=progress,
        desc="gsm8k",
    )
    _warn_truncated(truncated, len(items), "gsm8k prompts", max_length, "the latents and new tokens", shard)
    preds, strict_ok, flex_ok = [], 0, 0
    for it, completion in zip(items, completions):
        strict, flexible = extract_answer(completion)
        strict_ok += strict == it["target"]
        flex_ok += flexible == it["target"]
        preds.append(
            {
                "question": it["question"],
                "completion": completion,
                "strict": strict,
                "flexible": flexible,
                "target": it["target"],
            }
        )
    n = len(items)
    return {
        "task": "gsm8k",
        "n": n,
        "num_fewshot": len(fewshot),
        "cot": cot,
        "exact_match_strict": strict_ok / n,
        "exact_match_flexible": flex_ok / n,
        "truncated": truncated,
        "predictions": preds,
    }


def split_fewshot(items: list[dict], k: int, fewshot_items: list[dict] | None = None):
    """(exemplars, evaluation items): exemplars come from ``fewshot_items`` or the first k items."""
    if k < 0:
        raise InferenceError(f"--num-fewshot must be >= 0, got {k}")
    if fewshot_items is not None:
        if len(fewshot_items) < k:
            raise InferenceError(
                f"the few-shot file has {len(fewshot_items)} items, fewer than --num-fewshot {k}"
            )
        return fewshot_items[:k], items
    if len(items) <= k:
        raise InferenceError(
            f"{len(items)} items leave none to evaluate after {k} few-shot exemplars (pass --fewshot-file)"
        )
    return items[:k], items[k:]


def run_downstream_cli(args) -> int:
    """``cacheaug downstream``. Data parallel under a launcher (``torchrun``, ``deepspeed``, ``srun``):
    every rank loads the model on its device and runs its share of the batches; the results are
    gathered, and rank 0 alone prints and writes (the same numbers as one process)."""
    from .data_parallel import data_parallel

    if not args.gsm8k and not args.mc:
        raise InferenceError("give at least one task file: --gsm8k FILE and/or --mc FILE")
    check_batch_size(args.batch_size)
    with data_parallel(args.device) as (env, device):
        return _run_downstream(args, env, device)


def _run_downstream(args, env, device) -> int:
    from .inference import check_vocab, load_for_inference, load_tokenizer_for

    gsm = load_gsm8k(args.gsm8k) if args.gsm8k else None
    mc = load_mc(args.mc) if args.mc else None
    shots = load_gsm8k(args.fewshot_file) if args.fewshot_file else None
    model, cfg = load_for_inference(args.checkpoint, decoder=args.decoder, device=device)
    tok = load_tokenizer_for(cfg, args.tokenizer, what="cacheaug downstream")
    check_vocab(model, tok.vocab_size, f"tokenizer {tok.path}")
    augment = not args.no_augment
    max_length = args.max_length or decoder_max_length(model)
    run = dict(batch_size=args.batch_size, max_length=max_length, shard=(env.rank, env.world_size))
    progress = not args.no_progress
    results = {
        "checkpoint": str(args.checkpoint),
        "augment": augment,
        "num_latents": model.num_latents,
        "max_length": max_length,
        "world_size": env.world_size,
    }
    say = print if env.is_main else (lambda *a, **k: None)
    if gsm is not None:
        cot = (getattr(args, "cot_prompt", None) or COT_PROMPT) if getattr(args, "cot", False) else None
        num_fewshot = args.num_fewshot if args.num_fewshot is not None else (0 if cot else DEFAULT_FEWSHOT)
        max_new = args.max_new_tokens or (COT_NEW_TOKENS if cot else DEFAULT_NEW_TOKENS)
        exemplars, items = split_fewshot(gsm, num_fewshot, shots)
        items = items[: args.limit] if args.limit else items
        r = evaluate_gsm8k(
            model,
            tok,
            items,
            fewshot=exemplars,
            augment=augment,
            max_new_tokens=max_new,
            reaugment_every=args.reaugment_every,
            async_delay=args.async_delay,
            cot=cot,
            progress=progress,
            **run,
        )
        results["gsm8k"] = r
        mode = f"{r['num_fewshot']}-shot" + (f", zero-shot CoT {cot!r}" if cot else "")
        say(
            f"gsm8k ({r['n']} items, {mode}): exact match strict {100 * r['exact_match_strict']:.2f}%"
            f", flexible {100 * r['exact_match_flexible']:.2f}%"
        )
    if mc is not None:
        items = mc[: args.limit] if args.limit else mc
        r = evaluate_mc(
            model, tok, items, augment=augment, async_delay=args.async_delay, progress=progress, **run
        )
        results["multiple_choice"] = r
        say(
            f"multiple choice ({r['n']} items): acc {100 * r['acc']:.2f}%, acc_norm {100 * r['acc_norm']:.2f}%"
        )
    if args.out and env.is_main:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")
    return 0
