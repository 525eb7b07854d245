"""The demo's numbers (``results.json``), its report (``report.md``), plots and TensorBoard scalars, from the
per-run evaluations ``demo.stage_eval`` wrote. The checks at the end are computed from the numbers (the
effects the paper reports, each with the margin that decides it), never written by hand."""

from __future__ import annotations

import math
import shutil
import statistics
from pathlib import Path

from ..evaluation.loss_at_k import log_tensorboard, table_ks
from .answers import paired_difference

LOSS_PNG = "results_loss_at_k.png"
ANSWER_PNG = "results_answer.png"
LATENT_RUNS = ("latents_4", "latents_16")


def _mean(xs) -> float:
    return float(statistics.fmean(xs))


def _spread(xs) -> float:
    """Range across seeds (0 with one seed)."""
    return float(max(xs) - min(xs)) if len(xs) > 1 else 0.0


def aggregate(evals: dict, seeds: list[int], max_k: int, kinds: list[str] | None = None) -> dict:
    """results.json's numbers: means over seeds, per-seed values, spreads, paired comparisons."""
    names = list(evals)
    base_seed = seeds[0]
    base_ans = evals["baseline"][base_seed]["answer"]
    base_loss = evals["baseline"][base_seed]["loss_at_k"]
    r: dict = {
        "loss_at_k": {},
        "ppl_change_pct_at_k": {},
        "loss_at_k_spread": {},
        "answer_loss": {},
        "answer_loss_spread": {},
        "answer_loss_per_seed": {},
        "answer_loss_change_pct": {},
        "answer_loss_paired_se": {},
        "first_digit_loss": {},
        "exact_match": {},
        "trainable_params": {},
        "num_answer_problems": base_ans["num_problems"],
        "num_answer_tokens": base_ans["num_answer_tokens"],
        "seeds": list(seeds),
    }
    for name in names:
        per_seed = [evals[name][s] for s in seeds]
        losses = [e["loss_at_k"] for e in per_seed]
        mean_k = [_mean(col) for col in zip(*losses)]
        r["loss_at_k"][name] = {str(k): mean_k[k - 1] for k in range(1, max_k + 1)}
        r["loss_at_k_spread"][name] = {
            str(k): _spread([x[k - 1] for x in losses]) for k in range(1, max_k + 1)
        }
        r["ppl_change_pct_at_k"][name] = {
            str(k): 100.0 * (math.exp(mean_k[k - 1] - base_loss[k - 1]) - 1.0) for k in range(1, max_k + 1)
        }
        ans = [e["answer"]["answer_ce"] for e in per_seed]
        r["answer_loss"][name] = _mean(ans)
        r["answer_loss_spread"][name] = _spread(ans)
        r["answer_loss_per_seed"][name] = {str(s): a for s, a in zip(seeds, ans)}
        r["answer_loss_change_pct"][name] = 100.0 * (_mean(ans) / base_ans["answer_ce"] - 1.0)
        r["first_digit_loss"][name] = _mean([e["answer"]["first_digit_ce"] for e in per_seed])
        r["exact_match"][name] = _mean([e["answer"]["exact_match"] for e in per_seed])
        r["trainable_params"][name] = per_seed[0]["trainable_params"]
    # Answers, paired by problem: each problem's CE averaged over seeds, compared with the same problem's CE
    # under another model. The margin of every answer check is built from these (and the seed spread).
    per_problem = {
        name: [_mean(col) for col in zip(*(evals[name][s]["answer"]["per_problem_ce"] for s in seeds))]
        for name in names
    }
    r["answer_per_problem_ce"] = per_problem
    r["answer_pairs"] = {}
    for name in names:
        if name != "baseline":
            d, se = paired_difference(per_problem[name], per_problem["baseline"])
            seed_means = [_mean(evals[name][s]["answer"]["per_problem_ce"]) for s in seeds]
            r["answer_pairs"][name] = {"diff_vs_baseline": d, "se": se, "seed_spread": _spread(seed_means)}
            r["answer_loss_paired_se"][name] = se
    # the same paired comparison within each kind of problem (bare expressions, word problems)
    r["answer_by_kind"] = {}
    for kind in sorted(set(kinds or [])):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        if len(idx) < 2:
            continue
        row = {"num_problems": len(idx)}
        base_k = [per_problem["baseline"][i] for i in idx]
        row["baseline"] = {"per_problem_ce": _mean(base_k)}
        for name in names:
            if name != "baseline":
                d, se = paired_difference([per_problem[name][i] for i in idx], base_k)
                row[name] = {
                    "per_problem_ce": _mean(per_problem[name][i] for i in idx),
                    "diff_vs_baseline": d,
                    "se": se,
                }
        r["answer_by_kind"][kind] = row
    r["checks"] = checks(r, max_k)
    return r


def answer_pair(r: dict, a: str, b: str) -> tuple[float, float]:
    """Mean and SE over problems of (per-problem answer CE of a) - (that of b)."""
    return paired_difference(r["answer_per_problem_ce"][a], r["answer_per_problem_ce"][b])


def checks(r: dict, max_k: int) -> list[dict]:
    """The paper's effects, measured: each row says what was compared, the numbers, the margin that
    decides it, and the verdict (None where the budget cannot decide it, e.g. a spread with one seed)."""
    out = []
    one_seed = len(r["seeds"]) == 1
    base_k = r["loss_at_k"]["baseline"]
    beats = {}
    for name in LATENT_RUNS:
        if name not in r["answer_pairs"]:
            continue
        p = r["answer_pairs"][name]
        gain, margin = -p["diff_vs_baseline"], max(p["seed_spread"], 2 * p["se"])
        beats[name] = gain > margin
        n_l = _n_l(name)
        out.append(
            {
                "check": f"{name}: held-out answer loss below the frozen base's",
                "claim": "N_L = {n} latents lower the held-out answer CE ({d})",
                "n": n_l,
                "detail": f"{r['answer_loss_change_pct'][name]:+.2f} %",
                "measured": f"per-problem gain {gain:+.4f} nats; margin max(seed spread, 2 paired SE) {margin:.4f}",
                "pass": beats[name],
            }
        )
        gain1 = base_k["1"] - r["loss_at_k"][name]["1"]
        spread1 = r["loss_at_k_spread"][name]["1"]
        out.append(
            {
                "check": f"{name}: loss at k=1 below the frozen base's (Table 1)",
                "claim": "N_L = {n} latents give a Table 1 gain at k = 1 beyond the seed spread",
                "n": n_l,
                "measured": f"gain {gain1:+.4f} nats; seed spread {spread1:.4f}"
                + (" (one seed)" if one_seed else ""),
                "pass": None if one_seed else gain1 > spread1,
            }
        )
        near_ks = [k for k in (1, 2, 4) if k <= max_k]
        far_ks = [k for k in (16, 32) if k <= max_k]
        if near_ks and far_ks:
            near = _mean([base_k[str(k)] - r["loss_at_k"][name][str(k)] for k in near_ks])
            far = _mean([base_k[str(k)] - r["loss_at_k"][name][str(k)] for k in far_ks])
            out.append(
                {
                    "check": f"{name}: a gain at small k that shrinks with k (k={near_ks} vs k={far_ks})",
                    "claim": "N_L = {n} latents give a Table 1 gain at small k that shrinks with k",
                    "n": n_l,
                    "measured": f"mean gain {near:+.4f} vs {far:+.4f} nats",
                    "pass": near > 0 and near > far,
                }
            )
    if all(n in r["answer_pairs"] for n in LATENT_RUNS):
        d, se = answer_pair(r, "latents_16", "latents_4")
        # The paper's claim is that more latents help (Table 1): N_L = 16 must beat N_L = 4 beyond 2 paired
        # SE, not merely tie with it.
        out.append(
            {
                "check": "N_L=16 beats N_L=4 on answers (more latents help, Table 1's order)",
                "claim": "N_L = 16 lowers the answer CE more than N_L = 4",
                "measured": f"latents_16 - latents_4 = {d:+.4f} nats per problem; margin 2 paired SE {2 * se:.4f}; "
                f"latents_16 beats the base: {'yes' if beats['latents_16'] else 'no'}",
                "pass": beats["latents_16"] and d < -2 * se,
            }
        )
    for name in LATENT_RUNS:
        if "pause_16" in r["answer_pairs"] and name in r["answer_pairs"]:
            d, se = answer_pair(r, "pause_16", name)
            out.append(
                {
                    "check": f"pause tokens worse than the coprocessor ({name}) on answers (Table 3's order)",
                    "claim": "pause tokens are worse than N_L = {n} latents (Table 3)",
                    "n": _n_l(name),
                    "measured": f"pause_16 - {name} = {d:+.4f} nats per problem; margin 2 paired SE {2 * se:.4f}",
                    "pass": d > 2 * se,
                }
            )
    if "base_extra_steps" in r["answer_pairs"]:
        for name in LATENT_RUNS:
            if name in r["answer_pairs"]:
                d, se = answer_pair(r, name, "base_extra_steps")
                out.append(
                    {
                        "check": f"{name} beats the compute control (the base trained as many extra steps; "
                        "not a claim of the paper)",
                        "claim": "N_L = {n} latents beat training the base as many extra steps "
                        "(not a claim of the paper)",
                        "n": _n_l(name),
                        "measured": f"{name} - base_extra_steps = {d:+.4f} nats per problem; margin 2 paired SE "
                        f"{2 * se:.4f}",
                        "pass": d < -2 * se,
                    }
                )
    return out


def _n_l(name: str) -> str:
    return name.rsplit("_", 1)[1]


def headline(checks_: list[dict], seeds: int, record: dict | None = None) -> list[str]:
    """The report's first two sentences, from the computed checks: what this run shows, and what it does
    not (a check that failed, or that this budget cannot decide). With a replica record
    (``replicas.record_for``), a claim that did not hold in every replica of the budget says so: one run
    showing it is one draw, not a result."""
    counts = replica_counts(record)
    shown = _claims([c for c in checks_ if c["pass"]], counts)
    failed = _claims([c for c in checks_ if c["pass"] is False], counts)
    why = " (one seed: no spread to compare with)" if seeds == 1 else ""
    undecided = [f"{c}{why}" for c in _claims([c for c in checks_ if c["pass"] is None])]
    first = (
        f"This run shows that {_join(shown)}."
        if shown
        else "This run shows none of the paper's effects checked below: at this budget they are not visible."
    )
    missing = failed + undecided
    second = f"It does not show that {_join(missing)}." if missing else "Every check below passed."
    return [first, second]


def replica_counts(record: dict | None) -> dict[str, tuple[int, int]]:
    """check -> (replicas it held in, replicas measured), from a current replica record; {} without one."""
    if not record or record.get("stale"):
        return {}
    n = record["replicas"]
    return {name: (c["holds"], n) for name, c in record["checks"].items() if c["decided"]}


def held_in(counts: dict[str, tuple[int, int]], check: str) -> str | None:
    """ "h of n" for a check with a replica count (:func:`replica_counts`), else None."""
    return f"{counts[check][0]} of {counts[check][1]}" if check in counts else None


def _claims(checks_: list[dict], counts: dict[str, tuple[int, int]] | None = None) -> list[str]:
    """Claims in check order, those differing only in N_L merged ("N_L = 4 and 16 ..."); a claim that
    did not hold in every replica of the budget carries the count."""
    groups: dict[str, list[dict]] = {}
    for c in checks_:
        groups.setdefault(c["claim"], []).append(c)
    out = []
    for template, cs in groups.items():
        ns = " and ".join(dict.fromkeys(str(c.get("n")) for c in cs))
        details = ", ".join(c["detail"] for c in cs if c.get("detail"))
        claim = template.format(n=ns, d=details)
        counts = counts or {}
        shaky = [(c, *counts[c.get("check")]) for c in cs if c.get("check") in counts]
        shaky = [(c, h, n) for c, h, n in shaky if h < n]
        if shaky:
            held = ", ".join(
                (f"N_L = {c['n']}: " if len(cs) > 1 and c.get("n") else "") + f"{h} of {n}"
                for c, h, n in shaky
            )
            claim += f" [held in only {held} replicas of this budget: not robust at this scale]"
        out.append(claim)
    return out


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else "; ".join(items[:-1]) + "; and " + items[-1]


def _record_lines(record: dict | None) -> list[str]:
    """The meta line naming the replica record the checks are counted against (or why there is none)."""
    if record is None:
        return ["- replicas of this budget: none recorded (`--replicas 5 --publish docs` measures them)"]
    if record["stale"]:
        return [
            f"- replicas of this budget: {record['source']} was measured on another recipe of it; not used "
            "(rerun it with `--replicas 5 --publish docs`)"
        ]
    return [
        f"- replicas of this budget: {record['replicas']} ({record['source']}; `{record['command']}`; "
        f"{record['machine']}, {record['dates']}): the last column of the checks counts the replicas each held in"
    ]


def _fmt_change(ce: float, base: float) -> str:
    return f"{ce:.4f} ({100 * (math.exp(ce - base) - 1):+.1f}%)"


def _cpu_note(meta: dict) -> str:
    cpu = meta.get("cpu_s") or {}
    if not cpu.get("total_s"):
        return ""
    return f"; CPU time {cpu['total_s'] / 60:.1f} min (user + system, the demo and its subprocesses)"


def report_markdown(r: dict, meta: dict, descriptions: dict[str, str]) -> str:
    names = list(r["loss_at_k"])
    ks = table_ks(len(r["loss_at_k"]["baseline"]))
    base = r["loss_at_k"]["baseline"]
    multi = len(r["seeds"]) > 1
    lines = [
        "# Differentiable cache augmentation at tiny scale: results",
        "",
        " ".join(headline(r["checks"], len(r["seeds"]), r.get("replica_record"))),
        "",
        "Generated by `cacheaug demo` (the README's first command); every number below is computed by it, and "
        "the two sentences above from the checks at the end.",
        "",
        f"- command: `{meta['command']}`",
        f"- budget: `{meta['budget']}`; seeds {r['seeds']} (coprocessor/pause/control init, soft tokens, "
        "training positions); the base, the data and the evaluation points are shared",
        f"- machine: {meta['machine']}",
        f"- date: {meta['date']}; wall time {meta['durations_s']['total_s'] / 60:.1f} min ("
        + ", ".join(f"{k[:-2]} {v / 60:.1f} min" for k, v in meta["durations_s"].items() if k != "total_s")
        + ")"
        + _cpu_note(meta),
        f"- data: {meta['data']}",
        f"- base: {meta['base']}",
        f"- runs: {meta['runs']}",
        f"- convention: `{meta['convention']}` (docs/design.md §1.6; the paper's is `insert`, see docs/ablations.md)",
        *_record_lines(r.get("replica_record")),
        "",
        "## Loss of the k-th token after the insertion point (paper Table 1)",
        "",
        f"Cross-entropy (nats) on {meta['eval_traces']} held-out insertion points (validation shards, never "
        "trained on), and in brackets the perplexity change vs the frozen base"
        + (f"; mean over {len(r['seeds'])} seeds, ± half the range across seeds." if multi else "."),
        "",
        "| run | " + " | ".join(f"k={k}" for k in ks) + " |",
        "|---|" + "---:|" * len(ks),
    ]
    for name in names:
        cells = []
        for k in ks:
            ce = r["loss_at_k"][name][str(k)]
            cell = f"{ce:.4f}" if name == "baseline" else _fmt_change(ce, base[str(k)])
            if multi and name != "baseline":
                cell += f" ±{r['loss_at_k_spread'][name][str(k)] / 2:.4f}"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"![loss change at k]({LOSS_PNG})",
        "",
        "## Held-out arithmetic answers",
        "",
        f"{r['num_answer_problems']} generated problems whose questions never occur in the training corpus, "
        "asked in the direct-answer form; augmentation happens at the end of the question (the `####` "
        f"marker). Answer loss: mean CE of the {r['num_answer_tokens']} answer digit tokens; paired SE: "
        "standard error of the per-problem difference vs the frozen base; exact match: greedy decoding "
        "writes the answer and stops. The checks below pair problems: each problem's CE averaged over seeds.",
        "",
        "| run | trainable params | answer CE | CE change vs base | paired SE | "
        + ("per seed | " if multi else "")
        + "first-digit CE | exact match |",
        "|---|---:|---:|---:|---:|" + ("---|" if multi else "") + "---:|---:|",
    ]
    for name in names:
        se = r["answer_loss_paired_se"].get(name)
        per_seed = ", ".join(f"{v:.4f}" for v in r["answer_loss_per_seed"][name].values())
        lines.append(
            f"| {name} | {r['trainable_params'][name]:,} | {r['answer_loss'][name]:.4f} | "
            f"{r['answer_loss_change_pct'][name]:+.2f}% | {'–' if se is None else f'{se:.4f}'} | "
            + (f"{per_seed} | " if multi else "")
            + f"{r['first_digit_loss'][name]:.4f} | {100 * r['exact_match'][name]:.1f}% |"
        )
    if r.get("answer_by_kind"):
        lines += [
            "",
            "By kind of problem (mean of per-problem answer CE; in brackets the paired difference vs the "
            "frozen base ± its SE):",
            "",
            "| run | "
            + " | ".join(f"{k} ({v['num_problems']})" for k, v in r["answer_by_kind"].items())
            + " |",
            "|---|" + "---:|" * len(r["answer_by_kind"]),
        ]
        for name in names:
            cells = []
            for row in r["answer_by_kind"].values():
                v = row[name]
                cell = f"{v['per_problem_ce']:.4f}"
                if name != "baseline":
                    cell += f" ({v['diff_vs_baseline']:+.4f} ± {v['se']:.4f})"
                cells.append(cell)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"![answer loss]({ANSWER_PNG})",
        "",
        "## What the numbers show (computed checks)",
        "",
        "| check | measured | result | replicas of this budget |",
        "|---|---|---|---:|",
    ]
    counts = replica_counts(r.get("replica_record"))
    for c in r["checks"]:
        verdict = "n/a" if c["pass"] is None else ("yes" if c["pass"] else "**no**")
        held = held_in(counts, c["check"]) or "–"
        lines.append(f"| {c['check']} | {c['measured']} | {verdict} | {held} |")
    lines += ["", "## Runs", ""]
    for name in names:
        lines.append(f"- `{name}`: {descriptions.get(name, '')}")
    lines += [
        "",
        f"TensorBoard (training curves of every run, and these evaluations): `{meta['tensorboard']}`",
        "",
    ]
    return "\n".join(lines)


def plot(r: dict, out_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    names = [n for n in r["loss_at_k"] if n != "baseline"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name in names:
        ks = [int(k) for k in r["ppl_change_pct_at_k"][name]]
        ax.plot(ks, list(r["ppl_change_pct_at_k"][name].values()), marker="o", markersize=2, label=name)
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (token after the insertion point)")
    ax.set_ylabel("perplexity change vs frozen base (%)")
    ax.set_title("Loss at k, relative to the frozen base")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / LOSS_PNG)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    all_names = list(r["answer_loss"])
    vals = [r["answer_loss"][n] for n in all_names]
    errs = [r["answer_loss_spread"][n] / 2 for n in all_names]
    ax.bar(all_names, vals, yerr=errs, color=["gray"] + ["C0"] * (len(all_names) - 1))
    lo = min(vals) - 0.05 * (max(vals) - min(vals) + 1e-3) - 0.02
    ax.set_ylim(max(0.0, lo), max(vals) * 1.01 + 1e-3)
    ax.set_ylabel("answer-token CE (nats)")
    ax.set_title("Held-out answers, augmentation at the question's end")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / ANSWER_PNG)
    plt.close(fig)
    return [out_dir / LOSS_PNG, out_dir / ANSWER_PNG]


def log_eval_tensorboard(evals: dict, tb_dir: Path) -> None:
    """Each run's loss-at-k curve per seed (``insertion/*`` against k), beside the training logs; written
    afresh each time (a rerun must not add a second copy of every point)."""
    shutil.rmtree(tb_dir, ignore_errors=True)
    log_tensorboard(
        {
            f"{name}_seed{s}": e["insertion"]
            for name, per in evals.items()
            if name != "baseline"  # every run's scalars include the base's (insertion/baseline_ce)
            for s, e in per.items()
        },
        tb_dir,
    )
