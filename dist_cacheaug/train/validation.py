"""Validation loss per ahead offset, augmented vs the frozen baseline (no DeepSpeed here).

The validation set is the first ``eval_samples`` sequences of the held-out split; rank r of W takes
samples r, r+W, .... Sample i's augmentation positions come from a generator seeded with
``(seed, i)``, so the numbers do not depend on the world size or batch size (up to float summation
order), and a reloaded export reproduces the trainer's own ``val_loss``.

Baseline at offset k: the plain decoder's cross-entropy for the same target token x[p+k], predicted
from x[0..p+k-1] (no latents) -- i.e. the decoder's own next-token loss at position p+k-1.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..config import RunConfig
from ..core.losses import baseline_ce, summarize_offsets
from ..core.model import sample_positions
from ..data import build_eval_loader


def eval_positions(sample_index: int, cfg: RunConfig) -> torch.Tensor:
    """[P] positions of validation sample ``sample_index`` (a pure function of the seed and index)."""
    seed = int(np.random.SeedSequence([cfg.train.seed, 0xE7A1, sample_index]).generate_state(1)[0])
    gen = torch.Generator().manual_seed(seed)
    m = cfg.model
    return sample_positions(1, cfg.data.seq_len, m.num_positions, m.num_ahead, gen)[0]


@torch.no_grad()
def validation_sums(
    loss_fn: Callable,
    decoder,
    cfg: RunConfig,
    *,
    rank: int,
    world_size: int,
    eval_samples: int,
    device: torch.device,
    max_batches: int | None = None,
) -> torch.Tensor:
    """This rank's ``[2 * N_A + 1]`` float64 sums on ``device``: augmented CE per offset, baseline CE per
    offset, number of traces. ``loss_fn(input_ids, positions, num_ahead)`` -> object with
    ``loss_per_offset`` (the model's own chunked CE); the baseline CE is chunked by
    ``cfg.model.loss_chunk_size`` too. Sums stay on ``device``: no host sync per batch."""
    na = cfg.model.num_ahead
    loader = build_eval_loader(
        cfg.data.val_shards,
        seq_len=cfg.data.seq_len,
        batch_size=cfg.train.micro_batch_size,
        rank=rank,
        world_size=world_size,
        max_samples=eval_samples,
    )
    chunk = cfg.model.loss_chunk_size
    sums = torch.zeros(2 * na + 1, dtype=torch.float64, device=device)
    seen = 0
    for b, batch in enumerate(loader):
        if max_batches is not None and b >= max_batches:
            break
        ids = batch["input_ids"].to(device)
        idx = [rank + (seen + i) * world_size for i in range(ids.shape[0])]
        seen += ids.shape[0]
        positions = torch.stack([eval_positions(i, cfg) for i in idx]).to(device)
        traces = positions.numel()
        out = loss_fn(ids, positions, na)
        sums[:na] += out.loss_per_offset.detach().to(sums) * traces
        rows = (positions[:, :, None] + torch.arange(na, device=device)).reshape(ids.shape[0], -1)
        base = baseline_ce(decoder, ids, chunk, rows=rows)  # x[p+k] is predicted at row p+k-1
        sums[na : 2 * na] += base.reshape(-1, na).double().sum(0).to(sums)
        sums[-1] += traces
    return sums


def summarize(sums: torch.Tensor, offsets: list[int]) -> dict[str, float]:
    """Metrics from (all-reduced) sums: ``val_loss``, ``val_baseline``, ``val_loss_k*``,
    ``val_baseline_k*`` for the logged offsets."""
    sums = sums.detach().cpu()
    na = (sums.numel() - 1) // 2
    per_k = summarize_offsets(sums[:na], sums[na : 2 * na], float(sums[-1]))
    aug, base = per_k["augmented_ce"], per_k["baseline_ce"]
    out = {"val_loss": _mean(aug), "val_baseline": _mean(base)}
    for k in offsets:
        if k <= na:
            out[f"val_loss_k{k}"] = aug[k - 1]
            out[f"val_baseline_k{k}"] = base[k - 1]
    return out


def _mean(values: list[float]) -> float:
    return float(torch.tensor(values, dtype=torch.float64).mean())  # torch's float64 summation order


def eval_samples_for(cfg: RunConfig, world_size: int) -> int:
    """Validation set size: ``train.eval_batches`` micro-batches per rank."""
    return cfg.train.eval_batches * cfg.train.micro_batch_size * world_size
