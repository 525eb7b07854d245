"""``cacheaug demo --replicas N``: the same budget run N times, base included, each replica with other seeds.

A run on another CPU rounds differently from the first matmul on, and training is chaotic: by the end the
base and every run are as different as with another seed. So a claim the main job prints must hold in
every replica, not in one. This module turns the replicas' ``results.json`` contents into a table: per
check, the replicas in which it holds; per headline number, its value in each replica and the range.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .report import answer_pair

_PCT = "{:+.2f} %"
_NATS = "{:+.4f}"


def _pair(r: dict, a: str, b: str) -> float | None:
    """The paired answer-CE difference a - b, None when the budget has no such run."""
    ce = r["answer_per_problem_ce"]
    return answer_pair(r, a, b)[0] if a in ce and b in ce else None


def _numbers(r: dict) -> dict[str, tuple[float | None, str]]:
    """A replica's headline numbers: label -> (value read from results.json's contents, format)."""
    change = r["answer_loss_change_pct"]
    at_k1 = {name: v["1"] for name, v in r["ppl_change_pct_at_k"].items()}
    out = {}
    for name in ("latents_4", "latents_16", "pause_16", "base_extra_steps"):
        if name in change:
            out[f"answer CE change vs the base, {name}"] = (change[name], _PCT)
    out["answer CE, latents_16 - latents_4 (nats per problem)"] = (_pair(r, "latents_16", "latents_4"), _NATS)
    for name in ("latents_4", "latents_16"):
        out[f"answer CE, pause_16 - {name} (nats per problem)"] = (_pair(r, "pause_16", name), _NATS)
    for name in ("latents_4", "latents_16"):
        if name in at_k1:
            out[f"perplexity change at k = 1, {name}"] = (at_k1[name], _PCT)
    return out


def summarize(per_replica: list[dict], budget, command: str) -> dict:
    """replicas.json: each replica's checks and numbers, and per check the count of replicas it holds in."""
    replicas = []
    numbers_of = [_numbers(r) for r in per_replica]
    for i, r in enumerate(per_replica):
        replicas.append(
            {
                "replica": i,
                "base_seed": r["budget_values"]["base_seed"],
                "seeds": r["seeds"],
                "date": r["date"],
                "machine": r["machine"],
                "wall_min": round(r["durations_s"]["total_s"] / 60, 2),
                "cpu_min": round(r["cpu_s"].get("total_s", 0.0) / 60, 2),
                "checks": {c["check"]: c["pass"] for c in r["checks"]},
                "numbers": {k: v for k, (v, _) in numbers_of[i].items()},
            }
        )
    n = len(replicas)
    checks = []
    for name in replicas[0]["checks"]:
        verdicts = [rep["checks"].get(name) for rep in replicas]
        decided = [v for v in verdicts if v is not None]
        checks.append(
            {
                "check": name,
                "per_replica": verdicts,
                "holds": sum(1 for v in decided if v),
                "decided": len(decided),
                "robust": len(decided) == n and all(decided),
            }
        )
    formats = {k: f for k, (_, f) in numbers_of[0].items()}
    numbers = []
    for label, fmt in formats.items():
        values = [rep["numbers"].get(label) for rep in replicas]
        known = [v for v in values if v is not None]
        numbers.append(
            {
                "number": label,
                "format": fmt,
                "per_replica": values,
                "min": min(known) if known else None,
                "max": max(known) if known else None,
            }
        )
    return {
        "command": command,
        "budget": budget.source or budget.name,
        "budget_values": dataclasses.asdict(budget),
        "replicas": replicas,
        "checks": checks,
        "numbers": numbers,
    }


#: What a replica record shares with the budget it speaks for: the recipe. Seeds differ by design.
RECIPE_FIELDS = ("corpus", "base", "runs", "eval")


def record_for(budget, docs: Path) -> dict | None:
    """What ``docs/replicas_<budget>.json`` measured, for a report on one run of that budget: per check, in
    how many replicas it held. None when there is no record; ``{"stale": True}`` when the record is of
    another recipe (the budget was edited since), so a report never borrows another recipe's counts."""
    path = docs / f"replicas_{budget.name}.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    shown = f"{path.parent.name}/{path.with_suffix('.md').name}"
    now, then = dataclasses.asdict(budget), summary["budget_values"]
    if any(now[k] != then.get(k) for k in RECIPE_FIELDS) or len(now["seeds"]) != len(then.get("seeds", [])):
        return {"source": shown, "stale": True}
    reps = summary["replicas"]
    return {
        "source": shown,
        "stale": False,
        "replicas": len(reps),
        "machine": reps[0]["machine"],
        "dates": f"{reps[0]['date'][:10]} … {reps[-1]['date'][:10]}",
        "command": summary["command"],
        "checks": {c["check"]: {"holds": c["holds"], "decided": c["decided"]} for c in summary["checks"]},
    }


def _held(check: dict, n: int) -> str:
    return f"{check['holds']} of {n}" if check["decided"] else "n/a"


def _verdict(v: bool | None) -> str:
    return "n/a" if v is None else ("yes" if v else "**no**")


def headline(summary: dict) -> str:
    """One sentence: which checks held in every replica, which did not."""
    n = len(summary["replicas"])
    robust = [c["check"] for c in summary["checks"] if c["robust"]]
    not_robust = [
        f"{c['check']} ({c['holds']} of {n})" for c in summary["checks"] if not c["robust"] and c["decided"]
    ]
    first = f"In all {n} replicas: " + ("; ".join(robust) if robust else "no check held") + "."
    return first + (f" Not in every replica: {'; '.join(not_robust)}." if not_robust else "")


def markdown(summary: dict) -> str:
    reps = summary["replicas"]
    n = len(reps)
    walls = [r["wall_min"] for r in reps]
    cpus = [r["cpu_min"] for r in reps]
    head = " | ".join(f"r{r['replica']}" for r in reps)
    lines = [
        f"# Replicas of the `{summary['budget']}` budget",
        "",
        headline(summary),
        "",
        "Generated by `cacheaug demo --replicas` (dist_cacheaug/demo/replicas.py); each replica is the whole "
        "budget, base included, with other seeds, standing in for another machine's rounding.",
        "",
        f"- command: `{summary['command']}`",
        f"- machine: {reps[0]['machine']}",
        f"- dates: {reps[0]['date']} … {reps[-1]['date']}",
        f"- replicas: {n}; base seeds {[r['base_seed'] for r in reps]}; run seeds "
        f"{[r['seeds'] for r in reps]}",
        f"- wall time per replica {min(walls):.1f}–{max(walls):.1f} min, CPU time {min(cpus):.1f}–{max(cpus):.1f} "
        "min (each replica's own report.md has its stages)",
        "",
        "## Checks (each replica's report.md computes them)",
        "",
        f"| check | {head} | holds in |",
        "|---|" + "---|" * n + "---:|",
    ]
    for c in summary["checks"]:
        cells = " | ".join(_verdict(v) for v in c["per_replica"])
        lines.append(f"| {c['check']} | {cells} | {_held(c, n)} |")
    lines += [
        "",
        "## Headline numbers",
        "",
        f"| number | {head} | range |",
        "|---|" + "---:|" * n + "---|",
    ]
    for row in summary["numbers"]:
        fmt = row["format"]
        cells = " | ".join("–" if v is None else fmt.format(v) for v in row["per_replica"])
        rng = "–" if row["min"] is None else f"{fmt.format(row['min'])} … {fmt.format(row['max'])}"
        lines.append(f"| {row['number']} | {cells} | {rng} |")
    return "\n".join(lines) + "\n"


def console_lines(summary: dict) -> list[str]:
    n = len(summary["replicas"])
    out = [headline(summary)]
    for c in summary["checks"]:
        out.append(f"[{_held(c, n)}] {c['check']}")
    return out
