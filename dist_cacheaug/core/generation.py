"""Generation through transformers' own ``generate``: augment at the end of the prompt, optionally
re-augment every K generated tokens, optionally asynchronously (latents computed from the cache d tokens
behind). Every decoding option is a ``GenerationConfig`` field handled by transformers (greedy, sampling,
top-k/top-p, temperature, repetition penalty, EOS per row, max new tokens, ...); this module adds only
what is specific to augmentation. The augmentation step itself is in ``augment.py``;
``CacheAugmentedLM.generate`` is :func:`generate`.

How the augmented cache reaches HF ``generate`` (docs/design.md §1.2). The cache holds N_L latent entries
that have no token id, and with "refeed" (or left padding) position ids differ from cache indices, so the
cache cannot simply be handed over with the prompt ids. ``generate`` can, however, continue from a cache
with ``inputs_embeds`` that span the whole sequence and reads only the part past the cache: the latents
(with "refeed": the latents and x[p] again) are that part, so the decoder's pass over the latents is
``generate``'s own first forward and its next-token logits go through the logits processors like every
other step. The part under the cache is a placeholder ``generate`` never reads. Explicit ``position_ids``
(the latents' positions; ``generate`` continues them +1 per token) and an ``attention_mask`` over cache +
latents (the prompt's mask, ones for the latents; ``generate`` appends a one per token) keep every row
exactly where it would be alone, for both conventions and left-padded batches. The prompt ids are
``generate``'s ``input_ids``, so the logits processors (repetition penalty, ...) and stopping criteria
see the real tokens and no latent. The frozen baseline (``augment=False``) is ``decoder.generate`` itself.

Re-augmenting every K tokens replaces the cache in the middle of decoding, which ``generate``'s loop
cannot do. It runs through ``generate(custom_generate=...)`` (a public hook: ``generate`` builds the
logits processors and stopping criteria from the config, then calls our loop): our loop keeps the cache,
positions and re-augmentation, transformers' processors choose every token, and the choice (argmax, or
sampling from the processed scores) and the per-row finishing follow ``generate``'s own sampling loop, so
both paths give the same tokens (``tests/core/test_hf_generation.py``).

Semantics (our reading of the paper; its appendix on asynchronous augmentation gives no pseudo-code):

* Every augmentation at the current length L (last real token p = L-1) matches training exactly: the
  coprocessor reads a cache of *real tokens only*, computed without any latents, and the decoder gets
  ``[real tokens 0..p, latents]`` ("insert"; "refeed": ``[0..p-1, latents, x[p]]``). Earlier latents are
  dropped at a re-augmentation: no training trace ever saw two sets of latents. So re-augmenting every
  K tokens equals calling ``augment()`` on the whole text so far every K tokens, but costs only a
  K-token decoder pass (to bring the latent-free cache up to date) plus the coprocessor call.
* Asynchronous, delay d: the coprocessor reads the cache of x[0..p-d] (its soft tokens take the
  positions they would have at p-d) while the decoder reads on to x[p]; the latents are inserted after
  x[p] as usual. With d=0 this is the synchronous case.
* Prompts of different lengths: left-padded with an ``attention_mask`` (``augment.py``); every row
  generates what it would alone. As in HF ``generate``, a row that has emitted EOS is filled with the
  pad token (the config's ``pad_token_id``, else its first EOS id) while the others go on.
* Defaults are HF ``generate``'s: the decoder's own ``generation_config`` fills what the call leaves
  unset (so EOS is the decoder's unless ``eos_token_id`` is given); ``max_new_tokens`` defaults to 32.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationConfig
from transformers.generation import (
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from .augment import (
    CleanCache,
    augment_at,
    augmented_mask,
    check_attention_mask,
    check_delay,
    check_padded_delay,
    check_prompt,
    latent_inputs,
)
from .hf_compat import cache_arg
from .stopping import StopRule, StopRuleCriterion

DEFAULT_MAX_NEW_TOKENS = 32


@dataclass
class GenerationStats:
    augmentations: int = 0
    new_tokens: int = 0


class StopCallback(StoppingCriteria):
    """``stop(generated_ids [B, t]) -> bool`` (the ids after the prompt) as a stopping criterion: True
    finishes every row at once."""

    def __init__(self, stop, prompt_length: int):
        self.stop, self.prompt_length = stop, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = bool(self.stop(input_ids[:, self.prompt_length :]))
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def build_generation_config(
    decoder: nn.Module,
    generation_config: GenerationConfig | None,
    max_new_tokens: int | None,
    options: dict,
) -> GenerationConfig:
    """The call's ``GenerationConfig``: a copy of ``generation_config`` (or an empty one) updated with the
    HF-style ``options`` (``do_sample=``, ``top_k=``, ...). Unset fields stay None: ``generate`` fills them
    from the decoder's ``generation_config``. Kept from this package's earlier API: ``temperature > 0``
    without ``do_sample`` means sampling, ``temperature <= 0`` greedy. Unknown options, beam search and
    several sequences per prompt are refused with a ValueError."""
    config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    options = dict(options)
    temperature = options.get("temperature")
    if temperature is not None and options.get("do_sample") is None and config.do_sample is None:
        options["do_sample"] = temperature > 0
        if temperature <= 0:
            del options["temperature"]  # greedy: HF would warn about an unused temperature
    unknown = config.update(**options)
    if unknown:
        raise ValueError(
            f"unknown generation option(s) {sorted(unknown)}: pass GenerationConfig fields "
            "(do_sample, temperature, top_k, top_p, repetition_penalty, eos_token_id, stop_strings, ...)"
        )
    if max_new_tokens is not None:
        config.max_new_tokens = max_new_tokens
    elif config.max_new_tokens is None and config.max_length is None:
        config.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    defaults = decoder.generation_config
    for name in ("num_beams", "num_return_sequences"):
        value = getattr(config, name)
        source = "" if value is not None else " (from the decoder's generation_config)"
        value = value if value is not None else getattr(defaults, name, None)
        if value is not None and value > 1:
            raise ValueError(
                f"{name}={value}{source}: cache-augmented generation decodes one sequence per prompt "
                f"(greedy or sampling); pass {name}=1"
            )
    return config


@contextlib.contextmanager
def _seeded(generator: torch.Generator | None, device: torch.device):
    """Sampling draws from torch's global RNG (as in HF ``generate``); a ``generator`` (kept from the
    earlier API) seeds it for this call only and leaves the global state as it was."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    devices = (
        []
        if device.type != "cuda"
        else [device.index if device.index is not None else torch.cuda.current_device()]
    )
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def generate(
    model: nn.Module,  # a CacheAugmentedLM (model.py imports this module, so no import back)
    input_ids: torch.Tensor,
    max_new_tokens: int | None = None,
    *,
    augment: bool = True,
    reaugment_every: int | None = None,
    async_delay: int | None = None,
    generation_config: GenerationConfig | None = None,
    attention_mask: torch.Tensor | None = None,
    tokenizer=None,
    stop=None,
    logits_processor: LogitsProcessorList | None = None,
    stopping_criteria: StoppingCriteriaList | None = None,
    generator: torch.Generator | None = None,
    stats: GenerationStats | None = None,
    logits_out: list | None = None,
    **generation_options,
) -> torch.Tensor:
    """[B, L + new] prompt followed by generated tokens (prompts of equal length L, or left-padded to L
    with ``attention_mask`` [B, L], 1 = token, 0 = pad: each row then generates what it would alone;
    without a mask every token is real, pad ids are not guessed). ``new`` is less than
    ``max_new_tokens`` when every row has stopped.

    Decoding options are HF's: ``generation_config=GenerationConfig(...)`` and/or keyword arguments with
    its field names (``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``,
    ``eos_token_id``, ``pad_token_id``, ``stop_strings`` (with ``tokenizer=``), ``min_new_tokens``, ...);
    what is left unset comes from the decoder's ``generation_config``, as in HF ``generate``.
    ``temperature > 0`` without ``do_sample`` samples. ``logits_processor`` / ``stopping_criteria``: extra
    HF processors and criteria, as in HF ``generate``.

    ``augment=False``: the frozen decoder alone (HF ``generate`` of the decoder). ``reaugment_every=K``:
    augment again after every K generated tokens. ``async_delay=d``: latents come from the cache d tokens
    behind (default: the model's own ``async_delay``, set by the "async" variant, else 0). ``stop``:
    optional callable ``stop(generated_ids [B, t]) -> bool`` checked after each token; True ends every
    row. ``generator``: seeds sampling for this call (else torch's global RNG, as in HF). ``logits_out``:
    a list that receives the raw next-token logits [B, V] (fp32) of every step (tests/analysis).
    """
    check_prompt(input_ids)
    mask = check_attention_mask(input_ids, attention_mask)
    if max_new_tokens is not None and max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if async_delay is None:
        async_delay = int(getattr(model, "async_delay", 0))
    if reaugment_every is not None and reaugment_every < 1:
        raise ValueError(f"reaugment_every must be >= 1, got {reaugment_every}")
    if async_delay < 0:
        raise ValueError(f"async_delay must be >= 0, got {async_delay}")
    augment = augment and model.num_latents > 0  # nothing to write (base_lm): plain decoding
    if augment:
        if mask is None:
            check_delay(input_ids.shape[1], async_delay)
        else:
            check_padded_delay(mask, async_delay)
    stats = stats if stats is not None else GenerationStats()
    dec = model.decoder
    config = build_generation_config(dec, generation_config, max_new_tokens, generation_options)
    if config.max_new_tokens == 0:
        return input_ids
    n = input_ids.shape[1]
    criteria = StoppingCriteriaList(stopping_criteria or [])
    if config.stop_strings is not None:
        # The project's one stop rule (core/stopping.py), not HF's StopStringCriteria: the commands cut their
        # text by the same rule, and it needs only decode(). Built here, not by generate: generate drops
        # ``tokenizer=`` when given ``custom_generate`` (5.17-5.24).
        criteria.append(StopRuleCriterion(StopRule(strings=config.stop_strings), tokenizer, n))
        config.stop_strings = None
    if stop is not None:
        criteria.append(StopCallback(stop, n))
    if logits_out is not None:
        config.return_dict_in_generate, config.output_logits = True, True
    hf_kwargs = dict(
        generation_config=config,
        logits_processor=logits_processor,
        stopping_criteria=criteria,
        # Always explicit: without a mask HF would guess one from pad ids in the prompt.
        attention_mask=mask if mask is not None else torch.ones_like(input_ids),
    )
    with _seeded(generator, input_ids.device):
        if augment and reaugment_every is not None:
            loop = _reaugmenting_loop(model, mask, reaugment_every, async_delay, stats, logits_out)
            out = dec.generate(input_ids, custom_generate=loop, **hf_kwargs)
        else:
            if augment:
                _check_cache_implementation(config, dec)
                hf_kwargs.update(_continue_from_latents(model, input_ids, async_delay, mask))
                stats.augmentations += 1
            if logits_out is not None:
                config.return_dict_in_generate, config.output_logits = True, True
            out = dec.generate(input_ids, **hf_kwargs)
            if logits_out is not None:
                logits_out.extend(out.logits)
    ids = out if torch.is_tensor(out) else out.sequences
    stats.new_tokens += ids.shape[1] - n
    return ids


def _check_cache_implementation(config: GenerationConfig, decoder: nn.Module) -> None:
    """Continuing from the augmented cache needs ``generate`` to take our DynamicCache: a ValueError when
    the call or the decoder's ``generation_config`` asks for a cache of another kind ("hybrid", the old
    Gemma-2 default, ``generate`` itself ignores)."""
    asked = config.cache_implementation
    source = ""
    if asked is None:
        asked, source = (
            decoder.generation_config.cache_implementation,
            " (from the decoder's generation_config)",
        )
    if asked not in (None, "hybrid"):
        raise ValueError(
            f"cache_implementation={asked!r}{source}: augmented decoding continues from the DynamicCache that "
            "augmentation wrote; set model.decoder.generation_config.cache_implementation = None"
        )


def _continue_from_latents(model, input_ids: torch.Tensor, delay: int, mask: torch.Tensor | None) -> dict:
    """HF ``generate`` arguments that make its first forward the decoder's pass over the latents (module
    docstring): the latent-free cache, ``inputs_embeds`` over cache + latents (a placeholder under the
    cache, never read), the latents' ``position_ids`` and the mask over cache + latents."""
    li = latent_inputs(model, CleanCache(model.decoder), input_ids, delay, mask)
    b, _, hidden = li.inputs_embeds.shape
    past = li.cache.get_seq_length()  # what generate subtracts to find the new inputs
    embeds = torch.cat([li.inputs_embeds.new_zeros(b, past, hidden), li.inputs_embeds], 1)
    positions = torch.cat([li.position_ids.new_zeros(b, past), li.position_ids], 1)
    cache_mask = li.attention_mask
    if cache_mask is None:
        cache_mask = torch.ones(b, embeds.shape[1], dtype=torch.long, device=input_ids.device)
    return dict(
        inputs_embeds=embeds, position_ids=positions, attention_mask=cache_mask, **cache_arg(li.cache)
    )


def _pad_token(config: GenerationConfig) -> int | None:
    """The id HF ``generate`` writes into finished rows: ``pad_token_id``, else the first EOS id."""
    if config.pad_token_id is not None:
        return int(config.pad_token_id)
    eos = config.eos_token_id
    return int(eos[0] if isinstance(eos, (list, tuple)) else eos) if eos is not None else None


def _reaugmenting_loop(model, mask, every: int, delay: int, stats: GenerationStats, logits_out):
    """The decoding loop handed to ``generate(custom_generate=...)`` for re-augmentation every ``every``
    tokens: ``generate`` has built the logits processors and stopping criteria from the config; this loop
    keeps the cache, positions and masks, and chooses and finishes rows as ``generate``'s sampling loop
    does (argmax or a multinomial draw from the processed scores; rows finished by a criterion get the
    pad token when an EOS criterion is present)."""

    def decode(decoder, input_ids, logits_processor, stopping_criteria, generation_config, **model_kwargs):
        # model_kwargs (generate's own cache, positions, mask) are unused: augment_at builds the cache.
        b, n_l = input_ids.shape[0], model.num_latents
        clean = CleanCache(decoder)
        has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)  # as generate decides
        pad = _pad_token(generation_config)
        unfinished = torch.ones(b, dtype=torch.bool, device=input_ids.device)
        ids, ids_mask, generated = input_ids, mask, 0
        while True:
            if generated % every == 0:
                cache, logits, next_pos = augment_at(model, clean, ids, delay, attention_mask=ids_mask)
                cache_mask = None if ids_mask is None else augmented_mask(ids_mask, n_l)
                stats.augmentations += 1
            if logits_out is not None:
                logits_out.append(logits)
            scores = logits_processor(ids, logits)
            if generation_config.do_sample:
                tok = torch.multinomial(torch.softmax(scores, -1), num_samples=1)[:, 0]
            else:
                tok = scores.argmax(-1)
            if has_eos:
                tok = torch.where(unfinished, tok, torch.full_like(tok, pad))
            ids = torch.cat([ids, tok[:, None]], 1)
            if ids_mask is not None:
                ids_mask = torch.cat([ids_mask, ids_mask.new_ones(b, 1)], 1)
            generated += 1
            unfinished &= ~stopping_criteria(ids, None)
            if not bool(unfinished.any()):
                return ids
            if generated % every == 0:
                continue  # augment again at the top, from the text so far
            if cache_mask is None:
                pos, extra = torch.full((b, 1), next_pos, device=ids.device), {}
            else:
                cache_mask = torch.cat([cache_mask, cache_mask.new_ones(b, 1)], 1)
                pos, extra = next_pos[:, None], {"attention_mask": cache_mask}
            out = decoder(
                input_ids=tok[:, None], **cache_arg(cache), use_cache=True, position_ids=pos, **extra
            )
            logits = out.logits[:, -1].float()
            next_pos = next_pos + 1  # an int, or a [B] tensor (padded): never in place

    return decode
