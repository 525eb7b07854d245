"""A generated reasoning corpus: multi-step arithmetic word problems whose answer needs computation over
earlier tokens, so deliberation in latent space has something to do (docs/results_notes.md). Some documents show
worked steps in GSM8K's answer format (``... #### 42``); others give the answer right after the question,
where a frozen decoder must compute it "in its head" — the case where augmentation helped in our trials."""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lia", "Max", "Noa"]
ITEMS = ["apples", "books", "coins", "marbles", "pens", "stamps", "shells", "cards", "eggs", "nails"]
GAIN = ["buys {n} more", "finds {n} more", "is given {n} more", "collects {n} more"]
LOSS = ["gives away {n}", "loses {n}", "sells {n}", "uses {n}"]
TIMES = ["doubles them", "triples them"]


def make_problem(rng: random.Random, steps: int) -> dict:
    """One problem with ``steps`` operations. Values stay in 0..999."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(2, 60)
    clauses, work = [], []
    for _ in range(steps):
        op = rng.choice(["+", "-", "*"] if value <= 150 else ["+", "-"])
        if op == "+":
            n = rng.randint(1, 60)
            clauses.append(rng.choice(GAIN).format(n=n))
            new = value + n
        elif op == "-" and value > 1:
            n = rng.randint(1, value - 1)
            clauses.append(rng.choice(LOSS).format(n=n))
            new = value - n
        else:
            k = rng.choice([2, 3])
            clauses.append(TIMES[k - 2])
            op, n, new = "*", k, value * k
        work.append(f"{value} {op} {n} = {new}.")
        value = new
    question = (
        f"{name} has {work[0].split()[0]} {item}. {name} "
        + ", then ".join(clauses)
        + f". How many {item} does {name} have now?"
    )
    return {"question": question, "steps": " ".join(work), "answer": value}


def make_expression(rng: random.Random, steps: int) -> dict:
    """A bare expression: ``steps`` additions/subtractions of 1-2-digit numbers to a 2-digit start,
    evaluated left to right, never negative (the compact form of the demo's direct-answer arithmetic)."""
    value = rng.randint(10, 99)
    text, work = str(value), []
    for _ in range(steps):
        if value > 1 and rng.random() < 0.5:
            n = rng.randint(1, min(99, value - 1))
            op, new = "-", value - n
        else:
            n = rng.randint(1, 99)
            op, new = "+", value + n
        work.append(f"{value} {op} {n} = {new}.")
        text += f" {op} {n}"
        value = new
    return {"question": f"{text} =", "steps": " ".join(work), "answer": value, "compact": True}


def draw_problem(rng: random.Random, min_steps: int, max_steps: int, compact_fraction: float) -> dict:
    """A word problem, or with probability ``compact_fraction`` a bare expression."""
    steps = rng.randint(min_steps, max_steps)
    if compact_fraction and rng.random() < compact_fraction:
        return make_expression(rng, steps)
    return make_problem(rng, steps)


def format_problem(problem: dict, worked: bool) -> str:
    if worked:
        return f"Question: {problem['question']}\nAnswer: {problem['steps']}\n#### {problem['answer']}\n"
    return f"Question: {problem['question']}\nAnswer: #### {problem['answer']}\n"


def write_arithmetic_corpus(
    out: str | Path,
    *,
    docs: int,
    seed: int = 0,
    worked_fraction: float = 0.5,
    min_steps: int = 1,
    max_steps: int = 3,
    problems_per_doc: int = 8,
    compact_fraction: float = 0.0,
) -> Path:
    """Write ``docs`` jsonl documents (field ``text``), each several problems; also one problem per line in
    ``<out>.problems.jsonl`` (question, answer, steps) for accuracy evaluation. ``compact_fraction``: the
    share of problems that are bare expressions (``47 + 38 - 19 =``) rather than word problems."""
    if docs < 1 or not 0 <= worked_fraction <= 1 or not 1 <= min_steps <= max_steps:
        raise ValueError("docs >= 1, 0 <= worked_fraction <= 1 and 1 <= min_steps <= max_steps are required")
    if not 0 <= compact_fraction <= 1:
        raise ValueError(f"compact_fraction must be in [0, 1], got {compact_fraction}")
    rng = random.Random(seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    problems_path = out.with_suffix(".problems.jsonl")
    with out.open("w") as f, problems_path.open("w") as fp:
        for _ in range(docs):
            parts = []
            for _ in range(problems_per_doc):
                p = draw_problem(rng, min_steps, max_steps, compact_fraction)
                worked = rng.random() < worked_fraction
                parts.append(format_problem(p, worked))
                fp.write(json.dumps({**p, "worked": worked}) + "\n")
            f.write(json.dumps({"text": "\n".join(parts)}) + "\n")
    return out
