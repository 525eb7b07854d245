"""Parameter counts, an analytic FLOP model, a per-GPU memory estimate and the bytes each ZeRO layout
moves per GPU (:func:`zero_comm`) for a run config.

Everything is computed from the architecture alone (models are built on the meta device), so the
paper's Gemma-2 2B run can be sized on a laptop. The memory estimate is a planning number, not a
measurement: see the formulas in :func:`memory_estimate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM

from ..config import RunConfig
from ..core.decoder import decoder_hf_config

GiB = 1024**3


@dataclass
class ParamCounts:
    decoder: int  # the frozen decoder, LM head included (tied embeddings counted once)
    coprocessor: int  # trainable: decoder base model minus its input embeddings, plus soft tokens
    embedding: int
    soft_tokens: int
    decoder_layers: int = 0  # the decoder's transformer layers: what ``zero.shard_decoder`` splits
    num_layers: int = 1
    largest: int = 0  # the coprocessor's largest parameter: what a streamed checkpoint holds at once


def param_counts(cfg: RunConfig) -> ParamCounts:
    hf = decoder_hf_config(cfg.model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    decoder = sum(p.numel() for p in model.parameters())  # parameters() de-duplicates tied weights
    embedding = model.get_input_embeddings().weight.numel()
    base = sum(p.numel() for p in model.base_model.parameters())
    layers = sum(p.numel() for p in model.base_model.layers.parameters())
    soft = cfg.model.num_latents * hf.hidden_size
    # model.variant=pause has no coprocessor: its N_L soft tokens go to the decoder directly
    trainable = soft if cfg.model.variant == "pause" else base - embedding + soft
    emb = model.get_input_embeddings().weight
    largest = max(
        [soft]
        + [p.numel() for p in model.base_model.parameters() if p is not emb] * (cfg.model.variant != "pause")
    )
    return ParamCounts(
        decoder=decoder,
        coprocessor=trainable,
        embedding=embedding,
        soft_tokens=soft,
        decoder_layers=layers,
        num_layers=hf.num_hidden_layers,
        largest=largest,
    )


def decoder_shard_group(cfg: RunConfig, world_size: int) -> int:
    """Ranks one copy of the frozen decoder's layers is split over (1: replicated)."""
    z = cfg.zero
    return min(z.decoder_shard_size or world_size, world_size) if z.shard_decoder else 1


def decoder_bytes(counts: ParamCounts, group: int, elt: int) -> dict[str, float]:
    """Per-GPU bytes of the frozen decoder split over ``group`` ranks (1: replicated): its resident
    part (the layers' shard + the replicated embeddings, norm and head) and, when split, the gathered
    layers alive at once. FSDP2 holds the running layer whole, and the next one while it is gathered
    and copied out of the all-gather buffer (explicit prefetch): 3 layers' worth at the peak."""
    if group <= 1:
        return {"frozen_decoder": counts.decoder * elt, "decoder_gathered_layers": 0.0}
    rest = counts.decoder - counts.decoder_layers
    per_layer = counts.decoder_layers / counts.num_layers
    return {
        "frozen_decoder": rest * elt + counts.decoder_layers * elt / group,
        "decoder_gathered_layers": 3 * per_layer * elt,
    }


def checkpoint_estimate(cfg: RunConfig, world_size: int) -> dict[str, float]:
    """Bytes one checkpoint writes and the host memory a save adds per rank (``train/checkpoint.py``).

    Written: DeepSpeed's files (fp32 master weights and Adam's two moments, 12 B per trainable
    parameter, split over the ranks) plus the consolidated fp32 copy (4 B per parameter, rank 0). Memory:
    rank 0 gathers and writes one parameter at a time (the largest, 4 B per element); under ZeRO-3 the
    other ranks only send their partitions, under ZeRO-1/2 DeepSpeed's all-reduce gives each rank one
    whole parameter too. ``whole_copy`` is what every rank held before the save was streamed."""
    counts = param_counts(cfg)
    n, big = counts.coprocessor, counts.largest
    return {
        "bytes_per_save": 16 * n,
        "deepspeed_bytes_per_rank": 12 * n / world_size,
        "consolidated_bytes": 4 * n,
        "save_peak_rank0": 4 * big,
        "save_peak_other_ranks": 0 if cfg.zero.stage == 3 else 4 * big,
        "whole_copy": 4 * n,
    }


def trace_token_counts(cfg: RunConfig) -> tuple[int, int]:
    """(coprocessor tokens, decoder trace tokens) appended per sequence by the extended passes."""
    m = cfg.model
    per_trace = m.num_latents + m.num_ahead - (1 if m.convention == "insert" else 0)
    coprocessor = 0 if m.variant == "pause" else m.num_positions * m.num_latents
    return coprocessor, m.num_positions * per_trace


def flops_per_sequence(cfg: RunConfig) -> dict[str, float]:
    """Useful training FLOPs for one sequence (matmuls only; masked-out attention is not counted).

    Per token, a transformer layer costs 2·(weights of the layer) multiply-adds → 2·W_layer FLOPs in
    forward, plus 4·d_head·heads per attended key (QK^T and AV). Backward costs 2× forward for
    activations *and* weights of trained modules, 1× forward for activations only through the frozen
    decoder (its weights get no gradient). Pass by pass:
      prefix:       frozen decoder forward over N tokens, causal (N²/2 keys)
      coprocessor:  trainable forward+backward (3×) over P·N_L tokens; each sees p+1 prefix keys + its own
      trace:        frozen forward + input-grad backward (2×) over P·T tokens, same pattern, plus the LM head
                    on P·N_A predictions (forward + input-grad backward).
    Averaging over uniform p, a trace sees about N/2 prefix keys.
    """
    hf = decoder_hf_config(cfg.model)
    n, m = cfg.data.seq_len, cfg.model
    counts = param_counts(cfg)
    layers = hf.num_hidden_layers
    heads = hf.num_attention_heads
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    w_layer = counts.decoder_layers / layers  # weights per transformer layer
    attn_per_key = 4 * heads * head_dim  # FLOPs per (query, key) pair per layer
    vocab_head = 2 * hf.hidden_size * hf.vocab_size  # FLOPs per predicted token
    cop_tokens, trace_tokens = trace_token_counts(cfg)
    t_len = trace_tokens // m.num_positions

    def pass_flops(tokens, keys_per_token):
        return layers * (2 * w_layer * tokens + attn_per_key * tokens * keys_per_token)

    prefix = pass_flops(n, (n + 1) / 2)
    cop = pass_flops(cop_tokens, n / 2 + (m.num_latents + 1) / 2)
    trace = pass_flops(trace_tokens, n / 2 + (t_len + 1) / 2) + vocab_head * m.num_positions * m.num_ahead
    plain_lm_step = 3 * (pass_flops(n, (n + 1) / 2) + vocab_head * n)
    total = prefix + 3 * cop + 2 * trace
    return {
        "prefix": prefix,
        "coprocessor": 3 * cop,
        "trace": 2 * trace,
        "total": total,
        "plain_lm_step": plain_lm_step,
        "ratio_to_plain_lm": total / plain_lm_step,
    }


def memory_estimate(cfg: RunConfig, world_size: int, *, bf16: bool = True) -> dict[str, float]:
    """Per-GPU bytes, by part (a planning estimate):

    * frozen decoder: params × 2 (bf16) or × 4 on every rank; with ``zero.shard_decoder`` its layers
      are divided by the shard group (``zero.decoder_shard_size`` or the world size), the embeddings,
      final norm and LM head stay whole, and up to 3 gathered layers are alive at once
      (:func:`decoder_bytes`)
    * coprocessor under ZeRO stage s: bf16 params (2 B, /world at s=3; with hpZ at s=3 also a secondary
      bf16 copy split over ``zero.hpz_partition_size`` ranks), gradients accumulated in fp32 (4 B,
      /world at s>=2; at s=1 under bf16 DeepSpeed's BF16_Optimizer also keeps the bf16 grads, +2 B),
      fp32 master + Adam m, v (12 B, /world at s>=1); offloaded parts count 0 on the GPU
    * prefix kv-cache: micro × layers × 2 × N × kv_heads × head_dim × bytes
    * activations: per layer and token, 34·H bytes for a layer held in full (Korthikanti et al. 2022,
      no materialised attention scores: flex/flash); with activation checkpointing each layer keeps only
      its input (2·H) and one layer at a time is held in full
    * loss chunk: fp32 logits of ``loss_chunk_size`` rows × vocab, ×3 (logits, softmax, grad)
    * optimizer step transient, per partitioned parameter: DeepSpeed flattens the gradients into a new
      fp32 buffer (4 B) and torch's CPU AdamW holds two fp32 temporaries for the denominator (8 B):
      12 B in fp32, measured on CPU (``bench/real_widths.py``, docs/real_widths.md); under bf16 on GPU
      (foreach AdamW: one temporary) 8 B, not yet measured
    """
    hf = decoder_hf_config(cfg.model)
    counts = param_counts(cfg)
    z = cfg.zero
    elt = 2 if bf16 else 4
    w = world_size
    decoder = decoder_bytes(counts, decoder_shard_group(cfg, w), elt)
    cop = counts.coprocessor
    params = 0 if z.offload_params else cop * elt / (w if z.stage == 3 else 1)
    if z.stage == 3 and z.hpz_partition_size > 1 and not z.offload_params:
        params += cop * elt / z.hpz_partition_size  # hpZ secondary partition
    grads = cop * 4 / (w if z.stage >= 2 else 1) + (cop * 2 if bf16 and z.stage == 1 else 0)
    optim = 0 if z.offload_optimizer else cop * 12 / (w if z.stage >= 1 else 1)
    step_transient = 0 if z.offload_optimizer else cop * (8 if bf16 else 12) / (w if z.stage >= 1 else 1)
    layers, h = hf.num_hidden_layers, hf.hidden_size
    head_dim = getattr(hf, "head_dim", None) or h // hf.num_attention_heads
    micro, n = cfg.train.micro_batch_size, cfg.data.seq_len
    kv = micro * layers * 2 * n * hf.num_key_value_heads * head_dim * elt
    cop_tokens, trace_tokens = trace_token_counts(cfg)
    tokens = micro * (cop_tokens + trace_tokens)
    if z.activation_checkpointing:
        acts = tokens * layers * 2 * h + micro * max(cop_tokens, trace_tokens) * 34 * h
    else:
        acts = tokens * layers * 34 * h
    loss = (
        min(cfg.model.loss_chunk_size, micro * cfg.model.num_positions * cfg.model.num_ahead)
        * hf.vocab_size
        * 4
        * 3
    )
    parts = {
        **decoder,
        "coprocessor_params": params,
        "coprocessor_grads": grads,
        "optimizer_state": optim,
        "prefix_kv_cache": kv,
        "activations": acts,
        "loss_chunk": loss,
        "optimizer_step_transient": step_transient,
    }
    parts["total"] = sum(parts.values())
    return parts


# --------------------------------------------------------------------------------------------------
# Communication per GPU under each ZeRO layout
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Collective:
    """One kind of collective on the coprocessor's parameters or gradients, as one GPU sees it."""

    what: str
    nbytes: float  # bytes this GPU sends each time (ring algorithm: (g-1)/g of the full tensor)
    group: int  # ranks taking part
    inter_node: bool  # the group spans nodes, so the inter-node link bounds it
    per_micro: int  # times in a steady-state micro-step (not the first after an optimizer step)
    per_step: int  # times per optimizer step (all micro-steps + the step itself)


@dataclass(frozen=True)
class CommEstimate:
    collectives: list[Collective] = field(default_factory=list)

    def bytes_per_micro(self) -> float:
        return sum(c.nbytes * c.per_micro for c in self.collectives)

    def bytes_per_step(self) -> float:
        return sum(c.nbytes * c.per_step for c in self.collectives)

    def seconds_per_micro(self, intra_gbs: float, inter_gbs: float) -> float:
        return sum(c.nbytes * c.per_micro / _bw(c, intra_gbs, inter_gbs) for c in self.collectives)

    def seconds_per_step(self, intra_gbs: float, inter_gbs: float) -> float:
        return sum(c.nbytes * c.per_step / _bw(c, intra_gbs, inter_gbs) for c in self.collectives)


def _bw(c: Collective, intra_gbs: float, inter_gbs: float) -> float:
    return (inter_gbs if c.inter_node else intra_gbs) * 1e9


def zero_comm(
    params: int,
    world_size: int,
    stage: int,
    accum: int,
    *,
    hpz_partition_size: int = 1,
    bf16: bool = True,
    gpus_per_node: int = 8,
) -> CommEstimate:
    """Bytes each GPU sends for the trainable ``params`` under DeepSpeed 0.19.8 ZeRO ``stage`` over
    ``world_size`` data-parallel ranks with ``accum`` micro-steps per optimizer step (pure arithmetic).

    A ring all-gather or reduce-scatter of a full tensor of N bytes over g ranks sends (g-1)/g·N bytes
    per GPU; an all-reduce sends twice that. A collective whose group spans nodes (g > gpus_per_node)
    is bounded by the inter-node link, else by the intra-node one. 16-bit = 2 B (bf16), else 4 B.

    * stage 3: params stay partitioned. Per micro-step: all-gather the 16-bit params for the forward,
      again for the backward (activation checkpointing's recompute reuses that gather: a layer's
      recompute and backward are adjacent, within ``stage3_max_reuse_distance``), and reduce-scatter the
      16-bit gradients; each rank adds its shard into its fp32 accumulation buffer. Nothing more at the
      optimizer step (each rank updates its own shard in place).
    * stage 3 + hpZ (``zero_hpz_partition_size`` = h): the first forward gather after an optimizer step
      is over all ranks and leaves a secondary copy split over h ranks (one node); every later gather
      until the next step (the other 2·accum-1) is within those h ranks. Gradients still reduce-scatter
      over all ranks every micro-step.
    * stage 2: params replicated, so no gathers in forward/backward; gradients are reduced to their
      owning rank every micro-step (reduce-scatter volume), and after the optimizer step the updated
      16-bit params are all-gathered once.
    * stage 1 (bf16: DeepSpeed's BF16_Optimizer): gradients accumulate locally in fp32 and are
      all-reduced once per optimizer step in fp32; the updated 16-bit params are all-gathered once.
    * stage 0 (fp32 only): one fp32 all-reduce of the gradients per optimizer step.

    Scalars (grad-norm all-reduce) and ZeRO-3's persistent small params (< 1e5 elements: norms, soft
    tokens, gathered once per step) are left out: under 0.1 % of the bytes here.
    """
    w = world_size
    if w <= 1:
        return CommEstimate([])
    b16 = 2 if bf16 else 4
    ring = (w - 1) / w
    inter = w > gpus_per_node
    out: list[Collective] = []
    if stage == 3:
        h = hpz_partition_size if hpz_partition_size > 1 else 1
        if h == 1:
            out.append(
                Collective("all-gather 16-bit params (forward)", ring * params * b16, w, inter, 1, accum)
            )
            out.append(
                Collective("all-gather 16-bit params (backward)", ring * params * b16, w, inter, 1, accum)
            )
        else:
            sec = (h - 1) / h * params * b16
            sec_inter = h > gpus_per_node
            out.append(
                Collective(
                    "all-gather 16-bit params, all ranks (1st fwd per step)",
                    ring * params * b16,
                    w,
                    inter,
                    0,
                    1,
                )
            )
            out.append(
                Collective(
                    f"all-gather 16-bit params within hpZ group of {h}", sec, h, sec_inter, 2, 2 * accum - 1
                )
            )
        out.append(Collective("reduce-scatter 16-bit grads", ring * params * b16, w, inter, 1, accum))
    elif stage == 2:
        out.append(Collective("reduce(-scatter) 16-bit grads", ring * params * b16, w, inter, 1, accum))
        out.append(Collective("all-gather updated 16-bit params", ring * params * b16, w, inter, 0, 1))
    elif stage == 1:
        out.append(Collective("all-reduce fp32 grads", 2 * ring * params * 4, w, inter, 0, 1))
        out.append(Collective("all-gather updated 16-bit params", ring * params * b16, w, inter, 0, 1))
    else:
        out.append(Collective("all-reduce grads", 2 * ring * params * b16, w, inter, 0, 1))
    return CommEstimate(out)


def decoder_comm(
    cfg: RunConfig, world_size: int, accum: int, *, bf16: bool = True, gpus_per_node: int = 8
) -> CommEstimate:
    """Bytes each GPU sends for the frozen decoder (pure arithmetic). Replicated: nothing. Sharded over
    a group of g ranks (``zero.decoder_shard_size``, default all): each layer is all-gathered (ring:
    (g-1)/g of its 16-bit bytes per GPU) once in the prefix pass, once in the trace pass and once
    more for the backward through the trace pass (activation checkpointing's recompute shares that
    gather), every micro-step. Frozen parameters have no gradient: no reduce-scatter, nothing at the
    optimizer step. Validation passes add one gather of every layer per forward (not counted here).
    The embeddings, norm and LM head are replicated and move nothing."""
    g = decoder_shard_group(cfg, world_size)
    if g <= 1:
        return CommEstimate([])
    layers = param_counts(cfg).decoder_layers * (2 if bf16 else 4)
    nbytes = (g - 1) / g * layers
    inter = g > gpus_per_node
    return CommEstimate(
        [
            Collective(f"all-gather decoder layers ({what})", nbytes, g, inter, 1, accum)
            for what in ("prefix pass", "trace pass", "backward")
        ]
    )


def compute_seconds_per_micro(cfg: RunConfig, *, peak_flops: float, mfu: float) -> float:
    """One micro-step's useful FLOPs (``flops_per_sequence`` × micro batch) at ``mfu`` of ``peak_flops``."""
    return flops_per_sequence(cfg)["total"] * cfg.train.micro_batch_size / (peak_flops * mfu)
