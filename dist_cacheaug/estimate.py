"""Parameter counts, an analytic FLOP model and a per-GPU memory estimate for a run config.

Everything is computed from the architecture alone (models are built on the meta device), so the
paper's Gemma-2 2B run can be sized on a laptop. The memory estimate is a planning number, not a
measurement: see the formulas in :func:`memory_estimate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM

from .config import RunConfig
from .decoder import decoder_hf_config

GiB = 1024**3


@dataclass
class ParamCounts:
    decoder: int  # the frozen decoder, LM head included (tied embeddings counted once)
    coprocessor: int  # trainable: decoder base model minus its input embeddings, plus soft tokens
    embedding: int
    soft_tokens: int


def param_counts(cfg: RunConfig) -> ParamCounts:
    hf = decoder_hf_config(cfg.model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    decoder = sum(p.numel() for p in model.parameters())  # parameters() de-duplicates tied weights
    embedding = model.get_input_embeddings().weight.numel()
    base = sum(p.numel() for p in model.base_model.parameters())
    soft = cfg.model.num_latents * hf.hidden_size
    return ParamCounts(
        decoder=decoder, coprocessor=base - embedding + soft, embedding=embedding, soft_tokens=soft
    )


def trace_token_counts(cfg: RunConfig) -> tuple[int, int]:
    """(coprocessor tokens, decoder trace tokens) appended per sequence by the extended passes."""
    m = cfg.model
    per_trace = m.num_latents + m.num_ahead - (1 if m.convention == "insert" else 0)
    return m.num_positions * m.num_latents, m.num_positions * per_trace


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
    w_layer = (counts.coprocessor - counts.soft_tokens) / layers  # non-embedding weights per layer (approx.)
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

    * frozen decoder replica: params × 2 (bf16) or × 4, divided by world size with ``zero.shard_decoder``
    * coprocessor under ZeRO stage s: bf16 params (2 B, /world at s=3), grads (2 B, /world at s>=2),
      fp32 master + Adam m, v (12 B, /world at s>=1); offloaded parts count 0 on the GPU
    * prefix kv-cache: micro × layers × 2 × N × kv_heads × head_dim × bytes
    * activations: per layer and token, 34·H bytes for a layer held in full (Korthikanti et al. 2022,
      no materialised attention scores: flex/flash); with activation checkpointing each layer keeps only
      its input (2·H) and one layer at a time is held in full
    * loss chunk: fp32 logits of ``loss_chunk_size`` rows × vocab, ×3 (logits, softmax, grad)
    """
    hf = decoder_hf_config(cfg.model)
    counts = param_counts(cfg)
    z = cfg.zero
    elt = 2 if bf16 else 4
    w = world_size
    decoder = counts.decoder * elt / (w if z.shard_decoder else 1)
    cop = counts.coprocessor
    params = 0 if z.offload_params else cop * elt / (w if z.stage == 3 else 1)
    grads = cop * elt / (w if z.stage >= 2 else 1)
    optim = 0 if z.offload_optimizer else cop * 12 / (w if z.stage >= 1 else 1)
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
        "frozen_decoder": decoder,
        "coprocessor_params": params,
        "coprocessor_grads": grads,
        "optimizer_state": optim,
        "prefix_kv_cache": kv,
        "activations": acts,
        "loss_chunk": loss,
    }
    parts["total"] = sum(parts.values())
    return parts
