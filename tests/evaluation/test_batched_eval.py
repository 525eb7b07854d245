"""Batched downstream evaluation (``evaluation/batching.py``) against one request at a time: log-likelihood
scores of left-padded batches equal scoring each (context, continuation) alone to ATOL (fp32, eager, CPU);
greedy generations, with rows ending at their own EOS or stop rule, equal each prompt decoded alone,
exactly; the pad id never changes a number; results come back in the caller's order; bad input
(empty question or choice, a prompt too long for the decoder, bad batch sizes) gets one clear error or
is left-truncated and counted."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from inference_helpers import FIXTURES, CharTokenizer, tiny_world  # noqa: F401  (fixture)
from tiny_models import VOCAB, tiny_augmented

import dist_cacheaug.evaluation.downstream as ds
from dist_cacheaug.cli import main
from dist_cacheaug.core.generation import generate
from dist_cacheaug.core.stopping import StopRule
from dist_cacheaug.evaluation import batching
from dist_cacheaug.evaluation.inference import InferenceError

ATOL = 1e-4  # on a sum of log-probs: measured differences are ~1e-6 (fp32 sums over different shapes)


def _model(family="gemma2", convention="insert", n_l=3, **decoder_kw):
    return tiny_augmented(family, convention, n_l, decoder_kw=decoder_kw)


def _ids(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


# ---- scoring ------------------------------------------------------------------------------------------
@pytest.mark.numerics
@pytest.mark.parametrize("augment", [True, False], ids=["augment", "no-augment"])
@pytest.mark.parametrize(
    "family,convention", [("gemma2", "insert"), ("gemma2", "refeed"), ("llama", "insert")]
)
def test_score_batch_equals_one_pair_at_a_time(family, convention, augment):
    model = _model(family, convention)
    ctxs = _ids([1, 5, 12, 9])  # gemma2's window is 7: contexts, latents and continuations cross it
    ctxs.append(ctxs[2])  # a context shared by two rows (multiple choice): read once
    conts = _ids([3, 1, 10, 4, 2], seed=1)
    pairs = list(zip(ctxs, conts))
    got = batching.score_batch(model, pairs, augment=augment)
    for (ctx, cont), (lp, greedy) in zip(pairs, got):
        want_lp, want_greedy = ds.continuation_logprobs(model, ctx, [cont], augment=augment)[0]
        assert lp == pytest.approx(want_lp, abs=ATOL) and greedy == want_greedy
    # the augmentation changes the scores, so the comparison above is not between equal baselines
    plain = batching.score_batch(model, pairs, augment=not augment)
    assert max(abs(a - b) for (a, _), (b, _) in zip(got, plain)) > 1e-2


def test_pad_id_never_changes_a_score_and_is_chosen_without_a_pad_token():
    model = _model("llama")
    pairs = list(zip(_ids([2, 7, 4]), _ids([3, 5, 1], seed=2)))
    base = batching.score_batch(model, pairs, pad_id=0)
    for pad in (2, VOCAB - 1):
        assert batching.score_batch(model, pairs, pad_id=pad) == base  # exactly: pads are masked out
    prompts = _ids([2, 7, 4], seed=3)
    gen = batching.generate_batch(model, prompts, 5, pad_id=0)
    assert batching.generate_batch(model, prompts, 5, pad_id=VOCAB - 1) == gen

    class NoPad:  # a tokenizer without a pad token (sentencepiece reports -1, HF None)
        pad_id = None

    assert batching.pad_id_for(NoPad(), VOCAB) == 0
    NoPad.pad_id = -1
    assert batching.pad_id_for(NoPad(), VOCAB) == 0
    NoPad.pad_id = VOCAB  # outside the embedding table
    assert batching.pad_id_for(NoPad(), VOCAB) == 0
    assert batching.pad_id_for(CharTokenizer(), VOCAB) == CharTokenizer().pad_id


# ---- generation ---------------------------------------------------------------------------------------
def _alone(model, prompt, n, eos, is_stop, **kw):
    """What one prompt decodes to by itself (generate's own early stop), new tokens only."""
    stop = (lambda ids: is_stop(ids[0].tolist())) if is_stop else None
    out = generate(model, torch.tensor([prompt]), n, eos_token_id=eos, stop=stop, **kw)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize(
    "kw",
    [{}, {"augment": False}, {"reaugment_every": 2}],
    ids=["augment", "no-augment", "reaugment"],
)
def test_generate_batch_rows_end_where_each_prompt_alone_ends(kw):
    model = _model("gemma2", "refeed")
    prompts = _ids([9, 2, 6, 4])
    n = 10
    free = [_alone(model, p, n, None, None, **kw) for p in prompts]
    # EOS: the earliest token some row writes for the first time after its first step
    _, eos = min((j, row[j]) for row in free for j in range(1, n) if row[j] not in row[:j])

    def is_stop(tokens):  # a rule on the text so far that rows meet at different steps
        return sum(tokens) > 250

    want = [_alone(model, p, n, eos, is_stop, **kw) for p in prompts]
    assert any(w[-1] == eos and len(w) < n for w in want)  # a row ends at its EOS ...
    assert any(w[-1] != eos and len(w) < n for w in want)  # ... another at the stop rule
    assert len({len(w) for w in want}) > 1
    assert batching.generate_batch(model, prompts, n, eos_id=eos, is_stop=is_stop, **kw) == want
    assert batching.generate_batch(model, prompts, n, **kw) == free
    # no eos_id given: ``generate`` stops at the decoder's own EOS (HF's default), and so must each row
    model.decoder.generation_config.eos_token_id = eos
    want_default = [_alone(model, p, n, eos, None, **kw) for p in prompts]
    assert any(len(w) < n for w in want_default)
    assert batching.generate_batch(model, prompts, n, **kw) == want_default


@pytest.mark.parametrize("keep_string", [True, False], ids=["keep", "drop"])
def test_generate_texts_ends_and_cuts_each_row_by_one_rule(keep_string):
    """The entry point every generating command uses: a row stops decoding at the step its text first
    holds a stop string (one that spans tokens), exactly as that prompt alone, and the same rule cuts it."""
    model, tok = _model("llama"), CharTokenizer()
    prompts = [tok.encode(t) for t in ("q: ab", "a", "q: 12 + 3 =")]
    n = 12
    free = [_alone(model, p, n, None, None) for p in prompts]
    texts = [tok.decode(f) for f in free]
    stop = next(texts[0][i : i + 2] for i in range(1, len(texts[0]) - 1) if texts[0][i : i + 2].strip())
    rule = StopRule(eos_ids=(tok.eos_id,), strings=(stop,), keep_string=keep_string)
    want = [
        rule.text(tok, _alone(model, p, n, tok.eos_id, lambda t: rule.text_ended(tok, t))) for p in prompts
    ]
    assert batching.generate_texts(model, tok, prompts, n, rule, pad_id=tok.pad_id) == want
    assert want[0] == (
        texts[0][: texts[0].index(stop) + 2] if keep_string else texts[0][: texts[0].index(stop)]
    )
    assert any(stop not in t and w == t[: len(w)] for t, w in zip(texts, want))  # a row the rule never ends
    # no EOS in the rule: the decoder's own EOS ends rows and cuts their text
    eos = free[1][3]
    model.decoder.generation_config.eos_token_id = eos
    got = batching.generate_texts(model, tok, prompts[1:2], n, StopRule())
    assert got == [tok.decode(free[1][: free[1].index(eos)])]


def test_row_stops_find_the_first_end_even_between_calls():
    stops = batching.RowStops(2, lambda t: sum(t) >= 10, eos_id=7)
    assert stops(torch.tensor([[1, 2], [3, 3]])) is False
    # called again only 3 tokens later: the first end is still found (row 1 at t=4, row 0 at EOS t=3)
    assert stops(torch.tensor([[1, 2, 7, 0, 9], [3, 3, 1, 5, 0]])) is True
    assert stops.cut(torch.tensor([[1, 2, 7, 0, 9], [3, 3, 1, 5, 0]])) == [[1, 2, 7], [3, 3, 1, 5]]
    never = batching.RowStops(1, None, None)
    assert never.cut(torch.tensor([[4, 5]])) == [[4, 5]]


# ---- plan ---------------------------------------------------------------------------------------------
def test_run_batched_sorts_longest_first_and_returns_the_callers_order():
    requests = [[1] * n for n in (3, 8, 1, 8, 5)]
    seen = []

    def fn(batch):
        seen.append([len(r) for r in batch])
        return [sum(r) for r in batch]

    out = batching.run_batched(fn, requests, [-len(r) for r in requests], 2)
    assert out == [3, 8, 1, 8, 5] and seen == [[8, 8], [5, 3], [1]]
    # rank r of W runs batches r, r+W, ...: the same batches as one rank
    plan = batching.plan_batches([-len(r) for r in requests], 2)
    assert plan == [[1, 3], [4, 0], [2]] and plan[1::2] == [[4, 0]]
    with pytest.raises(RuntimeError, match="not initialised"):  # a share is never returned as the whole
        batching.run_batched(fn, requests, [0] * 5, 2, shard=(1, 2))
    for bad in (0, "auto", "auto:4", "x", -1):
        with pytest.raises(InferenceError, match="batch"):
            batching.check_batch_size(bad)
    assert batching.check_batch_size("16") == 16


class _Stream:
    """A stand-in stderr: a log file, or (``tty=True``) a terminal."""

    def __init__(self, tty: bool):
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize(
    "tty, tqdm_disable, shown",
    [(False, "", False), (True, "", True), (True, "1", False)],
    ids=["log-file", "terminal", "terminal-TQDM_DISABLE"],
)
def test_progress_bar_only_on_a_terminal(tty, tqdm_disable, shown, monkeypatch):
    """``progress=True`` (the CLI's default) shows a bar on a terminal only: never tqdm frames in a log
    file (tqdm's ``disable=False`` would force them), and the user's TQDM_DISABLE=1 still wins."""
    monkeypatch.setenv("TQDM_DISABLE", tqdm_disable)
    err = _Stream(tty)
    monkeypatch.setattr(sys, "stderr", err)
    out = batching.run_batched(
        lambda b: [len(r) for r in b], [[1], [1, 2]], [0, 0], 1, progress=True, desc="x"
    )
    assert out == [1, 2]
    assert ("x: " in err.text) == shown, err.text  # the bar's description
    if shown:  # another rank of a data-parallel run never draws one (it fails later, at the gather)
        err.text = ""
        with pytest.raises(RuntimeError, match="not initialised"):
            batching.run_batched(lambda b: [0] * len(b), [[1], [2]], [0, 0], 1, shard=(1, 2), progress=True)
        assert err.text == ""


# ---- the evaluators at batch B = batch 1 --------------------------------------------------------------
@pytest.mark.numerics
@pytest.mark.parametrize("augment", [True, False], ids=["augment", "no-augment"])
def test_evaluators_at_batch_size_4_equal_batch_size_1(augment):
    tok, model = CharTokenizer(), _model("gemma2")
    mc = ds.load_mc(FIXTURES / "mc_tiny.jsonl") + ds.load_mc(FIXTURES / "mc_arc_tiny.jsonl")
    one = ds.evaluate_mc(model, tok, mc, augment=augment, batch_size=1)
    four = ds.evaluate_mc(model, tok, mc, augment=augment, batch_size=4)
    for a, b in zip(one["predictions"], four["predictions"]):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=ATOL)
        assert (a["pred"], a["pred_norm"]) == (b["pred"], b["pred_norm"])
    assert (one["acc"], one["acc_norm"]) == (four["acc"], four["acc_norm"])
    # and both equal our one-context reference scorer
    ref = ds.continuation_logprobs(
        model, tok.encode(ds.mc_context(mc[0]["question"])), [tok.encode(" " + c) for c in mc[0]["choices"]],
        augment=augment,
    )  # fmt: skip
    assert four["predictions"][0]["loglikelihoods"] == pytest.approx([s for s, _ in ref], abs=ATOL)

    items = ds.load_gsm8k(FIXTURES / "gsm8k_tiny.jsonl")
    kw = dict(fewshot=items[:1], augment=augment, max_new_tokens=6)
    g1 = ds.evaluate_gsm8k(model, tok, items[1:], batch_size=1, **kw)
    g4 = ds.evaluate_gsm8k(model, tok, items[1:], batch_size=4, **kw)
    assert [p["completion"] for p in g1["predictions"]] == [p["completion"] for p in g4["predictions"]]
    assert g1["truncated"] == g4["truncated"] == 0


# ---- bad input ----------------------------------------------------------------------------------------
def test_empty_questions_and_choices_are_refused(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "  ", "answer": "#### 3"}\n')
    with pytest.raises(InferenceError, match=r"bad.jsonl: item 1: 'question' is empty"):
        ds.load_gsm8k(bad)
    bad.write_text('{"question": "", "choices": ["a", "b"], "answer": 0}\n')
    with pytest.raises(InferenceError, match="'question' is empty"):
        ds.load_mc(bad)
    bad.write_text('{"question": "q", "choices": ["a", ""], "answer": 0}\n')
    with pytest.raises(InferenceError, match="item 1: choice 1 is empty"):
        ds.load_mc(bad)


def test_prompts_longer_than_the_decoder_are_left_truncated_and_counted(capsys):
    tok = CharTokenizer()
    model = _model("llama", max_position_embeddings=40)
    long_q = "a b c d e f g h i j k l m n o p q r s t u v w x y z a b c d e f?"
    items = [{"question": long_q, "choices": ["xy", "a"], "label": 0},
             {"question": "one?", "choices": ["aaaa", "x"], "label": 0}]  # fmt: skip
    r = ds.evaluate_mc(model, tok, items, batch_size=2)
    assert r["truncated"] == 1 and "1 of 2 multiple-choice contexts did not fit max_length 40" in (
        capsys.readouterr().err
    )
    # the score is that of the context's last 40 - 3 latents - (3 - 1) tokens (" xy" is the longest
    # choice, 3 tokens, of which 2 are read), the same context for both choices
    ctx = tok.encode(ds.mc_context(long_q))[-(40 - 3 - 2) :]
    want = ds.continuation_logprobs(model, ctx, [tok.encode(" xy"), tok.encode(" a")])
    assert r["predictions"][0]["loglikelihoods"] == pytest.approx([s for s, _ in want], abs=ATOL)
    assert r["predictions"][1]["loglikelihoods"] == pytest.approx(
        [s for s, _ in ds.continuation_logprobs(model, tok.encode(ds.mc_context("one?")), [tok.encode(" aaaa"), tok.encode(" x")])],
        abs=ATOL,
    )  # fmt: skip
    g = ds.evaluate_gsm8k(model, tok, [{"question": long_q, "solution": "", "target": "1"}], max_new_tokens=5)
    assert g["truncated"] == 1 and "1 of 1 gsm8k prompts" in capsys.readouterr().err
    with pytest.raises(InferenceError, match="gsm8k item 1: the 40 positions needed after the prompt"):
        ds.evaluate_gsm8k(model, tok, items[:1] and [{"question": "q", "solution": "", "target": "1"}],
                          max_new_tokens=38)  # fmt: skip


def test_downstream_cli_batch_size_and_bad_values(tiny_world, tmp_path, capsys):  # noqa: F811
    args = ["downstream", "--checkpoint", str(tiny_world["run"]), "--mc", str(FIXTURES / "mc_tiny.jsonl"),
            "--gsm8k", str(FIXTURES / "gsm8k_tiny.jsonl"), "--num-fewshot", "1", "--max-new-tokens", "3",
            "--no-progress", "--device", "cpu"]  # fmt: skip
    outs = {}
    for b in ("1", "3"):
        outs[b] = tmp_path / f"b{b}.json"
        assert main([*args, "--batch-size", b, "--out", str(outs[b])]) == 0
    one, three = (json.loads(outs[b].read_text()) for b in ("1", "3"))
    assert one["world_size"] == 1 and one["max_length"] == 256
    assert [p["completion"] for p in one["gsm8k"]["predictions"]] == [
        p["completion"] for p in three["gsm8k"]["predictions"]
    ]
    for a, b in zip(one["multiple_choice"]["predictions"], three["multiple_choice"]["predictions"]):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=ATOL)
    capsys.readouterr()
    assert main([*args, "--batch-size", "0"]) == 2
    assert "batch size must be a whole number >= 1" in capsys.readouterr().err
