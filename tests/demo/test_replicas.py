"""``cacheaug demo --replicas N``: each replica re-seeds the base and the runs; the summary counts, per
check, the replicas in which it holds, from the replicas' own computed checks."""

from __future__ import annotations

import json

import pytest

from dist_cacheaug.config import ConfigError
from dist_cacheaug.demo import pipeline, replicas
from dist_cacheaug.demo.pipeline import Layout, load_budget, replica_budget, stage_base, stamp_budget
from dist_cacheaug.demo.report import aggregate


def test_replica_budget_reseeds_the_base_and_the_runs():
    b = load_budget("full")
    assert replica_budget(b, 0) == b  # replica 0 is the budget itself
    r2 = replica_budget(b, 2)
    assert r2.base_seed == b.base_seed + 2
    assert r2.seeds == [s + 2 * pipeline.REPLICA_SEED_STRIDE for s in b.seeds]
    all_seeds = [s for r in range(5) for s in replica_budget(b, r).seeds]
    assert len(set(all_seeds)) == len(all_seeds)  # no two replicas share a run seed
    assert (r2.runs, r2.base, r2.corpus, r2.eval) == (b.runs, b.base, b.corpus, b.eval)  # same recipe


def test_the_base_trains_with_the_budget_base_seed(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(pipeline, "_run", lambda name, cmd, log: seen.append(cmd))
    monkeypatch.setattr(pipeline, "_vocab", lambda layout: 512)
    layout = Layout(tmp_path)
    stage_base(replica_budget(load_budget("quick"), 3), layout)
    assert len(seen) == 1 and "train.seed=3" in seen[0]
    seen.clear()
    stage_base(load_budget("quick"), layout)
    assert "train.seed=0" in seen[0]


def test_a_run_dir_stamped_before_base_seed_existed_still_resumes(tmp_path):
    b = load_budget("micro")
    layout = Layout(tmp_path)
    stamp_budget(b, layout)
    stamp = json.loads((tmp_path / "budget.json").read_text())
    del stamp["base_seed"]  # as an older version wrote it
    (tmp_path / "budget.json").write_text(json.dumps(stamp))
    stamp_budget(b, layout)  # the same budget: accepted
    with pytest.raises(ConfigError, match="base_seed"):
        stamp_budget(replica_budget(b, 1), layout)  # another base: refused, naming the field


def _fake(answer_ce: float, per_problem: list[float], k1: float) -> dict:
    return {
        "loss_at_k": [k1] + [2.0] * 31,
        "insertion": {"num_traces": 10},
        "answer": {
            "answer_ce": answer_ce,
            "first_digit_ce": answer_ce,
            "exact_match": 0.5,
            "num_problems": len(per_problem),
            "num_answer_tokens": len(per_problem),
            "per_problem_ce": per_problem,
        },
        "trainable_params": 7,
    }


def _results(replica: int, l16: list[float]) -> dict:
    base = [1.0, 1.02, 0.98, 1.01, 0.99, 1.0]
    evals = {
        "baseline": {replica: _fake(1.0, base, 2.0)},
        "latents_4": {replica: _fake(0.95, [x - 0.05 for x in base], 1.95)},
        "latents_16": {replica: _fake(sum(l16) / len(l16), l16, 1.9)},
        "pause_16": {replica: _fake(1.05, [x + 0.05 for x in base], 2.05)},
    }
    r = aggregate(evals, [replica], 32)
    b = replica_budget(load_budget("quick"), replica)
    r.update(
        date=f"2026-12-0{replica + 1}",
        machine="test",
        durations_s={"total_s": 60.0 * (6 + replica)},
        cpu_s={"total_s": 120.0},
        budget_values={"base_seed": b.base_seed},
    )
    return r


def test_summary_counts_each_check_over_replicas():
    base = [1.0, 1.02, 0.98, 1.01, 0.99, 1.0]
    good = [x - 0.1 for x in base]  # N_L = 16 better than N_L = 4 on every problem
    bad = [x + 0.01 * (i % 2) for i, x in enumerate(base)]  # no better than the base
    per = [_results(0, good), _results(1, bad), _results(2, good)]
    s = replicas.summarize(per, load_budget("quick"), "cacheaug demo --replicas 3")
    rows = {c["check"]: c for c in s["checks"]}
    l16 = rows["latents_16: held-out answer loss below the frozen base's"]
    assert l16["per_replica"] == [True, False, True] and l16["holds"] == 2 and not l16["robust"]
    l4 = rows["latents_4: held-out answer loss below the frozen base's"]
    assert l4["holds"] == 3 and l4["robust"]
    k1 = rows["latents_4: loss at k=1 below the frozen base's (Table 1)"]
    assert k1["decided"] == 0 and not k1["robust"]  # one seed per replica: undecided, never "robust"
    diff = {n["number"]: n for n in s["numbers"]}["answer CE, latents_16 - latents_4 (nats per problem)"]
    assert diff["per_replica"][0] == pytest.approx(-0.05) and diff["max"] > 0 > diff["min"]
    md = replicas.markdown(s)
    assert md.startswith("# Replicas of the `")
    assert "| latents_16: held-out answer loss below the frozen base's | yes | **no** | yes | 2 of 3 |" in md
    assert "wall time per replica 6.0–8.0 min" in md
    assert "`cacheaug demo --replicas 3`" in md
    first = replicas.headline(s)
    assert first.startswith("In all 3 replicas: latents_4: held-out answer loss below the frozen base's")
    assert "Not in every replica: latents_16: held-out answer loss below the frozen base's (2 of 3)" in first


def test_replicas_option_is_validated():
    with pytest.raises(ConfigError, match="--replicas must be >= 1"):
        pipeline.main(["--budget", "micro", "--replicas", "0"])
