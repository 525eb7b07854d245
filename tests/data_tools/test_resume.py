"""make-shards killed (SIGKILL) at chosen points and run again continues from its last complete shard
and ends byte-identical to an uninterrupted run; other arguments or changed inputs are refused."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile

import pytest

from data_tools import DataError, make_shards, read_manifest
from data_tools.faults import faults_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# seq_len 32 and 5 samples per shard: ~60 shards; 10 % held out: the val split's open shard spans many
# train shards, so a resume has to replay documents from before the checkpoint.
ARGS = {"seq_len": 32, "shard_samples": 5, "val_fraction": 0.1}


@pytest.fixture(scope="module")
def references(jsonl_corpus, tmp_path_factory, read_dataset):
    """Uninterrupted runs, corpus-wide and --per-file."""
    out = {}
    for per_file in (False, True):
        d = tmp_path_factory.mktemp(f"reference_per_file_{per_file}")
        make_shards(
            jsonl_corpus.tok, [jsonl_corpus.dir], str(d), per_file=per_file, workers=1, progress=False, **ARGS
        )
        out[per_file] = read_dataset(d)
    assert out[False] != out[True]
    return out


def _nothing_half_written_looks_valid(d) -> None:
    """After a kill: no manifest (not a dataset), and every shard under its final name is complete."""
    with pytest.raises(DataError, match="no manifest.json"):
        read_manifest(str(d))
    for name in os.listdir(d):
        if name.endswith(".tar"):  # parses to the end, and every sample is whole
            with tarfile.open(os.path.join(d, name)) as tar:
                sizes = [len(tar.extractfile(m).read()) for m in tar.getmembers()]
            assert 1 <= len(sizes) <= ARGS["shard_samples"] and set(sizes) == {2 * ARGS["seq_len"]}, name


# kill points: mid-way through the first shard, between a shard's rename and its journal line, right
# after the first complete shard, mid-shard later on (val shard open), after the last shard before the
# manifest, and (--per-file) after a unit.
POINTS = ["sample:3", "renamed:4", "shard:1", "sample:97", "shard:30", "done:1"]
CASES = [(False, p) for p in POINTS] + [(True, p) for p in [*POINTS, "unit:2"]]


@pytest.mark.parametrize(
    ("per_file", "point"), CASES, ids=[f"{'per_file' if f else 'corpus'}-{p}" for f, p in CASES]
)
def test_killed_run_resumes_byte_identical(
    per_file, point, jsonl_corpus, references, run_killed, read_dataset, tmp_path
):
    kw = dict(
        tokenizer=jsonl_corpus.tok,
        inputs=[jsonl_corpus.dir],
        out_dir=str(tmp_path),
        per_file=per_file,
        **ARGS,
    )
    assert run_killed(point, workers=2, **kw) == -9
    _nothing_half_written_looks_valid(tmp_path)
    # killed again, early in the resumed run (one worker this time: the count is not part of the run)
    rc = run_killed("sample:11", workers=1, **kw)
    assert rc in (-9, 0) and (rc == -9 or point == "done:1")
    m = make_shards(workers=2, progress=False, **kw)
    assert read_dataset(tmp_path) == references[per_file]
    assert m == read_manifest(str(tmp_path))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temp files left


def test_cut_off_journal_line_is_dropped(jsonl_corpus, references, run_killed, read_dataset, tmp_path):
    kw = dict(tokenizer=jsonl_corpus.tok, inputs=[jsonl_corpus.dir], out_dir=str(tmp_path), **ARGS)
    assert run_killed("shard:6", workers=1, **kw) == -9
    journal = tmp_path / "make-shards.progress.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines) + lines[-1][: len(lines[-1]) // 2])  # a write the kill cut short
    make_shards(workers=1, progress=False, **kw)
    assert read_dataset(tmp_path) == references[False]


def test_changed_arguments_or_inputs_are_refused(
    jsonl_corpus, references, run_killed, read_dataset, tmp_path
):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for f in jsonl_corpus.files:
        (corpus / os.path.basename(f)).write_bytes(open(f, "rb").read())
    out = tmp_path / "out"
    kw = dict(tokenizer=jsonl_corpus.tok, inputs=[str(corpus)], out_dir=str(out), progress=False)
    make_shards(**{**kw, "out_dir": str(tmp_path / "reference")}, **ARGS)
    assert run_killed("shard:3", workers=1, **kw, **ARGS) == -9
    before = sorted(os.listdir(out))
    with pytest.raises(DataError, match=r"seq_len: 32 -> 64.*original ones to continue it.*--overwrite"):
        make_shards(**kw, **{**ARGS, "seq_len": 64})
    with pytest.raises(DataError, match=r"val_fraction: 0.1 -> 0.2"):
        make_shards(**kw, **{**ARGS, "val_fraction": 0.2})
    with pytest.raises(DataError, match=r"per_file: False -> True"):
        make_shards(**kw, **ARGS, per_file=True)
    assert sorted(os.listdir(out)) == before  # a refused run touches nothing
    make_shards(**kw, **ARGS)  # the original arguments continue it
    assert read_dataset(out) == read_dataset(tmp_path / "reference")
    changed = corpus / "part2.jsonl"
    changed.write_text(changed.read_text() + '{"text": "one more document"}\n')
    with pytest.raises(DataError, match=r"input file\(s\) changed since \(size or mtime\): .*part2.jsonl"):
        make_shards(**kw, **ARGS)
    (corpus / "part9.jsonl").write_text('{"text": "a new file"}\n')
    with pytest.raises(DataError, match=r"the input files \(4 before, 5 now"):
        make_shards(**kw, **ARGS)
    make_shards(**kw, **ARGS, overwrite=True)
    assert read_manifest(str(out))["inputs"][-1]["documents"] == 1


def test_cli_kill_minus_9_and_run_again(jsonl_corpus, references, read_dataset, tmp_path):
    """The command line, in a subprocess with 2 tokenizer workers, SIGKILLed after its 2nd shard."""
    cmd = [sys.executable, "-m", "data_tools", "make-shards", "--tokenizer", jsonl_corpus.tok,
           "--input", jsonl_corpus.dir, "--out", str(tmp_path), "--seq-len", "32", "--shard-samples", "5",
           "--val-fraction", "0.1", "--workers", "2", "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    killed = subprocess.run(
        cmd, env={**env, **faults_env(make_kill_at="shard:2")}, capture_output=True, text=True
    )
    assert killed.returncode == -9, killed.stderr
    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "wrote" in again.stdout and read_dataset(tmp_path) == references[False]
