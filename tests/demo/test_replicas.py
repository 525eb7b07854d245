"""``cacheaug demo --replicas N``: each replica re-seeds the base and the runs; the summary counts, per
check, the replicas in which it holds, from the replicas' own computed checks."""

from __future__ import annotations

import json

import pytest

from dist_cacheaug.config import ConfigError
from dist_cacheaug.demo import pipeline, replicas
from dist_cacheaug.demo.pipeline import Layout, load_budget, replica_budget, stage_base, stamp_budget
from dist_cacheaug.demo.report import aggregate, headline, report_markdown


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


def _published(tmp_path, per: list[dict]) -> None:
    s = replicas.summarize(per, load_budget("quick"), "cacheaug demo --replicas 3")
    (tmp_path / "replicas_quick.json").write_text(json.dumps(s))


def test_a_run_report_counts_its_claims_against_the_budget_replicas(tmp_path):
    base = [1.0, 1.02, 0.98, 1.01, 0.99, 1.0]
    good = [x - 0.1 for x in base]
    bad = [x + 0.01 * (i % 2) for i, x in enumerate(base)]
    _published(tmp_path, [_results(0, good), _results(1, bad), _results(2, good)])
    record = replicas.record_for(load_budget("quick"), tmp_path)
    assert not record["stale"] and record["replicas"] == 3 and record["source"].endswith("replicas_quick.md")
    run = _results(0, good)  # this run shows N_L = 16 beating the base, which held in 2 of 3 replicas
    run["replica_record"] = record
    shown, _ = headline(run["checks"], 1, record)
    assert "N_L = 4 and 16 latents lower the held-out answer CE" in shown
    assert "[held in only N_L = 16: 2 of 3 replicas of this budget: not robust at this scale]" in shown
    assert headline(run["checks"], 1) == headline(run["checks"], 1, None)  # no record: as before
    md = report_markdown(run, _meta(), {})
    assert "| latents_16: held-out answer loss below the frozen base's |" in md
    row = next(line for line in md.splitlines() if line.startswith("| latents_16: held-out answer loss"))
    assert row.endswith("| yes | 2 of 3 |")
    assert "- replicas of this budget: 3 (" in md


def test_a_replica_record_of_another_recipe_is_not_used(tmp_path):
    _published(tmp_path, [_results(0, [1.0] * 6)])
    edited = load_budget("quick")
    edited.runs.steps += 1
    assert replicas.record_for(edited, tmp_path) == {
        "source": f"{tmp_path.name}/replicas_quick.md",
        "stale": True,
    }
    assert replicas.record_for(load_budget("micro"), tmp_path) is None  # no record for that budget
    run = _results(0, [1.0] * 6)
    run["replica_record"] = replicas.record_for(edited, tmp_path)
    assert "measured on another recipe of it; not used" in report_markdown(run, _meta(), {})
    assert "held in only" not in " ".join(headline(run["checks"], 1, run["replica_record"]))


def test_the_published_quick_record_is_of_the_shipped_quick_recipe():
    # README's claims about --quick quote docs/replicas_quick.md: editing quick.yaml without measuring it
    # again would leave every report counting against another recipe.
    from dist_cacheaug.resources import CHECKOUT

    record = replicas.record_for(load_budget("quick"), CHECKOUT / "docs")
    assert record is not None and not record["stale"] and record["replicas"] >= 5


def _meta() -> dict:
    return {
        "command": "cacheaug demo",
        "budget": "quick",
        "machine": "test",
        "date": "2026-12-07",
        "durations_s": {"total_s": 60.0},
        "cpu_s": {},
        "data": "d",
        "base": "b",
        "runs": "r",
        "convention": "refeed",
        "eval_traces": 10,
        "tensorboard": "tensorboard --logdir x",
    }


def test_replica_option_runs_one_replica_where_replicas_would_put_it(tmp_path, monkeypatch):
    seen = []

    def fake_run(budget, layout, parallel, command, publish):
        seen.append((budget, layout.run))
        return {"pngs": [], "tensorboard": "", "checks": [], "seeds": budget.seeds}

    monkeypatch.setattr(pipeline, "run_budget", fake_run)
    assert pipeline.main(["--budget", "micro", "--run-dir", str(tmp_path), "--replica", "2"]) == 0
    ((budget, run),) = seen
    assert budget == replica_budget(load_budget("micro"), 2) and run == tmp_path / "replica_2"
    for bad in (["--replica", "-1"], ["--replica", "1", "--replicas", "3"]):
        with pytest.raises(ConfigError, match="--replica must be >= 0 and not combined with --replicas"):
            pipeline.main(["--budget", "micro", *bad])
