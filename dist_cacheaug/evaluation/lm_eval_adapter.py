"""lm-evaluation-harness model ``cacheaug``: a checkpoint with augmentation at the end of each context.

lm-eval finds models in its registry, so this module must be imported before it resolves the name.
Either run lm-eval through this module (same arguments as ``lm_eval``)::

    python -m dist_cacheaug.evaluation.lm_eval_adapter run --model cacheaug \\
        --model_args checkpoint=runs/tiny_cpu,tokenizer=runs/demo_quick/data/tokenizer --tasks arc_easy

or from Python: ``import dist_cacheaug.evaluation.lm_eval_adapter`` then ``lm_eval.simple_evaluate(model="cacheaug",
model_args="checkpoint=RUN_DIR")``. Model args: ``checkpoint`` (run or export dir), ``decoder``,
``tokenizer`` (default: the run config's ``data.tokenizer``), ``device``, ``augment`` (default true),
``max_gen_toks`` (256), ``max_length`` (default: the decoder's ``max_position_embeddings``),
``reaugment_every``, ``async_delay``.

* ``loglikelihood``: the context is augmented once, the continuation scored after the latents
  (``dist_cacheaug.evaluation.downstream.continuation_logprobs``: the numbers our own evaluators use).
* ``generate_until``: greedy generation with augmentation at the end of the context, cut at ``until``.
* ``loglikelihood_rolling`` (perplexity tasks): the frozen decoder alone over windows of
  ``max_length`` tokens — there is no single "end of context" to augment at.

lm-eval is imported lazily: importing ``dist_cacheaug`` never needs it.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without lm-eval
    raise ImportError(
        "dist_cacheaug.evaluation.lm_eval_adapter needs lm-evaluation-harness: pip install lm-eval"
    ) from e

from ..core.generation import generate
from .downstream import context_prefix, continuation_logprobs, encode_pair

MODEL_NAME = "cacheaug"


def _bool(v) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "y", "on")
    return bool(v)


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
        async_delay: int = 0,
        model=None,
        tokenizer_obj=None,
        **kwargs,  # batch_size, max_batch_size, ... from lm-eval: one request at a time here
    ):
        super().__init__()
        from .inference import load_for_inference, load_tokenizer_for

        if model is None:
            if checkpoint is None:
                raise ValueError("model_args must include checkpoint=RUN_DIR_OR_EXPORT")
            model, cfg = load_for_inference(checkpoint, decoder=decoder, device=device)
        else:
            cfg = None
        self.model = model
        self.tok = (
            tokenizer_obj if tokenizer_obj is not None else load_tokenizer_for(cfg, tokenizer, what="lm-eval")
        )
        self.augment = _bool(augment)
        self.max_gen_toks = int(max_gen_toks)
        dec_max = getattr(model.decoder.config, "max_position_embeddings", None) or 2048
        self.max_length = int(max_length) if max_length else int(dec_max)
        self.reaugment_every = int(reaugment_every) if reaugment_every else None
        self.async_delay = int(async_delay)
        self._device = next(model.decoder.parameters()).device

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tok, "identity", "cacheaug")

    def _ctx_budget(self, cont_len: int) -> int:
        latents = self.model.num_latents if self.augment else 0
        return max(1, self.max_length - latents - cont_len)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from tqdm.auto import tqdm

        out = []
        for req in tqdm(requests, disable=disable_tqdm, file=sys.stderr, desc="loglikelihood"):
            context, continuation = req.args[:2]
            ctx, cont = encode_pair(self.tok, context, continuation)
            ctx = (ctx or context_prefix(self.tok, self.model))[-self._ctx_budget(len(cont)) :]
            res = continuation_logprobs(self.model, ctx, [cont], augment=self.augment)[0]
            self.cache_hook.add_partial("loglikelihood", (context, continuation), res)
            out.append(res)
        return out

    @torch.no_grad()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        dec = self.model.decoder
        out = []
        for req in requests:
            ids = context_prefix(self.tok, self.model) + self.tok.encode(req.args[0])
            total, start = 0.0, 1
            while start < len(ids):  # predict ids[start:end] from up to max_length tokens before them
                end = min(len(ids), start + self.max_length - 1)
                lo = max(0, end - self.max_length)
                window = torch.tensor([ids[lo:end]], device=self._device)
                logp = F.log_softmax(dec(input_ids=window).logits[0].float(), -1)
                tgt = torch.tensor(ids[start:end], device=self._device)
                rows = torch.arange(start - lo - 1, end - lo - 1, device=self._device)
                total += float(logp[rows].gather(1, tgt[:, None]).sum())
                start = end
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tqdm.auto import tqdm

        out = []
        for req in tqdm(requests, disable=disable_tqdm, file=sys.stderr, desc="generate_until"):
            context, gen_kwargs = req.args[0], dict(req.args[1] if len(req.args) > 1 else {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            temperature = float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample") else 0.0
            ids = self.tok.encode(context) or context_prefix(self.tok, self.model)
            ids = ids[-self._ctx_budget(max_new) :]
            n = len(ids)

            def stop(gen_ids, until=until):
                text = self.tok.decode(gen_ids[0].tolist())
                return any(u in text for u in until)

            gen = generate(
                self.model,
                torch.tensor([ids], device=self._device),
                max_new,
                augment=self.augment,
                reaugment_every=self.reaugment_every,
                async_delay=self.async_delay,
                temperature=temperature,
                top_p=float(gen_kwargs.get("top_p", 1.0)),
                eos_token_id=getattr(self.tok, "eos_id", None),
                stop=stop if until else None,
            )
            text = self.tok.decode(gen[0, n:].tolist())
            for u in until:
                text = text.split(u, 1)[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


def main(argv: list[str] | None = None) -> None:
    """``lm_eval``'s own command line, with the ``cacheaug`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
