"""Many requests per forward pass, for ``cacheaug downstream`` and the lm-eval adapter.

* **Plan** (:func:`run_batched`): requests are sorted longest first (the longest batch runs first, so
  an out-of-memory shows at once, and rows of one batch have similar lengths, so little padding), cut
  into batches of ``batch_size``, and the results come back in the caller's order. Data parallel,
  rank r of W runs batches r, r+W, ... and the results are all-gathered. The batches do not depend on
  W, so every request is computed in the very same batch whatever the number of ranks: the numbers
  equal a one-rank run's, bit for bit on the same kernels and thread count (tested on CPU).
* **Padding**: prompts of a batch are LEFT-padded and carry an attention mask; every row then runs as
  if alone (``core/augment.py``). The pad id (:func:`pad_id_for`) is never attended to and takes no
  position, so it does not change any number.
* **Scoring** (:func:`score_batch`): the distinct contexts of a batch are read (and augmented) once;
  each (context, continuation) row continues from its context's rows of that cache with its
  continuation RIGHT-padded (a row's pads come after all its tokens, so causal attention never reads
  them; their outputs are dropped).
* **Generation** (:func:`generate_texts`, the entry point of every generating command: ``cacheaug
  generate``, GSM8K, lm-eval's ``generate_until``): one ``generate`` call per batch; each row ends where
  that prompt decoded alone would end (its EOS, or the first step its text ends by the command's
  :class:`~dist_cacheaug.core.stopping.StopRule`), the batch ends when every row has (:class:`RowStops`),
  and the same rule cuts each row's text.
* **Length** (:func:`fit_context`): a context too long for the decoder's positions is LEFT-truncated
  (its most recent tokens kept, as lm-evaluation-harness does); the callers count and report it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..core.augment import augment_prompt, read_prompt
from ..core.cache import clone_cache
from ..core.generation import generate
from ..core.hf_compat import cache_arg
from ..core.stopping import StopRule
from .data_parallel import check_shard, gather_indexed
from .inference import InferenceError


# ---- plan ------------------------------------------------------------------------------------------
def check_batch_size(batch_size) -> int:
    """A positive int from an int or a digit string (lm-eval passes ``--batch_size`` as text)."""
    text = str(batch_size).strip()
    if text.startswith("auto"):
        raise InferenceError(
            f"batch_size={batch_size!r}: automatic batch sizes are not supported; give a number (e.g. 16)"
        )
    if not text.isdigit() or int(text) < 1:
        raise InferenceError(f"batch size must be a whole number >= 1, got {batch_size!r}")
    return int(text)


def plan_batches(sort_keys: Sequence, batch_size: int) -> list[list[int]]:
    """Request indices sorted by ``sort_keys`` (ascending, ties in request order), in batches."""
    order = sorted(range(len(sort_keys)), key=sort_keys.__getitem__)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def run_batched(
    fn: Callable[[list], list],
    requests: Sequence,
    sort_keys: Sequence,
    batch_size: int,
    *,
    shard: tuple[int, int] = (0, 1),
    progress: bool = False,
    desc: str = "",
) -> list:
    """``fn`` over batches of ``requests`` (a list in, one result per request out), results in request
    order. ``shard=(rank, world)``: this rank runs its share of the batches; every rank must call this
    and every rank gets all the results. Progress bar on rank 0 only (its own share)."""
    from data_tools.shards import progress_bar

    rank, world = check_shard(shard)
    batch_size = check_batch_size(batch_size)
    mine = plan_batches(sort_keys, batch_size)[rank::world]
    bar = progress_bar(
        total=sum(map(len, mine)),
        desc=desc if world == 1 else f"{desc} (rank {rank} of {world})",
        enabled=progress and rank == 0,  # and only on a terminal: never frames in a log file
    )
    local = []
    for batch in mine:
        out = fn([requests[i] for i in batch])
        if len(out) != len(batch):
            raise RuntimeError(f"a batch of {len(batch)} requests gave {len(out)} results")
        local.extend(zip(batch, out))
        bar.update(len(batch))
    bar.close()
    return gather_indexed(local, len(requests), world)


# ---- padding and length ----------------------------------------------------------------------------
def pad_id_for(tokenizer, vocab_size: int) -> int:
    """The id that left pads carry: the tokenizer's pad id when it has one inside the vocabulary, else
    0. It is masked out of every attention and takes no position, so any valid id gives the same
    numbers; it only has to index the embedding table."""
    pad = getattr(tokenizer, "pad_id", None)
    return int(pad) if isinstance(pad, int) and 0 <= pad < vocab_size else 0


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] ids and mask (1 = token) of non-empty rows, LEFT-padded to the longest."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        if not row:
            raise ValueError(f"row {r} of the batch is empty")
        ids[r, width - len(row) :] = torch.tensor(row)
        mask[r, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def right_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] ids and mask (1 = token) of rows RIGHT-padded to the longest: every row keeps positions
    0..len-1; an empty row is all padding."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[r, : len(row)] = 1
    return ids.to(device), mask.to(device)


def fit_context(ids: list[int], after: int, max_length: int, what: str) -> tuple[list[int], bool]:
    """(context, truncated?): the context LEFT-truncated so that it and the ``after`` tokens the
    decoder reads after it (latents, continuation or generated tokens) fit ``max_length`` positions;
    an InferenceError naming ``what`` when not even one context token fits."""
    room = max_length - after
    if room < 1:
        raise InferenceError(
            f"{what}: the {after} positions needed after the prompt (latents + answer or new tokens) leave "
            f"none for the prompt within max_length {max_length}; ask for fewer new tokens, or raise "
            "max_length if the decoder handles longer positions"
        )
    return (ids[-room:], True) if len(ids) > room else (ids, False)


def decoder_max_length(model) -> int:
    """Positions the decoder was built for (``max_position_embeddings``; 2048 when its config has
    none, lm-evaluation-harness's default)."""
    return int(getattr(model.decoder.config, "max_position_embeddings", None) or 2048)


def tokens_after_context(model, augment: bool, fed: int) -> int:
    """Cache entries after the context: the N_L latents (when augmenting) and ``fed`` tokens read
    after them (a continuation of n tokens reads n-1; n new tokens read n-1)."""
    return (model.num_latents if augment else 0) + max(fed, 0)


# ---- scoring ---------------------------------------------------------------------------------------
@torch.no_grad()
def score_batch(
    model,
    pairs: Sequence[tuple[list[int], list[int]]],
    *,
    augment: bool = True,
    pad_id: int = 0,
    async_delay: int | None = None,
) -> list[tuple[float, bool]]:
    """(sum of log-probs, greedy?) of each continuation after its context, for (context ids,
    continuation ids) pairs scored together; equal to one pair at a time
    (:func:`~dist_cacheaug.evaluation.downstream.continuation_logprobs`) to float rounding.
    ``async_delay``: latents from the cache that many tokens behind (default: the model's own)."""
    for ctx, cont in pairs:
        if not ctx or not cont:
            raise ValueError("every pair needs a non-empty context and continuation")
    dec = model.decoder
    device = next(dec.parameters()).device
    index = {}  # distinct contexts, in first-seen order -> their row in the context batch
    rows = [index.setdefault(tuple(ctx), len(index)) for ctx, _ in pairs]
    contexts = [list(c) for c in index]
    ids, mask = left_pad(contexts, pad_id, device)
    if augment and model.num_latents > 0:
        delay = int(getattr(model, "async_delay", 0)) if async_delay is None else async_delay
        a = augment_prompt(model, ids, delay, attention_mask=mask)
        cache, first, next_pos, cache_mask = a.past_key_values, a.logits, a.next_position, a.attention_mask
    else:
        cache, first = read_prompt(dec, ids, mask)
        next_pos, cache_mask = mask.sum(1), mask
    rows_t = torch.tensor(rows, device=device)
    first = first[rows_t]
    fed = [cont[:-1] for _, cont in pairs]  # the last token is predicted, never read
    width = max(map(len, fed))
    rest = None
    if width:
        cache = clone_cache(cache)
        cache.batch_select_indices(rows_t)  # rebinds the clone's layers; the original keeps its rows
        in_ids, in_mask = right_pad(fed, pad_id, device)
        lens = torch.tensor([max(len(f), 1) for f in fed])
        steps = torch.minimum(torch.arange(width)[None], lens[:, None] - 1)  # pads repeat the last position
        out = dec(
            input_ids=in_ids,
            attention_mask=torch.cat([cache_mask[rows_t], in_mask], 1),
            position_ids=next_pos[rows_t][:, None] + steps.to(device),
            **cache_arg(cache),
            use_cache=True,
        )
        rest = out.logits
    results = []
    for r, (_, cont) in enumerate(pairs):
        logits = first[r : r + 1]
        if len(cont) > 1:
            logits = torch.cat([logits, rest[r, : len(cont) - 1].float()], 0)
        logp = F.log_softmax(logits, -1)
        target = torch.tensor(cont, device=device)
        lp = logp.gather(1, target[:, None])[:, 0]
        results.append((float(lp.double().sum()), bool((logp.argmax(-1) == target).all())))
    return results


# ---- generation ------------------------------------------------------------------------------------
class RowStops:
    """Where each row of a batch decoded together ends: at the first t such that token t-1 is EOS or
    ``is_stop(tokens[:t])`` holds, which is exactly where ``generate`` stops that prompt decoded alone.
    As ``generate``'s ``stop`` callback it ends the batch once every row has ended; rows that ended
    earlier go on decoding, and :meth:`cut` drops what they wrote after their end."""

    def __init__(
        self, rows: int, is_stop: Callable[[list[int]], bool] | None, eos_id: int | list[int] | None
    ):
        self.is_stop = is_stop
        self.eos_ids = set() if eos_id is None else set(eos_id if isinstance(eos_id, list) else [eos_id])
        self.end: list[int | None] = [None] * rows
        self.checked = [0] * rows  # prefixes looked at so far, per row

    def __call__(self, generated: torch.Tensor) -> bool:
        for r, row in enumerate(generated.tolist()):
            t = self.checked[r]
            while self.end[r] is None and t < len(row):
                t += 1
                if row[t - 1] in self.eos_ids or (self.is_stop is not None and self.is_stop(row[:t])):
                    self.end[r] = t
            self.checked[r] = t
        return all(e is not None for e in self.end)

    def cut(self, generated: torch.Tensor) -> list[list[int]]:
        """Each row's tokens up to its end (all of them when it never ended)."""
        self(generated)
        return [row[:e] if e is not None else row for row, e in zip(generated.tolist(), self.end)]


@torch.no_grad()
def score_windows(decoder, windows: Sequence[tuple[list[int], list[int]]], pad_id: int = 0) -> list[float]:
    """Sum of log-probs of each window's targets, for (input ids, target ids) windows in which the last
    ``len(targets)`` inputs predict the targets (lm-eval's rolling windows), read together by the plain
    decoder (no latents). Right-padded with a mask: every row's tokens keep positions 0..len-1, as alone,
    and no real token attends to a pad, so each sum equals its window alone to float rounding."""
    for r, (w, t) in enumerate(windows):
        if not t or len(t) > len(w):
            raise ValueError(f"window {r}: {len(t)} targets for {len(w)} inputs")
    ids, mask = right_pad([w for w, _ in windows], pad_id, next(decoder.parameters()).device)
    logits = decoder(input_ids=ids, attention_mask=mask, use_cache=False).logits
    sums = []
    for r, (w, t) in enumerate(windows):
        logp = F.log_softmax(logits[r, len(w) - len(t) : len(w)].float(), -1)
        sums.append(float(logp.gather(1, torch.tensor(t, device=logp.device)[:, None]).sum()))
    return sums


@torch.no_grad()
def generate_batch(
    model,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    *,
    pad_id: int = 0,
    eos_id: int | list[int] | None = None,
    is_stop: Callable[[list[int]], bool] | None = None,
    **gen_kwargs,
) -> list[list[int]]:
    """The new tokens of each prompt, decoded together from a left-padded batch, each equal to that
    prompt decoded alone (greedy). ``is_stop(tokens) -> bool``: a row ends at the first step it holds
    (that token included); ``gen_kwargs``: ``generate``'s augment, reaugment_every, async_delay,
    temperature, top_p."""
    device = next(model.decoder.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    if eos_id is None:  # ``generate`` then stops at the decoder's own EOS (HF's rule): so do the rows
        eos_id = model.decoder.generation_config.eos_token_id
    stops = RowStops(len(prompts), is_stop, eos_id)
    out = generate(
        model,
        ids,
        max_new_tokens,
        attention_mask=mask,
        eos_token_id=eos_id,
        stop=stops if is_stop is not None else None,
        **gen_kwargs,
    )
    return stops.cut(out[:, ids.shape[1] :])


@torch.no_grad()
def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    rule: StopRule,
    *,
    pad_id: int = 0,
    **gen_kwargs,
) -> list[str]:
    """The completion text of each prompt, decoded together, ended and cut by ``rule``: a row stops
    decoding at its first EOS (the rule's, else the decoder's) or the first step its text has ended, and
    its text is :meth:`StopRule.text` of what it generated. ``gen_kwargs``: as :func:`generate_batch`."""
    if not rule.eos_ids:  # the decoder's own EOS (HF's default) ends the rows and cuts their text
        decoder_eos = StopRule.with_eos(model.decoder.generation_config.eos_token_id).eos_ids
        rule = dataclasses.replace(rule, eos_ids=decoder_eos)
    new = generate_batch(
        model,
        prompts,
        max_new_tokens,
        pad_id=pad_id,
        eos_id=list(rule.eos_ids) or None,
        is_stop=(lambda t: rule.text_ended(tokenizer, t)) if rule.stops_text else None,
        **gen_kwargs,
    )
    return [rule.text(tokenizer, t) for t in new]
