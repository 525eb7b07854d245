"""Where generated text stops: one rule that every generating command uses.

A completion ends at its first EOS token, or at the first stop string its decoded text contains, or,
with ``final`` (a regular expression), once the text runs past the end of that expression's first match.
The rule works on decoded text, so a stop string may span tokens, and it needs only a tokenizer's
``decode``. This project's sentencepiece wrapper and HF tokenizers both have one.

Who keeps the stop string:
- ``cacheaug generate`` and :func:`~dist_cacheaug.core.generation.generate`'s ``stop_strings`` keep
  it. That is HF's rule: the text runs to the end of the stop string.
- lm-eval's ``until`` and the GSM8K evaluator drop it: the text ends before the stop string.

The same rule does two jobs. It decides the step at which decoding a row ends (``text_ended``, with EOS),
and it cuts the row's text afterwards (``text``). So where a row stopped and what is printed cannot disagree.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers.generation import StoppingCriteria


@dataclass(frozen=True)
class StopRule:
    #: Token ids that end a completion (they are not part of its text).
    eos_ids: tuple[int, ...] = ()
    #: Strings that end a completion's text.
    strings: tuple[str, ...] = ()
    #: True: the text runs to the end of the first stop string (HF, ``cacheaug generate``). False: it ends
    #: before the stop string (lm-eval's ``until``).
    keep_string: bool = True
    #: A regular expression after whose first match the text ends (GSM8K: ``#### <number>``). The text
    #: has ended once something follows the match: a bare ``#### 4`` may still become ``#### 42``.
    final: str | None = None

    def __post_init__(self):
        strings = (self.strings,) if isinstance(self.strings, str) else tuple(self.strings)
        if not all(isinstance(s, str) and s for s in strings):
            raise ValueError(
                f"stop strings (stop_strings, --stop, until) must be non-empty strings, got {self.strings!r}"
            )
        object.__setattr__(self, "strings", strings)
        object.__setattr__(self, "eos_ids", tuple(int(e) for e in self.eos_ids))

    @classmethod
    def with_eos(cls, eos, **fields) -> StopRule:
        """A rule whose EOS ids are ``eos``: None, one id, or a list of ids (as HF configs hold them)."""
        ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
        return cls(eos_ids=ids, **fields)

    def cut(self, text: str) -> tuple[str, bool]:
        """(the completion's text, has it ended?) for the text decoded so far."""
        ended = False
        found = [(text.index(s), s) for s in self.strings if s in text]
        if found:
            ended = True
            if self.keep_string:  # the stop string that is complete first
                text = text[: min(i + len(s) for i, s in found)]
            else:
                text = text[: min(i for i, _ in found)]
        if self.final is not None:
            m = re.search(self.final, text)
            if m:
                ended = ended or m.end() < len(text)
                text = text[: m.end()]
        return text, ended

    @property
    def stops_text(self) -> bool:
        """Whether the rule ends text at all (stop strings or ``final``), beyond EOS."""
        return bool(self.strings or self.final)

    def token_end(self, tokens: Sequence[int]) -> int:
        """The index of the first EOS token in ``tokens``, or ``len(tokens)`` when there is none."""
        return next((i for i, t in enumerate(tokens) if t in self.eos_ids), len(tokens))

    def text_ended(self, tokenizer, tokens: Sequence[int]) -> bool:
        """Whether the text of ``tokens`` (EOS not considered) has reached a stop string or ``final``."""
        return self.stops_text and self.cut(tokenizer.decode(list(tokens)))[1]

    def text(self, tokenizer, tokens: Sequence[int]) -> str:
        """The completion's text: the tokens before the first EOS, decoded, then cut by :meth:`cut`."""
        return self.cut(tokenizer.decode(list(tokens[: self.token_end(tokens)])))[0]


class StopRuleCriterion(StoppingCriteria):
    """A :class:`StopRule`'s text part as an HF stopping criterion: a row finishes at the first step its
    generated text has ended (EOS stays HF's own criterion)."""

    def __init__(self, rule: StopRule, tokenizer, prompt_length: int):
        if tokenizer is None or not callable(getattr(tokenizer, "decode", None)):
            raise ValueError(
                "stop_strings need the tokenizer: pass tokenizer= (an HF tokenizer or one with decode())"
            )
        self.rule, self.tokenizer, self.prompt_length = rule, tokenizer, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = [self.rule.text_ended(self.tokenizer, row[self.prompt_length :].tolist()) for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
