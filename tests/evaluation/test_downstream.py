"""Downstream evaluators on hand-checked fixtures (model outputs forced), continuation scoring against
plain HF forwards, the lm-eval adapter against our own numbers, and the ``downstream`` CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from inference_helpers import FIXTURES, CharTokenizer, tiny_world  # noqa: F401  (fixture)
from tiny_models import VOCAB, tiny_decoder

import dist_cacheaug.evaluation.batching as batching
import dist_cacheaug.evaluation.downstream as ds
from dist_cacheaug import CacheAugmentedLM
from dist_cacheaug.cli import main
from dist_cacheaug.core.generation import generate
from dist_cacheaug.core.hf_compat import cache_arg
from dist_cacheaug.evaluation.inference import InferenceError


def _model(family="llama", convention="insert"):
    return CacheAugmentedLM.from_decoder(tiny_decoder(family), num_latents=3, convention=convention, seed=1)


def force_logits(model, favored: int):
    """Every next-token distribution becomes p(favored) = 1/2, every other token 1/(2(V-1))."""
    prior = torch.zeros(VOCAB)
    prior[favored] = math.log(VOCAB - 1)
    return model.decoder.lm_head.register_forward_hook(lambda m, i, o: torch.zeros_like(o) + prior)


# ---- GSM8K format --------------------------------------------------------------------------------------
def test_answer_extraction_and_loading():
    assert ds.extract_answer(" 3 + 4 = 7.\n#### 7") == ("7", "7")
    assert ds.extract_answer("so 12 - 2 = 10. The answer is 10.") == (None, "10")
    assert ds.extract_answer("#### 1,205.") == ("1205", "1205")
    assert ds.extract_answer("#### -3.0 and 5") == ("-3", "5")
    assert ds.extract_answer("no number") == (None, None)
    assert ds.gsm8k_stop().cut(" 1 + 1 = 2.\n#### 2\n\nQuestion: x #### 9") == (" 1 + 1 = 2.\n#### 2", True)
    items = ds.load_gsm8k(FIXTURES / "gsm8k_tiny.jsonl")
    assert [i["target"] for i in items] == ["7", "8", "12", "1205", "0"]
    assert items[0]["solution"] == "3 + 4 = 7.\n#### 7"
    synth = ds.load_gsm8k(FIXTURES / "gsm8k_synthetic.jsonl")
    assert [(i["solution"], i["target"]) for i in synth] == [
        ("5 + 2 = 7.\n#### 7", "7"),
        ("4 - 1 = 3.\n#### 3", "3"),
    ]


def test_gsm8k_evaluator_scores_known_completions(monkeypatch):
    tok = CharTokenizer()
    items = ds.load_gsm8k(FIXTURES / "gsm8k_tiny.jsonl")
    shots, evals = ds.split_fewshot(items, 1)
    completions = {  # question -> what the "model" writes; hand-checked scores on the right
        "ben": " 10 - 2 = 8.\n#### 8\n\nQuestion: more #### 99",  # strict 8 ok, flexible 8 ok (cut at stop)
        "cleo": " 6 * 2 = 12.\nQuestion: next",  # no ####: strict miss, flexible 12 ok
        "dev": " 1200 + 5 = 1205.\n#### 1,205",  # both ok (commas normalised)
        "eli": " 9 - 9 = 1.\n#### 1",  # both wrong
    }
    seen = []

    def fake_generate(model, input_ids, max_new_tokens, **kw):
        prompt = tok.decode(input_ids[0].tolist())
        seen.append((prompt, kw["augment"], kw["stop"]))
        name = prompt.rsplit("Question: ", 1)[1].split()[0]
        return torch.cat([input_ids, torch.tensor([tok.encode(completions[name])])], 1)

    monkeypatch.setattr(batching, "generate", fake_generate)
    r = ds.evaluate_gsm8k(_model(), tok, evals, fewshot=shots, max_new_tokens=50)
    assert r["exact_match_strict"] == pytest.approx(2 / 4)
    assert r["exact_match_flexible"] == pytest.approx(3 / 4)
    assert [p["strict"] for p in r["predictions"]] == ["8", None, "1205", "1"]
    assert [len(p) for p, _, _ in seen] == sorted((len(p) for p, _, _ in seen), reverse=True)  # longest first
    assert next(p for p, _, _ in seen if "ben has" in p) == (
        "Question: ada has 3 pens and buys 4 more. how many pens?\nAnswer: 3 + 4 = 7.\n#### 7\n\n"
        "Question: ben has 10 eggs and uses 2. how many eggs?\nAnswer:"
    )
    assert all(aug for _, aug, _ in seen)
    assert [p["completion"] for p in r["predictions"]][0] == " 10 - 2 = 8.\n#### 8"
    # the stop rule fires on a finished answer, not before
    rule = ds.gsm8k_stop(tok.eos_id)
    assert rule.text_ended(tok, tok.encode(" 1 + 1 = 2.\n#### 2")) is False  # may still become "#### 23"
    assert rule.text_ended(tok, tok.encode(" 1 + 1 = 2.\n#### 2\n")) is True
    assert rule.text_ended(tok, tok.encode(" 2\nQuestion:")) is True
    assert rule.text_ended(tok, tok.encode(" 12 - 2 = 1")) is False


def test_gsm8k_evaluator_runs_a_real_model():
    tok = CharTokenizer()
    items = ds.load_gsm8k(FIXTURES / "gsm8k_tiny.jsonl")
    model = _model("gemma2")
    a = ds.evaluate_gsm8k(model, tok, items[1:3], fewshot=items[:1], max_new_tokens=5)
    b = ds.evaluate_gsm8k(model, tok, items[1:3], fewshot=items[:1], max_new_tokens=5, augment=False)
    assert a["n"] == b["n"] == 2 and 0 <= a["exact_match_flexible"] <= 1
    assert all(len(p["completion"]) <= 5 for p in a["predictions"])


# ---- multiple choice -----------------------------------------------------------------------------------
@pytest.mark.parametrize("augment", [True, False])
@pytest.mark.parametrize("fixture", ["mc_tiny.jsonl", "mc_arc_tiny.jsonl"])
def test_multiple_choice_scores_hand_checked(fixture, augment):
    tok, model = CharTokenizer(), _model()
    items = ds.load_mc(FIXTURES / fixture)
    assert [i["label"] for i in items] == [0, 0, 1]
    hook = force_logits(model, tok.encode("a")[0])
    try:
        r = ds.evaluate_mc(model, tok, items, augment=augment)
    finally:
        hook.remove()
    lp_a, lp_o = math.log(0.5), -math.log(2 * (VOCAB - 1))
    # " aaaa" = space + 4 a; " x" = 2 others; ...
    want = [[lp_o + 4 * lp_a, 2 * lp_o], [3 * lp_o, lp_o + 12 * lp_a], [lp_o + lp_a, lp_o + 20 * lp_a]]
    for p, w in zip(r["predictions"], want):
        assert p["loglikelihoods"] == pytest.approx(w, abs=1e-4)
    assert [p["pred"] for p in r["predictions"]] == [0, 1, 0]
    assert [p["pred_norm"] for p in r["predictions"]] == [0, 1, 1]
    assert r["acc"] == pytest.approx(1 / 3) and r["acc_norm"] == pytest.approx(2 / 3)


def test_bad_task_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": 5}\n')
    with pytest.raises(InferenceError, match="item 1: 'answer'"):
        ds.load_mc(bad)
    bad.write_text('{"question": "q", "answer": "no number here"}\n')
    with pytest.raises(InferenceError, match="#### N"):
        ds.load_gsm8k(bad)
    bad.write_text("{not json\n")
    with pytest.raises(InferenceError, match="bad.jsonl:1"):
        ds.read_jsonl(bad)
    with pytest.raises(InferenceError, match="leave none"):
        ds.split_fewshot([{}] * 3, 3)


# ---- continuation scoring --------------------------------------------------------------------------------
@pytest.mark.numerics
@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_continuation_logprobs_equal_plain_forward(family):
    model = _model(family)
    ctx = [5, 9, 11, 4, 30, 7, 8, 22, 13]
    conts = [[3, 17, 40], [44], [12, 12, 12, 5, 6, 7]]
    got = ds.continuation_logprobs(model, ctx, conts, augment=False)
    for cont, (lp, greedy) in zip(conts, got):
        logits = model.decoder(input_ids=torch.tensor([ctx + cont])).logits[0, len(ctx) - 1 : -1]
        logp = F.log_softmax(logits.float(), -1)
        assert lp == pytest.approx(float(logp[torch.arange(len(cont)), cont].sum()), abs=1e-4)
        assert greedy == bool((logp.argmax(-1) == torch.tensor(cont)).all())
    # augmented: augment() on the context, then the continuation after the latents
    got = ds.continuation_logprobs(model, ctx, conts, augment=True)
    for cont, (lp, _) in zip(conts, got):
        with torch.no_grad():
            a = model.augment(torch.tensor([ctx]))
            logits = a.logits
            if len(cont) > 1:
                pos = torch.arange(a.next_position, a.next_position + len(cont) - 1)[None]
                rest = model.decoder(
                    input_ids=torch.tensor([cont[:-1]]), **cache_arg(a.past_key_values), position_ids=pos
                )
                logits = torch.cat([a.logits, rest.logits[0].float()])
            logp = F.log_softmax(logits, -1)
        assert lp == pytest.approx(float(logp[torch.arange(len(cont)), cont].sum()), abs=1e-4)


def test_greedy_flag():
    model = _model()
    ctx = [5, 9, 11]
    greedy = generate(model, torch.tensor([ctx]), 3)[0, 3:].tolist()
    (lp, is_greedy), (_, other) = ds.continuation_logprobs(model, ctx, [greedy, [(greedy[0] + 1) % VOCAB]])
    assert is_greedy and not other


# ---- lm-evaluation-harness adapter ------------------------------------------------------------------------
def test_lm_eval_adapter_matches_our_loglikelihood():
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    from dist_cacheaug.evaluation.lm_eval_adapter import CacheAugLM

    assert get_model("cacheaug") is CacheAugLM
    tok, model = CharTokenizer(), _model("gemma2")
    lm = CacheAugLM(model=model, tokenizer_obj=tok, max_gen_toks=5)
    pairs = [("Question: one?\nAnswer:", " aaaa"), ("Question: two? ", "xy"), ("", "abc")]
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    for (c, x), (lp, greedy) in zip(pairs, got):
        want = ds.loglikelihood(model, tok, c, x)
        assert lp == pytest.approx(want[0], abs=1e-4) and greedy == want[1]
    plain = CacheAugLM(model=model, tokenizer_obj=tok, augment="false").loglikelihood(
        reqs[:1], disable_tqdm=True
    )
    assert plain[0][0] == pytest.approx(ds.loglikelihood(model, tok, *pairs[0], augment=False)[0], abs=1e-4)
    assert plain[0][0] != pytest.approx(got[0][0], abs=1e-2)

    hook = force_logits(model, tok.encode("a")[0])
    try:
        gen = lm.generate_until(
            [Instance("generate_until", {}, ("Question: x?", {"until": ["\n"]}), 0),
             Instance("generate_until", {}, ("Question: x?", {"until": ["aaa"], "max_gen_toks": 9}), 1)],
            disable_tqdm=True,
        )  # fmt: skip
    finally:
        hook.remove()
    assert gen == ["aaaaa", ""]

    doc = "ab cd ef"
    ids = [tok.bos_id, *tok.encode(doc)]  # the empty-context prefix (BOS), then the document
    logp = F.log_softmax(model.decoder(input_ids=torch.tensor([ids])).logits[0, :-1].float(), -1)
    want = float(logp[torch.arange(len(ids) - 1), ids[1:]].sum())
    (rolled,) = lm.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (doc,), 0)], disable_tqdm=True
    )
    assert rolled == pytest.approx(want, abs=1e-4)


# ---- CLI -------------------------------------------------------------------------------------------------------
def test_downstream_cli(tiny_world, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "ds.json"
    rc = main(
        ["downstream", "--checkpoint", str(tiny_world["run"]), "--gsm8k", str(FIXTURES / "gsm8k_tiny.jsonl"),
         "--num-fewshot", "2", "--max-new-tokens", "4", "--limit", "2", "--mc", str(FIXTURES / "mc_tiny.jsonl"),
         "--out", str(out), "--no-progress", "--device", "cpu"]
    )  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["gsm8k"]["n"] == 2 and res["gsm8k"]["num_fewshot"] == 2
    assert res["multiple_choice"]["n"] == 2 and res["augment"] is True
    assert "exact match strict" in capsys.readouterr().out
    assert main(["downstream", "--checkpoint", str(tiny_world["run"])]) == 2
    assert "at least one task file" in capsys.readouterr().err


# ---- zero-shot chain of thought (paper Table 4 baseline) --------------------------------------------------
def test_zero_shot_cot_prompt_budget_and_answer_from_the_reasoning(monkeypatch):
    tok = CharTokenizer()
    items = ds.load_gsm8k(FIXTURES / "gsm8k_tiny.jsonl")[:2]
    seen = []

    def fake_generate(model, input_ids, max_new_tokens, **kw):
        seen.append((tok.decode(input_ids[0].tolist()), max_new_tokens))
        text = (
            " ada has 3, buys 4: 3 + 4 = 7. the answer is 7." if len(seen) == 1 else " so 10 - 3 = 7.\n#### 7"
        )
        return torch.cat([input_ids, torch.tensor([tok.encode(text)])], 1)

    monkeypatch.setattr(batching, "generate", fake_generate)
    cot = "lets think step by step."  # (the character tokenizer has no capitals or apostrophes)
    r = ds.evaluate_gsm8k(_model(), tok, items, cot=cot, max_new_tokens=ds.COT_NEW_TOKENS, max_length=1024)
    assert seen[0] == (
        "Question: ada has 3 pens and buys 4 more. how many pens?\nAnswer: lets think step by step.",
        512,
    )
    assert r["cot"] == cot and r["num_fewshot"] == 0
    assert [p["flexible"] for p in r["predictions"]] == ["7", "7"]  # last number of the reasoning
    assert r["exact_match_flexible"] == pytest.approx(1 / 2)  # item 2's target is 8


def test_downstream_cli_cot_defaults_to_zero_shot_and_a_larger_budget(tiny_world, tmp_path, monkeypatch):  # noqa: F811
    budgets = []

    def fake_generate(model, input_ids, max_new_tokens, **kw):
        budgets.append(max_new_tokens)
        return input_ids

    monkeypatch.setattr(batching, "generate", fake_generate)
    out = tmp_path / "cot.json"
    rc = main(
        ["downstream", "--checkpoint", str(tiny_world["run"]), "--gsm8k", str(FIXTURES / "gsm8k_tiny.jsonl"),
         "--cot", "--limit", "2", "--out", str(out), "--no-progress", "--device", "cpu", "--max-length", "1024"]
    )  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())["gsm8k"]
    assert res["num_fewshot"] == 0 and res["n"] == 2 and res["cot"] == ds.COT_PROMPT
    assert budgets == [ds.COT_NEW_TOKENS] * 2
    rc = main(
        ["downstream", "--checkpoint", str(tiny_world["run"]), "--gsm8k", str(FIXTURES / "gsm8k_tiny.jsonl"),
         "--cot", "--cot-prompt", "Think.", "--num-fewshot", "1", "--max-new-tokens", "7", "--limit", "1",
         "--out", str(out), "--no-progress", "--device", "cpu", "--max-length", "1024"]
    )  # fmt: skip
    res = json.loads(out.read_text())["gsm8k"]
    assert rc == 0 and res["num_fewshot"] == 1 and res["cot"] == "Think." and budgets[-1] == 7
