"""The config tree: shipped configs load, bad configs fail naming the key, overrides are typed, the
DeepSpeed JSON follows the tree, the dry run sizes the paper's run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from dist_cacheaug.cli import main as cli_main
from dist_cacheaug.config import ConfigError, deepspeed_config, load_config

ROOT = Path(__file__).resolve().parents[1]
# configs/demo/budgets/ hold demo budgets, not run configs (tests/test_demo.py loads them)
SHIPPED = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "budgets" not in p.parts)


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


MINIMAL = "model:\n  decoder_config: {model_type: llama, hidden_size: 32}\n"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.grad_accum_steps(1) >= 1
    from dist_cacheaug.estimate import param_counts

    assert param_counts(cfg).coprocessor > 0  # the architecture resolves


def test_paper_config_has_the_papers_numbers():
    cfg = load_config(ROOT / "configs/gemma2_2b_paper.yaml")
    m = cfg.model
    assert (m.num_latents, m.num_ahead, m.num_positions, m.coprocessor_init) == (16, 16, 128, "decoder")
    assert (cfg.data.seq_len, cfg.train.global_batch_size, cfg.train.max_steps) == (2048, 1024, 100_000)
    assert cfg.total_tokens() == 100_000 * 1024 * 2048  # ≈ 209.7B
    assert m.decoder_config["model_type"] == "gemma2" and m.decoder_config["hidden_size"] == 2304


def test_unknown_key_names_it_and_suggests(tmp_path):
    p = write(tmp_path, MINIMAL + "optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*'optim\.learning_rate'") as e:
        load_config(p)
    p = write(tmp_path, MINIMAL + "train:\n  max_step: 10\n")
    with pytest.raises(ConfigError, match=r"did you mean 'train\.max_steps'"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*did you mean 'train'"):
        load_config(write(tmp_path, MINIMAL + "trian: {}\n"))
    assert e.value is not None


@pytest.mark.parametrize(
    "text,key",
    [
        ("train:\n  max_steps: ten\n", "train.max_steps"),
        ("train:\n  max_steps: 1.5\n", "train.max_steps"),
        ("zero:\n  activation_checkpointing: 3\n", "zero.activation_checkpointing"),
        ("zero:\n  stage: 4\n", "zero.stage"),
        ("model:\n  convention: sideways\n", "model.convention"),
        ("optim:\n  betas: 0.9\n", "optim.betas"),
        ("optim:\n  lr: fast\n", "optim.lr"),
        ("train: 5\n", "train"),
    ],
)
def test_wrong_type_names_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(write(tmp_path, MINIMAL + text))


def test_numbers_in_yaml_and_overrides_are_typed(tmp_path):
    p = write(tmp_path, MINIMAL + "optim:\n  lr: 3e-4\n")  # PyYAML reads 3e-4 as a string
    cfg = load_config(
        p,
        [
            "train.max_steps=7",
            "zero.offload_optimizer=true",
            "optim.betas=[0.8, 0.9]",
            "data.train_shards=/a/b",
            "model.decoder_config.num_hidden_layers=3",
            "optim.warmup_steps=0",
        ],
    )
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.train.max_steps == 7 and cfg.zero.offload_optimizer is True
    assert cfg.optim.betas == [0.8, 0.9] and cfg.data.train_shards == ["/a/b"]
    assert cfg.model.decoder_config["num_hidden_layers"] == 3


def test_override_round_trips_through_the_resolved_yaml(tmp_path):
    cfg = load_config(ROOT / "configs/tiny_cpu.yaml", ["optim.lr=0.02", "train.run_dir=elsewhere"])
    again = load_config(write(tmp_path, cfg.to_yaml(), "resolved.yaml"))
    assert again == cfg


def test_bad_overrides_fail_naming_the_key():
    with pytest.raises(ConfigError, match=r"did you mean 'optim\.lr'"):
        load_config(ROOT / "configs/tiny_cpu.yaml", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(ROOT / "configs/tiny_cpu.yaml", ["optim.lr"])
    with pytest.raises(ConfigError, match="'optim.lr' is a value, not a section"):
        load_config(ROOT / "configs/tiny_cpu.yaml", ["optim.lr.x=1"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))


def test_cross_field_checks(tmp_path):
    with pytest.raises(
        ConfigError, match="global_batch_size=10 is not divisible by train.micro_batch_size=4"
    ):
        load_config(write(tmp_path, MINIMAL + "train: {global_batch_size: 10, micro_batch_size: 4}\n"))
    with pytest.raises(ConfigError, match="num_positions=100 exceeds"):
        load_config(
            write(
                tmp_path,
                MINIMAL + "model: {decoder_config: {model_type: llama}, num_positions: 100}\n"
                "data: {seq_len: 64}\n",
            )
        )
    with pytest.raises(ConfigError, match="decoder_path.*or model.decoder_config"):
        load_config(write(tmp_path, "train: {max_steps: 1}\n"))


def test_grad_accumulation_is_derived_and_checked():
    cfg = load_config(ROOT / "configs/gemma2_2b_paper.yaml")
    assert cfg.grad_accum_steps(64) == 1024 // (2 * 64)
    with pytest.raises(ConfigError, match=r"not divisible by .*micro_batch_size=2 × world size 3"):
        cfg.grad_accum_steps(3)


def test_deepspeed_json_follows_the_tree():
    cfg = load_config(
        ROOT / "configs/gemma2_2b_paper.yaml", ["zero.offload_optimizer=true", "optim.grad_clip=0.5"]
    )
    ds = deepspeed_config(cfg, world_size=16, bf16=True)
    assert ds["train_batch_size"] == 1024 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 32
    assert (
        ds["train_batch_size"]
        == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 16
    )
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True
    ds1 = deepspeed_config(
        load_config(ROOT / "configs/tiny_cpu.yaml", ["zero.stage=1"]), world_size=2, bf16=False
    )
    assert ds1["zero_optimization"] == {"stage": 1} and ds1["bf16"]["enabled"] is False


def test_dry_run_prints_the_paper_run(capsys):
    assert cli_main(["config", str(ROOT / "configs/gemma2_2b_paper.yaml"), "--world-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "training tokens 209,715,200,000 (209.7B)" in out
    assert "grad accumulation 8" in out
    total = re.search(r"total\s+([\d.]+) GiB", out)
    assert total and 5 < float(total.group(1)) < 80  # fits an 80 GB GPU with room
    assert '"stage": 3' in out


def test_dry_run_config_error_exits_2(tmp_path, capsys):
    p = write(tmp_path, MINIMAL + "optim:\n  lrr: 1\n")
    assert cli_main(["config", str(p)]) == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err


def test_fields_lists_every_field_with_its_doc(capsys):
    assert cli_main(["fields"]) == 0
    out = capsys.readouterr().out
    assert "model.num_latents = 16" in out and "N_L" in out
    assert "zero.stage = 3" in out and "train.run_dir" in out


def test_console_script_is_installed():
    out = subprocess.run(
        [sys.executable, "-m", "dist_cacheaug.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "config" in out.stdout and "train" in out.stdout


def test_readme_commands_and_ci_agree():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci/run").read_text()
    setup = re.search(r"<!-- setup-commands -->\s*```bash\n(.*?)```", readme, re.S)
    assert setup, "README must have the two set-up commands in a ```bash block after <!-- setup-commands -->"
    commands = [ln for ln in setup.group(1).splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(commands) == 2
    main_cmd, test_cmd = commands
    assert test_cmd in ci, f"CI must run the README's test command exactly: {test_cmd!r}"
    script = main_cmd.split()[1] if main_cmd.startswith("bash ") else None
    assert script and (ROOT / script).is_file(), main_cmd
    test_script = test_cmd.split()[1] if test_cmd.startswith("bash ") else None
    assert test_script and (ROOT / test_script).is_file(), test_cmd
