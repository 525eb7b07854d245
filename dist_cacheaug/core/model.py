"""CacheAugmentedLM: a frozen HF decoder plus a trainable coprocessor and soft tokens.

Plain PyTorch + transformers. The decoder is held as a plain attribute, not a registered submodule, so
``parameters()`` / ``state_dict()`` hold only the trainable part (coprocessor + soft tokens): that is
what an optimizer or a DeepSpeed engine wraps, while the decoder stays an inference-only replica.
"""

from __future__ import annotations

import copy
import json
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModel, DynamicCache

from . import phases
from .augment import AugmentOutput, augment_prompt, soft_token_inputs
from .cache import clone_cache, read_only_view
from .generation import generate as decode_loop
from .hf_compat import cache_arg, layer_cache
from .losses import chunked_cross_entropy, lm_head_of
from .masks import TraceLayout, attention_masks

CONFIG_NAME = "cacheaug_config.json"
COPROCESSOR_DIR = "coprocessor"
WEIGHTS_NAME = "model.safetensors"
SOFT_TOKENS_NAME = "soft_tokens.safetensors"


@dataclass
class AugmentConfig:
    num_latents: int = 16
    convention: str = "insert"  # "insert" | "refeed" (docs/design.md §1.6)
    latent_final_norm: bool = True
    soft_token_init: str = "embedding_sample"
    coprocessor_init: str = "decoder"
    loss_chunk_size: int = 4096

    def __post_init__(self):
        if self.num_latents < 1:
            raise ValueError(f"num_latents must be >= 1, got {self.num_latents}")
        if self.convention not in ("insert", "refeed"):
            raise ValueError(f"convention must be 'insert' or 'refeed', got {self.convention!r}")


@dataclass
class TrainingLossOutput:
    loss: torch.Tensor  # scalar: mean CE over traces and offsets
    loss_per_offset: torch.Tensor  # [num_ahead]: mean CE of the k-th token after the position
    num_predictions: int


def _checkpointed_forward(self, *args, **kwargs):
    """A layer's forward, recomputed in backward when that is safe: under autograd and with no cache or
    a read-only one (a growing cache would be appended to twice by the recompute)."""
    inner = type(self).forward
    cache = layer_cache(kwargs)
    if torch.is_grad_enabled() and (cache is None or getattr(cache, "read_only", False)):
        return checkpoint(inner, self, *args, use_reentrant=False, **kwargs)
    return inner(self, *args, **kwargs)


def checkpoint_layers(layers: nn.ModuleList) -> None:
    """Recompute each layer in backward (non-reentrant torch checkpointing). HF's own gradient
    checkpointing drops the layer's cache, which the extended passes need, so we wrap ``forward``.
    A bound method (not a closure) so that ``copy.deepcopy`` of the model rebinds it to the copy."""
    for layer in layers:
        layer.forward = types.MethodType(_checkpointed_forward, layer)


def decoder_fingerprint(config) -> dict:
    """The architecture fields an export records, to refuse loading it around another decoder."""
    keys = (
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "intermediate_size",
    )
    return {k: getattr(config, k, None) for k in keys}


def sample_positions(
    batch: int,
    seq_len: int,
    num_positions: int,
    num_ahead: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    *,
    anchor_mask: torch.Tensor | None = None,
    anchor_fraction: float = 0.0,
) -> torch.Tensor:
    """[batch, P] sorted distinct augmentation positions over the valid range
    0 <= p <= seq_len - 1 - num_ahead (every trace's targets lie inside the sequence): uniform, or, with
    ``anchor_mask`` ([batch, seq_len] bool, True where a marker token sits), up to
    ``round(anchor_fraction * P)`` of them drawn from the marked valid positions and the rest uniform
    over the unmarked ones."""
    valid = seq_len - num_ahead
    if num_positions > valid:
        raise ValueError(
            f"cannot sample {num_positions} positions from a {seq_len}-token sequence with num_ahead={num_ahead}"
            f" ({valid} valid positions)"
        )
    n_anchor = round(anchor_fraction * num_positions) if anchor_mask is not None else 0
    rows = []
    for b in range(batch):
        order = torch.randperm(valid, generator=generator)
        if n_anchor:
            marked = anchor_mask[b, :valid].cpu()[order]
            # marked positions first (in random order), then the rest: the first P are the sample
            order = torch.cat([order[marked][:n_anchor], order[~marked], order[marked][n_anchor:]])
        rows.append(order[:num_positions].sort().values)
    return torch.stack(rows).to(device)


def attn_implementation_of(decoder: nn.Module) -> str:
    """The attention implementation a model's masks are built for ("eager" when unset)."""
    return getattr(decoder.config, "_attn_implementation", "eager") or "eager"


def frozen_prefix_pass(decoder: nn.Module, input_ids: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """``decoder`` over the whole sequence without grad: (full-layer cache, last hidden states). Every
    key stays in every layer: the extended passes window through their masks."""
    cache = DynamicCache()
    with torch.no_grad():
        hidden = decoder.base_model(input_ids=input_ids, **cache_arg(cache), use_cache=True).last_hidden_state
    return cache, hidden


def trace_pass(
    decoder: nn.Module,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    latents_bpld: torch.Tensor,
    cache: DynamicCache,
    num_ahead: int,
    convention: str,
    implementation: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder over [latents, ahead tokens] of every trace in one extended pass over ``cache`` (the
    sequence's full-layer cache). Returns (hidden states [B*P*N_A, H] that predict the targets, targets
    [B*P*N_A]: x[p+1..p+N_A] of each trace). N_L = 0 with "refeed" is the pass without latents."""
    b, n = input_ids.shape
    p_count, n_l, n_a = positions.shape[1], latents_bpld.shape[2], num_ahead
    device = input_ids.device
    dec_dtype = next(decoder.parameters()).dtype
    if convention == "insert":
        ahead_offsets = torch.arange(1, n_a, device=device)  # x[p+1 .. p+N_A-1]
        trace_pos = torch.arange(1, n_l + n_a, device=device)[None, None] + positions[:, :, None]
        prefix_end = positions
        window_pos = None  # = position ids
        predict_rows = torch.arange(n_l - 1, n_l - 1 + n_a, device=device)
    else:  # refeed: [z, x[p], ..., x[p+N_A-1]] at positions [p+1..p+N_L, p, ..., p+N_A-1]
        ahead_offsets = torch.arange(0, n_a, device=device)
        rel = torch.cat([torch.arange(1, n_l + 1, device=device), torch.arange(0, n_a, device=device)])
        trace_pos = rel[None, None] + positions[:, :, None]
        prefix_end = positions - 1
        # HF decoding of the trace alone puts trace token i at cache index p + i.
        window_pos = (positions[:, :, None] + torch.arange(n_l + n_a, device=device)).reshape(b, -1)
        predict_rows = torch.arange(n_l, n_l + n_a, device=device)
    ahead_ids = torch.gather(input_ids, 1, (positions[:, :, None] + ahead_offsets).reshape(b, -1))
    hidden_size = latents_bpld.shape[-1]
    ahead_emb = decoder.get_input_embeddings()(ahead_ids).view(b, p_count, len(ahead_offsets), hidden_size)
    trace_in = torch.cat([latents_bpld, ahead_emb], dim=2)
    t_len = trace_in.shape[2]
    dec_layout = TraceLayout(
        prefix_len=n,
        trace_len=t_len,
        prefix_end_bp=prefix_end,
        position_ids_bq=trace_pos.reshape(b, -1),
        window_pos_bq=window_pos,
    )
    dec_mask = attention_masks(decoder.config, dec_layout, dtype=dec_dtype, implementation=implementation)
    hidden = decoder.base_model(
        inputs_embeds=trace_in.reshape(b, p_count * t_len, -1),
        attention_mask=dec_mask,
        position_ids=dec_layout.position_ids_bq,
        **cache_arg(read_only_view(cache)),
        use_cache=True,
    ).last_hidden_state
    hidden_bpah = hidden.view(b, p_count, t_len, -1)[:, :, predict_rows]
    targets = torch.gather(
        input_ids, 1, (positions[:, :, None] + torch.arange(1, n_a + 1, device=device)).reshape(b, -1)
    )
    return hidden_bpah.reshape(-1, hidden.shape[-1]), targets.reshape(-1)


@torch.no_grad()
def no_latent_trace_loss(
    decoder: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor, num_ahead: int
) -> TrainingLossOutput:
    """The trace pass with zero latents ("coprocessor disabled"): every trace re-reads
    x[p..p+num_ahead-1] after the prefix x[0..p-1] (:func:`trace_pass`, "refeed" with N_L = 0). Equals
    the plain decoder's CE to float tolerance; evaluation's ``augment=False`` checks the pipeline with it."""
    b = input_ids.shape[0]
    cache, hidden = frozen_prefix_pass(decoder, input_ids)
    no_latents = hidden.new_zeros(b, positions.shape[1], 0, hidden.shape[-1])
    hidden_mh, targets_m = trace_pass(
        decoder, input_ids, positions, no_latents, cache, num_ahead, "refeed", attn_implementation_of(decoder)
    )
    weight, softcap = lm_head_of(decoder)
    ce = chunked_cross_entropy(hidden_mh, targets_m, weight, softcap)
    per_offset = ce.view(-1, num_ahead).mean(0)
    return TrainingLossOutput(per_offset.mean(), per_offset, ce.numel())


#: How an export writes one tensor file: ``(path, {name: tensor})``. The tensors may be parameters that a
#: distributed writer gathers one at a time; :func:`save_tensors` writes them as they are.
TensorFileWriter = Callable[[Path, dict[str, torch.Tensor]], None]


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


class CacheAugmentedLM(nn.Module):
    variant_name = "coprocessor"  # recorded in the export; see dist_cacheaug/variants
    async_delay: int = 0  # latents from the cache this many tokens behind (the "async" variant sets it)

    def __init__(
        self, decoder: nn.Module, coprocessor: nn.Module, soft_tokens: torch.Tensor, config: AugmentConfig
    ):
        super().__init__()
        object.__setattr__(self, "decoder", decoder)  # not a submodule: frozen, outside optimizers/engines
        for p in decoder.parameters():
            p.requires_grad_(False)
        decoder.eval()
        self.coprocessor = coprocessor
        self.soft_tokens = nn.Parameter(soft_tokens)  # [N_L, H]
        self.aug_config = config

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def from_decoder(
        cls,
        decoder: nn.Module,
        num_latents: int = 16,
        *,
        coprocessor_init: str = "decoder",
        convention: str = "insert",
        latent_final_norm: bool = True,
        soft_token_init: str = "embedding_sample",
        loss_chunk_size: int = 4096,
        seed: int = 0,
        coprocessor_dtype: torch.dtype | None = None,
    ) -> CacheAugmentedLM:
        config = AugmentConfig(
            num_latents=num_latents,
            convention=convention,
            latent_final_norm=latent_final_norm,
            soft_token_init=soft_token_init,
            coprocessor_init=coprocessor_init,
            loss_chunk_size=loss_chunk_size,
        )
        dtype = coprocessor_dtype or next(decoder.parameters()).dtype
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if coprocessor_init == "decoder":
                coprocessor = copy.deepcopy(decoder.base_model)
            elif coprocessor_init == "scratch":
                coprocessor = AutoModel.from_config(decoder.config)
            else:
                raise ValueError(f"coprocessor_init must be 'decoder' or 'scratch', got {coprocessor_init!r}")
        coprocessor = as_coprocessor(coprocessor, config).to(dtype=dtype, device=device_of(decoder))
        soft = init_soft_tokens(decoder, num_latents, soft_token_init, gen).to(dtype)
        return cls(decoder, coprocessor, soft, config)

    @property
    def num_latents(self) -> int:
        return self.aug_config.num_latents

    @property
    def baseline_decoder(self) -> nn.Module:
        """The frozen decoder that baseline numbers come from (variants that finetune the decoder
        keep a frozen copy of the original here)."""
        return self.decoder

    def variant_options(self) -> dict:
        """Variant-specific settings saved in the export beside ``AugmentConfig``."""
        return {}

    # ---- the three passes --------------------------------------------------------------------------
    def coprocessor_states(self, inputs_bqh, cache, attention_mask=None, position_ids=None) -> torch.Tensor:
        """[B, Q, H] last hidden states of the coprocessor over ``inputs_bqh`` appended to ``cache``."""
        out = self.coprocessor(
            inputs_embeds=inputs_bqh,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **cache_arg(cache),
            use_cache=True,
        )
        return out.last_hidden_state

    def enable_activation_checkpointing(self) -> None:
        """Recompute coprocessor layers and the decoder's trace-pass layers in backward. (The decoder's
        layers are wrapped in place; under ``no_grad`` they run exactly as before.)"""
        checkpoint_layers(self.coprocessor.layers)
        checkpoint_layers(self.decoder.base_model.layers)

    def attn_implementation(self) -> str:
        """The attention implementation the trace masks are built for (the decoder's)."""
        return attn_implementation_of(self.decoder)

    def training_loss(
        self, input_ids: torch.Tensor, positions: torch.Tensor, num_ahead: int
    ) -> TrainingLossOutput:
        """All P traces of every sequence in one pass (docs/design.md §1.4-1.5): equals running each trace alone.
        (1) frozen decoder over the sequence; (2) :meth:`trace_latents`; (3) :meth:`trace_loss`.
        Variants (``dist_cacheaug/variants``) replace step (2) and leave (1) and (3) as they are."""
        b, n = input_ids.shape
        positions = check_positions(positions, b, n, num_ahead)
        phases.enter("prefix")
        cache, hidden = self.prefix_pass(input_ids)
        phases.enter("coprocessor")
        latents_bpld = self.trace_latents(input_ids, positions, cache, hidden)
        phases.enter("trace")
        return self.trace_loss(input_ids, positions, latents_bpld, cache, num_ahead)

    def prefix_pass(self, input_ids: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
        """(1) The frozen decoder over the whole sequence, no grad: (full-layer cache, last hidden states)."""
        return frozen_prefix_pass(self.decoder, input_ids)

    def coprocessor_layout(
        self, positions: torch.Tensor, view_end: torch.Tensor, prefix_len: int
    ) -> TraceLayout:
        """Trace j's soft tokens at positions view_end_j+1..view_end_j+N_L, seeing prefix 0..view_end_j."""
        b = positions.shape[0]
        offs_l = torch.arange(1, self.num_latents + 1, device=positions.device)
        return TraceLayout(
            prefix_len=prefix_len,
            trace_len=self.num_latents,
            prefix_end_bp=view_end,
            position_ids_bq=(view_end[:, :, None] + offs_l).reshape(b, -1),
        )

    def trace_latents(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        prefix_hidden: torch.Tensor,
        view_end: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(2) [B, P, N_L, H] latents of every trace: the coprocessor over P×N_L soft tokens appended
        after the decoder's cache; trace j sees cache entries 0..view_end_j (default: its position)."""
        b, n = input_ids.shape
        p_count, n_l = positions.shape[1], self.num_latents
        cop_layout = self.coprocessor_layout(positions, positions if view_end is None else view_end, n)
        cop_dtype = self.soft_tokens.dtype
        cop_mask = attention_masks(
            self.coprocessor.config, cop_layout, dtype=cop_dtype, implementation=self.attn_implementation()
        )
        soft = self.soft_tokens[None, None].expand(b, p_count, n_l, -1).reshape(b, p_count * n_l, -1)
        latents = self.coprocessor_states(soft, read_only_view(cache), cop_mask, cop_layout.position_ids_bq)
        dec_dtype = next(self.decoder.parameters()).dtype
        return latents.to(dec_dtype).view(b, p_count, n_l, -1)

    def trace_loss(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        latents_bpld: torch.Tensor,
        cache: DynamicCache,
        num_ahead: int,
    ) -> TrainingLossOutput:
        """(3) The decoder over [latents, ahead tokens] of every trace; CE per ahead offset."""
        hidden_mh, targets_m = trace_pass(
            self.decoder,
            input_ids,
            positions,
            latents_bpld,
            cache,
            num_ahead,
            self.aug_config.convention,
            self.attn_implementation(),
        )
        ce = self.token_ce(hidden_mh, targets_m)
        per_offset = ce.view(-1, num_ahead).mean(0)
        return TrainingLossOutput(
            loss=per_offset.mean(), loss_per_offset=per_offset, num_predictions=ce.numel()
        )

    def token_ce(self, hidden_mh: torch.Tensor, targets_m: torch.Tensor) -> torch.Tensor:
        """Per-row CE [M] through the decoder's LM head, in chunks (the head's weight is read directly:
        it is frozen and never partitioned)."""
        weight, softcap = lm_head_of(self.decoder)
        return chunked_cross_entropy(hidden_mh, targets_m, weight, softcap, self.aug_config.loss_chunk_size)

    def forward(self, input_ids, positions, num_ahead) -> TrainingLossOutput:
        return self.training_loss(input_ids, positions, num_ahead)

    # ---- inference -------------------------------------------------------------------------------
    def latents_for_cache(
        self, cache: DynamicCache, batch: int, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, N_L, H] latents from a decoder cache (HF builds the masks: plain cached decoding).
        ``attention_mask``: [B, cache length] of a left-padded batch: the soft tokens then skip the pad
        keys and take each row's own positions."""
        soft = self.soft_tokens[None].expand(batch, -1, -1)
        if attention_mask is None:
            return self.coprocessor_states(soft, clone_cache(cache))
        mask, pos = soft_token_inputs(attention_mask, self.num_latents)
        return self.coprocessor_states(soft, clone_cache(cache), mask, pos)

    def latents_for_prompt(
        self, input_ids: torch.Tensor, cache: DynamicCache, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, N_L, H] latents after the prompt ``input_ids`` whose decoder cache is ``cache`` (the
        coprocessor needs only the cache; the "activations" variant reads the prompt itself).
        ``attention_mask``: the left-padded prompt's [B, L] mask (the augmentation step passes it only
        for padded batches, so an override without it still serves unpadded ones)."""
        if attention_mask is None:
            return self.latents_for_cache(cache, input_ids.shape[0])
        return self.latents_for_cache(cache, input_ids.shape[0], attention_mask)

    @torch.no_grad()
    def augment(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> AugmentOutput:
        """Read the prompt, write N_L latents into the decoder's cache (latents ``async_delay`` tokens
        behind: 0 here, the "async" variant sets it). Continue with plain HF calls
        (``decoder(next_ids, **cache_arg(out.past_key_values))``, ``cache_arg`` from ``hf_compat``; for
        "refeed" also pass ``position_ids`` starting at ``out.next_position``). The step is
        :func:`~.augment.augment_at`, the one that generation and evaluation use.

        ``attention_mask`` [B, L] (1 = token, 0 = pad): prompts of different lengths, LEFT-padded; each
        row's output equals that prompt's alone. ``next_position`` is then a [B] tensor and
        ``out.attention_mask`` the [B, L + N_L] mask to extend (with ones) for the following tokens."""
        return augment_prompt(self, input_ids, self.async_delay, attention_mask)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int | None = None,
        *,
        augment: bool = True,
        generation_config=None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Augment at the end of the prompt, then decode with HF ``generate`` from the augmented cache.
        Returns [B, L + new] (prompt followed by the generated tokens). Decoding options are HF's: a
        ``generation_config=GenerationConfig(...)`` and/or its fields as keywords (``do_sample``,
        ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``eos_token_id``,
        ``stop_strings`` with ``tokenizer=``, ...), defaults from the decoder's ``generation_config``.
        ``augment=False``: the frozen decoder alone. ``attention_mask`` [B, L]: LEFT-padded prompts of
        different lengths (see :meth:`augment`). Further keywords (``reaugment_every``, ``async_delay``,
        ``stop``, ``stats``, ...) are those of :func:`~.generation.generate`, which this is."""
        return decode_loop(
            self,
            input_ids,
            max_new_tokens,
            augment=augment,
            generation_config=generation_config,
            attention_mask=attention_mask,
            **kwargs,
        )

    # ---- persistence -------------------------------------------------------------------------------
    #: Every tensor file of this variant's export goes through ``save_pretrained``'s ``write_tensors``, so
    #: training can stream a sharded model to disk one parameter at a time (``train/engine.py``). A variant
    #: that saves through Hugging Face's ``save_pretrained`` sets it False: training gathers it whole first.
    streamed_export = True

    def save_pretrained(self, directory: str | Path, write_tensors: TensorFileWriter | None = None) -> None:
        """Coprocessor (HF config + safetensors, HF key names), soft tokens, and our config. The frozen
        decoder is not saved: it is whatever the user already has. ``write_tensors(path, tensors)`` writes
        each tensor file (default :func:`save_tensors`); it receives the parameters themselves."""
        write = write_tensors or save_tensors
        directory = Path(directory)
        cop_dir = directory / COPROCESSOR_DIR
        cop_dir.mkdir(parents=True, exist_ok=True)
        self.coprocessor.config.save_pretrained(cop_dir)
        write(cop_dir / WEIGHTS_NAME, dict(self.coprocessor.state_dict(keep_vars=True)))
        self.save_soft_tokens(directory, write)
        self.write_meta(directory)

    def save_soft_tokens(self, directory: Path, write_tensors: TensorFileWriter | None = None) -> None:
        """Write the soft tokens (``SOFT_TOKENS_NAME``) into an export directory that exists."""
        (write_tensors or save_tensors)(directory / SOFT_TOKENS_NAME, {"soft_tokens": self.soft_tokens})

    def write_meta(self, directory: Path) -> None:
        """Write ``cacheaug_config.json`` (variant name and options, AugmentConfig, decoder fingerprint):
        what :func:`read_export_meta` and ``variants.load_pretrained`` read back."""
        meta = {
            "variant": self.variant_name,
            "variant_options": self.variant_options(),
            "augment": asdict(self.aug_config),
            "decoder": decoder_fingerprint(self.decoder.config),
        }
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path, decoder: nn.Module) -> CacheAugmentedLM:
        directory = Path(directory)
        meta, config = read_export_meta(directory, decoder, cls.variant_name)
        cop_dir = directory / COPROCESSOR_DIR
        # The coprocessor runs under the masks built for the decoder's attention implementation
        # (``attn_implementation``): rebuild it with that implementation, not AutoModel's default for the config.
        attn = getattr(decoder.config, "_attn_implementation", None) or "eager"
        try:
            cop = AutoModel.from_config(AutoConfig.from_pretrained(cop_dir), attn_implementation=attn)
            cop = as_coprocessor(cop, config)
            state = load_file(str(cop_dir / WEIGHTS_NAME))
            cop.load_state_dict(state, strict=True)
            soft = load_file(str(directory / SOFT_TOKENS_NAME))["soft_tokens"]
        except (OSError, RuntimeError, KeyError, ValueError) as e:
            raise ValueError(f"{directory}: cannot load the coprocessor or soft tokens: {e}") from e
        dtype = next(decoder.parameters()).dtype
        cop = cop.to(dtype=dtype, device=device_of(decoder))
        model = cls(decoder, cop, soft.to(dtype=dtype, device=device_of(decoder)), config)
        model.apply_variant_options(meta.get("variant_options", {}))
        return model

    def apply_variant_options(self, options: dict) -> None:
        """Restore what :meth:`variant_options` saved."""


def read_export_meta(
    directory: Path, decoder: nn.Module, variant: str | None = None
) -> tuple[dict, AugmentConfig]:
    """(meta, AugmentConfig) of an export, checked against the decoder (and the expected variant)."""
    meta_path = directory / CONFIG_NAME
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory} is not a saved CacheAugmentedLM: {CONFIG_NAME} is missing")
    try:
        meta = json.loads(meta_path.read_text())
        config = AugmentConfig(**meta["augment"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{meta_path}: unreadable or invalid: {e}") from e
    saved_variant = meta.get("variant", "coprocessor")
    if variant is not None and saved_variant != variant:
        raise ValueError(
            f"{directory} holds variant {saved_variant!r}, not {variant!r}: load it with "
            "dist_cacheaug.variants.load_pretrained"
        )
    have = decoder_fingerprint(decoder.config)
    if meta.get("decoder") != have:
        diff = {
            k: (meta.get("decoder", {}).get(k), v)
            for k, v in have.items()
            if meta.get("decoder", {}).get(k) != v
        }
        raise ValueError(f"{directory}: was trained for another decoder; (saved, given) differ in {diff}")
    return meta, config


# ---- helpers -----------------------------------------------------------------------------------------
def device_of(module: nn.Module) -> torch.device:
    """The device of ``module``'s parameters (where to put soft tokens and rebuilt parts)."""
    return next(module.parameters()).device


def as_coprocessor(base: nn.Module, config: AugmentConfig) -> nn.Module:
    """A decoder-architecture base model used as the coprocessor: its input is only soft tokens, so the
    input embedding matrix is dropped (Gemma-2 2B: 590M unused parameters); optionally no final norm."""
    base.embed_tokens = None
    if not config.latent_final_norm:
        base.norm = nn.Identity()
    base.train()
    for p in base.parameters():
        p.requires_grad_(True)
    return base


def init_soft_tokens(decoder, n_l: int, how: str, gen: torch.Generator) -> torch.Tensor:
    """[n_l, H] fp32 initial soft tokens: ``embedding_sample`` (random token embeddings), ``zeros`` or
    ``normal``."""
    emb = decoder.get_input_embeddings()
    hidden = emb.weight.shape[1]
    if how == "embedding_sample":  # scaled like real token embeddings (Gemma scales inside the module)
        ids = torch.randint(0, emb.weight.shape[0], (n_l,), generator=gen).to(emb.weight.device)
        with torch.no_grad():
            return emb(ids).detach().clone().float()
    if how == "zeros":
        return torch.zeros(n_l, hidden)
    if how == "normal":
        return torch.randn(n_l, hidden, generator=gen) * 0.02
    raise ValueError(f"soft_token_init must be embedding_sample, zeros or normal, got {how!r}")


def check_positions(positions: torch.Tensor, b: int, n: int, num_ahead: int) -> torch.Tensor:
    """``positions`` as a [b, P] long tensor, or a clear ValueError (every trace's targets must exist)."""
    if num_ahead < 1:
        raise ValueError(f"num_ahead must be >= 1, got {num_ahead}")
    positions = torch.as_tensor(positions, dtype=torch.long)
    if positions.dim() != 2 or positions.shape[0] != b:
        raise ValueError(f"positions must be [batch={b}, P], got shape {tuple(positions.shape)}")
    hi = n - 1 - num_ahead
    bad = (positions < 0) | (positions > hi)
    if bad.any():
        raise ValueError(
            f"augmentation positions must lie in [0, {hi}] for seq_len={n} and num_ahead={num_ahead} "
            f"(targets x[p+1..p+{num_ahead}] must exist); got {positions[bad].unique().tolist()}"
        )
    return positions
