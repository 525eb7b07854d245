"""The lm-eval adapter at lm-eval's ``batch_size``: requests batched (longest first, left-padded) give the
scores of one request at a time (ATOL) and the same greedy text, in lm-eval's order, through the adapter's
methods, ``lm_eval.simple_evaluate`` on local task configs (no hub access), and lm-eval's command line;
bad requests get one clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from inference_helpers import FIXTURES, CharTokenizer, tiny_world  # noqa: F401  (fixture)
from tiny_models import tiny_decoder

import dist_cacheaug.evaluation.downstream as ds
from dist_cacheaug import CacheAugmentedLM
from dist_cacheaug.evaluation.inference import InferenceError

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from dist_cacheaug.evaluation.lm_eval_adapter import CacheAugLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-4  # on a sum of log-probs (fp32, eager attention, CPU)

MC_TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {fixtures}/mc_tiny.jsonl
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: 0
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""
GEN_TASK = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {fixtures}/gsm8k_tiny.jsonl
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n", "Question:"]
  max_gen_toks: 5
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, text in (("tiny_mc", MC_TASK), ("tiny_gen", GEN_TASK)):
        (d / f"{name}.yaml").write_text(text.format(fixtures=FIXTURES, cache=d / "hf_cache"))
    return d


def _lm(batch_size, augment=True, **kw):
    model = CacheAugmentedLM.from_decoder(tiny_decoder("gemma2"), num_latents=3, seed=1).eval()
    return CacheAugLM(
        model=model, tokenizer_obj=CharTokenizer(), batch_size=batch_size, augment=augment, **kw
    )


LL_PAIRS = [
    ("Question: one?\nAnswer:", " aaaa"),
    ("Question: two? ", "xy"),  # trailing space moves to the continuation
    ("", "abc"),  # empty context: BOS stands for it
    ("Question: one?\nAnswer:", " x"),  # a context shared with request 0
    ("Question: a longer question, with more words?\nAnswer:", " 12"),
]


@pytest.mark.parametrize("augment", [True, False], ids=["augment", "no-augment"])
def test_adapter_at_batch_size_3_equals_batch_size_1(augment):
    one, three = _lm(1, augment), _lm("3", augment)  # lm-eval's CLI passes the size as text
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(LL_PAIRS)]
    a, b = one.loglikelihood(reqs, disable_tqdm=True), three.loglikelihood(reqs, disable_tqdm=True)
    for (lp1, g1), (lp3, g3), (c, x) in zip(a, b, LL_PAIRS):
        assert lp3 == pytest.approx(lp1, abs=ATOL) and g1 == g3
        assert lp3 == pytest.approx(ds.loglikelihood(one.model, one.tok, c, x, augment=augment)[0], abs=ATOL)
    gen = [("Question: x?", {"until": ["\n"], "max_gen_toks": 4}),
           ("Question: a much longer one?", {"until": ["\n"], "max_gen_toks": 4}),
           ("Question: y?", {"until": ["q"], "max_gen_toks": 6}),  # another group of arguments
           ("", {"until": ["\n"], "max_gen_toks": 4})]  # fmt: skip
    reqs = [Instance("generate_until", {}, g, i) for i, g in enumerate(gen)]
    texts = three.generate_until(reqs, disable_tqdm=True)
    assert texts == one.generate_until(reqs, disable_tqdm=True)
    assert texts[1:3] == one.generate_until(reqs[1:3], disable_tqdm=True)  # results in lm-eval's order


def _window_sum(lm, context: list[int], targets: list[int]) -> float:
    """log p(targets | context) by the plain decoder, one window alone."""
    ids = context + targets
    logp = torch.log_softmax(lm.model.decoder(input_ids=torch.tensor([ids[:-1]])).logits[0].float(), -1)
    rows = torch.arange(len(context) - 1, len(ids) - 1)
    return float(logp[rows, torch.tensor(targets)].sum())


def test_rolling_loglikelihood_uses_lm_evals_windows_and_batches_exactly():
    """lm-eval's rolling windows at max_length M = 12 over [BOS] + 29 tokens (ids 0..29): the targets
    1..12 read ids 0..11, 13..24 read 12..23, and the last 25..29 read the 12 ids before each; every
    window of every document in one batch equals each alone."""
    lm1, lm3 = _lm(1, max_length=12), _lm(3, max_length=12)
    doc = "a document of twenty-nine ch."
    ids = [lm1.tok.bos_id, *lm1.tok.encode(doc)]
    assert len(ids) == 30
    want = (
        _window_sum(lm1, ids[0:1], ids[1:13])
        + _window_sum(lm1, ids[12:13], ids[13:25])
        + _window_sum(lm1, ids[17:25], ids[25:30])
    )
    docs = [doc, "ab cd ef", "x", "12 + 7 = 19"]
    reqs = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)]
    one = lm1.loglikelihood_rolling(reqs, disable_tqdm=True)
    assert one[0] == pytest.approx(want, abs=ATOL)
    for d, got in zip(docs[1:], one[1:]):  # a document that fits: one pass over [BOS] + it
        assert got == pytest.approx(_window_sum(lm1, [lm1.tok.bos_id], lm1.tok.encode(d)), abs=ATOL)
    assert lm3.loglikelihood_rolling(reqs, disable_tqdm=True) == pytest.approx(one, abs=ATOL)


def test_adapter_bad_requests_and_long_contexts(capsys):
    lm = _lm(2, max_length=30)
    with pytest.raises(
        InferenceError, match="loglikelihood request 1: the continuation '' encodes to no tokens"
    ):
        lm.loglikelihood(
            [Instance("loglikelihood", {}, p, i) for i, p in enumerate([("q", " a"), ("q", "")])]
        )
    with pytest.raises(InferenceError, match="automatic batch sizes are not supported"):
        _lm("auto")
    long_ctx = "Question: " + "ab " * 20 + "?\nAnswer:"
    (lp, _), (short, _) = lm.loglikelihood(
        [
            Instance("loglikelihood", {}, (long_ctx, " ab"), 0),
            Instance("loglikelihood", {}, ("q:", " ab"), 1),
        ],
        disable_tqdm=True,
    )
    assert "1 of 2 loglikelihood contexts did not fit max_length 30" in capsys.readouterr().err
    kept = lm.tok.encode(long_ctx)[-(30 - 3 - 2) :]  # 3 latents, then " ab" reads 2 tokens
    assert lp == pytest.approx(
        ds.continuation_logprobs(lm.model, kept, [lm.tok.encode(" ab")])[0][0], abs=ATOL
    )
    assert short == pytest.approx(ds.loglikelihood(lm.model, lm.tok, "q:", " ab")[0], abs=ATOL)


def _samples(results, task):
    return {s["doc_id"]: s["resps"] for s in results["samples"][task]}


def test_simple_evaluate_with_local_tasks_at_batch_sizes_1_and_3(tiny_world, task_dir):  # noqa: F811
    """lm-eval's Python entry with the registered name (model args as lm-eval passes them) and a task
    manager over local task configs only."""
    from lm_eval.tasks import TaskManager

    runs = {}
    for b in (1, 3):
        runs[b] = lm_eval.simple_evaluate(
            model="cacheaug",
            model_args={"checkpoint": str(tiny_world["run"]), "device": "cpu"},
            tasks=["tiny_mc", "tiny_gen"],
            task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
            batch_size=b,
            log_samples=True,
        )
    one, three = runs[1], runs[3]
    assert one["results"]["tiny_mc"]["acc,none"] == three["results"]["tiny_mc"]["acc,none"]
    assert len(one["samples"]["tiny_mc"]) == 3 and len(one["samples"]["tiny_gen"]) == 5
    s1, s3 = _samples(one, "tiny_mc"), _samples(three, "tiny_mc")
    for doc in s1:
        for (r1,), (r3,) in zip(s1[doc], s3[doc]):
            assert r3[0] == pytest.approx(r1[0], abs=ATOL) and r3[1] == r1[1]
    assert _samples(one, "tiny_gen") == _samples(three, "tiny_gen")


@pytest.mark.slow
def test_lm_eval_command_line_with_a_local_task(tiny_world, task_dir, tmp_path):  # noqa: F811
    """``python -m dist_cacheaug.evaluation.lm_eval_adapter run ...`` is lm-eval's own CLI with the
    model registered; ``--batch_size`` reaches the adapter. (The device goes in ``--device``: lm-eval
    passes its own, so ``device=`` in ``--model_args`` as well is refused by lm-eval.)"""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dist_cacheaug.evaluation.lm_eval_adapter", "run", "--model", "cacheaug",
           "--model_args", f"checkpoint={tiny_world['run']}", "--tasks", "tiny_mc",
           "--include_path", str(task_dir), "--batch_size", "2", "--output_path", str(out)]  # fmt: skip
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (path,) = out.rglob("results_*.json")
    res = json.loads(path.read_text())
    assert res["config"]["batch_size"] in (2, "2")
    if not torch.cuda.is_available():  # lm-eval's default --device cuda:0 falls back to the CPU, said once
        assert proc.stderr.count("device cuda:0 asked for but CUDA is not available; using cpu") == 1
    from lm_eval.tasks import TaskManager

    want = lm_eval.simple_evaluate(
        model="cacheaug",
        model_args={"checkpoint": str(tiny_world["run"]), "device": "cpu"},
        tasks=["tiny_mc"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        batch_size=1,
    )
    assert res["results"]["tiny_mc"]["acc,none"] == want["results"]["tiny_mc"]["acc,none"]
