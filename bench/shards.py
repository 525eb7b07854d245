"""make-shards throughput: tokens/s and MB/s of text, per tokenizer worker, and what that means for the
paper's 209.7B training tokens.

    python bench/shards.py [--mb 8] [--workers 1 2 0] [--seq-len 2048] [--cores 64 256 1024]

The corpus is generated text (``--mb`` MB in one .jsonl; documents of ~4 kB; Zipf-distributed
pseudo-words drawn from a 2M-word lexicon, with punctuation and line breaks), so the benchmark needs no
download. Two tokenizers are built locally, once (cached under ``--cache``):

* ``sentencepiece``: a 1k-piece BPE trained with ``data_tools train-tokenizer`` (the demo's kind);
* ``hf-gemma-like``: a 256k-entry BPE trained with HF ``tokenizers`` on generated text and wrapped in
  transformers' ``GemmaTokenizer``, i.e. Gemma's pipeline (spaces become "▁", the whole document is one
  pre-token, byte fallback) at Gemma's vocabulary size. A stand-in: Gemma's own merges and text
  statistics differ (its bytes per token on real text will too).

Each row runs ``make_shards`` end to end (read JSON lines, tokenize in ``workers`` processes, pack,
write tars with sha256, journal) into a fresh directory; ``0`` workers means all usable cores. Rates
per second use wall time; CPU time (this process + its workers) is printed too, with the rates per
CPU-second, because other jobs on a shared machine stretch wall time but not CPU time. "main feeds":
how many tokenizer workers the main process (reader, packer, writer) could keep busy before it is the
bottleneck, from the CPU each side spends per MB. The writer is also timed alone on as many tokens.

Projection: the paper's 209.7B tokens on N cores, at the rate per worker of the row with the most
workers, and at its rate per CPU-second; cores split into parts (``--num-parts``, one per node) share
nothing, so they scale linearly until the shared file system does not (not measured here). Megatron's
preprocess_data reaches about 1 MB/s of text per worker (the issue's anchor), printed for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_tools import load_tokenizer, make_shards, train_tokenizer, write_token_shards  # noqa: E402

PAPER_TOKENS = 209.7e9
MEGATRON_MB_PER_WORKER = 1.0
CONSONANTS = list("bcdfghjklmnprstvwz") + ["th", "sh", "ch", "st", "tr", "pl", "gr", "qu"]
VOWELS = list("aeiou") + ["ai", "ou", "ea", "ie"]


# ------------------------------------------------------------------------------------------- text
class TextGenerator:
    """Zipf-distributed pseudo-words (1-5 syllables) with sentence ends and line breaks."""

    def __init__(self, lexicon_size: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        syllables = np.array([c + v for c in CONSONANTS for v in VOWELS] + VOWELS + [""])
        n = int(lexicon_size * 1.2)  # some duplicates are dropped below
        lengths = 1 + rng.binomial(4, 0.4, size=n)
        idx = rng.integers(0, len(syllables) - 1, size=(n, 5))
        idx[np.arange(5)[None, :] >= lengths[:, None]] = len(syllables) - 1  # "" past the word's length
        words = syllables[idx[:, 0]]
        for k in range(1, 5):
            words = np.char.add(words, syllables[idx[:, k]])
        self.words = np.array(list(dict.fromkeys(words.tolist()))[:lexicon_size])
        p = 1.0 / np.arange(1, len(self.words) + 1) ** 1.0
        self.cdf = np.cumsum(p) / p.sum()

    def documents(self, megabytes: float, seed: int):
        rng, total = np.random.default_rng(seed), 0
        while total < megabytes * 1e6:
            n = max(20, int(rng.lognormal(6.4, 0.6)))  # ~700 words, ~4 kB
            w = self.words[np.minimum(np.searchsorted(self.cdf, rng.random(n)), len(self.words) - 1)].tolist()
            for k in rng.integers(0, n, n // 14):
                w[k] += "."
            for k in rng.integers(0, n, n // 25):
                w[k] += ","
            for k in rng.integers(0, n, n // 60):
                w[k] += "\n"
            doc = " ".join(w)
            total += len(doc.encode())
            yield doc


# ------------------------------------------------------------------------------------------- tokenizers
def build_sentencepiece(out: str, gen: TextGenerator, vocab: int) -> str:
    if not os.path.isfile(os.path.join(out, "tokenizer_meta.json")):
        train_tokenizer(gen.documents(8, seed=101), out, vocab_size=vocab, max_sentences=200_000)
    return out


def build_hf_gemma_like(out: str, gen: TextGenerator, vocab: int) -> str:
    """BPE trained on generated text (words split on "▁" for training), then put in Gemma's pipeline."""
    if os.path.isfile(os.path.join(out, "tokenizer.json")):
        return out
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=specials, limit_alphabet=1000, show_progress=False
    )
    tok.train_from_iterator(gen.documents(24, seed=102), trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    GemmaTokenizer(vocab=model["vocab"], merges=merges).save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------------- runs
def cpu_times() -> tuple[float, float]:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def time_make_shards(tok, corpus: str, workers: int, seq_len: int, scratch: str) -> dict:
    out = tempfile.mkdtemp(dir=scratch)
    (c0, k0), t0 = cpu_times(), time.perf_counter()
    m = make_shards(tok, [corpus], out, seq_len=seq_len, shard_samples=256, workers=workers, progress=False)
    wall = time.perf_counter() - t0
    c1, k1 = cpu_times()
    shutil.rmtree(out)
    tokens = sum(s["doc_tokens"] for s in m["splits"].values())
    return {
        "wall": wall,
        "main_cpu": c1 - c0,
        "worker_cpu": k1 - k0,
        "tokens": tokens,
        "vocab": m["tokenizer"]["vocab_size"],
    }


def time_writer(tokens: int, vocab: int, seq_len: int, scratch: str) -> float:
    """tokens/s of packing nothing and writing everything: tars, sha256, rename (uint32 for 256k)."""
    rng = np.random.default_rng(0)
    samples = [rng.integers(0, vocab, seq_len, dtype=np.uint32) for _ in range(max(1, tokens // seq_len))]
    out = tempfile.mkdtemp(dir=scratch)
    t0 = time.perf_counter()
    write_token_shards(
        out,
        {"train": samples},
        seq_len=seq_len,
        tokenizer={"identity": "bench", "vocab_size": vocab},
        shard_samples=256,
    )
    dt = time.perf_counter() - t0
    shutil.rmtree(out)
    return len(samples) * seq_len / dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    p.add_argument(
        "--mb", type=float, default=None, help="corpus size (default: max(8, 2 x the most workers))"
    )
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 0], help="0 = all usable cores")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--spm-vocab", type=int, default=1000)
    p.add_argument("--hf-vocab", type=int, default=256000)
    p.add_argument("--tokenizers", nargs="+", default=["sentencepiece", "hf-gemma-like"])
    p.add_argument("--cores", type=int, nargs="+", default=[64, 256, 1024], help="for the projection")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/dist_cacheaug/bench_shards"))
    p.add_argument("--scratch", default=None, help="where the corpus and shards are written (default: temp)")
    a = p.parse_args()
    workers = sorted({w or cores for w in a.workers})
    mb = a.mb or max(8.0, 2.0 * max(workers))
    os.makedirs(a.cache, exist_ok=True)

    t0 = time.perf_counter()
    gen = TextGenerator(lexicon_size=2_000_000)
    toks = {}
    if "sentencepiece" in a.tokenizers:
        toks["sentencepiece"] = build_sentencepiece(
            os.path.join(a.cache, f"spm{a.spm_vocab}"), gen, a.spm_vocab
        )
    if "hf-gemma-like" in a.tokenizers:
        toks["hf-gemma-like"] = build_hf_gemma_like(os.path.join(a.cache, f"hf{a.hf_vocab}"), gen, a.hf_vocab)
    print(f"tokenizers ready in {time.perf_counter() - t0:.0f} s (cached in {a.cache})")
    for name, path in toks.items():  # loaded once, outside the timed runs (a part loads it once too)
        t0 = time.process_time()
        toks[name] = load_tokenizer(path)
        print(f"{name}: loading it takes {time.process_time() - t0:.1f} CPU-s, once per make-shards process")

    import webdataset  # noqa: F401  (imports torch: a once-per-process cost, kept out of the first timed row)

    with tempfile.TemporaryDirectory(dir=a.scratch) as scratch:
        corpus = os.path.join(scratch, "corpus.jsonl")
        n_docs = n_bytes = 0
        with open(corpus, "w") as f:
            for doc in gen.documents(mb, seed=7):
                f.write(json.dumps({"text": doc}) + "\n")
                n_docs, n_bytes = n_docs + 1, n_bytes + len(doc.encode())
        print(
            f"corpus: {n_docs} documents, {n_bytes / 1e6:.1f} MB of text; seq_len {a.seq_len}; "
            f"{cores} usable cores; workers {workers}\n"
        )
        head = (
            f"{'tokenizer':<14} {'vocab':>6} {'workers':>7} {'wall s':>6} {'tokens/s':>8} {'MB/s':>5} "
            f"{'MB/s/worker':>11} {'CPU s main+workers':>18} {'MB/CPU-s':>8} {'tokens/CPU-s':>12} {'bytes/tok':>9} "
            f"{'main feeds':>10}"
        )
        print(head)
        print("-" * len(head))
        last = {}
        for name, tok in toks.items():
            for w in workers:
                r = time_make_shards(tok, corpus, w, a.seq_len, scratch)
                cpu = r["main_cpu"] + r["worker_cpu"]
                rate, mbs = r["tokens"] / r["wall"], n_bytes / 1e6 / r["wall"]
                # The main process reads, packs and writes; workers tokenize. Per MB they cost main_cpu and
                # worker_cpu CPU-seconds, so the main process saturates at worker_cpu / main_cpu workers.
                feeds = f"{r['worker_cpu'] / r['main_cpu']:>9.0f}w" if w > 1 else f"{'-':>10}"
                print(
                    f"{name:<14} {r['vocab']:>6} {w:>7} {r['wall']:>6.1f} {rate / 1e6:>7.2f}M {mbs:>5.2f} "
                    f"{mbs / w:>11.2f} {r['main_cpu']:>8.1f} + {r['worker_cpu']:>7.1f} {n_bytes / 1e6 / cpu:>8.2f} "
                    f"{r['tokens'] / cpu / 1e6:>11.2f}M {n_bytes / r['tokens']:>9.2f} {feeds}"
                )
                last[name] = (w, rate / w, mbs / w, r["tokens"] / cpu, r["tokens"], r["vocab"])
        print()
        for name, (w, per_worker, mb_per_worker, per_cpu_s, tokens, vocab) in last.items():
            writer = time_writer(tokens, vocab, a.seq_len, scratch)
            print(
                f"{name}: the writer alone does {writer / 1e6:.1f}M tokens/s, {writer / (per_worker * w):.0f}x the "
                f"{w}-worker rate; {mb_per_worker:.2f} MB/s per worker (wall) is "
                f"{mb_per_worker / MEGATRON_MB_PER_WORKER:.1f}x Megatron's ~{MEGATRON_MB_PER_WORKER:g} MB/s"
            )
            for label, rate in (("per worker (wall)", per_worker), ("per CPU-second", per_cpu_s)):
                hours = ", ".join(f"{n} cores {PAPER_TOKENS / (rate * n) / 3600:.1f} h" for n in a.cores)
                print(f"  209.7B tokens at {rate / 1e6:.2f}M tokens/s {label}: {hours}")


if __name__ == "__main__":
    main()
