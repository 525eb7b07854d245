"""Generation: --no-augment = HF greedy generate; augmented = augment() + manual greedy decoding;
re-augmentation and the asynchronous variant equal hand-written references (written with plain HF
calls, for a fixed number of tokens: these decoders have no EOS in their generation_config); the CLI
(several prompts in left-padded batches, sampling options, stop strings). The options HF ``generate``
brings are tested in test_hf_generation.py."""

from __future__ import annotations

import re

import pytest
import torch
from inference_helpers import tiny_world  # noqa: F401  (fixture)
from tiny_models import VOCAB, tiny_augmented
from transformers import DynamicCache

from data_tools import load_tokenizer
from dist_cacheaug.cli import main
from dist_cacheaug.core.generation import GenerationStats, generate
from dist_cacheaug.core.hf_compat import cache_arg

NEW = 12


def _model(family="gemma2", convention="insert", n_l=3):
    model = tiny_augmented(family, convention, n_l)
    model.decoder.generation_config.eos_token_id = None  # no default EOS: every run decodes NEW tokens
    return model


def _prompt(b=2, n=11, seed=0):
    return torch.randint(3, VOCAB, (b, n), generator=torch.Generator().manual_seed(seed))


def greedy_from(model, cache, logits, next_pos, steps, trace=None):
    """Manual greedy decoding from a cache and the next-token logits (appended to ``trace``)."""
    toks = []
    for i in range(steps):
        if trace is not None:
            trace.append(logits)
        tok = logits.argmax(-1)
        toks.append(tok)
        if i == steps - 1:
            break
        pos = torch.full((tok.shape[0], 1), next_pos)
        logits = model.decoder(input_ids=tok[:, None], **cache_arg(cache), position_ids=pos).logits[:, -1]
        next_pos += 1
    return torch.stack(toks, 1)


@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_no_augment_equals_hf_greedy_generate(family):
    model, ids = _model(family), _prompt()
    ours = generate(model, ids, NEW, augment=False)
    hf = model.decoder.generate(ids, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(ours, hf) and ours.shape[1] == ids.shape[1] + NEW


@pytest.mark.parametrize("convention", ["insert", "refeed"])
def test_augmented_equals_augment_then_manual_greedy(convention):
    model, ids = _model("gemma2", convention), _prompt()
    trace, got = [], []
    with torch.no_grad():
        a = model.augment(ids)
        want = torch.cat(
            [ids, greedy_from(model, a.past_key_values, a.logits, a.next_position, NEW, trace)], 1
        )
    ours = generate(model, ids, NEW, logits_out=got)
    assert torch.equal(ours, want)
    torch.testing.assert_close(torch.stack(got), torch.stack(trace).float(), atol=1e-5, rtol=1e-5)
    assert torch.equal(ours, model.generate(ids, NEW))
    assert not torch.equal(ours, generate(model, ids, NEW, augment=False))  # the latents matter here


@torch.no_grad()
def reference_reaugment(model, ids, new, every, trace=None):
    """Re-augmenting every K tokens = calling augment() on the whole text so far every K tokens."""
    out = ids
    while out.shape[1] - ids.shape[1] < new:
        a = model.augment(out)
        steps = min(every, new - (out.shape[1] - ids.shape[1]))
        out = torch.cat(
            [out, greedy_from(model, a.past_key_values, a.logits, a.next_position, steps, trace)], 1
        )
    return out


@pytest.mark.parametrize("convention", ["insert", "refeed"])
def test_reaugment_every_k_equals_reference(convention):
    model, ids = _model("gemma2", convention), _prompt(n=9)
    stats, got, want = GenerationStats(), [], []
    ours = generate(model, ids, NEW, reaugment_every=3, stats=stats, logits_out=got)
    assert torch.equal(ours, reference_reaugment(model, ids, NEW, 3, want))
    torch.testing.assert_close(torch.stack(got), torch.stack(want).float(), atol=1e-5, rtol=1e-5)
    assert stats.augmentations == 4 and stats.new_tokens == NEW
    assert not torch.equal(ours, generate(model, ids, NEW))


@torch.no_grad()
def reference_async(model, ids, new, delay, every=None, trace=None):
    """The coprocessor reads the HF cache of the first L-d tokens; the decoder reads all L, then the
    latents (HF default positions), then decodes greedily. Written with plain HF calls only."""
    dec, b = model.decoder, ids.shape[0]
    out = ids
    while out.shape[1] - ids.shape[1] < new:
        length = out.shape[1]
        view = DynamicCache(config=dec.config)
        dec(input_ids=out[:, : length - delay], **cache_arg(view), use_cache=True)
        soft = model.soft_tokens[None].expand(b, -1, -1)
        z = model.coprocessor(inputs_embeds=soft, **cache_arg(view), use_cache=True).last_hidden_state
        cache = DynamicCache(config=dec.config)
        dec(input_ids=out, **cache_arg(cache), use_cache=True)
        logits = dec(inputs_embeds=z, **cache_arg(cache), use_cache=True).logits[:, -1]
        toks = []
        steps = min(every or new, new - (length - ids.shape[1]))
        for i in range(steps):
            if trace is not None:
                trace.append(logits)
            tok = logits.argmax(-1)
            toks.append(tok)
            if i < steps - 1:
                logits = dec(input_ids=tok[:, None], **cache_arg(cache), use_cache=True).logits[:, -1]
        out = torch.cat([out, torch.stack(toks, 1)], 1)
    return out


@pytest.mark.parametrize("delay,every", [(1, None), (3, None), (2, 4)])
def test_async_delay_equals_reference(delay, every):
    model, ids = _model("gemma2"), _prompt(n=10)
    got, want = [], []
    ours = generate(model, ids, NEW, async_delay=delay, reaugment_every=every, logits_out=got)
    assert torch.equal(ours, reference_async(model, ids, NEW, delay, every, want))
    torch.testing.assert_close(torch.stack(got), torch.stack(want).float(), atol=1e-5, rtol=1e-5)
    assert torch.equal(reference_async(model, ids, NEW, 0), generate(model, ids, NEW))  # d=0: synchronous


def test_async_reference_is_sensitive_to_the_delay():
    model, ids = _model("gemma2"), _prompt(n=10)
    assert not torch.equal(reference_async(model, ids, NEW, 3), reference_async(model, ids, NEW, 0))


def test_generate_rejects_bad_arguments():
    model = _model("llama")
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="async_delay=5"):
        generate(model, _prompt(1, 5), 4, async_delay=5)
    with pytest.raises(ValueError, match="reaugment_every"):
        generate(model, _prompt(1, 5), 4, reaugment_every=0)


def test_eos_and_stop_callback():
    model, ids = _model("llama"), _prompt(1, 8)
    full = generate(model, ids, NEW)
    eos = int(full[0, 8 + 2])
    first = int((full[0, 8:] == eos).nonzero()[0])
    assert generate(model, ids, NEW, eos_token_id=eos).shape[1] == 8 + first + 1
    assert generate(model, ids, NEW, stop=lambda g: g.shape[1] >= 4).shape[1] == 8 + 4


def _blocks(out: str, n: int) -> list[str]:
    """The printed completions of ``cacheaug generate`` with ``n`` prompts."""
    if n == 1:
        return [out.rstrip("\n")]
    parts = re.split(r"^### prompt \d+/\d+\n", out, flags=re.M)
    assert parts[0] == "" and len(parts) == n + 1, out
    return [p.rstrip("\n") for p in parts[1:]]


PROMPTS = ["Question: Ada has 3 apples. How many", "Q", "Question: 12 + 7 = "]


def test_generate_cli(tiny_world, capsys, tmp_path):  # noqa: F811
    run = tiny_world["run"]
    base = ["generate", "--checkpoint", str(run), "--max-new-tokens", "6", "--device", "cpu"]

    def cli(*extra, n=1):
        assert main([*base, *extra]) == 0
        out = capsys.readouterr()
        cli.steps = int(re.search(r"(\d+) decoding steps", out.err).group(1))
        return _blocks(out.out, n)

    prompt = PROMPTS[0]
    (text,) = cli("--prompt", prompt, "--no-augment")
    # the baseline text equals HF greedy generation of the decoder from the run dir (to the tokenizer's EOS)
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(str(tiny_world["tok"]))
    dec = AutoModelForCausalLM.from_pretrained(run / "decoder", attn_implementation="eager")
    ids = torch.tensor([tok.encode(prompt)])
    hf = dec.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_id)[
        0, ids.shape[1] :
    ].tolist()
    hf = hf[: hf.index(tok.eos_id)] if tok.eos_id in hf else hf
    assert text == prompt + tok.decode(hf)
    # several prompts (flags and a file) in left-padded batches: each as it prints alone (greedy)
    alone = [cli("--prompt", p)[0] for p in PROMPTS]
    assert len(set(alone)) == 3 and all(a.startswith(p) for a, p in zip(alone, PROMPTS))
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS[1:]) + "\n")
    batched = cli(
        "--prompt", PROMPTS[0], "--prompts-file", str(tmp_path / "prompts.txt"), "--batch-size", "2", n=3
    )
    assert batched == alone
    # a stop string ends a prompt's text (included) and its generation
    gen0 = alone[0][len(prompt) :]
    stop = gen0[:2]
    assert len(gen0) > 2, gen0
    stopped = cli(*[a for p in PROMPTS for a in ("--prompt", p)], "--stop", stop, n=3)
    for s, a, p in zip(stopped, alone, PROMPTS):
        g = a[len(p) :]
        assert s == (p + g[: g.index(stop) + len(stop)] if stop in g else a)
    assert cli("--prompt", prompt, "--stop", stop) == [prompt + stop] and cli.steps < 6
    for extra in (
        ["--reaugment-every", "2", "--async-delay", "1"],
        ["--temperature", "0.8", "--top-p", "0.9", "--top-k", "5"],
        ["--repetition-penalty", "1.5"],
    ):
        assert cli("--prompt", prompt, *extra)[0].startswith(prompt)
    seeded = ["--prompt", prompt, "--temperature", "1.5", "--seed", "3"]
    assert cli(*seeded) == cli(*seeded)
    (tmp_path / "holes.txt").write_text("a\n\nb\n")
    for bad, message in (
        (["--prompt", "  "], "empty"),
        ([], "no prompt"),
        (["--prompts-file", str(tmp_path / "holes.txt")], "line 2 is empty"),
        (["--prompt", "x", "--top-k", "3"], "--temperature > 0"),
        (["--prompt", "x", "--batch-size", "0"], "--batch-size"),
    ):
        assert main(["generate", "--checkpoint", str(run), *bad]) == 2, bad
        assert message in capsys.readouterr().err, bad
