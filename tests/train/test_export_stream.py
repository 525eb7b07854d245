"""Checkpoint and export without whole-model gathers, on 2 gloo ranks under ZeRO-3: the streamed export is
byte-identical to the whole-module gather it replaced, and the consolidated fp32 weights gathered onto
rank 0 equal DeepSpeed's own all-gathered ones exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import tiny_run_config

from dist_cacheaug import distributed, load_config

VARIANTS = ("coprocessor", "lora", "pause")


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from deepspeed.utils import safe_get_full_fp32_param

    from dist_cacheaug.core.decoder import build_decoder
    from dist_cacheaug.train.engine import build_engine, gathered, streaming_writer
    from dist_cacheaug.variants import build_trainable

    env = distributed.DistEnv(rank, world, rank, world, "127.0.0.1", port, "env")
    distributed.init_process_group(env, torch.device("cpu"))
    out = Path(out_dir)
    result = {}
    try:
        for variant in VARIANTS:
            (out / f"{variant}-{rank}").mkdir(parents=True, exist_ok=True)
            cfg = load_config(
                tiny_run_config(out / f"{variant}-{rank}", out / "no-shards"),
                [
                    f"model.variant={variant}",
                    "zero.stage=3",
                    f"train.global_batch_size={2 * world}",
                    "train.micro_batch_size=2",
                ],
            )
            model = build_trainable(cfg, build_decoder(cfg.model, device=torch.device("cpu"), seed=0))
            eng = build_engine(cfg, model, world_size=world, device=torch.device("cpu"))
            g = torch.Generator().manual_seed(rank)
            ids = torch.randint(0, 320, (2, 24), generator=g)  # tiny_run_config's vocabulary
            pos = torch.tensor([[3, 9], [5, 12]])
            eng.backward(eng.forward(ids, pos, 2).loss)
            eng.step()  # weights away from their init, master copy != a fresh cast
            streamed, whole = out / variant / "streamed", out / variant / "whole"
            if rank == 0:
                model.save_pretrained(streamed, streaming_writer(True))
            else:
                model.save_pretrained(out / variant / f"scratch{rank}", streaming_writer(False))
            with gathered(eng.engine.module):  # the export before this change: the whole module at once
                if rank == 0:
                    model.save_pretrained(whole)
                full = {  # frozen ones (LoRA's base weights) have no master copy: the weights themselves
                    n: (safe_get_full_fp32_param(p) if p.requires_grad else p.detach().float()).clone()
                    for n, p in eng.engine.module.named_parameters()
                }
            result[variant] = {"mine": eng.consolidated_fp32(), "deepspeed": full}
    finally:
        distributed.destroy()
    torch.save(result, out / f"rank{rank}.pt")


@pytest.mark.distributed
@pytest.mark.slow
def test_streamed_export_and_consolidation_equal_the_whole_module_gather(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, distributed.free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    for variant in VARIANTS:
        streamed, whole = tmp_path / variant / "streamed", tmp_path / variant / "whole"
        files = sorted(p.relative_to(whole) for p in whole.rglob("*") if p.is_file())
        assert any(f.suffix == ".safetensors" for f in files), variant
        assert files == sorted(p.relative_to(streamed) for p in streamed.rglob("*") if p.is_file())
        for f in files:
            assert (streamed / f).read_bytes() == (whole / f).read_bytes(), (variant, f)
        mine, ds = r0[variant]["mine"], r0[variant]["deepspeed"]
        assert mine.keys() == ds.keys() and mine
        for name in ds:
            assert torch.equal(mine[name], ds[name]), (variant, name)  # the same floats, gathered another way
        assert r1[variant]["mine"] == {}  # rank 1 holds nothing of it
