"""Shards read from URLs (data_tools/storage.py) against real servers on loopback that the tests start:
moto's S3 server, Python's HTTP server, a `pipe:` command, and a fault-injecting proxy in front of them.
The same samples in the same order as from the local copy (world size 1 and 2, across a resume); faults
retried into identical samples, or one error naming the URL once the retries run out."""

from __future__ import annotations

import shutil
import time
import uuid

import numpy as np
import pytest
from object_store_helpers import FaultProxy, environ, http_server, moto_server, s3_env, upload_dir

from data_tools import storage
from data_tools.errors import DataError
from data_tools.shards import read_manifest, verify_shards
from data_tools.storage import Retry
from dist_cacheaug.data import build_eval_loader, build_train_loader

FAST = Retry(attempts=4, backoff_s=0.05, timeout_s=1.0)  # a "slow" answer (3 s) times out


@pytest.fixture(scope="module")
def s3(shards):
    """(endpoint, s3:// URL of a copy of the test shards)."""
    with moto_server() as endpoint, environ(s3_env(endpoint)):
        yield endpoint, upload_dir(endpoint, shards, "tiny")


def _batches(location, n: int, *, rank=0, world=1, state=None, workers=0, prefetch=1, retry=FAST) -> list:
    loader = build_train_loader(
        location,
        seq_len=64,
        micro_batch_size=2,
        rank=rank,
        world_size=world,
        seed=3,
        num_workers=workers,
        shuffle_buffer=8,
        prefetch_shards=prefetch,
        retry=retry,
    )
    if state is not None:
        loader.load_state_dict(state)
    it = iter(loader)
    out = [next(it)["input_ids"].numpy().copy() for _ in range(n)]
    state_after = loader.state_dict()
    loader.close()
    return out, state_after


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------- unit
def test_locations_join_and_print_without_credentials():
    assert storage.join("s3://b/p/", "manifest.json") == "s3://b/p/manifest.json"
    assert storage.join("/data/shards", "x.tar") == "/data/shards/x.tar"
    assert storage.join("pipe:curl -s https://h/s/{name}", "x.tar") == "pipe:curl -s https://h/s/x.tar"
    assert storage.is_remote("gs://b/p") and storage.is_remote("pipe:cat x") and not storage.is_remote("/d")
    assert storage.shown("https://user:s3cret@host:8443/p") == "https://host:8443/p"


# -------------------------------------------------------------------------------------- same samples
@pytest.mark.parametrize("world", [1, 2])
def test_s3_http_and_pipe_give_the_local_samples_in_order_and_resume_exactly(s3, shards, world):
    _, url = s3
    with http_server(shards.parent) as base:
        sources = {
            "s3": url,
            "https": f"{base}/{shards.name}",
            "pipe": f"pipe:cat {shards}/{{name}}",
        }
        for rank in range(world):
            local, local_state = _batches(str(shards), 12, rank=rank, world=world)
            head, _ = _batches(str(shards), 5, rank=rank, world=world)
            for name, location in sources.items():
                remote, _ = _batches(location, 12, rank=rank, world=world)
                assert _same(remote, local), (name, rank)
            # Resume: 5 batches from disk, the rest from S3 after load_state_dict (and the other way).
            _, state = _batches(str(shards), 5, rank=rank, world=world)
            rest, _ = _batches(url, 7, rank=rank, world=world, state=state)
            assert _same(head + rest, local), rank
            _, state = _batches(url, 5, rank=rank, world=world)
            rest, _ = _batches(str(shards), 7, rank=rank, world=world, state=state)
            assert _same(head + rest, local), rank
            assert local_state["batches_consumed"] == 12


def test_data_workers_read_from_s3_too(s3, shards):
    _, url = s3
    local, _ = _batches(str(shards), 8, workers=2)
    remote, _ = _batches(url, 8, workers=2)
    assert _same(remote, local)


def test_forked_workers_do_not_stall_the_parents_next_reads(s3, shards):
    """fsspec's async clients are not fork-safe: a data worker that inherited the parent's live S3
    clients closed them through the parent's event loop, and the parent's next reads on those sockets
    waited out their read timeout (120 s in training; here a 5 s timeout and one attempt, so a stall
    is an error). The loader closes its process's clients before it starts workers."""
    endpoint, url = s3
    once = Retry(attempts=1, timeout_s=5.0)
    with FaultProxy(endpoint) as proxy:  # a second endpoint: the parent holds two clients
        for where in (endpoint, proxy.url, endpoint, proxy.url):
            with environ({"AWS_ENDPOINT_URL": where}):
                for _ in range(2):
                    t0 = time.perf_counter()
                    _batches(url, 6, workers=1, prefetch=0, retry=once)
                    read_manifest(url, once)
                    assert time.perf_counter() - t0 < 4.0, f"a read through {where} stalled"


def test_manifest_verify_and_eval_loader_accept_urls(s3, shards):
    _, url = s3
    assert read_manifest(url) == read_manifest(shards)
    report = verify_shards(url, workers=1, progress=False)
    assert report["ok"] and report["checked"] == len(list(shards.glob("*.tar")))
    ev_local = [b["input_ids"] for b in build_eval_loader(str(shards), seq_len=64, batch_size=4)]
    ev_s3 = [b["input_ids"] for b in build_eval_loader(url, seq_len=64, batch_size=4)]
    assert len(ev_s3) == len(ev_local) and all((a == b).all() for a, b in zip(ev_s3, ev_local))


# --------------------------------------------------------------------------------------------- faults
@pytest.mark.parametrize("backend", ["http", "s3"])
def test_dropped_connection_503_and_slow_server_are_retried_into_identical_samples(
    s3, shards, backend, caplog
):
    endpoint, url = s3
    local, _ = _batches(str(shards), 10)
    with http_server(shards.parent) as base:
        upstream = base if backend == "http" else endpoint
        with FaultProxy(upstream, match=".tar", slow_s=3.0) as proxy:
            location = f"{proxy.url}/{shards.name}" if backend == "http" else url
            with environ(s3_env(proxy.url)):
                proxy.faults = ["drop", "503", "slow", "drop"]  # all on the first shard: 5 attempts
                remote, _ = _batches(
                    location, 10, prefetch=0, retry=Retry(attempts=5, backoff_s=0.05, timeout_s=1.0)
                )
            assert proxy.faults == []  # every fault was met ...
            assert len(proxy.gets()) >= 5  # ... and each cost a retry
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 4 and all(".tar: attempt" in m for m in retries), retries
    assert _same(remote, local)


def test_retries_run_out_into_one_error_naming_the_url(shards):
    with http_server(shards.parent) as base, FaultProxy(base, match=".tar") as proxy:
        proxy.always = "503"
        location = f"{proxy.url}/{shards.name}"
        with pytest.raises(DataError) as err:
            _batches(location, 1, prefetch=0, retry=Retry(attempts=3, backoff_s=0.01, timeout_s=2.0))
    msg = str(err.value)
    assert "\n" not in msg and f"{proxy.url}/{shards.name}/train-" in msg and "after 3 attempts" in msg
    assert len(proxy.gets()) == 3  # one shard, three attempts, then the error


def test_a_shard_whose_bytes_changed_is_refused_not_used(shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    tar = sorted(copy.glob("train-*.tar"))[0]
    data = bytearray(tar.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: what a rewritten object looks like
    tar.write_bytes(bytes(data))
    with http_server(tmp_path) as base:
        with pytest.raises(DataError, match=r"is corrupt: sha256 differs from the manifest"):
            _batches(f"{base}/copy", 40)


def test_missing_manifest_at_a_url_is_one_clear_line(s3):
    _, url = s3
    with pytest.raises(DataError, match=r"s3://shards/nothing-here' has no manifest.json"):
        read_manifest("s3://shards/nothing-here")


def test_prefetch_reads_ahead_a_bounded_number_of_shards(shards):
    with http_server(shards.parent) as base, FaultProxy(base, match=".tar") as proxy:
        loader = build_train_loader(
            f"{proxy.url}/{shards.name}",
            seq_len=64,
            micro_batch_size=2,
            rank=0,
            world_size=1,
            seed=3,
            shuffle_buffer=1,  # samples in shard order: the first batch (2 samples) needs 2 shards
            prefetch_shards=2,
            retry=FAST,
        )
        it = iter(loader)
        next(it)
        deadline = time.time() + 10
        while len(proxy.gets()) < 4 and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        seen = len(proxy.gets())
        loader.close()
    assert seen == 4  # the 2 shards used and the next 2: no more


# ------------------------------------------------------------------------------------------- training
@pytest.mark.slow
def test_training_from_s3_gives_the_losses_of_the_local_copy_and_writes_no_secret(s3, shards, tmp_path):
    from train_helpers import metrics, run_train, tiny_run_config

    endpoint, url = s3
    cfg = tiny_run_config(tmp_path, shards, max_steps=4, eval_interval=4)
    run_train(1, cfg, f"train.run_dir={tmp_path / 'local'}")
    secret = f"sekrit-{uuid.uuid4().hex}"  # moto takes any key: this one must not reach any file
    env = {**s3_env(endpoint), "AWS_SECRET_ACCESS_KEY": secret}
    sets = (f"train.run_dir={tmp_path / 's3'}", f"data.train_shards={url}", f"data.val_shards={url}")
    proc = run_train(1, cfg, *sets, **env)
    ours, ref = metrics(tmp_path / "s3"), metrics(tmp_path / "local")
    keys = ("loss", "loss_k1", "loss_k4", "lr", "grad_norm", "val_loss", "val_baseline")
    assert [{k: r.get(k) for k in keys} for r in ours] == [{k: r.get(k) for k in keys} for r in ref]
    assert url in (tmp_path / "s3" / "config.yaml").read_text()
    written = [f for f in (tmp_path / "s3").rglob("*") if f.is_file()]
    assert len(written) > 10
    assert not [f for f in written if secret.encode() in f.read_bytes()]
    assert secret not in proc.stdout + proc.stderr
