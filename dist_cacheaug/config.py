"""One typed config tree for a run: dataclasses -> YAML -> validation -> DeepSpeed JSON.

Every field has a docstring-style comment (``#:``) that ``cacheaug config --help-fields`` prints.
Loading is strict: an unknown key or a value of the wrong type fails at once with a
:class:`ConfigError` naming the dotted key (and the closest valid key, when one is near).
A file may start from another with ``extends: other.yaml`` (see :func:`read_config_tree`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A config file, field or override is invalid. The message names the key."""


# --------------------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------------------


VariantName = Literal["coprocessor", "pause", "lora", "activations", "async", "single_model", "base_lm"]


@dataclass
class ModelConfig:
    decoder_path: str | None = None
    #: Local directory of an HF causal LM (config.json + weights) to use as the frozen decoder.
    #: None: build a randomly initialised decoder from ``decoder_config`` (tiny demos, benchmarks).
    decoder_config: dict = field(default_factory=dict)
    #: HF config kwargs (must include ``model_type``, e.g. gemma2 / llama / qwen2 / mistral) for the
    #: decoder's architecture. Used when ``decoder_path`` is None, and by the dry run when the path
    #: does not exist on this machine.
    variant: VariantName = "coprocessor"
    #: What is trained (``dist_cacheaug/variants``; baselines and ablations of the paper):
    #: "coprocessor" (the method), "pause" (N_L trainable pause embeddings, no coprocessor; Table 3),
    #: "lora" (LoRA adapters on a frozen copy of the decoder as coprocessor; Table 5), "activations"
    #: (the coprocessor reads the decoder's last-layer states instead of its kv-cache), "async"
    #: (latents from the cache ``async_delay`` tokens behind; A.5), "single_model" (the decoder itself,
    #: finetuned jointly with soft tokens, writes the latents), "base_lm" (plain next-token training
    #: of the decoder itself; the export is an HF model dir usable as ``decoder_path``).
    lora_rank: int = 64
    #: LoRA rank r (variant "lora").
    lora_alpha: float = 0.0
    #: LoRA alpha (variant "lora"); 0 means alpha = r (adapter scale 1).
    async_delay: int = 1
    #: d for variant "async": the coprocessor reads the cache of x[0..p-d] (p-d clamped at 0).
    coprocessor_init: Literal["decoder", "scratch"] = "decoder"
    #: "decoder": the coprocessor starts as a copy of the decoder's weights (paper default);
    #: "scratch": same architecture, random init (paper Table 5 ablation).
    num_latents: int = 16
    #: N_L: latent embeddings the coprocessor writes into the cache per augmentation.
    num_ahead: int = 16
    #: N_A: tokens after each augmentation position that are predicted (and trained on).
    num_positions: int = 128
    #: P: augmentation positions sampled per sequence and trained in one pass.
    anchor_text: str | None = None
    #: Training positions may favour a marker: the text of ONE token of ``data.tokenizer`` (e.g. "####",
    #: which precedes an answer). None: positions are uniform, as in the paper.
    anchor_fraction: float = 0.5
    #: With ``anchor_text``: the share of the P positions placed on the marker's occurrences in each
    #: sequence (as many as it has, up to that share); the rest stay uniform over the other positions.
    convention: Literal["insert", "refeed"] = "insert"
    #: Position-id convention for latents (docs/design.md §1.6): "insert" gives latents p+1..p+N_L and
    #: ahead tokens continue after them; "refeed" re-feeds x[p] after the latents at its own position.
    latent_final_norm: bool = True
    #: Apply the coprocessor's final norm to its output states before they become latents (our choice:
    #: the decoder's own input embeddings are never un-normalised residual states of layer L).
    soft_token_init: Literal["embedding_sample", "zeros", "normal"] = "embedding_sample"
    #: How the N_L trainable soft tokens start: copies of randomly chosen decoder input embeddings
    #: (scaled like the decoder's embeddings), zeros, or N(0, 0.02).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    #: Frozen decoder's dtype. "auto": bfloat16 on GPU, float32 on CPU.
    attn_implementation: Literal["auto", "eager", "flex_attention"] = "auto"
    #: Attention kernel for the extended passes. "auto": flex_attention on GPU, eager on CPU
    #: (FlexAttention has no CPU backward).
    loss_chunk_size: int = 4096
    #: Trace tokens per cross-entropy chunk: bounds the fp32 logits held at once over a large vocab.


@dataclass
class DataConfig:
    train_shards: list[str] = field(default_factory=list)
    #: Directories (or globs) of packed webdataset shards made by ``python -m data_tools make-shards``.
    val_shards: list[str] = field(default_factory=list)
    #: Held-out shards for periodic evaluation (validation loss per ahead offset).
    tokenizer: str | None = None
    #: Tokenizer (sentencepiece .model, our tokenizer dir, or an HF tokenizer dir). Checked against the
    #: shards' manifest when given.
    seq_len: int = 2048
    #: Tokens per training sequence; must match the shards' manifest.
    seed: int = 1234
    #: Data order seed (shard and buffer shuffles derive from it and the epoch).
    num_workers: int = 0
    #: DataLoader worker processes per rank.
    shuffle_buffer: int = 1000
    #: Samples in the streaming shuffle buffer.
    skip_corrupt_shards: bool = False
    #: False: a corrupt shard stops the run with an error naming it. True: skip it and count it in metrics.
    prefetch_shards: int = 1
    #: Shards each loader stream reads ahead in background threads while it consumes the current one
    #: (memory: this many shards more per stream). 0: read each shard when it is needed.
    read_retries: int = 5
    #: Reads of a remote shard or manifest (s3://, gs://, https://, pipe:) before one error names it;
    #: transient failures (connection reset, timeout, 5xx, a short read) back off 0.5 s, 1 s, 2 s, ...
    read_timeout_s: float = 120.0
    #: Seconds one read of one remote file may take before it counts as failed (and is retried).


@dataclass
class OptimConfig:
    lr: float = 1e-4
    #: Peak learning rate (AdamW).
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    #: Decay after warmup, down to ``min_lr_ratio * lr``.
    warmup_steps: int = 1000
    #: Linear warmup steps from 0.
    min_lr_ratio: float = 0.1
    #: Final learning rate as a fraction of ``lr``.
    weight_decay: float = 0.1
    #: AdamW decoupled weight decay (not applied to norms, biases or soft tokens).
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    #: AdamW betas.
    eps: float = 1e-8
    #: AdamW epsilon.
    grad_clip: float = 1.0
    #: Global gradient-norm clipping; 0 disables.


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    #: Run directory: config.yaml, metrics.jsonl, tb/, checkpoints/, export/. Rerunning resumes here.
    global_batch_size: int = 1024
    #: Sequences per optimizer step across all ranks.
    micro_batch_size: int = 1
    #: Sequences per rank per forward/backward.
    max_steps: int = 100_000
    #: Optimizer steps.
    log_interval: int = 10
    #: Steps between metrics lines (metrics.jsonl, TensorBoard, console).
    eval_interval: int = 1000
    #: Steps between validation evaluations; 0 disables.
    eval_batches: int = 16
    #: Validation batches per evaluation.
    checkpoint_interval: int = 1000
    #: Steps between checkpoints (one is always written at the end).
    keep_checkpoints: int = 3
    #: Newest complete checkpoints kept; older ones are deleted after a new one is complete.
    seed: int = 0
    #: Seed for model init, soft tokens and augmentation-position sampling.
    max_nonfinite_steps: int = 5
    #: Consecutive non-finite losses tolerated (each skipped and counted) before the run aborts.
    hang_timeout_s: float | None = None
    #: Seconds after the last completed step before a rank that made no progress writes every thread's
    #: stack to run_dir/hang/rank-N.txt, names the rank(s) behind, and exits 75 (the launcher stops the
    #: other ranks; slurm/train.sbatch requeues). null: 10x the median of this process's first 10 steps,
    #: at least 300 s; 0: no watchdog.
    hang_slow_phase_s: float = 1800.0
    #: The watchdog's limit for what is not a training step: start-up until the first step completes
    #: (compiling, on GPU), validation, checkpoints and the export.
    collective_timeout_s: float = 1800.0
    #: A collective (all-reduce, gather, barrier) that waits longer fails: the process group's timeout
    #: (and DeepSpeed's), with NCCL's async error handling on GPU. It ends like a hang (report, exit 75).


@dataclass
class ZeroConfig:
    stage: Literal[0, 1, 2, 3] = 3
    #: DeepSpeed ZeRO stage for the coprocessor. 3: bf16 params, grads and optimizer state partitioned
    #: (params all-gathered twice per micro-step); 2: params replicated, grads + optimizer state
    #: partitioned (one param all-gather per optimizer step); 1: only optimizer state partitioned.
    #: Under bf16, stages 1-3 accumulate gradients in fp32; stage 0 is refused (bf16 accumulation).
    #: ``cacheaug config`` prints memory and bytes moved per GPU for each layout (docs/zero_layouts.md).
    hpz_partition_size: int = 1
    #: ZeRO++ hierarchical partitioning (hpZ; stage 3 only): each group of this many consecutive ranks
    #: (one node: GPUs per node) also keeps a secondary bf16 copy of the params, split within the group,
    #: so all gathers but the first after each optimizer step stay inside the node. Must divide the
    #: world size. 1: off.
    offload_optimizer: bool = False
    #: Keep optimizer state in CPU memory (ZeRO-Offload).
    offload_params: bool = False
    #: Keep partitioned parameters in CPU memory (ZeRO-Infinity style; stage 3 only).
    activation_checkpointing: bool = True
    #: Recompute coprocessor activations in backward (non-reentrant).
    shard_decoder: bool = False
    #: Partition the frozen decoder's transformer layers across ranks (PyTorch FSDP2, no optimizer
    #: state), for bases too large to replicate (Gemma-2 27B, Llama-3 70B). Each layer is all-gathered
    #: when it runs: in the prefix pass, the trace pass and the backward through it (3 gathers per
    #: micro-step). Embeddings, final norm and LM head stay replicated. Not for model.variant
    #: single_model or base_lm (they train the decoder).
    decoder_shard_size: int = 0
    #: Ranks that each copy of the sharded decoder is split over; 0: all ranks. Set it to the GPUs per
    #: node to keep the decoder's gathers on the intra-node links (the copy is then replicated across
    #: nodes, HSDP). Must divide the world size; on fewer ranks than this, all ranks share one copy.


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    #: Write TensorBoard events under run_dir/tb.
    console: bool = True
    #: Print a progress line per logged step on rank 0.
    offsets: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    #: Ahead offsets k whose loss is logged individually (those <= num_ahead).


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    #: The frozen decoder, coprocessor and augmentation shape.
    data: DataConfig = field(default_factory=DataConfig)
    #: Training and validation shards.
    optim: OptimConfig = field(default_factory=OptimConfig)
    #: Optimizer and learning-rate schedule.
    train: TrainConfig = field(default_factory=TrainConfig)
    #: Batch sizes, step budget, intervals, run directory.
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    #: DeepSpeed ZeRO settings.
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    #: Monitoring.

    # ---- derived values -------------------------------------------------------------------------
    def grad_accum_steps(self, world_size: int) -> int:
        """global = micro × world × accumulation; raises ConfigError when not divisible (and for the
        other world-size dependent checks: ``zero.hpz_partition_size`` and ``zero.decoder_shard_size``
        must divide the world size)."""
        micro, glob = self.train.micro_batch_size, self.train.global_batch_size
        if world_size < 1:
            raise ConfigError(f"world size must be >= 1, got {world_size}")
        hpz = self.zero.hpz_partition_size
        if hpz > 1 and world_size % hpz:
            raise ConfigError(
                f"zero.hpz_partition_size={hpz} does not divide the world size {world_size}; set it to "
                "the GPUs per node (a divisor of the world size) or 1 to turn hpZ off"
            )
        shard = self.zero.decoder_shard_size
        if self.zero.shard_decoder and 1 < shard < world_size and world_size % shard:
            raise ConfigError(
                f"zero.decoder_shard_size={shard} does not divide the world size {world_size}; set it to "
                "the GPUs per node (a divisor of the world size) or 0 to split the decoder over all ranks"
            )
        if glob % (micro * world_size):
            raise ConfigError(
                f"train.global_batch_size={glob} is not divisible by train.micro_batch_size={micro} × "
                f"world size {world_size} = {micro * world_size}; choose sizes so that global = micro × "
                "world × gradient accumulation"
            )
        return glob // (micro * world_size)

    def tokens_per_step(self) -> int:
        return self.train.global_batch_size * self.data.seq_len

    def total_tokens(self) -> int:
        return self.tokens_per_step() * self.train.max_steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------------
# Loading, validation, overrides
# --------------------------------------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its ``#:`` comment lines, read from this module's source."""
    import inspect

    lines = inspect.getsource(cls).splitlines()
    docs: dict[str, str] = {}
    current = None
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#:") and current:
            docs[current] = (docs.get(current, "") + " " + stripped[2:].strip()).strip()
        elif ":" in stripped and not stripped.startswith(("#", "def", "@", "class", '"""')):
            name = stripped.split(":", 1)[0].strip()
            current = name if name.isidentifier() else None
        else:
            current = None if not stripped.startswith("#:") else current
    return docs


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(inner)}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value in allowed and type(value) in {type(a) for a in allowed}:
            return value
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and inner is str:
            value = [value]  # a single path where a list of paths is expected
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # pragma: no cover - programming error


def _unknown_key_error(cls: type, key: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(names)}"
    return ConfigError(f"unknown config key '{prefix}{key}'{hint}")


def build_dataclass(cls: type, data: Any, prefix: str = "") -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in by_name:
            raise _unknown_key_error(cls, str(key), prefix)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build_dataclass(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c=value`` in a nested dict, validating path segments against the dataclass tree."""
    parts = dotted.split(".")
    cls: Any = RunConfig
    node = tree
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i]) + ("." if i else "")
        is_last = i == len(parts) - 1
        if cls is dict:  # free-form mapping (model.decoder_config.*)
            if is_last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
            continue
        names = {f.name for f in dataclasses.fields(cls)}
        if part not in names:
            raise _unknown_key_error(cls, part, prefix)
        tp = typing.get_type_hints(cls)[part]
        if is_last:
            node[part] = value
        else:
            if not (dataclasses.is_dataclass(tp) or tp is dict):
                raise ConfigError(
                    f"config key '{prefix}{part}' is a value, not a section: cannot set '{dotted}'"
                )
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
            cls = tp


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` -> ``("optim.lr", 3e-4)``; values are parsed as YAML (ints, floats, bools, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


#: The key that makes a YAML file start from another. Not ``base``: demo budgets already have a ``base``
#: section (the base model's training), and everywhere here "base" means the frozen base model.
EXTENDS_KEY = "extends"


def merge_trees(parent: dict, child: dict) -> dict:
    """``child`` laid over ``parent``: mappings merge key by key (recursively); lists and values replace."""
    out = dict(parent)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_trees(out[key], value)
        else:
            out[key] = value
    return out


def _read_mapping(path: Path) -> dict:
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping of sections")
    return tree


def read_config_tree(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict:
    """The raw mapping of a YAML config file, with its ``extends:`` chain resolved.

    ``extends: ../tiny_cpu.yaml`` (a path relative to the file that names it) makes the file the parent's
    tree with its own keys laid over it (:func:`merge_trees`), so a variant of a config is a short diff
    that cannot drift from it. Parents may extend further; a cycle or a missing parent is one error line.
    The returned tree has no ``extends`` key: a run directory's ``config.yaml`` is always self-contained.
    """
    p = Path(path)
    if not p.is_file():
        named_by = f" (extends: in {_chain[-1]})" if _chain else ""
        raise ConfigError(f"config file not found: {p}{named_by}")
    if p.resolve() in _chain:
        loop = " -> ".join(str(c) for c in (*_chain, p.resolve()))
        raise ConfigError(f"config files extend each other in a loop: {loop}; remove one 'extends:'")
    tree = _read_mapping(p)
    parent = tree.pop(EXTENDS_KEY, None)
    if parent is None:
        return tree
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(f"{p}: '{EXTENDS_KEY}:' must be the path of one YAML file, got {parent!r}")
    parent_path = p.parent / parent
    return merge_trees(read_config_tree(parent_path, (*_chain, p.resolve())), tree)


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """Load a YAML file (or defaults when ``path`` is None), apply ``--set`` overrides, validate."""
    tree = {} if path is None else read_config_tree(path)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        cfg = build_dataclass(RunConfig, tree)
    except ConfigError as e:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{e}") from None
    validate(cfg)
    return cfg


def config_from_dict(tree: dict) -> RunConfig:
    cfg = build_dataclass(RunConfig, tree)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Checks that span fields. World-size dependent checks live in ``grad_accum_steps``."""
    m, t, o = cfg.model, cfg.train, cfg.optim
    positive = {
        "model.num_latents": m.num_latents,
        "model.num_ahead": m.num_ahead,
        "model.num_positions": m.num_positions,
        "model.loss_chunk_size": m.loss_chunk_size,
        "data.seq_len": cfg.data.seq_len,
        "train.global_batch_size": t.global_batch_size,
        "train.micro_batch_size": t.micro_batch_size,
        "train.max_steps": t.max_steps,
        "train.log_interval": t.log_interval,
        "train.checkpoint_interval": t.checkpoint_interval,
        "train.keep_checkpoints": t.keep_checkpoints,
        "data.read_retries": cfg.data.read_retries,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    for key, value in {
        "train.eval_interval": t.eval_interval,
        "optim.warmup_steps": o.warmup_steps,
        "data.num_workers": cfg.data.num_workers,
        "data.prefetch_shards": cfg.data.prefetch_shards,
        "optim.grad_clip": o.grad_clip,
        "optim.weight_decay": o.weight_decay,
    }.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if t.hang_timeout_s is not None and t.hang_timeout_s < 0:
        raise ConfigError(
            f"train.hang_timeout_s must be >= 0 (0: no watchdog) or null, got {t.hang_timeout_s}"
        )
    for key, value in {
        "data.read_timeout_s": cfg.data.read_timeout_s,
        "train.hang_slow_phase_s": t.hang_slow_phase_s,
        "train.collective_timeout_s": t.collective_timeout_s,
    }.items():
        if not value > 0:
            raise ConfigError(f"{key} must be > 0 seconds, got {value}")
    if not o.lr > 0:
        raise ConfigError(f"optim.lr must be > 0, got {o.lr}")
    if not 0 <= m.anchor_fraction <= 1:
        raise ConfigError(f"model.anchor_fraction must be in [0, 1], got {m.anchor_fraction}")
    if m.anchor_text is not None and not cfg.data.tokenizer:
        raise ConfigError("model.anchor_text needs data.tokenizer (the marker is looked up in it)")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size={t.micro_batch_size}"
        )
    # The last trace must fit: a position p needs p + num_ahead < seq_len, and p >= 0.
    if m.num_ahead >= cfg.data.seq_len:
        raise ConfigError(
            f"model.num_ahead={m.num_ahead} must be < data.seq_len={cfg.data.seq_len} (each trace predicts "
            "num_ahead tokens after its position)"
        )
    if m.num_positions > cfg.data.seq_len - m.num_ahead:
        raise ConfigError(
            f"model.num_positions={m.num_positions} exceeds the {cfg.data.seq_len - m.num_ahead} valid "
            f"positions of a {cfg.data.seq_len}-token sequence with num_ahead={m.num_ahead}"
        )
    if m.decoder_path is None and not m.decoder_config:
        raise ConfigError("model: set model.decoder_path (a local HF model dir) or model.decoder_config")
    if m.decoder_config and "model_type" not in m.decoder_config:
        raise ConfigError(
            "model.decoder_config must name its architecture with 'model_type' (e.g. gemma2, llama)"
        )
    if m.variant == "lora" and m.lora_rank < 1:
        raise ConfigError(f"model.lora_rank must be >= 1, got {m.lora_rank}")
    if m.variant == "lora" and m.coprocessor_init != "decoder":
        raise ConfigError(
            "model.variant=lora adapts a frozen copy of the decoder: needs model.coprocessor_init=decoder"
        )
    if m.variant == "async" and m.async_delay < 1:
        raise ConfigError(f"model.async_delay must be >= 1 for model.variant=async, got {m.async_delay}")
    if m.lora_alpha < 0:
        raise ConfigError(f"model.lora_alpha must be >= 0, got {m.lora_alpha}")
    if cfg.zero.offload_params and cfg.zero.stage != 3:
        raise ConfigError("zero.offload_params needs zero.stage=3")
    if cfg.zero.hpz_partition_size < 1:
        raise ConfigError(
            f"zero.hpz_partition_size must be >= 1 (1 turns hpZ off), got {cfg.zero.hpz_partition_size}"
        )
    if cfg.zero.hpz_partition_size > 1 and cfg.zero.stage != 3:
        raise ConfigError(
            f"zero.hpz_partition_size={cfg.zero.hpz_partition_size} (ZeRO++ hpZ) partitions parameters, "
            f"which only zero.stage=3 does (got stage {cfg.zero.stage}); set zero.stage=3 or "
            "zero.hpz_partition_size=1"
        )
    z = cfg.zero
    if z.decoder_shard_size < 0 or z.decoder_shard_size == 1:
        raise ConfigError(
            f"zero.decoder_shard_size must be 0 (all ranks) or >= 2, got {z.decoder_shard_size}; "
            "zero.shard_decoder=false replicates the decoder"
        )
    if z.shard_decoder and m.variant in ("single_model", "base_lm"):
        raise ConfigError(
            f"zero.shard_decoder=true partitions the frozen decoder, but model.variant={m.variant} trains "
            "the decoder itself (it is inside the ZeRO engine already); set zero.shard_decoder=false"
        )
    bad = [k for k in cfg.logging.offsets if k < 1]
    if bad:
        raise ConfigError(f"logging.offsets must be >= 1, got {bad}")


# --------------------------------------------------------------------------------------------------
# DeepSpeed JSON (generated, never hand-kept)
# --------------------------------------------------------------------------------------------------


def deepspeed_config(cfg: RunConfig, world_size: int, bf16: bool) -> dict:
    """The DeepSpeed config dict this run implies. The optimizer and LR schedule are built by the
    engine module from ``cfg.optim`` (so CPU and GPU use the same schedule code); the JSON carries the
    batch geometry, ZeRO, precision and clipping.

    Precision: under bf16, ``data_types.grad_accum_dtype = "fp32"``: DeepSpeed 0.19.8 then sums the
    gradients of the micro-steps in fp32 (ZeRO-3: the fp32 partition buffer each reduce-scatter adds
    into; ZeRO-2: fp32 grad partitions; ZeRO-1: DeepSpeed's BF16_Optimizer with fp32 grad buffers).
    Without it the sum over 8-64 micro-steps is rounded to bf16 at every add. Each micro-step's own
    reduce-scatter still travels in bf16 (``communication_data_type`` defaults to the model dtype).
    DeepSpeed has no fp32 accumulation without ZeRO (stage 0 + bf16 + fp32 raises in its engine), so
    stage 0 under bf16 is refused here."""
    accum = cfg.grad_accum_steps(world_size)
    z = cfg.zero
    if bf16 and z.stage == 0:
        raise ConfigError(
            "zero.stage=0 under bf16 (every GPU run) would accumulate gradients in bf16 (DeepSpeed accumulates in fp32 only "
            "with ZeRO); set zero.stage to 1, 2 or 3"
        )
    zero: dict[str, Any] = {"stage": z.stage}
    if z.stage == 3:
        zero.update(
            {
                "stage3_gather_16bit_weights_on_model_save": True,
                "overlap_comm": True,
                "contiguous_gradients": True,
                "reduce_bucket_size": 5e7,
                "stage3_prefetch_bucket_size": 5e7,
                "stage3_param_persistence_threshold": 1e5,
            }
        )
        if z.hpz_partition_size > 1:
            zero["zero_hpz_partition_size"] = z.hpz_partition_size
    elif z.stage == 2:
        zero.update(
            {
                "overlap_comm": True,
                "contiguous_gradients": True,
                "reduce_scatter": True,
                "reduce_bucket_size": 5e7,
                "allgather_bucket_size": 5e7,
            }
        )
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if z.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    out = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(bf16)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if bf16:
        out["data_types"] = {"grad_accum_dtype": "fp32"}
    return out
