"""The config tree: shipped configs load, bad configs fail naming the key, overrides are typed, the
DeepSpeed JSON follows the tree, the dry run sizes the paper's run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dist_cacheaug.cli import main as cli_main
from dist_cacheaug.config import ConfigError, deepspeed_config, load_config, read_config_tree

ROOT = Path(__file__).resolve().parents[1]
# configs/demo/budgets/ hold demo budgets, not run configs (tests/demo/test_demo.py loads them)
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
    from dist_cacheaug.train.estimate import param_counts

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


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}: the test's own reading of 'a file is its parent plus its keys'."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_extends_lays_a_files_keys_over_its_parents(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path, MINIMAL + "optim: {lr: 0.1, betas: [0.8, 0.9]}\ntrain: {max_steps: 7}\n", "grand.yaml")
    write(
        tmp_path,
        "extends: ../grand.yaml\n"  # relative to the file that names it
        "model: {decoder_config: {num_hidden_layers: 3}}\noptim: {betas: [0.5, 0.6]}\n",
        "sub/parent.yaml",
    )
    child = write(tmp_path, "extends: parent.yaml\ntrain: {max_steps: 9}\n", "sub/child.yaml")
    cfg = load_config(child, ["optim.lr=0.2"])
    # mappings merge key by key, down into the free-form decoder_config ...
    assert cfg.model.decoder_config == {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 3}
    # ... lists and values replace, the nearest file wins, and --set comes last
    assert (cfg.optim.betas, cfg.train.max_steps, cfg.optim.lr) == ([0.5, 0.6], 9, 0.2)
    assert "extends" not in cfg.to_yaml()  # the resolved config a run dir keeps stands alone
    assert load_config(write(tmp_path, cfg.to_yaml(), "resolved.yaml")) == cfg


def test_extends_errors_are_one_line_naming_the_files(tmp_path):
    child = write(tmp_path, "extends: nope.yaml\n", "child.yaml")
    with pytest.raises(ConfigError, match=r"not found: .*nope\.yaml \(extends: in .*child\.yaml\)"):
        load_config(child)
    write(tmp_path, "extends: b.yaml\n", "a.yaml")
    write(tmp_path, "extends: a.yaml\n", "b.yaml")
    with pytest.raises(
        ConfigError, match=r"extend each other in a loop: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"
    ):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match=r"'extends:' must be the path of one YAML file, got \['x'\]"):
        load_config(write(tmp_path, "extends: [x]\n" + MINIMAL))
    with pytest.raises(ConfigError, match="unknown config key 'extends'"):  # a file key, not a --set key
        load_config(ROOT / "configs/tiny_cpu.yaml", ["extends=x.yaml"])


EXTENDING = [
    p for p in sorted((ROOT / "configs").rglob("*.yaml")) if "extends" in yaml.safe_load(p.read_text())
]


def test_configs_that_must_not_drift_extend_their_recipe():
    names = {str(p.relative_to(ROOT / "configs")) for p in EXTENDING}
    ablations = {str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs/ablations").glob("*.yaml")}
    assert len(ablations) == 19 and ablations <= names
    assert {"gemma2_9b_paper.yaml", "gemma2_27b_shard.yaml", "demo/coprocessor.yaml"} <= names
    for p in (ROOT / "configs/ablations").glob("*.yaml"):
        assert (
            p.parent / yaml.safe_load(p.read_text())["extends"]
        ).resolve() == ROOT / "configs/tiny_cpu.yaml"


@pytest.mark.parametrize("path", EXTENDING, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_a_shipped_config_is_its_parent_plus_its_own_keys(path):
    own = yaml.safe_load(path.read_text())
    parent = read_config_tree(path.parent / own.pop("extends"))
    flat_own, flat_parent = flatten(own), flatten(parent)
    assert flatten(read_config_tree(path)) == {**flat_parent, **flat_own}
    if path.parent.name == "ablations":  # a short diff, not a copy: each key changes what it inherits
        copied = sorted(k for k, v in flat_own.items() if k in flat_parent and flat_parent[k] == v)
        assert not copied, f"{path.name} restates its parent's values: {copied}"


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


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_json_accumulates_gradients_in_fp32(stage):
    """Under bf16, gradients summed over 8-64 micro-steps must not be rounded to bf16 at each add:
    the JSON asks DeepSpeed for fp32 accumulation, and DeepSpeed's own config parser reads it so."""
    import torch
    from deepspeed.runtime.config import DeepSpeedConfig, DtypeEnum

    cfg = load_config(ROOT / "configs/gemma2_2b_paper.yaml", [f"zero.stage={stage}"])
    ds = deepspeed_config(cfg, world_size=1, bf16=True)
    assert ds["bf16"]["enabled"] is True
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"
    parsed = DeepSpeedConfig(ds)
    assert parsed.bfloat16_config.enabled and DtypeEnum(parsed.grad_accum_dtype).value == torch.float32
    # fp32 runs (CPU) accumulate in fp32 anyway: nothing to ask for
    assert "data_types" not in deepspeed_config(cfg, world_size=1, bf16=False)


def test_bf16_refuses_stage0_which_would_accumulate_in_bf16():
    cfg = load_config(ROOT / "configs/tiny_cpu.yaml", ["zero.stage=0"])
    with pytest.raises(ConfigError, match=r"zero\.stage=0 under bf16.*set zero\.stage to 1, 2 or 3"):
        deepspeed_config(cfg, world_size=1, bf16=True)
    assert "data_types" not in deepspeed_config(cfg, world_size=1, bf16=False)  # fp32: fine


def test_hpz_partition_size_is_validated_and_emitted(tmp_path):
    cfg = load_config(ROOT / "configs/gemma2_2b_paper.yaml", ["zero.hpz_partition_size=8"])
    zero = deepspeed_config(cfg, world_size=64, bf16=True)["zero_optimization"]
    assert zero["stage"] == 3 and zero["zero_hpz_partition_size"] == 8
    assert (
        "zero_hpz_partition_size"
        not in deepspeed_config(load_config(ROOT / "configs/gemma2_2b_paper.yaml"), world_size=64, bf16=True)[
            "zero_optimization"
        ]
    )
    with pytest.raises(
        ConfigError, match=r"zero\.hpz_partition_size=8 does not divide the world size 4"
    ) as e:
        deepspeed_config(cfg, world_size=4, bf16=True)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"zero\.hpz_partition_size=8 .*only zero\.stage=3.*got stage 2"):
        load_config(ROOT / "configs/gemma2_2b_paper.yaml", ["zero.hpz_partition_size=8", "zero.stage=2"])
    with pytest.raises(ConfigError, match=r"zero\.hpz_partition_size must be >= 1"):
        load_config(ROOT / "configs/gemma2_2b_paper.yaml", ["zero.hpz_partition_size=0"])
    # the same one-line error from the command line, exit 2
    assert (
        cli_main(
            [
                "config",
                "--config",
                str(ROOT / "configs/gemma2_2b_paper.yaml"),
                "--world-size",
                "4",
                "--set",
                "zero.hpz_partition_size=8",
            ]
        )
        == 2
    )


def test_stage2_json():
    cfg = load_config(ROOT / "configs/gemma2_2b_paper.yaml", ["zero.stage=2"])
    ds = deepspeed_config(cfg, world_size=8, bf16=True)
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["reduce_scatter"] is True
    assert "stage3_gather_16bit_weights_on_model_save" not in ds["zero_optimization"]
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}


def test_zero_comm_matches_hand_computation():
    """P = 2e9 params, bf16 (2 B), 64 ranks on 8-GPU nodes, 8 micro-steps per optimizer step."""
    from dist_cacheaug.train.estimate import zero_comm

    p, w, acc = 2_000_000_000, 64, 8
    full = p * 2 * 63 / 64  # one ring all-gather / reduce-scatter of the bf16 tensor: 3.9375 GB per GPU
    assert full == 3.9375e9
    s3 = zero_comm(p, w, 3, acc)
    assert s3.bytes_per_micro() == pytest.approx(3 * full)  # gather fwd + gather bwd + reduce-scatter
    assert s3.bytes_per_step() == pytest.approx(8 * 3 * full)  # = 94.5 GB
    assert s3.bytes_per_step() == pytest.approx(94.5e9)
    assert all(c.inter_node for c in s3.collectives)
    # at 25 GB/s inter-node: 94.5 / 25 = 3.78 s per step, 11.8125 / 25 = 0.4725 s per micro-step
    assert s3.seconds_per_step(300, 25) == pytest.approx(3.78)
    assert s3.seconds_per_micro(300, 25) == pytest.approx(0.4725)

    s2 = zero_comm(p, w, 2, acc)
    assert s2.bytes_per_micro() == pytest.approx(full)  # grads only
    assert s2.bytes_per_step() == pytest.approx(8 * full + full)  # + one param all-gather after the step
    assert s2.bytes_per_step() == pytest.approx(35.4375e9)

    hpz = zero_comm(p, w, 3, acc, hpz_partition_size=8)
    sec = p * 2 * 7 / 8  # 3.5 GB: all-gather within the node from the secondary partition
    assert hpz.bytes_per_micro() == pytest.approx(2 * sec + full)
    assert hpz.bytes_per_step() == pytest.approx(full + (2 * 8 - 1) * sec + 8 * full)  # 87.9375 GB
    assert hpz.bytes_per_step() == pytest.approx(87.9375e9)
    # inter-node: (1 + 8) × 3.9375 GB at 25 GB/s = 1.4175 s; intra-node: 15 × 3.5 GB at 300 GB/s = 0.175 s
    assert hpz.seconds_per_step(300, 25) == pytest.approx(1.4175 + 0.175)

    s1 = zero_comm(p, w, 1, acc)  # bf16: BF16_Optimizer, fp32 all-reduce once per step + param gather
    assert s1.bytes_per_micro() == 0 and s1.bytes_per_step() == pytest.approx(2 * p * 4 * 63 / 64 + full)

    one_node = zero_comm(p, 8, 3, 64)
    assert not any(c.inter_node for c in one_node.collectives)
    assert one_node.bytes_per_step() == pytest.approx(64 * 3 * 3.5e9)
    assert zero_comm(p, 1, 3, 512).bytes_per_step() == 0


def test_dry_run_prints_comm_next_to_compute(capsys):
    args = ["config", "--config", str(ROOT / "configs/gemma2_2b_paper.yaml"), "--world-size", "64"]
    assert cli_main([*args, "--inter-node-gbs", "50"]) == 0
    out = capsys.readouterr().out
    assert "intra-node 300 GB/s, inter-node 50 GB/s, 8 GPUs per node" in out
    assert "compute per micro-step" in out and "per optimizer step:" in out
    assert re.search(r"\* stage 3 ", out) and "stage 3 + hpZ 8" in out and "stage 2" in out
    # 2.02B coprocessor params × 2 B × 63/64 × 3 per micro-step
    m = re.search(r"per micro-step: ([\d.]+) GB", out)
    assert m and float(m.group(1)) == pytest.approx(2.0246e9 * 2 * 63 / 64 * 3 / 1e9, rel=1e-3)


@pytest.mark.slow
@pytest.mark.distributed
def test_stage2_trains_two_steps_on_two_ranks_and_exports(shards, tmp_path):
    """zero.stage=2 (params replicated, grads + optimizer state partitioned) end to end: 2 ranks on CPU
    (gloo), 2 optimizer steps, the final checkpoint and the export, which reloads without DeepSpeed."""
    import json
    import os

    import torch
    from safetensors.torch import load_file
    from train_helpers import tiny_run_config
    from transformers import AutoModelForCausalLM

    from dist_cacheaug import CacheAugmentedLM
    from dist_cacheaug.train.checkpoint import WEIGHTS

    cfg = tiny_run_config(tmp_path, shards, max_steps=2)
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"  # the launcher's `deepspeed`
    proc = subprocess.run(
        ["bash", str(ROOT / "launchers/local.sh"), "2", str(cfg), "--set", "zero.stage=2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp_path / "run"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["grad_norm"] > 0 for r in rows)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000002"
    assert load_config(run_dir / "config.yaml").zero.stage == 2
    decoder = AutoModelForCausalLM.from_pretrained(run_dir / "decoder", attn_implementation="eager")
    model = CacheAugmentedLM.from_pretrained(run_dir / "export", decoder=decoder)
    # the export holds the weights of the final checkpoint (consolidated fp32 master weights)
    saved = load_file(str(run_dir / "checkpoints" / "step_000002" / WEIGHTS))
    exported = dict(model.named_parameters())
    trained = [n for n in saved if n in exported]
    assert trained and all(torch.equal(saved[n].to(exported[n].dtype), exported[n].detach()) for n in trained)


BF16_ENGINE = """
import json, sys, torch
from dist_cacheaug import load_config
from dist_cacheaug.core.decoder import build_decoder
from dist_cacheaug.train.engine import build_engine
from dist_cacheaug.variants import build_trainable

out = {}
for stage in (3, 2, 1):
    cfg = load_config(sys.argv[1], [f"zero.stage={stage}", "model.dtype=bfloat16", "train.global_batch_size=4",
                                    "train.micro_batch_size=2", "data.seq_len=64", "model.num_positions=8"])
    model = build_trainable(cfg, build_decoder(cfg.model, device=torch.device("cpu"), seed=0))
    eng = build_engine(cfg, model, world_size=1, device=torch.device("cpu"), bf16=True)
    g = torch.Generator().manual_seed(0)
    for micro in range(2):  # one optimizer step of 2 micro-steps
        ids = torch.randint(0, 4096, (2, 64), generator=g)
        pos = torch.stack([torch.randperm(40, generator=g)[:8].sort().values for _ in range(2)])
        res = eng.forward(ids, pos, cfg.model.num_ahead)
        eng.backward(res.loss)
        applied = eng.step()
    opt = eng.engine.optimizer
    acc = getattr(opt, "grad_partitions_flat_buffer", None)  # ZeRO-3's accumulation buffer
    acc = acc.dtype if acc is not None else getattr(opt, "gradient_accumulation_dtype", None)  # ZeRO-2
    acc = acc if acc is not None else opt.grad_acc_dtype  # ZeRO-1 under bf16: BF16_Optimizer
    out[stage] = [str(next(eng.engine.module.parameters()).dtype), str(acc), applied, eng.grad_norm()]
print("RESULT", json.dumps(out))
"""


@pytest.mark.slow
def test_bf16_engine_on_cpu_accumulates_in_fp32():
    """DeepSpeed accepts the bf16 JSON (on CPU, gloo) for stages 3, 2, 1: bf16 params, fp32 gradient
    accumulation, an applied optimizer step."""
    import json
    import os
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", RANK="0", LOCAL_RANK="0")
    env.update(WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    proc = subprocess.run(
        [sys.executable, "-c", BF16_ENGINE, str(ROOT / "configs/tiny_cpu.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    for stage in ("3", "2", "1"):
        param_dtype, accum_dtype, applied, grad_norm = result[stage]
        assert (param_dtype, accum_dtype, applied) == ("torch.bfloat16", "torch.float32", True), stage
        assert grad_norm is not None and grad_norm > 0, stage
