"""The README's commands, from a fresh clone, in the order a reader meets them.

Every ```bash block of README.md is read line by line (a line that is only a comment continues the one
before). Each command is then either

- **run**, in README order, in a directory that looks like a fresh clone (the repository's tracked files,
  no ``runs/``, nothing built): the trailing ``# comment`` and every optional ``[...]`` group are dropped
  and placeholders (``RUN_DIR``, ``VAL_SHARDS``, ``FILE``, ...) are filled from :data:`PLACEHOLDERS`, which
  point at what earlier README commands built; training commands get ``--set train.max_steps=2`` (this
  test checks that they start on the data the README told the reader to build and that they export,
  not how far they train); or
- **skipped, with the reason stated**: a block preceded by ``<!-- readme-test: skip REASON -->`` (the
  marker convention, also in the README's Tests section), or a command matching :data:`SKIP` (it needs
  a GPU, a SLURM cluster, the network, or much longer than a test may take).

A command with a placeholder this test cannot fill fails it, naming the README line: a new README
command is run from then on, or gets a reason to be skipped. Then every shipped config (configs/**, but
those in :data:`NOT_TRAINED`, each with its reason) trains a step on the data those commands built.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->")

#: What the README's placeholders stand for when this test runs them: things earlier commands built.
PLACEHOLDERS = {
    "RUN_DIR": "runs/tiny_cpu",  # `cacheaug train --config configs/tiny_cpu.yaml` (Training)
    "VAL_SHARDS": "runs/ablations/data/shards",  # the shards built right before it (Training)
    "TOK": "runs/ablations/data/tokenizer",
    "C": "configs/tiny_cpu.yaml",
    "FILE": "runs/readme_test/gsm8k.jsonl",  # GSM8K-format problems this test writes (gsm8k_file)
    "test.jsonl": "runs/readme_test/gsm8k.jsonl",
    "arc.jsonl": "tests/fixtures/mc_arc_tiny.jsonl",
    "OUT_DIR": "runs/out",
    "N": "2",  # processes per launcher: two CPU ranks
}

#: (pattern searched in the command, why this test does not run it). GPU- and SLURM-only commands have
#: their own tests, which skip without a GPU or a cluster (markers gpu, slurm).
SKIP = [
    (
        r"^(srun|sbatch)\b|^cacheaug slurm\b",
        "needs a SLURM cluster (tests/train/test_slurm.py, marker slurm)",
    ),
    (r"gpu_check\.sh|--device cuda|-m gpu\b", "needs a GPU (tests/test_gpu.py, marker gpu)"),
    (r"^cacheaug bench train .*gemma2_\w+_paper", "the paper's shapes (2B parameters): a GPU"),
    (
        r"lm_eval_adapter run\b",
        "downloads its task from the Hugging Face Hub; tests/evaluation runs the adapter offline",
    ),
    (r"bench/real_widths\.py", "real widths: about 20 GiB of RAM and many minutes"),
    (r"bench/checkpoint_memory\.py", "4 ranks of a 318M-parameter coprocessor: about 15 GiB of RAM"),
    (r"bench/ablations\.py", "about 16 minutes; docs/ablations.md records its run"),
    (
        r"bench/(core|loader|train|masks|shards|generate|generate_batch|shard_decoder)\.py",
        "a benchmark: minutes of repeated timings, no pass/fail",
    ),
    (r"^python -m pytest\b", "a part of this test suite, which runs it anyway"),
]
TRAIN = re.compile(r"^(cacheaug train|launchers/local\.sh)\b")
TRAIN_STEPS = 2


@dataclass
class Command:
    line: int  # 1-based line in README.md
    text: str  # as written, comment dropped
    skip: str | None  # the reason it is not run, or None

    def words(self) -> list[str]:
        """The command's words without its optional ``[...]`` groups."""
        out, depth = [], 0
        for tok in shlex.split(self.text):
            if tok.startswith("["):
                depth += tok.count("[")
            if depth == 0:
                out.append(tok)
            elif tok.endswith("]"):
                depth -= tok.count("]")
        return out

    def argv(self) -> list[str]:
        """The command as this test runs it: optional groups dropped, placeholders filled."""
        out = [PLACEHOLDERS.get(tok, _fill(tok)) for tok in self.words()]
        if TRAIN.match(" ".join(out)):
            out += ["--set", f"train.max_steps={TRAIN_STEPS}"]
        left = [t for t in out if re.fullmatch(r"[A-Z][A-Z0-9_]*", t)]
        if left:
            raise AssertionError(
                f"README.md:{self.line}: `{self.text}` has placeholders {left} this test cannot fill: add them "
                "to tests/test_readme.py's PLACEHOLDERS, or skip the block with <!-- readme-test: skip REASON -->"
            )
        return out


def _fill(token: str) -> str:
    """Placeholders inside a token (``checkpoint=RUN_DIR,tokenizer=TOK``)."""
    names = "|".join(re.escape(k) for k in PLACEHOLDERS if re.fullmatch(r"[A-Z_]{2,}", k))
    return re.sub(rf"(?<![A-Za-z0-9_])({names})(?![A-Za-z0-9_])", lambda m: PLACEHOLDERS[m.group(1)], token)


def readme_commands(text: str) -> list[Command]:
    lines = text.splitlines()
    commands: list[Command] = []
    pending: list[str] = []  # readme-test markers right above the next block
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped.startswith("```"):
            lang = stripped[3:].strip()
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```"))
            if lang == "bash":
                skip = next(
                    (m[len("skip") :].strip() or "skip" for m in pending if m.startswith("skip")), None
                )
                for j in range(i + 1, end):
                    code = lines[j].split(" #", 1)[0].strip() if not lines[j].lstrip().startswith("#") else ""
                    if code:
                        commands.append(Command(j + 1, code, skip))
            pending = []
            i = end + 1
            continue
        m = MARKER.fullmatch(stripped)  # a marker is a line of its own
        if m:
            pending.append(m.group(1))
        elif stripped and not stripped.startswith("<!--"):
            pending = []
        i += 1
    return commands


def skip_reason(cmd: Command) -> str | None:
    if cmd.skip:
        return cmd.skip
    text = " ".join(cmd.words())  # what would run: `bench/masks.py [--device cuda]` runs on the CPU
    return next((why for pattern, why in SKIP if re.search(pattern, text)), None)


def gsm8k_file(path: Path, count: int = 9) -> None:
    """``count`` generated problems in GSM8K's format (the reader's own test.jsonl): one more than the
    8 few-shot exemplars `cacheaug downstream` takes from it by default."""
    import random

    from data_tools.synthetic import make_problem

    rng = random.Random(0)
    rows = []
    for _ in range(count):
        p = make_problem(rng, rng.randint(1, 2))
        rows.append({"question": p["question"], "answer": f"{p['steps']}\n#### {p['answer']}"})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def fresh_clone(dest: Path) -> Path:
    """``dest`` holding links to the repository's tracked top-level files and folders: a checkout with
    nothing built (no runs/, no corpus/)."""
    try:
        tracked = subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the fresh-clone layout cannot be made")
    dest.mkdir()
    for top in sorted({p.split("/", 1)[0] for p in tracked}):
        if (ROOT / top).exists():
            (dest / top).symlink_to(ROOT / top)
    return dest


# ---- the parser itself -----------------------------------------------------------------------------
def test_readme_parser_markers_optional_groups_and_placeholders():
    text = "\n".join(
        [
            "## A",
            "<!-- readme-test: skip runs elsewhere -->",
            "<!-- another note -->",
            "```bash",
            "bash launchers/quickstart.sh",
            "```",
            "Text.",
            "```bash",
            "cacheaug eval --checkpoint RUN_DIR [RUN_DIR2 ...] --data VAL_SHARDS [--positions all|stride S]  # Table 1",
            "                                  # a comment that continues the line above",
            "python -m data_tools train-tokenizer --special-tokens '####' [--doc-sep '\\n\\n'] --seed 1",
            "cacheaug train --config configs/tiny_cpu.yaml [--set key=value ...]",
            "x --model_args checkpoint=RUN_DIR,tokenizer=TOK",
            "cacheaug generate --checkpoint RUN_DIR --prompt WHAT",
            "```",
            "<!-- readme-test: skip never used: text comes between -->",
            "More text.",
            "```python",
            "print('not a command')",
            "```",
        ]
    )
    cmds = readme_commands(text)
    assert [c.line for c in cmds] == [5, 9, 11, 12, 13, 14]
    assert cmds[0].skip == "runs elsewhere" and all(c.skip is None for c in cmds[1:])
    assert cmds[1].argv() == [
        "cacheaug",
        "eval",
        "--checkpoint",
        "runs/tiny_cpu",
        "--data",
        "runs/ablations/data/shards",
    ]
    assert cmds[2].argv()[-3:] == ["####", "--seed", "1"]
    assert cmds[3].argv()[-2:] == ["--set", f"train.max_steps={TRAIN_STEPS}"]
    assert cmds[4].argv()[-1] == "checkpoint=runs/tiny_cpu,tokenizer=runs/ablations/data/tokenizer"
    with pytest.raises(AssertionError, match=r"README.md:14: .* placeholders \['WHAT'\]"):
        cmds[5].argv()


def test_every_readme_command_is_run_or_skipped_for_a_stated_reason():
    """Cheap and always on: each command parses, its placeholders are known, and the scripts and configs
    it names exist (the slow test below runs them)."""
    commands = readme_commands((ROOT / "README.md").read_text())
    assert len(commands) > 10
    for cmd in commands:
        if skip_reason(cmd):
            continue
        argv = cmd.argv()
        for tok in argv:
            if re.fullmatch(r"(configs|launchers|bench|slurm|tests)/[\w./-]+", tok):
                assert (ROOT / tok).exists(), f"README.md:{cmd.line}: {tok} does not exist"


# ---- running them ---------------------------------------------------------------------------------
#: Shipped configs this test does not train, and why. Every other configs/**/*.yaml trains a step on the
#: data the README's commands built.
NOT_TRAINED = {
    "configs/gemma2_2b_paper.yaml": "needs Gemma-2 2B's weights (model.decoder_path) and GPUs",
    "configs/gemma2_9b_paper.yaml": "needs Gemma-2 9B's weights (model.decoder_path) and GPUs",
    "configs/gemma2_27b_shard.yaml": "needs Gemma-2 27B's weights and GPUs; bench/real_widths.py runs its shape",
    "configs/llama3_70b_shard.yaml": "needs Llama-3 70B's weights and GPUs; bench/real_widths.py runs its shape",
    "configs/demo/base.yaml": "the main job's own; tests/demo runs it end to end",
    "configs/demo/coprocessor.yaml": "the main job's own; tests/demo runs it end to end",
}


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """The README's commands, run once in a fresh-clone layout: (clone, env, failures, skipped)."""
    clone = fresh_clone(tmp_path_factory.mktemp("readme") / "clone")
    gsm8k_file(clone / PLACEHOLDERS["FILE"])
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # cacheaug, deepspeed
        PYTHONPATH=str(ROOT),
        DS_ACCELERATOR="cpu",
        PYTHONUNBUFFERED="1",
    )
    failures, skipped = [], []
    for cmd in readme_commands((ROOT / "README.md").read_text()):
        why = skip_reason(cmd)
        if why:
            skipped.append(f"README.md:{cmd.line} {cmd.text}  ({why})")
            continue
        argv = cmd.argv()
        proc = subprocess.run(
            shlex.join(argv), shell=True, cwd=clone, env=env, capture_output=True, text=True, timeout=900
        )
        if proc.returncode != 0:
            failures.append(
                f"README.md:{cmd.line}: `{cmd.text}` (run as `{shlex.join(argv)}`) exited {proc.returncode}\n"
                f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
            )
            break  # later commands build on this one
    return clone, env, failures, skipped


@pytest.mark.slow
def test_readme_commands_run_from_a_fresh_clone(readme_run):
    clone, _, failures, skipped = readme_run
    assert not failures, failures[0]
    print(f"skipped {len(skipped)} README commands:\n" + "\n".join(skipped))
    # what the Training section promised: a finished tiny run the later sections' RUN_DIR points at
    assert (clone / PLACEHOLDERS["RUN_DIR"] / "export").is_dir()


@pytest.mark.slow
def test_every_shipped_config_trains_a_step_on_the_data_the_readme_built(readme_run):
    clone, env, failures, _ = readme_run
    assert not failures, "the README's commands failed (see the test above)"
    configs = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "configs").rglob("*.yaml")
        if "budgets" not in p.parts  # the main job's budgets, not run configs (tests/demo loads each)
    )
    assert set(NOT_TRAINED) <= set(configs), "NOT_TRAINED names a config that no longer exists"
    for config in configs:
        if config in NOT_TRAINED:
            continue
        run_dir = f"runs/config_step/{Path(config).stem}"
        argv = ["cacheaug", "train", "--config", config, "--set", f"train.run_dir={run_dir}"]
        argv += ["--set", "train.max_steps=1", "--set", "train.eval_interval=0"]
        proc = subprocess.run(argv, cwd=clone, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{config}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
        assert (clone / run_dir / "export").is_dir(), config
