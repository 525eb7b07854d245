"""Training-step benchmarks at a config's shapes (random init: no weights needed).

``cacheaug bench train --config configs/gemma2_2b_paper.yaml --set train.micro_batch_size=2`` measures
one GPU (or the CPU) without DeepSpeed: the augmented step (forward + backward + AdamW on the
coprocessor) with the config's attention kernel, dtype and activation checkpointing, and, in the same
run, three ratios: augmented / plain LM step of the same model on the same tokens (forward + backward
only, both), batched pass / naive loop over positions (at ``--naive-positions``), and flex / eager
(at ``--eager-positions``, where eager attention's [Q, N+Q] scores fit). MFU counts useful FLOPs only
(``estimate.flops_per_sequence``). Everything printed is measured, except the analytic ratio.
"""

from __future__ import annotations

import copy
import dataclasses
import platform
import resource
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..config import RunConfig
from ..core.decoder import build_decoder, freeze, hf_config_from_dict
from ..core.hf_compat import cache_arg
from ..core.losses import chunked_cross_entropy, lm_head_of
from ..core.model import CacheAugmentedLM, sample_positions
from .estimate import flops_per_sequence
from .metrics import peak_flops as device_peak_flops

# Architectures the benchmarks build with random weights (bench/core.py, bench/generate.py).
MODEL_PRESETS = {
    # the shape of configs/tiny_cpu.yaml (~2.4M parameters)
    "tiny": dict(
        model_type="gemma2",
        vocab_size=4096,
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=48,
        query_pre_attn_scalar=48,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"] * 2,
    ),
    # ~100M parameters, Gemma-2-shaped
    "small": dict(
        model_type="gemma2",
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        head_dim=64,
        query_pre_attn_scalar=64,
        sliding_window=4096,
    ),
}


def answering_device(threads: int | None) -> tuple[torch.device, str]:
    """(device, what it is in words) for the answering benchmarks: the GPU when present, else the CPU
    with ``threads`` torch threads (None: torch's default)."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return device, torch.cuda.get_device_name()
    return device, f"{platform.machine()} CPU, {torch.get_num_threads()} threads"


def random_answering_decoder(preset: str, device: torch.device):
    """A frozen decoder of ``MODEL_PRESETS[preset]``'s shape with random weights, for the answering
    benchmarks (bench/generate.py, bench/generate_batch.py): latency does not depend on the weights.
    bf16 on a GPU, fp32 on the CPU; EOS off so every answer has the requested length (random weights
    may emit it)."""
    from transformers import AutoModelForCausalLM

    hf = hf_config_from_dict(dict(MODEL_PRESETS[preset], max_position_embeddings=8192))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    decoder = freeze(
        AutoModelForCausalLM.from_config(hf, dtype=dtype, attn_implementation="eager").to(device)
    )
    decoder.generation_config.eos_token_id = None
    return decoder


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(
    fn: Callable[[], None], device: torch.device, repeats: int, warmup: int = 1
) -> tuple[float, float | None]:
    """(best wall seconds of ``repeats`` calls after ``warmup`` calls, peak MiB). On GPU the peak is the
    CUDA allocator's; on CPU, which has no allocator peak counter, it is the growth of the process's
    peak RSS across the calls (meaningful when each measured variant runs in its own process)."""
    rss_before = _max_rss_mib()
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _max_rss_mib() - rss_before
    return best, peak


def naive_loop_step(model: CacheAugmentedLM, ids: torch.Tensor, positions: torch.Tensor, n_a: int) -> None:
    """One trace at a time (prefix -> HF cache -> coprocessor -> latents -> decoder), backward per trace:
    what the batched pass replaces. "insert" convention."""
    dec, n_l = model.decoder, model.num_latents
    emb = dec.get_input_embeddings()
    count = positions.numel()
    for b in range(ids.shape[0]):
        for p in positions[b].tolist():
            row = ids[b : b + 1]
            cache = DynamicCache(config=dec.config)
            with torch.no_grad():
                dec.base_model(input_ids=row[:, : p + 1], **cache_arg(cache), use_cache=True)
            z = model.latents_for_cache(cache, 1)
            trace = torch.cat([z.to(emb.weight.dtype), emb(row[:, p + 1 : p + n_a])], 1)
            logits = dec(inputs_embeds=trace, **cache_arg(cache), use_cache=True).logits[0, n_l - 1 :]
            (F.cross_entropy(logits.float(), row[0, p + 1 : p + 1 + n_a]) / count).backward()


def plain_lm_step(decoder, ids: torch.Tensor, chunk: int) -> None:
    """Forward + backward of an ordinary LM step of the same architecture on the same tokens."""
    hidden = decoder.base_model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
    weight, softcap = lm_head_of(decoder)
    ce = chunked_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), ids[:, 1:].reshape(-1), weight, softcap, chunk
    )
    ce.mean().backward()


@dataclasses.dataclass
class BenchSetup:
    model: CacheAugmentedLM
    ids: torch.Tensor
    device: torch.device


def _setup(cfg: RunConfig, device: torch.device, attn: str | None = None, seed: int = 0) -> BenchSetup:
    mcfg = dataclasses.replace(cfg.model, decoder_path=None)  # random init at the config's shapes
    if attn:
        mcfg = dataclasses.replace(mcfg, attn_implementation=attn)
    decoder = build_decoder(mcfg, device=device, seed=seed)
    m = cfg.model
    model = CacheAugmentedLM.from_decoder(
        decoder,
        num_latents=m.num_latents,
        convention=m.convention,
        latent_final_norm=m.latent_final_norm,
        soft_token_init=m.soft_token_init,
        loss_chunk_size=m.loss_chunk_size,
        seed=seed,
    )
    if cfg.zero.activation_checkpointing:
        model.enable_activation_checkpointing()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    vocab = decoder.config.vocab_size
    ids = torch.randint(3, vocab, (cfg.train.micro_batch_size, cfg.data.seq_len), generator=gen).to(device)
    return BenchSetup(model, ids, device)


def _positions(setup: BenchSetup, count: int, n_a: int, seed: int = 1) -> torch.Tensor:
    b, n = setup.ids.shape
    return sample_positions(b, n, count, n_a, torch.Generator().manual_seed(seed), device=setup.device)


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (flex attention is compiled by
    transformers; every entry past the first is a recompile)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def mask_build_seconds(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds one call of ``fn`` spends building attention masks (``masks.attention_masks`` as the model
    calls it), synchronising the device around each build so the time is the build's own."""
    from ..core import model as model_module

    build, spent = model_module.attention_masks, [0.0]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed_build(*args, **kwargs):
        sync()
        t0 = time.perf_counter()
        result = build(*args, **kwargs)
        sync()
        spent[0] += time.perf_counter() - t0
        return result

    model_module.attention_masks = timed_build
    try:
        fn()
    finally:
        model_module.attention_masks = build
    return spent[0]


def profile_summary(fn: Callable[[], None], device: torch.device, rows: int = 25) -> str:
    """torch.profiler table of one call of ``fn`` (after a warm-up call), sorted by device time."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


def bench_train(
    cfg: RunConfig,
    *,
    steps: int = 5,
    warmup: int = 2,
    naive_positions: int = 8,
    eager_positions: int | None = None,
    skip: tuple[str, ...] = (),
    profile: bool = False,
) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    graphs_before = compiled_graphs()
    m = cfg.model
    n_a, p_count = m.num_ahead, m.num_positions
    setup = _setup(cfg, device)
    model, ids = setup.model, setup.ids
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    positions = _positions(setup, p_count, n_a)

    def augmented_step():
        opt.zero_grad(set_to_none=True)
        model.training_loss(ids, positions, n_a).loss.backward()
        opt.step()

    def augmented_fwd_bwd():
        model.zero_grad(set_to_none=True)
        model.training_loss(ids, positions, n_a).loss.backward()

    out: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "attn_implementation": model.attn_implementation(),
        "dtype": str(next(model.decoder.parameters()).dtype),
        "micro_batch": ids.shape[0],
        "seq_len": ids.shape[1],
        "positions": p_count,
        "num_latents": m.num_latents,
        "num_ahead": n_a,
    }
    step_s, peak = timed(augmented_step, device, steps, warmup)
    out["compiled_graphs_after_step"] = compiled_graphs() - graphs_before
    graphs_steady = compiled_graphs()
    augmented_step()
    out["recompiles_in_steady_step"] = compiled_graphs() - graphs_steady
    out["mask_build_s"] = mask_build_seconds(augmented_step, device)
    if profile:
        out["profile"] = profile_summary(augmented_step, device)
    peak = peak if device.type == "cuda" else None  # CPU RSS growth is not meaningful after model setup
    flops = flops_per_sequence(cfg)
    out.update(
        step_s=step_s,
        peak_mib=peak,
        tokens_per_s=ids.numel() / step_s,
        achieved_tflops=flops["total"] * ids.shape[0] / step_s / 1e12,
    )
    peak_flops = device_peak_flops(device)  # dense bf16 datasheet peak
    out["mfu"] = flops["total"] * ids.shape[0] / step_s / peak_flops if peak_flops else None
    out["analytic_aug_over_plain"] = flops["ratio_to_plain_lm"]

    if "plain" not in skip:
        aug_s, _ = timed(augmented_fwd_bwd, device, steps, warmup)
        plain_model = copy.deepcopy(model.decoder).train()
        for prm in plain_model.parameters():
            prm.requires_grad_(True)

        def plain():
            plain_model.zero_grad(set_to_none=True)
            plain_lm_step(plain_model, ids, m.loss_chunk_size)

        plain_s, _ = timed(plain, device, steps, warmup)
        out.update(aug_fwd_bwd_s=aug_s, plain_fwd_bwd_s=plain_s, aug_over_plain=aug_s / plain_s)
        del plain_model

    if "naive" not in skip:
        small = _positions(setup, naive_positions, n_a, seed=2)

        def batched_small():
            model.zero_grad(set_to_none=True)
            model.training_loss(ids[:1], small[:1], n_a).loss.backward()

        def naive_small():
            model.zero_grad(set_to_none=True)
            naive_loop_step(model, ids[:1], small[:1], n_a)

        b_s, _ = timed(batched_small, device, max(1, steps // 2), 1)
        n_s, _ = timed(naive_small, device, 1, 1)
        out.update(
            naive_positions=naive_positions,
            batched_small_s=b_s,
            naive_loop_s=n_s,
            naive_over_batched=n_s / b_s,
        )

    if "eager" not in skip and device.type == "cuda":
        ep = eager_positions or max(1, p_count // 8)
        eager_cfg = dataclasses.replace(cfg, model=dataclasses.replace(m, num_positions=ep))
        results = {}
        for attn in ("flex_attention", "eager"):
            s = _setup(eager_cfg, device, attn=attn)
            pos = _positions(s, ep, n_a, seed=3)

            def step(s=s, pos=pos):
                s.model.zero_grad(set_to_none=True)
                s.model.training_loss(s.ids[:1], pos[:1], n_a).loss.backward()

            results[attn] = timed(step, device, steps, warmup)[0]
            del s
            torch.cuda.empty_cache()
        out.update(
            eager_positions=ep,
            flex_s=results["flex_attention"],
            eager_s=results["eager"],
            flex_over_eager=results["flex_attention"] / results["eager"],
        )
    elif "eager" not in skip:
        out["flex_over_eager"] = None  # FlexAttention has no backward on CPU
    out["compiled_graphs_total"] = compiled_graphs() - graphs_before
    return out


def format_report(r: dict) -> str:
    def f(x, spec=".3f"):
        return "n/a" if x is None else format(x, spec)

    lines = [
        f"device {r['device']}, attention {r['attn_implementation']}, {r['dtype']}; micro batch {r['micro_batch']} × "
        f"seq {r['seq_len']}, P={r['positions']}, N_L={r['num_latents']}, N_A={r['num_ahead']}",
        f"augmented step (fwd+bwd+AdamW): {r['step_s'] * 1e3:.1f} ms, {r['tokens_per_s']:,.0f} tokens/s, "
        f"{r['achieved_tflops']:.2f} TFLOP/s useful, MFU {f(r['mfu'], '.1%')}, peak {f(r['peak_mib'], ',.0f')} MiB",
    ]
    lines.append(
        f"attention masks built per step: {r['mask_build_s'] * 1e3:.1f} ms "
        f"({r['mask_build_s'] / r['step_s']:.1%} of the step)"
    )
    if "aug_over_plain" in r:
        lines.append(
            f"augmented / plain LM step (fwd+bwd): {r['aug_over_plain']:.2f}× measured "
            f"({r['aug_fwd_bwd_s'] * 1e3:.1f} / {r['plain_fwd_bwd_s'] * 1e3:.1f} ms), "
            f"{r['analytic_aug_over_plain']:.2f}× analytic"
        )
    if "naive_over_batched" in r:
        lines.append(
            f"naive loop / batched pass at P={r['naive_positions']}: {r['naive_over_batched']:.1f}× "
            f"({r['naive_loop_s'] * 1e3:.1f} / {r['batched_small_s'] * 1e3:.1f} ms)"
        )
    if r.get("flex_over_eager") is not None:
        lines.append(
            f"flex / eager at P={r['eager_positions']}: {r['flex_over_eager']:.2f}× "
            f"({r['flex_s'] * 1e3:.1f} / {r['eager_s'] * 1e3:.1f} ms)"
        )
    elif "flex_over_eager" in r:
        lines.append("flex / eager: n/a on CPU (FlexAttention has no CPU backward)")
    lines.append(
        f"torch.compile graphs: {r['compiled_graphs_after_step']} for the augmented step, "
        f"{r['recompiles_in_steady_step']} new in a further step, {r['compiled_graphs_total']} in the whole run"
    )
    if "profile" in r:
        lines += ["profile of one augmented step:", r["profile"]]
    return "\n".join(lines)
