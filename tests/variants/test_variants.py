"""Baselines and ablations (dist_cacheaug/variants): each batched pass against one trace at a time with
plain HF calls, what is trainable, export/reload, and every variant config under the real trainer."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reference_helpers import check_batched_equals_reference, reference_trace_ce
from tiny_models import VOCAB, tiny_decoder
from train_helpers import metrics, run_train, tiny_run_config
from transformers import DynamicCache

from dist_cacheaug import load_config
from dist_cacheaug.core.generation import GenerationStats, generate
from dist_cacheaug.core.hf_compat import cache_arg
from dist_cacheaug.evaluation.inference import load_for_inference
from dist_cacheaug.train.checkpoint import decoder_digest
from dist_cacheaug.variants import (
    VARIANTS,
    ActivationsInputLM,
    AsyncLatentsLM,
    BaseLM,
    PauseTokensLM,
    build_trainable,
    load_pretrained,
)

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------- pause
def pause_reference(model, ids_1n, p, n_a):
    """One trace: HF cache of x[0..p], then the pause embeddings and the ahead tokens, plain HF."""
    dec, n_l = model.decoder, model.num_latents
    targets = ids_1n[0, p + 1 : p + 1 + n_a]
    cache = DynamicCache(config=dec.config)
    dec(input_ids=ids_1n[:, : p + 1], **cache_arg(cache), use_cache=True)
    trace = torch.cat([model.soft_tokens[None], dec.get_input_embeddings()(ids_1n[:, p + 1 : p + n_a])], 1)
    logits = dec(inputs_embeds=trace, **cache_arg(cache), use_cache=True).logits[0]
    return F.cross_entropy(logits[n_l - 1 : n_l - 1 + n_a].float(), targets, reduction="none")


@pytest.mark.parametrize("family,n_l", [("gemma2", 3), ("llama", 1), ("mistral", 4)])
def test_pause_batched_equals_one_trace_at_a_time(family, n_l):
    model = PauseTokensLM.from_decoder(tiny_decoder(family), num_latents=n_l, seed=1)
    assert [n for n, _ in model.named_parameters()] == ["soft_tokens"]  # no coprocessor
    check_batched_equals_reference(model, pause_reference)


def test_pause_refeed_matches_core_with_pause_latents():
    """Refeed: the core's own reference with the coprocessor replaced by 'return the soft tokens'."""
    model = PauseTokensLM.from_decoder(tiny_decoder("gemma2"), num_latents=2, convention="refeed", seed=1)

    class Identity(torch.nn.Module):
        def forward(self, inputs_embeds, **kw):
            return type("O", (), {"last_hidden_state": inputs_embeds})()

    model.coprocessor = Identity()  # what reference_trace_ce calls
    check_batched_equals_reference(model, reference_trace_ce)


# ---------------------------------------------------------------------------------------------- async
def async_reference(model, ids_1n, p, n_a):
    """One trace, as generation.py does it: coprocessor over the HF cache of x[0..p-d] (nothing when
    p < d), decoder over its cache of x[0..p] then [latents, ahead tokens]."""
    dec, n_l, d = model.decoder, model.num_latents, model.async_delay
    targets = ids_1n[0, p + 1 : p + 1 + n_a]
    lag = DynamicCache(config=dec.config)
    if p - d >= 0:
        dec(input_ids=ids_1n[:, : p - d + 1], **cache_arg(lag), use_cache=True)
    z = model.coprocessor(inputs_embeds=model.soft_tokens[None], **cache_arg(lag), use_cache=True)
    cache = DynamicCache(config=dec.config)
    dec(input_ids=ids_1n[:, : p + 1], **cache_arg(cache), use_cache=True)
    trace = torch.cat([z.last_hidden_state, dec.get_input_embeddings()(ids_1n[:, p + 1 : p + n_a])], 1)
    logits = dec(inputs_embeds=trace, **cache_arg(cache), use_cache=True).logits[0]
    return F.cross_entropy(logits[n_l - 1 : n_l - 1 + n_a].float(), targets, reduction="none")


@pytest.mark.parametrize("family,delay", [("gemma2", 1), ("gemma2", 3), ("llama", 2)])
def test_async_batched_equals_one_trace_at_a_time(family, delay):
    model = AsyncLatentsLM.from_decoder(tiny_decoder(family), num_latents=3, delay=delay, seed=1)
    check_batched_equals_reference(model, async_reference, seed=delay)


@pytest.mark.parametrize("delay", [1, 2])
def test_async_training_loss_equals_generation_with_delay(delay):
    """A trace of the training pass = generation.generate(async_delay=d) teacher-forced (and augment())."""
    model = AsyncLatentsLM.from_decoder(tiny_decoder("gemma2"), num_latents=3, delay=delay, seed=2)
    ids = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))
    p, n_a = 10, 1
    with torch.no_grad():
        loss = model.training_loss(ids, torch.tensor([[p]]), n_a).loss_per_offset
    got = []
    generate(model, ids[:, : p + 1], 1, logits_out=got)  # async_delay defaults to the model's own
    torch.testing.assert_close(F.cross_entropy(got[0], ids[:, p + 1]), loss[0], atol=1e-5, rtol=1e-5)
    aug = model.augment(ids[:, : p + 1])
    torch.testing.assert_close(F.cross_entropy(aug.logits, ids[:, p + 1]), loss[0], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------- activations
def activations_reference(model, ids_1n, p, n_a):
    dec, n_l = model.decoder, model.num_latents
    targets = ids_1n[0, p + 1 : p + 1 + n_a]
    with torch.no_grad():
        h = dec.base_model(input_ids=ids_1n[:, : p + 1]).last_hidden_state
    cop_cache = DynamicCache(config=model.coprocessor.config)
    model.coprocessor(inputs_embeds=h, **cache_arg(cop_cache), use_cache=True)
    z = model.coprocessor(inputs_embeds=model.soft_tokens[None], **cache_arg(cop_cache), use_cache=True)
    cache = DynamicCache(config=dec.config)
    dec(input_ids=ids_1n[:, : p + 1], **cache_arg(cache), use_cache=True)
    trace = torch.cat([z.last_hidden_state, dec.get_input_embeddings()(ids_1n[:, p + 1 : p + n_a])], 1)
    logits = dec(inputs_embeds=trace, **cache_arg(cache), use_cache=True).logits[0]
    return F.cross_entropy(logits[n_l - 1 : n_l - 1 + n_a].float(), targets, reduction="none")


@pytest.mark.parametrize("family", ["gemma2", "llama"])
def test_activations_batched_equals_one_trace_at_a_time(family):
    model = ActivationsInputLM.from_decoder(tiny_decoder(family), num_latents=2, seed=1)
    check_batched_equals_reference(model, activations_reference, num_pos=4)
    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # augment() reads the prompt's activations the same way
        loss = model.training_loss(ids, torch.tensor([[9]]), 1).loss_per_offset[0]
    torch.testing.assert_close(
        F.cross_entropy(model.augment(ids[:, :10]).logits, ids[:, 10]), loss, atol=1e-5, rtol=1e-5
    )


# ------------------------------------------------------------------------ trainable parts, export/reload
def _cfg(**model):
    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_latents=2, **model))


def test_lora_only_adapters_and_soft_tokens_are_trainable():
    decoder = tiny_decoder("gemma2")
    model = build_trainable(_cfg(variant="lora", lora_rank=4), decoder)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert "soft_tokens" in trainable and frozen
    assert all(n == "soft_tokens" or ".lora_A." in n or ".lora_B." in n for n in trainable)
    # every linear layer of the coprocessor is adapted; r = 4
    assert {n.split(".")[-4] for n in trainable if ".lora_A." in n} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip
    assert model.coprocessor.layers[0].self_attn.q_proj.lora_A["default"].weight.shape[0] == 4
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    model.training_loss(ids, torch.tensor([[3, 9], [5, 12]]), 2).loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in decoder.parameters())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_saves_and_reloads_to_the_same_loss(variant, tmp_path):
    decoder = tiny_decoder("gemma2")
    before = decoder_digest(decoder)
    model = build_trainable(_cfg(variant=variant, lora_rank=4), decoder)
    with torch.no_grad():  # move the trainable weights away from their init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    pos = torch.tensor([[0, 9], [5, 16]])
    with torch.no_grad():
        want = model.training_loss(ids, pos, 3)
    model.save_pretrained(tmp_path)
    again = load_pretrained(tmp_path, decoder=decoder)
    assert (
        type(again) is type(model)
        and json.loads((tmp_path / "cacheaug_config.json").read_text())["variant"] == variant
    )
    with torch.no_grad():
        got = again.training_loss(ids, pos, 3)
    torch.testing.assert_close(got.loss_per_offset, want.loss_per_offset)
    assert decoder_digest(decoder) == before  # the frozen original is never touched
    assert decoder_digest(again.baseline_decoder) == before


def test_single_model_trains_the_decoder_copy_not_the_original():
    decoder = tiny_decoder("gemma2")
    model = build_trainable(_cfg(variant="single_model"), decoder)
    assert model.baseline_decoder is decoder and model.decoder is not decoder
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "soft_tokens" in names and any(n.startswith("lm.") for n in names)
    ids = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
    model.training_loss(ids, torch.tensor([[4, 11]]), 2).loss.backward()
    assert model.lm.get_input_embeddings().weight.grad is not None
    assert all(p.grad is None and not p.requires_grad for p in decoder.parameters())


# ------------------------------------------------------------------------------ the real trainer, 1 rank
TRAINER_VARIANTS = {
    "pause_16": [],
    "lora_r64": ["model.lora_rank=8"],
    "scratch": [],
    "activations": [],
    "async_d2": [],
    "single_model": [],
    "num_ahead_16": ["model.num_ahead=6", "model.num_positions=16"],
}


def _variant_run(tmp_path, shards, name, extra=()):
    cfg = tiny_run_config(tmp_path, shards, max_steps=3, eval_interval=3, eval_batches=1)
    ablation = load_config(ROOT / "configs" / "ablations" / f"{name}.yaml").model
    sets = [
        f"model.variant={ablation.variant}",
        f"model.coprocessor_init={ablation.coprocessor_init}",
        f"model.async_delay={ablation.async_delay}",
        *extra,
    ]
    run_train(1, cfg, *sets)
    return tmp_path / "run", load_config(tmp_path / "run" / "config.yaml")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TRAINER_VARIANTS))
def test_variant_config_trains_under_the_trainer_and_its_export_loads(name, shards, tmp_path):
    run_dir, cfg = _variant_run(tmp_path, shards, name, TRAINER_VARIANTS[name])
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] > 0 for r in rows)
    assert rows[-1]["val_loss"] > 0 and rows[-1]["val_baseline"] > 0
    model, _ = load_for_inference(run_dir, device="cpu")
    assert model.variant_name == cfg.model.variant
    # the frozen decoder the baseline came from is the seeded original, bitwise
    state = torch.load(next((run_dir / "checkpoints").glob("step_*")) / "train_state.pt", weights_only=False)
    assert state["ranks"][0]["decoder_digest"] == decoder_digest(model.baseline_decoder)


@pytest.mark.slow
def test_base_lm_export_is_an_hf_model_and_the_next_stage_decoder(shards, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = tiny_run_config(tmp_path, shards, max_steps=4, eval_interval=4, eval_batches=1)
    run_train(1, cfg, "model.variant=base_lm", "optim.lr=1e-2")
    rows = metrics(tmp_path / "run")
    assert rows[-1]["loss"] < rows[0]["loss"]  # the decoder itself learns
    assert rows[-1]["val_loss_k1"] < rows[-1]["val_baseline_k1"]  # ... and beats its frozen random init
    export = tmp_path / "run" / "export"
    lm = AutoModelForCausalLM.from_pretrained(export)
    original = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "decoder")
    assert decoder_digest(lm) != decoder_digest(original)
    # the next stage: a coprocessor around the pretrained base (model.decoder_path = the export)
    nxt = tmp_path / "next"
    nxt.mkdir()
    cfg2 = tiny_run_config(nxt, shards, max_steps=2)
    run_train(1, cfg2, f"model.decoder_path={export}")
    model, _ = load_for_inference(nxt / "run", device="cpu")
    assert decoder_digest(model.decoder) == decoder_digest(lm)
    # and the base_lm export itself loads for evaluation (no latents; baseline = the original)
    base, _ = load_for_inference(tmp_path / "run", device="cpu")
    assert base.num_latents == 0 and decoder_digest(base.decoder) == decoder_digest(lm)
    assert decoder_digest(base.baseline_decoder) == decoder_digest(original)


def test_async_augment_is_the_core_step_with_the_model_delay():
    model = AsyncLatentsLM.from_decoder(tiny_decoder("llama"), num_latents=2, delay=2, seed=1)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    got = []
    out = generate(model, ids, 3, logits_out=got)
    torch.testing.assert_close(model.augment(ids).logits, got[0])
    assert torch.equal(model.generate(ids, 3), out)
    with pytest.raises(ValueError, match="async_delay=2"):
        model.augment(ids[:, :2])


def test_base_lm_decodes_through_the_one_loop_without_latents():
    model = BaseLM.from_decoder(tiny_decoder("gemma2"))
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    got, stats = [], GenerationStats()
    out = generate(model, ids, 4, logits_out=got, stats=stats)  # augment=True: nothing to write
    assert torch.equal(out, generate(model, ids, 4, augment=False)) and stats.augmentations == 0
    aug = model.augment(ids)
    torch.testing.assert_close(aug.logits, got[0])
    assert aug.latents.shape == (2, 0, model.lm.config.hidden_size) and aug.next_position == 9


def test_registry_refuses_a_variant_mismatch(tmp_path):
    decoder = tiny_decoder("gemma2")
    build_trainable(_cfg(variant="pause"), decoder).save_pretrained(tmp_path)
    from dist_cacheaug import CacheAugmentedLM

    with pytest.raises(ValueError, match="holds variant 'pause'"):
        CacheAugmentedLM.from_pretrained(tmp_path, decoder=copy.deepcopy(decoder))
