"""Why the paper's `insert` convention fails on the demo's tiny base (docs/results_notes.md, "The insert
convention at this scale"): the frozen base's loss of x[p+1] when the tokens after the latents sit at
shifted positions, measured without any training.

Under `insert` the latents take positions p+1..p+N_L and whatever follows them continues at p+N_L+1, so
the base meets a gap of N_L positions it never saw in pretraining. Under `refeed` x[p] is read again at
its own position p after the latents. Rows (k = 1 cross-entropy of x[p+1], random points of the
validation shards):

- baseline: x[0..p] at positions 0..p;
- refeed, zero latents: x[0..p-1], N_L zero vectors at p+1..p+N_L, then x[p] at p (an untrained
  coprocessor's best case under `refeed`);
- insert, last latent = x[p]: x[0..p], zeros at p+1..p+N_L-1, x[p]'s embedding at p+N_L (the best
  a latent could do by copying the token it follows);
- x[p] shifted by N_L: x[0..p-1], then x[p] alone at position p+N_L (the gap and nothing else).

    python bench/position_shift.py runs/demo_quick              # a finished (or --full) demo run directory
    python bench/position_shift.py runs/demo_quick --points 16 --latents 4 16
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from data_tools.shards import read_manifest, read_shard
from dist_cacheaug.cli import quiet_libraries


def val_sequences(shards: Path) -> list[torch.Tensor]:
    m = read_manifest(str(shards))
    out = []
    for entry in m["splits"]["val"]["shards"]:
        rows = read_shard(str(shards / entry["name"]), entry, seq_len=m["seq_len"], dtype=m["dtype"])
        out.extend(torch.as_tensor(r.astype("int64")) for r in rows)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a demo run directory (holds base/export and data/shards)")
    p.add_argument("--points", type=int, default=16, help="random insertion points per validation sequence")
    p.add_argument("--latents", type=int, nargs="+", default=[4, 16])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    quiet_libraries()  # no weight-loading bar

    decoder = AutoModelForCausalLM.from_pretrained(args.run_dir / "base" / "export").eval()
    embed = decoder.get_input_embeddings()
    gen = torch.Generator().manual_seed(args.seed)
    losses: dict[str, list[float]] = {}

    def add(name: str, inputs: torch.Tensor, positions: list[torch.Tensor], target: torch.Tensor) -> None:
        # an explicit all-ones mask: with position ids that jump and no mask, transformers would read the
        # batch as packed sequences and cut x[p] off from the tokens before it
        mask = torch.ones(1, len(inputs), dtype=torch.long)
        pos = torch.cat(positions)[None]
        logits = decoder(inputs_embeds=inputs[None], position_ids=pos, attention_mask=mask).logits[0, -1]
        losses.setdefault(name, []).append(
            torch.nn.functional.cross_entropy(logits[None], target[None]).item()
        )

    with torch.no_grad():
        for seq in val_sequences(args.run_dir / "data" / "shards"):
            for pt in torch.randint(8, len(seq) - 2, (args.points,), generator=gen).tolist():
                e, target = embed(seq[: pt + 1]), seq[pt + 1]
                head, last = torch.arange(pt), torch.tensor([pt])
                add("baseline", e, [head, last], target)
                for n_l in args.latents:
                    zeros = e.new_zeros(n_l, e.shape[-1])
                    gap = torch.arange(pt + 1, pt + 1 + n_l)
                    add(
                        f"refeed, zero latents (N_L={n_l})",
                        torch.cat([e[:-1], zeros, e[-1:]]),
                        [head, gap, last],
                        target,
                    )
                    add(
                        f"insert, last latent = x[p] (N_L={n_l})",
                        torch.cat([e, zeros[1:], e[-1:]]),
                        [head, last, gap],
                        target,
                    )
                    add(f"x[p] shifted by N_L (N_L={n_l})", e, [head, last + n_l], target)
    base = sum(losses["baseline"]) / len(losses["baseline"])
    print(
        f"{args.run_dir}: {len(losses['baseline'])} points; {platform.processor() or platform.machine()}, torch {torch.__version__}"
    )
    print(f"{'input':42s} {'k=1 CE':>8s} {'vs baseline':>12s}")
    for name, values in losses.items():
        mean = sum(values) / len(values)
        print(f"{name:42s} {mean:8.4f} {100 * (mean / base - 1):+11.1f} %")


if __name__ == "__main__":
    main()
