"""Shared pieces for the evaluation / generation / downstream tests: a tiny sentencepiece tokenizer
trained on the arithmetic corpus, tiny shards, and a hand-built run directory (decoder/, export/,
config.yaml) as the trainer would leave it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import TINY, tiny_decoder

from data_tools import make_shards, train_tokenizer
from data_tools.synthetic import write_arithmetic_corpus
from dist_cacheaug import CacheAugmentedLM, load_config

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
SEQ_LEN = 48


class CharTokenizer:
    """A character tokenizer over a fixed alphabet (ids 3..), for hand-checked scores."""

    ALPHABET = " \nabcdefghijklmnopqrstuvwxyzQA0123456789:#?.,-+*="

    def __init__(self):
        self.eos_id, self.bos_id, self.pad_id = 2, 1, 0
        self.vocab_size = 3 + len(self.ALPHABET)
        self.identity, self.path = "char:test", "<chars>"

    def encode(self, text: str) -> list[int]:
        return [3 + self.ALPHABET.index(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(self.ALPHABET[i - 3] for i in ids if 3 <= i < self.vocab_size)


def build_run_dir(
    root: Path,
    tok_dir: Path,
    shards: Path,
    vocab: int,
    *,
    num_latents=3,
    convention="insert",
    family="gemma2",
    name="run",
) -> Path:
    dec = tiny_decoder(family, vocab_size=vocab)
    run = root / name
    dec.save_pretrained(run / "decoder")
    model = CacheAugmentedLM.from_decoder(dec, num_latents=num_latents, convention=convention, seed=1)
    with torch.no_grad():  # a coprocessor that differs from the decoder, so augmentation changes things
        for p in model.coprocessor.parameters():
            if p.dim() > 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    model.save_pretrained(run / "export")
    dcfg = dict(TINY[family], vocab_size=vocab)
    cfg = load_config(
        ROOT / "configs" / "tiny_cpu.yaml",
        [
            f"model.decoder_config={json.dumps(dcfg)}",
            f"model.num_latents={num_latents}",
            f"model.convention={convention}",
            f"data.tokenizer={tok_dir}",
            f"data.train_shards=[{shards}]",
            f"data.val_shards=[{shards}]",
            f"data.seq_len={SEQ_LEN}",
            f"train.run_dir={run}",
        ],
    )
    (run / "config.yaml").write_text(cfg.to_yaml())
    return run


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """(root, tokenizer dir, shard dir, run dir, vocab size)."""
    root = tmp_path_factory.mktemp("tiny_world")
    corpus = write_arithmetic_corpus(root / "corpus.jsonl", docs=40, seed=0, problems_per_doc=4)
    docs = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    tok = train_tokenizer(docs, str(root / "tok"), vocab_size=120, byte_fallback=False, num_threads=1)
    shards = root / "shards"
    make_shards(
        str(root / "tok"), [str(corpus)], str(shards), seq_len=SEQ_LEN, val_fraction=0.25, progress=False
    )
    run = build_run_dir(root, root / "tok", shards, tok.vocab_size)
    return {"root": root, "tok": root / "tok", "shards": shards, "run": run, "vocab": tok.vocab_size}
