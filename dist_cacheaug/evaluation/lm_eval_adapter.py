"""lm-evaluation-harness model ``cacheaug``: a checkpoint with augmentation at the end of each context.

lm-eval finds models in its registry, so this module must be imported before it resolves the name.
Either run lm-eval through this module (same arguments as ``lm_eval``)::

    python -m dist_cacheaug.evaluation.lm_eval_adapter run --model cacheaug \\
        --model_args checkpoint=runs/tiny_cpu,tokenizer=runs/demo_quick/data/tokenizer --tasks arc_easy \\
        --batch_size 16

or from Python: ``import dist_cacheaug.evaluation.lm_eval_adapter`` then ``lm_eval.simple_evaluate(model="cacheaug",
model_args="checkpoint=RUN_DIR", batch_size=16)``. Model args: ``checkpoint`` (run or export dir), ``decoder``,
``tokenizer`` (default: the run config's ``data.tokenizer``), ``device``, ``augment`` (default true),
``max_gen_toks`` (256), ``max_length`` (default: the decoder's ``max_position_embeddings``),
``reaugment_every``, ``async_delay``; lm-eval's ``batch_size`` (a number; ``auto`` is refused).

* ``loglikelihood``: the context is augmented, the continuation scored after the latents
  (``dist_cacheaug.evaluation.batching.score_batch``: the numbers our own evaluators use).
* ``generate_until``: generation with augmentation at the end of the context, cut at ``until``.
* ``loglikelihood_rolling`` (perplexity tasks): the frozen decoder alone over windows of
  ``max_length`` tokens — there is no single "end of context" to augment at.

Requests run ``batch_size`` at a time, longest first (generation: grouped by their generation
arguments), left-padded; results come back in lm-eval's order and equal one request at a time (scores
to float rounding, greedy text exactly; sampled text is random either way). An empty context reads
BOS (else EOS) in its place, as lm-eval's own models do; a continuation that encodes to no tokens is an
error; a context too long for ``max_length`` with the latents and the continuation (or ``max_gen_toks``)
is left-truncated, as lm-eval's models do, and a warning gives the count. One process: lm-eval's own
data parallelism (accelerate) is not wired here.

lm-eval is imported lazily: importing ``dist_cacheaug`` never needs it.
"""

from __future__ import annotations

import functools
import sys

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - exercised only without lm-eval
    raise ImportError(
        "dist_cacheaug.evaluation.lm_eval_adapter needs lm-evaluation-harness: pip install lm-eval"
    ) from e

from ..core.stopping import StopRule
from .batching import (
    check_batch_size,
    decoder_max_length,
    fit_context,
    generate_texts,
    pad_id_for,
    run_batched,
    score_batch,
    score_windows,
    tokens_after_context,
)
from .downstream import context_prefix, encode_pair
from .inference import InferenceError

MODEL_NAME = "cacheaug"


def _bool(v) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "y", "on")
    return bool(v)


def _warn_truncated(count: int, total: int, what: str, max_length: int) -> None:
    if count:
        print(
            f"cacheaug lm-eval: warning: {count} of {total} {what} contexts did not fit max_length {max_length} "
            "with the latents and the continuation / new tokens and were left-truncated",
            file=sys.stderr,
        )


@register_model(MODEL_NAME)
class CacheAugLM(LM):
    def __init__(
        self,
        checkpoint: str | None = None,
        decoder: str | None = None,
        tokenizer: str | None = None,
        device: str | None = None,
        augment: bool | str = True,
        max_gen_toks: int = 256,
        max_length: int | None = None,
        reaugment_every: int | None = None,
        async_delay: int | None = None,
        batch_size: int | str | None = 1,
        model=None,
        tokenizer_obj=None,
        **kwargs,  # max_batch_size, ... from lm-eval: not used
    ):
        super().__init__()
        from .inference import load_for_inference, load_tokenizer_for

        self.batch_size = check_batch_size(1 if batch_size is None else batch_size)
        if model is None:
            if checkpoint is None:
                raise ValueError("model_args must include checkpoint=RUN_DIR_OR_EXPORT")
            if device and str(device).startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's command line passes --device cuda:0 unless told otherwise; its own HF model
                # then falls back to the CPU too
                print(
                    f"cacheaug lm-eval: warning: device {device} asked for but CUDA is not available; using cpu",
                    file=sys.stderr,
                )
                device = "cpu"
            model, cfg = load_for_inference(checkpoint, decoder=decoder, device=device)
        else:
            cfg = None
        self.model = model
        self.tok = (
            tokenizer_obj if tokenizer_obj is not None else load_tokenizer_for(cfg, tokenizer, what="lm-eval")
        )
        self.augment = _bool(augment)
        self.max_gen_toks = int(max_gen_toks)
        self.max_length = int(max_length) if max_length else decoder_max_length(model)
        self.reaugment_every = int(reaugment_every) if reaugment_every else None
        self.async_delay = None if async_delay in (None, "") else int(async_delay)
        self.pad_id = pad_id_for(self.tok, model.decoder.config.vocab_size)
        self._device = next(model.decoder.parameters()).device

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tok, "identity", "cacheaug")

    def _fit(self, ids: list[int], fed: int, what: str) -> tuple[list[int], bool]:
        """``ids`` (or BOS/EOS when empty) left-truncated to leave room for the latents and ``fed`` tokens."""
        ids = ids or context_prefix(self.tok, self.model)
        return fit_context(ids, tokens_after_context(self.model, self.augment, fed), self.max_length, what)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs, truncated = [], 0
        for i, req in enumerate(requests):
            context, continuation = req.args[:2]
            ctx, cont = encode_pair(self.tok, context, continuation)
            if not cont:
                raise InferenceError(
                    f"lm-eval loglikelihood request {i}: the continuation {continuation!r} encodes to no tokens"
                )
            ctx, cut = self._fit(ctx, len(cont) - 1, f"lm-eval loglikelihood request {i}")
            truncated += cut
            pairs.append((ctx, cont))
        out = run_batched(
            lambda batch: score_batch(
                self.model, batch, augment=self.augment, pad_id=self.pad_id, async_delay=self.async_delay
            ),
            pairs,
            [(-len(c), tuple(c), -len(x)) for c, x in pairs],  # longest first, a context's requests together
            self.batch_size,
            progress=not disable_tqdm,
            desc="loglikelihood",
        )
        _warn_truncated(truncated, len(requests), "loglikelihood", self.max_length)
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", tuple(req.args[:2]), res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The plain decoder's log-likelihood of each whole document (lm-eval's perplexity tasks) in
        lm-eval's own rolling windows (as its HF model: up to ``max_length`` tokens of context per
        prediction, the first token predicted from BOS/EOS); every window of every document batched."""
        windows, owner = [], []
        (prefix,) = context_prefix(self.tok, self.model)
        for i, req in enumerate(requests):
            for context, targets in map(
                make_disjoint_window,
                get_rolling_token_windows(self.tok.encode(req.args[0]), prefix, self.max_length, 1),
            ):
                windows.append(((context + targets)[-(self.max_length + 1) :][:-1], targets))
                owner.append(i)
        sums = run_batched(
            lambda batch: score_windows(self.model.decoder, batch, pad_id=self.pad_id),
            windows,
            [-len(w) for w, _ in windows],
            self.batch_size,
            progress=not disable_tqdm,
            desc="loglikelihood_rolling",
        )
        out = [0.0] * len(requests)
        for i, total in zip(owner, sums):  # a document's windows in order, as one loop would add them
            out[i] += total
        for req, total in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[tuple, list[int]] = {}  # requests with the same generation arguments batch together
        prompts, truncated = [], 0
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args[0], dict(req.args[1] if len(req.args) > 1 else {})
            until = gen_kwargs.get("until") or []
            until = tuple(u for u in ((until,) if isinstance(until, str) else until) if u)
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            temperature = float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample") else 0.0
            top_p = float(gen_kwargs.get("top_p", 1.0))
            ids, cut = self._fit(self.tok.encode(context), max_new - 1, f"lm-eval generate_until request {i}")
            truncated += cut
            prompts.append(ids)
            groups.setdefault((until, max_new, temperature, top_p), []).append(i)
        texts: list[str | None] = [None] * len(requests)
        for (until, max_new, temperature, top_p), members in groups.items():
            group = [prompts[i] for i in members]
            group_texts = run_batched(
                functools.partial(
                    self._generate, until=until, max_new=max_new, temperature=temperature, top_p=top_p
                ),
                group,
                [-len(ids) for ids in group],
                self.batch_size,
                progress=not disable_tqdm,
                desc="generate_until",
            )
            for i, text in zip(members, group_texts):
                texts[i] = text
        _warn_truncated(truncated, len(requests), "generate_until", self.max_length)
        for req, text in zip(requests, texts):
            self.cache_hook.add_partial(
                "generate_until", (req.args[0], req.args[1] if len(req.args) > 1 else {}), text
            )
        return texts

    def _generate(self, batch, *, until, max_new, temperature, top_p) -> list[str]:
        # lm-eval's rule: the text ends before the first of ``until`` (the string itself is dropped)
        rule = StopRule.with_eos(getattr(self.tok, "eos_id", None), strings=until, keep_string=False)
        return generate_texts(
            self.model,
            self.tok,
            batch,
            max_new,
            rule,
            pad_id=self.pad_id,
            augment=self.augment,
            reaugment_every=self.reaugment_every,
            async_delay=self.async_delay,
            temperature=temperature,
            top_p=top_p,
        )


def main(argv: list[str] | None = None) -> None:
    """``lm_eval``'s own command line, with the ``cacheaug`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
