"""Table-1 evaluation: baseline = plain HF forward, augmented = augment() + decoding, disabled coprocessor =
baseline; the CLI writes JSON / Markdown / PNG / TensorBoard and rejects bad checkpoints and data."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from inference_helpers import SEQ_LEN, tiny_world  # noqa: F401  (fixture)
from reference_helpers import reference_trace_ce
from tiny_models import VOCAB, tiny_decoder

from data_tools import write_token_shards
from dist_cacheaug import CacheAugmentedLM
from dist_cacheaug.cli import main
from dist_cacheaug.core.hf_compat import cache_arg
from dist_cacheaug.evaluation.inference import InferenceError, load_for_inference, resolve_checkpoint
from dist_cacheaug.evaluation.loss_at_k import PositionSpec, evaluate_insertion, parse_positions


def _t(values):
    return torch.tensor(values, dtype=torch.float64)


def _model(family="gemma2", convention="insert", n_l=3):
    return CacheAugmentedLM.from_decoder(tiny_decoder(family), num_latents=n_l, convention=convention, seed=1)


def _batches(n_seq=3, seq_len=30, batch=2, seed=0):
    ids = torch.randint(3, VOCAB, (n_seq, seq_len), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": ids[i : i + batch]} for i in range(0, n_seq, batch)], ids


def _per_trace_mean(ids, spec, max_k, ce_fn):
    """Mean over (sequence, position) of a [max_k] CE vector computed one trace at a time."""
    rows = []
    for i in range(ids.shape[0]):
        for p in spec.positions(ids.shape[1], max_k, i).tolist():
            rows.append(ce_fn(ids[i : i + 1], p))
    return torch.stack(rows).mean(0)


@pytest.mark.numerics
@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_baseline_equals_plain_hf_forward(family):
    model = _model(family)
    batches, ids = _batches()
    spec, max_k = PositionSpec("stride", 4), 6
    r = evaluate_insertion(model, batches, spec, max_k, progress=False)

    def plain(ids_1n, p):  # CE of x[p+k] given x[0..p+k-1], from HF's own forward over the sequence
        logits = model.decoder(input_ids=ids_1n).logits[0]
        return F.cross_entropy(
            logits[p : p + max_k].float(), ids_1n[0, p + 1 : p + 1 + max_k], reduction="none"
        )

    want = _per_trace_mean(ids, spec, max_k, plain)
    torch.testing.assert_close(_t(r["baseline_ce"]), want.double(), atol=1e-5, rtol=1e-5)
    assert r["num_traces"] == 3 * len(range(0, 30 - max_k, 4))
    assert r["baseline_ppl"][0] == pytest.approx(float(torch.exp(want[0])), rel=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "mistral"])  # sliding windows 7 / 9 are crossed
def test_disabled_coprocessor_equals_baseline(family):
    model = _model(family)
    batches, _ = _batches(seq_len=28)
    kw = dict(positions_spec="all", max_k=5, positions_per_pass=7, progress=False)
    off = evaluate_insertion(model, batches, augment=False, **kw)
    torch.testing.assert_close(_t(off["augmented_ce"]), _t(off["baseline_ce"]), atol=2e-5, rtol=1e-5)
    assert max(abs(x) for x in off["ppl_change_pct"]) < 1e-2
    on = evaluate_insertion(model, batches, augment=True, **kw)  # the latents do change the numbers
    assert on["baseline_ce"] == pytest.approx(off["baseline_ce"], rel=1e-6)
    assert max(abs(x) for x in on["ppl_change_pct"]) > 0.5


@pytest.mark.numerics
def test_augmented_equals_augment_then_decoding():
    model = _model("gemma2", "insert")
    batches, ids = _batches(seq_len=26)
    spec, max_k = PositionSpec("random", 5, seed=3), 7  # k runs past a trained N_A: any k works
    r = evaluate_insertion(model, batches, spec, max_k, positions_per_pass=2, seed=3, progress=False)

    def manual(ids_1n, p):
        a = model.augment(ids_1n[:, : p + 1])
        ahead = ids_1n[:, p + 1 : p + max_k]
        pos = torch.arange(a.next_position, a.next_position + ahead.shape[1])[None]
        rest = model.decoder(input_ids=ahead, **cache_arg(a.past_key_values), position_ids=pos).logits[0]
        logits = torch.cat([a.logits, rest.float()])
        return F.cross_entropy(logits, ids_1n[0, p + 1 : p + 1 + max_k], reduction="none")

    with torch.no_grad():
        want = _per_trace_mean(ids, spec, max_k, manual)
    torch.testing.assert_close(_t(r["augmented_ce"]), want.double(), atol=2e-5, rtol=1e-5)


@pytest.mark.numerics
def test_augmented_refeed_equals_one_trace_reference():
    model = _model("gemma2", "refeed")
    batches, ids = _batches(n_seq=2, seq_len=22)
    spec, max_k = PositionSpec("stride", 5), 4
    r = evaluate_insertion(model, batches, spec, max_k, progress=False)
    with torch.no_grad():
        want = _per_trace_mean(ids, spec, max_k, lambda x, p: reference_trace_ce(model, x, p, max_k))
    torch.testing.assert_close(_t(r["augmented_ce"]), want.double(), atol=2e-5, rtol=1e-5)


def test_position_specs():
    assert parse_positions("all") == PositionSpec("all")
    assert parse_positions(["stride", "8"]) == PositionSpec("stride", 8)
    assert parse_positions("random:4", seed=2) == PositionSpec("random", 4, 2)
    for bad in ("every 3", "stride", "stride 0", "random x"):
        with pytest.raises(ValueError, match="--positions"):
            parse_positions(bad)
    assert PositionSpec("all").positions(10, 3, 0).tolist() == list(range(7))
    assert PositionSpec("stride", 3).positions(10, 3, 0).tolist() == [0, 3, 6]
    r = PositionSpec("random", 4, 1)
    assert torch.equal(r.positions(40, 8, 5), r.positions(40, 8, 5))  # same for every checkpoint
    assert not torch.equal(r.positions(40, 8, 5), r.positions(40, 8, 6))
    assert r.positions(40, 8, 5).max() <= 40 - 1 - 8


# ---- CLI and resolver ----------------------------------------------------------------------------------
def test_eval_cli_writes_json_md_png_tb(tiny_world, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "eval"
    run = tiny_world["run"]
    rc = main(
        ["eval", "--checkpoint", str(run), str(run / "export"), "--data", str(tiny_world["shards"]),
         "--max-k", "8", "--positions", "stride", "6", "--batch-size", "2", "--max-sequences", "5",
         "--out", str(out), "--no-progress", "--device", "cpu"]
    )  # fmt: skip
    assert rc == 0
    res = json.loads((out / "results.json").read_text())["checkpoints"]
    assert set(res) == {"run", "run-2"}
    r = res["run"]
    assert r["k"] == list(range(1, 9)) and r["num_sequences"] == 5 and r["seq_len"] == SEQ_LEN
    assert r["num_traces"] == 5 * len(range(0, SEQ_LEN - 8, 6))
    assert r["augmented_ce"] == pytest.approx(res["run-2"]["augmented_ce"])  # same export, same numbers
    md = (out / "results.md").read_text()
    assert "| run | 3 |" in md and "k=8" in md
    assert (out / "ppl_change.png").read_bytes()[:4] == b"\x89PNG"
    assert list((out / "tb").rglob("events.out.tfevents*"))
    assert "Relative perplexity change" in capsys.readouterr().out


def test_eval_cli_rejects_bad_inputs(tiny_world, tmp_path, capsys):  # noqa: F811
    run, shards = tiny_world["run"], str(tiny_world["shards"])
    base = ["eval", "--data", shards, "--max-k", "4", "--out", str(tmp_path / "o"), "--no-progress"]
    # a decoder of another shape
    other = tmp_path / "other_decoder"
    tiny_decoder("gemma2", vocab_size=tiny_world["vocab"], hidden_size=48).save_pretrained(other)
    assert main([*base, "--checkpoint", str(run), "--decoder", str(other)]) == 2
    assert "does not fit decoder" in capsys.readouterr().err
    # shards made with another tokenizer
    foreign = tmp_path / "foreign"
    samples = [torch.randint(3, 50, (SEQ_LEN,)).numpy() for _ in range(3)]
    write_token_shards(
        str(foreign), {"val": samples}, seq_len=SEQ_LEN, tokenizer={"identity": "sp:other", "vocab_size": 50}
    )
    assert main([*base[:1], "--checkpoint", str(run), "--data", str(foreign), *base[3:]]) == 2
    assert "different tokenizer" in capsys.readouterr().err
    # a run directory without export/, and a path that is nothing
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "config.yaml").write_text((run / "config.yaml").read_text())
    assert main([*base, "--checkpoint", str(tmp_path / "unfinished")]) == 2
    assert "no export/" in capsys.readouterr().err
    assert main([*base, "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # max-k too large for the sequences
    assert (
        main(["eval", "--checkpoint", str(run), "--data", shards, "--max-k", str(SEQ_LEN), "--no-progress"])
        == 2
    )
    assert "no valid position" in capsys.readouterr().err


def test_resolver_run_dir_and_export_dir(tiny_world, tmp_path):  # noqa: F811
    run = tiny_world["run"]
    assert resolve_checkpoint(run) == (run / "export", run)
    assert resolve_checkpoint(run / "export") == (run / "export", run)
    m1, cfg = load_for_inference(run, device="cpu")
    assert cfg is not None and cfg.model.num_latents == m1.num_latents == 3
    # an export dir on its own needs the decoder named
    lone = tmp_path / "lone_export"
    m1.save_pretrained(lone)
    with pytest.raises(InferenceError, match="--decoder"):
        load_for_inference(lone, device="cpu")
    m2, cfg2 = load_for_inference(lone, decoder=run / "decoder", device="cpu")
    assert cfg2 is None
    torch.testing.assert_close(m2.soft_tokens, m1.soft_tokens)
