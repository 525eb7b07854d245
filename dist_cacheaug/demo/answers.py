"""Answer-token loss and exact match on held-out arithmetic problems (the demo's accuracy metric).

A problem is asked in the corpus's direct-answer form (``data_tools.synthetic.format_problem``)::

    <EOS>Question: Ada has 12 apples. Ada buys 5 more, then doubles them. How many ...?\\nAnswer: ####| 34\\n

The context ends at the ``####`` marker: augmentation happens there, at the end of the question, before a
single answer token is seen (the decoder must compute the answer "in its head"). Scored: the CE of the
answer's digit tokens (and of the first digit alone); exact match: greedy decoding writes the answer's
tokens and then the line break, i.e. every continuation token is the argmax under teacher forcing.
The context starts with EOS because documents follow an EOS in the packed shards.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from data_tools.synthetic import draw_problem, format_problem

from ..evaluation.downstream import continuation_token_logprobs, encode_pair, read_jsonl

MARKER = "####"


def heldout_problems(
    count: int, seed: int, exclude_questions: set[str], max_ops: int = 3, compact_fraction: float = 0.0
) -> list[dict]:
    """``count`` generated problems whose questions are not in ``exclude_questions`` (the training
    corpus's), all distinct; the generator is the corpus's (same mix of kinds) with another seed."""
    rng = random.Random(seed)
    out, seen = [], set(exclude_questions)
    for _ in range(200 * count + 1000):
        if len(out) == count:
            return out
        p = draw_problem(rng, 1, max_ops, compact_fraction)
        if p["question"] not in seen:
            seen.add(p["question"])
            out.append(p)
    raise ValueError(f"could not draw {count} problems unseen in training (the problem space is exhausted)")


def problem_kind(problem: dict) -> str:
    return "expression" if problem.get("compact") else "word problem"


def read_questions(problems_jsonl: str | Path) -> set[str]:
    return {row["question"] for row in read_jsonl(problems_jsonl)}


def encode_problem(tokenizer, problem: dict) -> tuple[list[int], list[int], list[int]]:
    """(context ids, continuation ids, indices of the continuation's digit tokens)."""
    text = format_problem(problem, worked=False)
    cut = text.index(MARKER) + len(MARKER)
    ctx, cont = encode_pair(tokenizer, text[:cut], text[cut:])
    if tokenizer.eos_id is not None:
        ctx = [int(tokenizer.eos_id), *ctx]
    digits = [i for i, t in enumerate(cont) if any(c.isdigit() for c in tokenizer.decode([t]))]
    if not digits:
        raise ValueError(f"the answer {problem['answer']!r} encodes to no digit tokens with {tokenizer.path}")
    return ctx, cont, digits


@torch.no_grad()
def evaluate_answers(model, tokenizer, problems: list[dict], *, augment: bool = True) -> dict:
    """Pooled answer-token CE, first-digit CE, exact match, and each problem's mean answer CE (for paired
    comparisons between models on the same problems)."""
    if not problems:
        raise ValueError("no problems to evaluate")
    total = first = 0.0
    tokens = exact = 0
    per_problem = []
    for p in problems:
        ctx, cont, digits = encode_problem(tokenizer, p)
        logp, greedy = continuation_token_logprobs(model, ctx, [cont], augment=augment)[0]
        ce = -logp[digits].double()
        total += float(ce.sum())
        tokens += len(digits)
        first += float(ce[0])
        exact += bool(greedy.all())
        per_problem.append(float(ce.mean()))
    n = len(problems)
    return {
        "answer_ce": total / tokens,
        "first_digit_ce": first / n,
        "exact_match": exact / n,
        "num_problems": n,
        "num_answer_tokens": tokens,
        "per_problem_ce": per_problem,
    }


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of ``a[i] - b[i]`` (same problems, two models)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("paired_difference needs two equally long lists of at least 2 values")
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    return float(d.mean()), float(d.std() / len(d) ** 0.5)
