"""The paper's Table 1: perplexity of the k-th token after inserting N_L latents, vs the frozen decoder.

For every sampled position p of a held-out sequence and k = 1..max_k (beyond the trained N_A too):

* augmented: CE of x[p+k] when the decoder reads x[0..p], the N_L latents, then x[p+1..p+k-1] — the
  batched multi-position pass (``CacheAugmentedLM.training_loss`` with ``num_ahead=max_k``);
* baseline: CE of x[p+k] from the frozen decoder given x[0..p+k-1] — one plain forward per sequence.

Perplexity at k is exp(mean CE at k); the change is ``100 * (ppl_aug / ppl_base - 1)`` percent.
Positions: ``all`` valid ones (0..seq_len-1-max_k), ``stride S`` (0, S, 2S, ...) or ``random R`` (R per
sequence, seeded by the sequence index, so every checkpoint sees the same positions).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..core.losses import baseline_ce, summarize_offsets
from ..core.model import CacheAugmentedLM, no_latent_trace_loss
from ..distributed import all_gather_object

TABLE_KS = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class PositionSpec:
    kind: str  # "all" | "stride" | "random"
    value: int = 0
    seed: int = 0

    def __str__(self) -> str:
        return self.kind if self.kind == "all" else f"{self.kind} {self.value}"

    def positions(self, seq_len: int, max_k: int, sample_index: int) -> torch.Tensor:
        """[P] sorted positions for one sequence."""
        valid = seq_len - max_k  # p in 0..seq_len-1-max_k
        if valid < 1:
            raise ValueError(f"sequences of {seq_len} tokens are too short for max_k={max_k}")
        if self.kind == "all":
            return torch.arange(valid)
        if self.kind == "stride":
            return torch.arange(0, valid, self.value)
        seed = int(np.random.SeedSequence([self.seed, 0x7AB1E1, sample_index]).generate_state(1)[0])
        gen = torch.Generator().manual_seed(seed)
        return torch.randperm(valid, generator=gen)[: min(self.value, valid)].sort().values


def parse_positions(spec: str | PositionSpec | Iterable[str], seed: int = 0) -> PositionSpec:
    """``"all"``, ``"stride 16"``, ``"random 32"`` (also ``stride:16`` / ``stride=16``)."""
    if isinstance(spec, PositionSpec):
        return spec
    text = spec if isinstance(spec, str) else " ".join(spec)
    parts = [t for t in re.split(r"[\s:=]+", text.strip()) if t]
    if parts == ["all"]:
        return PositionSpec("all", seed=seed)
    if len(parts) == 2 and parts[0] in ("stride", "random") and parts[1].isdigit() and int(parts[1]) >= 1:
        return PositionSpec(parts[0], int(parts[1]), seed)
    raise ValueError(f"--positions must be 'all', 'stride S' or 'random R' with S, R >= 1; got {text!r}")


# ---- the measurement -------------------------------------------------------------------------------
def _data_shard(eval_batches, shard: tuple[int, int] | None) -> tuple[int, int]:
    """(rank, world size) of the data this process reads: ``shard`` when given, else the loader's own
    ``rank`` / ``world_size`` (:class:`~dist_cacheaug.data.EvalLoader`), else (0, 1)."""
    if shard is None:
        shard = (int(getattr(eval_batches, "rank", 0)), int(getattr(eval_batches, "world_size", 1)))
    rank, world = shard
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard rank {rank} is not in [0, world_size={world})")
    return rank, world


def _combine(
    records: list, seq_len: int | None, world: int
) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """Sums over every rank's per-batch records ``(first global sample, aug [max_k], base [max_k],
    sequences, traces)``, added in global sample order so the float64 sums do not depend on how the
    sequences were split (with batch size 1 they equal a 1-rank run's bit for bit)."""
    if world > 1:
        if not dist.is_initialized() or dist.get_world_size() != world:
            raise RuntimeError(
                f"the evaluation data is split over {world} ranks but torch.distributed is not initialised "
                f"with that world size"
            )
        gathered = all_gather_object((records, seq_len))
        records = [r for part, _ in gathered for r in part]
        seq_len = next((n for _, n in gathered if n is not None), None)
    records = sorted(records, key=lambda r: r[0])
    if not records:
        return torch.zeros(0), torch.zeros(0), 0, 0, seq_len
    max_k = len(records[0][1])
    aug_sum = torch.zeros(max_k, dtype=torch.float64)
    base_sum = torch.zeros(max_k, dtype=torch.float64)
    seqs = traces = 0
    for _, aug, base, b, t in records:
        aug_sum += torch.tensor(aug, dtype=torch.float64)
        base_sum += torch.tensor(base, dtype=torch.float64)
        seqs, traces = seqs + b, traces + t
    return aug_sum, base_sum, seqs, traces, seq_len


@torch.no_grad()
def evaluate_insertion(
    model: CacheAugmentedLM,
    eval_batches: Iterable[dict],
    positions_spec: str | PositionSpec = "stride 16",
    max_k: int = 32,
    *,
    augment: bool = True,
    positions_per_pass: int = 64,
    max_sequences: int | None = None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "insertion eval",
    shard: tuple[int, int] | None = None,
) -> dict:
    """Table 1 numbers over ``eval_batches`` (dicts with ``input_ids`` [b, n]). ``augment=False``: the
    "augmented" column runs the same pipeline with zero latents (it must then equal the baseline).
    ``positions_per_pass`` bounds the traces per batched pass (memory). ``max_sequences`` caps the
    sequences *this process* reads. Returns a dict of lists per k.

    Data parallel: when the batches are this rank's share of the data (``shard=(rank, world_size)``,
    by default taken from an :class:`~dist_cacheaug.data.EvalLoader`, whose rank r reads global samples
    r, r+W, ...), every rank must call this (it all-gathers the per-batch sums over ``torch.distributed``)
    and every rank gets the totals over all ranks. Random positions are seeded by the *global* sample
    index, so the numbers do not depend on the world size."""
    from data_tools.shards import progress_bar

    if max_k < 1:
        raise ValueError(f"max_k must be >= 1, got {max_k}")
    spec = parse_positions(positions_spec, seed)
    rank, world = _data_shard(eval_batches, shard)
    decoder = model.baseline_decoder  # the frozen original (variants that finetune the decoder keep it)
    device = next(decoder.parameters()).device
    records = []  # (first global sample index, aug CE sum [max_k], base CE sum [max_k], sequences, traces)
    seqs = 0
    seq_len = None
    total = None
    if hasattr(eval_batches, "num_samples"):
        total = (
            eval_batches.num_samples
            if max_sequences is None
            else min(max_sequences, eval_batches.num_samples)
        )
    bar = progress_bar(
        total=total,
        desc=desc if world == 1 else f"{desc} (rank 0 of {world})",
        unit="seq",
        enabled=progress and rank == 0,  # and only on a terminal: never frames in a log file
    )
    for batch in eval_batches:
        ids = batch["input_ids"] if isinstance(batch, dict) else batch
        if max_sequences is not None:
            ids = ids[: max_sequences - seqs]
        if ids.shape[0] == 0:
            break
        ids = ids.to(device)
        b, n = ids.shape
        seq_len = n
        index = [rank + world * (seqs + i) for i in range(b)]  # global sample indices
        pos = torch.stack([spec.positions(n, max_k, j) for j in index]).to(device)  # [b, P]
        base = baseline_ce(decoder, ids)  # [b, n-1]; x[p+k] is predicted at row p+k-1
        rows = pos[:, :, None] + torch.arange(max_k, device=device)
        base_b = torch.gather(base, 1, rows.reshape(b, -1)).view(-1, max_k).double().sum(0).cpu()
        aug_b = torch.zeros(max_k, dtype=torch.float64)
        for chunk in pos.split(positions_per_pass, dim=1):
            if augment:
                out = model.training_loss(ids, chunk, max_k)
            else:
                out = no_latent_trace_loss(decoder, ids, chunk, max_k)
            aug_b += out.loss_per_offset.double().cpu() * chunk.numel()
        records.append((index[0], aug_b.tolist(), base_b.tolist(), b, pos.numel()))
        seqs += b
        bar.update(b)
        bar.set_postfix(traces=sum(r[4] for r in records))
        if max_sequences is not None and seqs >= max_sequences:
            break
    bar.close()
    aug_sum, base_sum, seqs, traces, seq_len = _combine(records, seq_len, world)
    if traces == 0:
        raise ValueError("no evaluation sequences: the data yielded no batches")
    result = summarize_offsets(aug_sum, base_sum, traces)
    result.update(
        num_sequences=seqs,
        seq_len=seq_len,
        positions=str(spec),
        max_k=max_k,
        augment=augment,
        num_latents=model.num_latents,
        convention=model.aug_config.convention,
    )
    if world > 1:
        result["world_size"] = world
    return result


# ---- reporting -------------------------------------------------------------------------------------
def table_ks(max_k: int) -> list[int]:
    ks = [k for k in TABLE_KS if k <= max_k]
    return ks if max_k in ks else [*ks, max_k]


def markdown_table(results: dict[str, dict]) -> str:
    """Table-1-style Markdown: relative ppl change per k, then the perplexities behind it."""
    first = next(iter(results.values()))
    ks = table_ks(first["max_k"])
    head = "| checkpoint | N_L | " + " | ".join(f"k={k}" for k in ks) + " |"
    sep = "|---|---|" + "---|" * len(ks)
    lines = [
        "Relative perplexity change at the k-th token after insertion (%, negative = better)",
        "",
        head,
        sep,
    ]
    for name, r in results.items():
        cells = " | ".join(f"{r['ppl_change_pct'][k - 1]:+.2f}" for k in ks)
        lines.append(f"| {name} | {r['num_latents']} | {cells} |")
    lines += ["", "Perplexity: baseline / augmented", "", head, sep]
    for name, r in results.items():
        cells = " | ".join(f"{r['baseline_ppl'][k - 1]:.3f} / {r['augmented_ppl'][k - 1]:.3f}" for k in ks)
        lines.append(f"| {name} | {r['num_latents']} | {cells} |")
    r = first
    lines += [
        "",
        f"{r['num_sequences']} sequences of {r['seq_len']} tokens, positions `{r['positions']}`, "
        f"{r['num_traces']} insertion positions per checkpoint, k = 1..{r['max_k']}.",
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], path: Path) -> bool:
    """PNG of ppl change vs k, one line per checkpoint. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("cacheaug eval: matplotlib is not installed; skipping the PNG plot", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, r in results.items():
        ax.plot(
            r["k"], r["ppl_change_pct"], marker="o", markersize=3, label=f"{name} (N_L={r['num_latents']})"
        )
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ks = table_ks(max(r["max_k"] for r in results.values()))
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k (token after the insertion)")
    ax.set_ylabel("perplexity change vs frozen decoder (%)")
    ax.set_title("Perplexity change after cache augmentation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def log_tensorboard(results: dict[str, dict], tb_dir: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    for name, r in results.items():
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        with SummaryWriter(log_dir=str(tb_dir / safe)) as w:
            for i, k in enumerate(r["k"]):
                w.add_scalar("insertion/ppl_change_pct", r["ppl_change_pct"][i], k)
                w.add_scalar("insertion/augmented_ce", r["augmented_ce"][i], k)
                w.add_scalar("insertion/baseline_ce", r["baseline_ce"][i], k)
                w.add_scalar("insertion/augmented_ppl", r["augmented_ppl"][i], k)
                w.add_scalar("insertion/baseline_ppl", r["baseline_ppl"][i], k)
            w.add_text("insertion/table", markdown_table({name: r}))


def write_report(results: dict[str, dict], out: str | os.PathLike) -> dict[str, Path]:
    """results.json, results.md, ppl_change.png (when matplotlib is there), tb/. Returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "ppl_change.png"}
    paths["json"].write_text(json.dumps({"checkpoints": results}, indent=2) + "\n")
    paths["md"].write_text(markdown_table(results))
    if not plot(results, paths["png"]):
        del paths["png"]
    log_tensorboard(results, out / "tb")
    paths["tb"] = out / "tb"
    return paths


def training_tokenizer_identity(cfg) -> str | None:
    """The tokenizer identity the run was trained with: its ``data.tokenizer`` when that exists here,
    else the manifest of its first training shard directory; None when neither is available."""
    from data_tools.errors import DataError
    from data_tools.shards import read_manifest
    from data_tools.tokenizer import load_tokenizer

    if cfg is None:
        return None
    if cfg.data.tokenizer and os.path.exists(cfg.data.tokenizer):
        try:
            return load_tokenizer(cfg.data.tokenizer).identity
        except DataError:
            pass
    for d in cfg.data.train_shards:
        if os.path.isfile(os.path.join(d, "manifest.json")):
            try:
                return read_manifest(d)["tokenizer"]["identity"]
            except DataError:
                return None
    return None


def _checkpoint_names(paths: list[str]) -> list[str]:
    names = []
    for p in paths:
        q = Path(p).resolve()
        name = q.parent.name if q.name == "export" else q.name
        base, i = name, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.append(name)
    return names


def run_eval_cli(args) -> int:
    """``cacheaug eval``: Table 1 for one or more checkpoints on held-out shards.

    Data parallel under any launcher that sets ``RANK`` / ``WORLD_SIZE`` (``torchrun``, the
    ``deepspeed`` launcher) or inside ``srun``: one process per device, rank r evaluates global
    sequences r, r+W, ..., the sums are gathered, and rank 0 alone writes the report and prints.
    A plain ``cacheaug eval`` is world size 1 and starts no process group."""
    from .data_parallel import data_parallel

    with data_parallel(args.device) as (env, device):
        return _run_eval(args, env, device)


def _run_eval(args, env, device) -> int:
    from data_tools.errors import DataError
    from data_tools.shards import read_manifest

    from ..data import build_eval_loader
    from .inference import InferenceError, check_vocab, load_for_inference

    try:
        spec = parse_positions(args.positions, args.seed)
    except ValueError as e:
        raise InferenceError(str(e)) from e
    data = args.data
    manifests = {}
    for d in data:
        try:
            manifests[d] = read_manifest(d)
        except DataError as e:
            raise InferenceError(str(e)) from e
    seq_lens = {m["seq_len"] for m in manifests.values()}
    if len(seq_lens) != 1:
        raise InferenceError(f"--data directories have different seq_len values: {sorted(seq_lens)}")
    seq_len = seq_lens.pop()
    if seq_len - args.max_k < 1:
        raise InferenceError(f"--max-k {args.max_k} leaves no valid position in {seq_len}-token sequences")
    results = {}
    for ckpt, name in zip(args.checkpoint, _checkpoint_names(args.checkpoint)):
        model, cfg = load_for_inference(ckpt, decoder=args.decoder, device=device)
        identity = training_tokenizer_identity(cfg)
        for d, m in manifests.items():
            check_vocab(model, int(m["tokenizer"]["vocab_size"]), f"{d}/manifest.json")
        try:
            loader = build_eval_loader(
                data,
                seq_len=seq_len,
                batch_size=args.batch_size,
                rank=env.rank,
                world_size=env.world_size,
                max_samples=args.max_sequences,
                tokenizer_identity=identity,
                split=args.split,
            )
        except DataError as e:
            raise InferenceError(f"{e} (checkpoint {ckpt})") from e
        r = evaluate_insertion(
            model,
            loader,
            spec,
            args.max_k,
            augment=not args.no_augment,
            positions_per_pass=args.positions_per_pass,
            seed=args.seed,  # the loader caps the sequences at --max-sequences over all ranks
            progress=not args.no_progress,
            desc=name,
        )
        r["checkpoint"] = str(ckpt)
        if cfg is not None:
            r["num_ahead_trained"] = cfg.model.num_ahead
        results[name] = r
        del model
    if not env.is_main:
        return 0
    paths = write_report(results, args.out)
    print(markdown_table(results))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
