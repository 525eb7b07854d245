"""The one rule for where generated text stops (core/stopping.py): stop strings kept or dropped, a final
answer pattern, EOS, bad strings; and every generating command goes through it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dist_cacheaug.core.stopping import StopRule

PACKAGE = Path(__file__).resolve().parents[2] / "dist_cacheaug"


class Chars:
    """One token per character: ids are code points."""

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_stop_strings_are_kept_to_the_first_complete_one_or_dropped_from_the_first_start():
    keep = StopRule(strings=("cde", "b"))
    assert keep.cut("abcdef") == ("ab", True)  # "b" is complete first
    assert StopRule(strings=("bcd", "c")).cut("abcdef") == ("abc", True)
    drop = StopRule(strings=("cd", "bcx"), keep_string=False)
    assert drop.cut("abcdef") == ("ab", True)
    assert drop.cut("xyz") == ("xyz", False)
    assert StopRule(strings="\n").strings == ("\n",)  # one string, as HF accepts it


def test_final_pattern_ends_the_text_once_something_follows_it():
    rule = StopRule(strings=("Question:",), keep_string=False, final=r"####\s*\d+")
    assert rule.cut("2 + 2 = 4.\n#### 4") == ("2 + 2 = 4.\n#### 4", False)  # may still become 42
    assert rule.cut("2 + 2 = 4.\n#### 42\n") == ("2 + 2 = 4.\n#### 42", True)
    assert rule.cut("#### 4 Question: #### 9") == ("#### 4", True)
    assert rule.cut("no answer yet") == ("no answer yet", False)


def test_eos_ends_the_tokens_and_is_not_text():
    tok = Chars()
    rule = StopRule.with_eos([0, 1], strings=("cd",))
    assert (
        rule.eos_ids == (0, 1)
        and StopRule.with_eos(None).eos_ids == ()
        and StopRule.with_eos(5).eos_ids == (5,)
    )
    ids = [ord(c) for c in "abc"] + [1] + [ord(c) for c in "cd"]
    assert rule.token_end(ids) == 3 and rule.text(tok, ids) == "abc"  # the stop after EOS never counts
    assert rule.text_ended(tok, [ord("c"), ord("d")]) is True  # a string spanning two tokens
    assert StopRule(eos_ids=(1,)).text_ended(tok, [1]) is False  # EOS is the token rule's, not the text's


@pytest.mark.parametrize("bad", [("",), ("ok", ""), (None,)])
def test_bad_stop_strings_are_one_clear_error(bad):
    with pytest.raises(ValueError, match="stop strings .* must be non-empty strings"):
        StopRule(strings=bad)


def test_every_generating_command_uses_the_one_entry_point():
    """Text stops are decided in one place: no module but batching.py calls generate_batch, no module but
    core/stopping.py cuts text at a stop string, and the three commands call generate_texts."""
    sources = {p.relative_to(PACKAGE).as_posix(): p.read_text() for p in PACKAGE.rglob("*.py")}
    assert [m for m, s in sources.items() if re.search(r"\bgenerate_batch\(", s)] == [
        "evaluation/batching.py"
    ]
    for module in ("evaluation/generate_cmd.py", "evaluation/downstream.py", "evaluation/lm_eval_adapter.py"):
        assert "generate_texts(" in sources[module], module
    cutters = [
        m for m, s in sources.items() if re.search(r"StoppingCriteria\)|\.split\(u\b|def truncate_at", s)
    ]
    assert sorted(cutters) == ["core/generation.py", "core/stopping.py"]
