"""Errors a user can fix print one line, ``error: <what, naming the file or field, and what to do>``, and
exit 2 (``dist_cacheaug/cli.py: main``); under a launcher only rank 0 prints it; ``--debug`` (or
``CACHEAUG_DEBUG=1``) keeps the traceback; bugs always keep theirs."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from inference_helpers import tiny_world  # noqa: F401  (fixture)
from train_helpers import run_train, tiny_run_config, train_env

from dist_cacheaug import cli
from dist_cacheaug.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _cacheaug(*args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dist_cacheaug.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=train_env(**(env or {})),
    )


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The process exited 2 and its stderr is exactly one ``error: ...`` line (no traceback, no rank
    prefix); returns that line."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


# ---- the contract, in process ---------------------------------------------------------------------
def test_user_errors_print_one_line_from_rank_0_and_bugs_raise(monkeypatch, capsys):
    def boom(_argv):
        raise ConfigError("train.max_steps must be >= 1, got 0")

    monkeypatch.setattr(cli, "_dispatch", boom)
    monkeypatch.setenv("CACHEAUG_DEBUG", "")  # restored at teardown: main(--debug) sets it for subprocesses
    assert cli.main(["train"]) == 2
    assert capsys.readouterr().err == "error: train.max_steps must be >= 1, got 0\n"
    with pytest.raises(ConfigError):  # --debug: the traceback
        cli.main(["train", "--debug"])

    def bug(_argv):
        raise KeyError("not a user error")

    monkeypatch.setattr(cli, "_dispatch", bug)
    monkeypatch.setenv("CACHEAUG_DEBUG", "")
    with pytest.raises(KeyError):
        cli.main(["train"])


def test_every_user_error_class_shares_one_base_and_is_caught_by_type(monkeypatch, capsys):
    """The CLI catches errors.UserError by type: every error class the package raises for the user
    derives from it (found by walking the package, so a new one that forgets the base fails here), and
    a subclass the CLI has never heard of is still one line."""
    import importlib
    import pkgutil

    import data_tools.shards  # noqa: F401  (DataError's module family)
    import dist_cacheaug
    from dist_cacheaug.errors import UserError

    user_facing = set()
    for info in pkgutil.walk_packages(dist_cacheaug.__path__, "dist_cacheaug."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, Exception)
                and value.__module__ == info.name
                and value.__name__.endswith(("Error", "Aborted", "Failed"))
            ):
                user_facing.add(value)
    names = {c.__name__ for c in user_facing}
    assert {"ConfigError", "LaunchError", "InferenceError", "CheckpointError"} <= names
    assert {"TrainingAborted", "StageFailed"} <= names
    assert [c.__name__ for c in user_facing if not issubclass(c, UserError)] == []

    class RenamedLater(UserError):
        pass

    def boom(_argv):
        raise RenamedLater("the checkpoint at runs/x is from another model: start a new run_dir")

    monkeypatch.setattr(cli, "_dispatch", boom)
    monkeypatch.setenv("CACHEAUG_DEBUG", "")
    assert cli.main(["eval"]) == 2
    assert capsys.readouterr().err.startswith("error: the checkpoint at runs/x is from another model")


def test_other_ranks_wait_then_report_with_their_rank(monkeypatch):
    """Rank 0 prints at once; another rank only after OTHER_RANK_DELAY_S (by then a launcher has stopped
    it if rank 0 failed too), naming itself."""
    slept = []
    monkeypatch.setattr(cli.time, "sleep", slept.append)
    for environ, want, delay in (
        ({"RANK": "0", "WORLD_SIZE": "2"}, "error: bad\n", []),
        ({"RANK": "1", "WORLD_SIZE": "2"}, "error (rank 1): bad\n", [cli.OTHER_RANK_DELAY_S]),
        (
            {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4"},
            "error (rank 3): bad\n",
            [cli.OTHER_RANK_DELAY_S],
        ),
        ({"SLURM_PROCID": "3"}, "error: bad\n", []),  # an salloc shell, not a step: one process
    ):
        slept.clear()
        err = io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        cli.report_user_error(ConfigError("bad"), environ)
        assert err.getvalue() == want and slept == delay


def test_quiet_libraries_keeps_user_settings_and_terminal_bars():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    env = {"TRANSFORMERS_VERBOSITY": "info"}
    cli.quiet_libraries(env, io.StringIO())
    assert env["TRANSFORMERS_VERBOSITY"] == "info"  # the user's own setting wins
    assert env["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and env["TQDM_DISABLE"] == "1"
    env = {}
    cli.quiet_libraries(env, Tty())
    assert "TQDM_DISABLE" not in env  # a terminal keeps its progress bars


# ---- each kind, through the real command line ------------------------------------------------------
def test_config_error(tmp_path):
    line = _one_error_line(_cacheaug("train", "--config", str(tmp_path / "nope.yaml")))
    assert f"config file not found: {tmp_path / 'nope.yaml'}" in line
    line = _one_error_line(_cacheaug("config", "configs/tiny_cpu.yaml", "--set", "optim.lrr=1"))
    assert "optim.lrr" in line and "optim.lr" in line.replace("optim.lrr", "")
    line = _one_error_line(_cacheaug("demo", "--budget", "nope", "--run-dir", str(tmp_path / "demo")))
    assert "demo budget 'nope' not found (known: " in line and "full" in line and "quick" in line


def test_data_error_names_the_field_and_the_command(tmp_path):
    missing = tmp_path / "no_shards"
    line = _one_error_line(
        _cacheaug("train", "--config", "configs/tiny_cpu.yaml", "--set", f"data.train_shards=[{missing}]")
    )
    assert line.startswith(f"error: data.train_shards: shard directory '{missing}' does not exist")
    assert f"python -m data_tools make-shards --out {missing}" in line


def test_tokenizer_error(shards, tmp_path):
    cfg = tiny_run_config(tmp_path, shards)
    missing = tmp_path / "no_tokenizer"
    proc = _cacheaug(
        "train", "--config", str(cfg), "--set", "model.anchor_text=x", "--set", f"data.tokenizer={missing}"
    )
    line = _one_error_line(proc)
    assert line.startswith(f"error: data.tokenizer: tokenizer '{missing}' does not exist")
    assert "train-tokenizer" in line


def test_decoder_vocabulary_smaller_than_the_shards_is_refused(shards, tmp_path):
    """Without the check, token ids past the embedding crash inside the decoder with an index error."""
    cfg = tiny_run_config(tmp_path, shards)  # shards of a 320-piece tokenizer
    line = _one_error_line(
        _cacheaug("train", "--config", str(cfg), "--set", "model.decoder_config.vocab_size=100")
    )
    assert "made with a 320-token vocabulary but the decoder has 100" in line
    assert "model.decoder_config.vocab_size >= 320" in line


def test_checkpoint_and_prompt_errors(tmp_path, tiny_world):  # noqa: F811
    line = _one_error_line(_cacheaug("generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "Hi"))
    assert f"checkpoint {tmp_path / 'run'} does not exist" in line
    line = _one_error_line(_cacheaug("generate", "--checkpoint", str(tiny_world["run"]), "--prompt", ""))
    assert line == "error: --prompt is empty: give some text to continue"


def test_launcher_error_and_debug_traceback():
    env = {"RANK": "x", "WORLD_SIZE": "2"}
    line = _one_error_line(_cacheaug("train", "--config", "configs/tiny_cpu.yaml", env=env))
    assert "environment variable RANK='x' is not an integer" in line
    debug = _cacheaug("train", "--config", "configs/tiny_cpu.yaml", "--debug", env=env)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "LaunchError" in debug.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_launcher_prints_the_error_once(shards, tmp_path):
    """2 CPU ranks under the deepspeed launcher (launchers/local.sh): both hit the same missing shard
    directory; rank 0 prints one line, rank 1 stays silent, the launcher exits 2."""
    cfg = tiny_run_config(tmp_path, shards)
    missing = tmp_path / "no_shards"
    proc = run_train(2, cfg, f"data.train_shards=[{missing}]", check=False)
    out = proc.stdout + proc.stderr
    errors = [ln for ln in out.splitlines() if ln.startswith("error")]
    assert proc.returncode == 2, out[-3000:]
    assert errors == [
        f"error: data.train_shards: shard directory '{missing}' does not exist; make it with "
        f"`python -m data_tools make-shards --out {missing} ...` (README: Data, Training)"
    ], out[-3000:]
    assert "Traceback" not in out and "[rank" not in out


@pytest.mark.parametrize(
    "args, want",
    [
        (["launchers/local.sh"], "needs the number of ranks and a config"),
        (
            ["launchers/local.sh", "x", "configs/tiny_cpu.yaml"],
            "NPROC must be a number of ranks >= 1, got 'x'",
        ),
        (["launchers/local.sh", "2", "configs/nope.yaml"], "config file not found: configs/nope.yaml"),
        (["launchers/quickstart.sh", "--budget"], "--budget needs a value"),
    ],
)
def test_launcher_scripts_refuse_bad_arguments(args, want):
    proc = subprocess.run(["bash", *args], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert want in _one_error_line(proc)


# ---- quiet by default ----------------------------------------------------------------------------
def test_training_prints_one_line_per_logged_step_and_nothing_else(shards, tmp_path):
    """What a user sees from a run: the run's own lines and one line per logged step; no DeepSpeed
    build notice, warnings, or progress-bar frames."""
    proc = run_train(1, tiny_run_config(tmp_path, shards), "train.max_steps=3")
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    steps = [ln for ln in lines if ln.startswith("step ")]
    assert [s.split(" |")[0] for s in steps] == ["step 1/3", "step 2/3", "step 3/3"], lines
    others = [ln for ln in lines if not ln.startswith(("step ", "[cacheaug] "))]
    assert others == [], others
    assert "\r" not in proc.stdout + proc.stderr


def test_without_lines_drops_only_the_named_notices(capsys):
    from dist_cacheaug.train.engine import without_lines

    with without_lines(("built successfully",)):
        print("DeepSpeed op built successfully")
        print("kept")
    assert capsys.readouterr().out == "kept\n"


def test_the_fault_switch_refuses_unknown_faults_and_bad_json():
    from data_tools.faults import ENV, FaultSpecError, faults_env, read_faults

    assert read_faults({}) == {} and read_faults({ENV: " "}) == {}
    assert read_faults(faults_env(nan_steps=[2])) == {"nan_steps": [2]}
    with pytest.raises(FaultSpecError, match=r"unknown fault\(s\) \['nan_step'\]"):
        read_faults({ENV: '{"nan_step": [2]}'})
    with pytest.raises(FaultSpecError, match="is not JSON"):
        read_faults({ENV: "nan_steps=2"})  # the old variables' syntax
    with pytest.raises(FaultSpecError, match="must be a JSON object"):
        read_faults({ENV: "[2]"})
    assert cli.is_user_error(FaultSpecError("x"))
