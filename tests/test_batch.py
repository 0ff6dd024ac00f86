"""Batch search jobs on Dask (asteria_store.batch) and sharded collections.

Every job here runs on a real ``distributed.LocalCluster`` (threads where that keeps the
test fast; processes in the tests that need them) or with ``workers=0`` (no Dask), and is
checked against ``Store.search`` of the same blocks.
"""

from __future__ import annotations

import json
import os
import pickle
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import distributed  # a hard dependency (dask[distributed]): missing, this module fails, not skips
import numpy as np
import pytest
import torch
import zarr
from asteria_store_cli.main import cli
from click.testing import CliRunner

import asteria_store
from asteria_store import batch
from asteria_store.batch import output, workers
from asteria_store.errors import (
    DimensionMismatchError,
    IdNotFoundError,
    InvalidArgumentError,
    InvalidInputError,
    StoreChangedError,
    StoreExistsError,
    StoreLockedError,
    StoreNotFoundError,
)
from asteria_store.storage.lock import WriterLock

K = 10
PROBES = 4
BLOCK = 64


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def built(wordnet, tmp_path_factory):
    """One routing model (trained once), a store with it, and a 3-shard collection with
    it, both holding the 3,000 wordnet vectors; and 300 queries on disk as .npy."""
    root = tmp_path_factory.mktemp("batch")
    model = root / "model.pt"
    asteria_store.train_model(wordnet.base, save=model, dim=384, seed=0)
    with asteria_store.create(root / "store", dim=384, model=model) as store:
        store.ingest(wordnet.base)
        assert store.info()["buckets"] >= 16  # a real index: probing 4 buckets reads a fraction
    with asteria_store.create_collection(root / "coll", shards=3, dim=384, model=model) as coll:
        coll.ingest(wordnet.base)
    queries = np.concatenate([wordnet.queries, wordnet.base[::30] + 0.05]).astype(np.float32)
    np.save(root / "q.npy", queries)
    return root


@pytest.fixture(scope="module")
def thread_client():
    """A LocalCluster of one worker with two threads, in this process."""
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cl, \
            distributed.Client(cl) as client:
        yield client


def by_blocks(store_path: Path, queries: np.ndarray, k: int = K, probes=PROBES, rows: int = BLOCK):
    """``Store.search`` of each block of ``rows`` queries, concatenated: what a job must equal."""
    with asteria_store.open(store_path, readonly=True) as store:
        parts = [store.search(queries[a:a + rows], k, probes=probes) for a in range(0, len(queries), rows)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def results(path: Path) -> tuple[np.ndarray, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    return group["ids"][:], group["scores"][:]


# --- one store ----------------------------------------------------------------------------


def test_job_without_dask_equals_search_block_by_block(built, tmp_path):
    queries = np.load(built / "q.npy")
    res = batch.search(built / "store", built / "q.npy", tmp_path / "r.zarr", k=K, probes=PROBES,
                       block_rows=BLOCK, workers=0)
    assert (res.blocks, res.blocks_run, res.blocks_skipped) == (5, 5, 0)
    ids, scores = results(tmp_path / "r.zarr")
    want = by_blocks(built / "store", queries)
    np.testing.assert_array_equal(ids, want[0])
    np.testing.assert_array_equal(scores, want[1])
    assert (ids >= 0).all()
    assert not output.staging_path(tmp_path / "r.zarr").exists()  # published, staging gone
    attrs = zarr.open_group(str(tmp_path / "r.zarr"), mode="r").attrs["asteria_batch"]
    assert attrs["complete"] is True and attrs["k"] == K and attrs["n_queries"] == len(queries)


def test_job_with_rerank_equals_search_with_rerank_block_by_block(built, tmp_path):
    """rerank reaches every block's search: the job equals ``Store.search(rerank=)`` block by
    block, which (rescoring only k rows) is not the certified search."""
    queries = np.load(built / "q.npy")
    batch.search(built / "store", built / "q.npy", tmp_path / "r.zarr", k=K, probes=PROBES, rerank=K,
                 block_rows=BLOCK, workers=0)
    ids, scores = results(tmp_path / "r.zarr")
    with asteria_store.open(built / "store", readonly=True) as store:
        parts = [store.search(queries[a:a + BLOCK], K, probes=PROBES, rerank=K) for a in range(0, len(queries), BLOCK)]
    np.testing.assert_array_equal(ids, np.concatenate([p[0] for p in parts]))
    np.testing.assert_array_equal(scores, np.concatenate([p[1] for p in parts]))
    assert not np.array_equal(ids, by_blocks(built / "store", queries)[0])
    assert zarr.open_group(str(tmp_path / "r.zarr"), mode="r").attrs["asteria_batch"]["rerank"] == K


def test_job_on_a_cluster_equals_search_and_opens_the_store_once(built, tmp_path, thread_client):
    queries = np.load(built / "q.npy")
    before = workers.opens
    res = batch.search(built / "store", built / "q.npy", tmp_path / "r.zarr", k=K, probes=PROBES,
                       block_rows=32, client=thread_client)
    assert res.blocks_run == 10 and res.workers == 1
    ids, scores = results(tmp_path / "r.zarr")
    want = by_blocks(built / "store", queries, rows=32)
    np.testing.assert_array_equal(ids, want[0])
    np.testing.assert_array_equal(scores, want[1])
    # Ten blocks on two threads of one worker process: the store was opened once, not per block.
    assert workers.opens - before == 1
    batch.search(built / "store", built / "q.npy", tmp_path / "r2.zarr", k=K, probes=PROBES, block_rows=32,
                 client=thread_client)
    assert workers.opens - before == 1  # and a second job on the same workers reuses it


def test_output_is_plain_zarr_that_dask_reads(built, tmp_path):
    import dask.array as da

    batch.search(built / "store", built / "q.npy", tmp_path / "r.zarr", k=K, probes=PROBES, block_rows=BLOCK,
                 workers=0)
    ids = da.from_zarr(str(tmp_path / "r.zarr"), component="ids")
    assert ids.chunks[0] == (64, 64, 64, 64, 44) and ids.dtype == np.int64
    np.testing.assert_array_equal(ids.compute(), results(tmp_path / "r.zarr")[0])


def test_zarr_and_in_memory_queries(built, tmp_path):
    queries = np.load(built / "q.npy")
    arr = zarr.open_group(str(tmp_path / "q.zarr"), mode="w").create_array(
        "vectors", shape=queries.shape, chunks=(100, 384), dtype="float16")
    arr[:] = queries.astype(np.float16)
    batch.search(built / "store", tmp_path / "q.zarr" / "vectors", tmp_path / "a.zarr", k=K, probes=PROBES,
                 block_rows=BLOCK, workers=0)
    batch.search(built / "store", queries.astype(np.float16), tmp_path / "b.zarr", k=K, probes=PROBES,
                 block_rows=BLOCK, workers=0)
    want = by_blocks(built / "store", queries.astype(np.float16).astype(np.float32))
    for name in ("a.zarr", "b.zarr"):
        np.testing.assert_array_equal(results(tmp_path / name)[0], want[0])
    with pytest.raises(InvalidInputError, match="Zarr group"):
        batch.search(built / "store", tmp_path / "q.zarr", tmp_path / "c.zarr", workers=0)


def test_knn_graph_of_the_store_excludes_each_own_id(built, tmp_path, wordnet):
    batch.search(built / "store", built / "store", tmp_path / "g.zarr", k=5, probes=PROBES, exclude_self=True,
                 block_rows=1000, workers=0)
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="r")
    qids, ids = group["query_ids"][:], group["ids"][:]
    np.testing.assert_array_equal(qids, np.arange(3000))
    assert ids.shape == (3000, 5)
    assert not (ids == qids[:, None]).any()
    with asteria_store.open(built / "store", readonly=True) as store:
        full = store.search(store.get(np.arange(1000)), 6, probes=PROBES)[0]
    # Each row: the 6 best minus its own id (or minus the 6th where its own id is not there).
    for row in range(1000):
        expect = [i for i in full[row] if i != row][:5]
        assert ids[row].tolist() == expect


# --- resume, crashes and a changing store -------------------------------------------------


class Stop(RuntimeError):
    pass


def crash_after(blocks: int):
    """A progress callback that kills the job (an exception in the client) after ``blocks``."""
    seen = []

    def fn(done, total, desc):
        seen.append(done)
        if len(seen) >= blocks:
            raise Stop("client died")

    return fn


def test_resume_redoes_only_missing_blocks(built, tmp_path):
    queries = np.load(built / "q.npy")
    out = tmp_path / "r.zarr"
    with pytest.raises(Stop):
        batch.search(built / "store", built / "q.npy", out, k=K, probes=PROBES, block_rows=BLOCK, workers=0,
                     progress=crash_after(2))
    stage = output.staging_path(out)
    assert not out.exists() and stage.is_dir()  # never half-published
    assert sorted(int(p.name) for p in (stage / "done").iterdir() if p.name.isdigit()) == [0, 1]
    # A block torn mid-write (no marker) is rewritten by the resume.
    torn = stage / "results.zarr" / "ids" / "c" / "3"
    torn.mkdir(parents=True, exist_ok=True)
    (torn / "0").write_bytes(b"garbage")
    with pytest.raises(StoreExistsError, match="--resume"):
        batch.search(built / "store", built / "q.npy", out, k=K, probes=PROBES, block_rows=BLOCK, workers=0)
    res = batch.search(built / "store", built / "q.npy", out, k=K, probes=PROBES, block_rows=BLOCK, workers=0,
                       resume=True)
    assert (res.blocks_run, res.blocks_skipped) == (3, 2)
    want = by_blocks(built / "store", queries)
    np.testing.assert_array_equal(results(out)[0], want[0])
    np.testing.assert_array_equal(results(out)[1], want[1])
    again = batch.search(built / "store", built / "q.npy", out, k=K, probes=PROBES, block_rows=BLOCK, workers=0,
                         resume=True)
    assert again.blocks_run == 0  # a finished job: nothing to do


def test_resume_refuses_a_different_job(built, tmp_path):
    out = tmp_path / "r.zarr"
    with pytest.raises(Stop):
        batch.search(built / "store", built / "q.npy", out, k=K, probes=PROBES, block_rows=BLOCK, workers=0,
                     progress=crash_after(1))
    with pytest.raises(InvalidArgumentError, match="different job .*probes"):
        batch.search(built / "store", built / "q.npy", out, k=K, probes=PROBES * 2, block_rows=BLOCK, workers=0,
                     resume=True)


def test_a_commit_during_the_job_fails_it(built, tmp_path, wordnet):
    store_path = tmp_path / "store"
    shutil.copytree(built / "store", store_path)

    def write_meanwhile(done, total, desc):
        with asteria_store.open(store_path) as writer:
            writer.delete([int(done)])

    with pytest.raises(StoreChangedError, match="changed while the batch job read it"):
        batch.search(store_path, built / "q.npy", tmp_path / "r.zarr", k=K, probes=PROBES, block_rows=BLOCK,
                     workers=0, progress=write_meanwhile)
    assert not (tmp_path / "r.zarr").exists()


def test_refuses_a_store_whose_writer_lock_is_held(built, tmp_path):
    store_path = tmp_path / "store"
    shutil.copytree(built / "store", store_path)
    with WriterLock(store_path, timeout=0):
        with pytest.raises(StoreLockedError, match="--allow-writer"):
            batch.search(store_path, built / "q.npy", tmp_path / "r.zarr", workers=0)
        assert not output.staging_path(tmp_path / "r.zarr").exists()
        res = batch.search(store_path, built / "q.npy", tmp_path / "r.zarr", k=K, probes=PROBES, workers=0,
                           allow_writer=True)
        assert res.blocks_run == 1


def test_without_lmdb_locks(built, tmp_path):
    queries = np.load(built / "q.npy")
    batch.search(built / "store", built / "q.npy", tmp_path / "r.zarr", k=K, probes=PROBES, block_rows=BLOCK,
                 workers=0, lock=False)
    np.testing.assert_array_equal(results(tmp_path / "r.zarr")[0], by_blocks(built / "store", queries)[0])


# --- bad input: one line, before any work -------------------------------------------------


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"k": 3001}, InvalidArgumentError, "more than the 3,000 vectors"),
    ({"k": 0}, InvalidArgumentError, "k must be a positive integer"),
    ({"probes": 0}, InvalidArgumentError, "probes must be"),
    ({"block_rows": 0}, InvalidArgumentError, "block_rows"),
    ({"exclude_self": True}, InvalidArgumentError, "exclude_self needs"),
    ({"rerank": 5}, InvalidArgumentError, r"rerank must be an integer >= k \(10\)"),
])
def test_bad_arguments(built, tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        batch.search(built / "store", built / "q.npy", tmp_path / "r.zarr", workers=0, **kwargs)
    assert os.listdir(tmp_path) == []


def test_bad_queries_and_paths(built, tmp_path):
    np.save(tmp_path / "q7.npy", np.ones((4, 7), dtype=np.float32))
    with pytest.raises(DimensionMismatchError, match="dimension 384, got 7"):
        batch.search(built / "store", tmp_path / "q7.npy", tmp_path / "r.zarr", workers=0)
    with pytest.raises(StoreNotFoundError):
        batch.search(tmp_path / "nowhere", built / "q.npy", tmp_path / "r.zarr", workers=0)
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        batch.search(built / "store", built / "q.npy", tmp_path / "no" / "r.zarr", workers=0)
    (tmp_path / "taken.zarr").mkdir()
    with pytest.raises(StoreExistsError, match="already exists"):
        batch.search(built / "store", built / "q.npy", tmp_path / "taken.zarr", workers=0)
    assert sorted(os.listdir(tmp_path)) == ["q7.npy", "taken.zarr"]


def test_a_store_a_worker_cannot_see_is_named_with_the_worker(tmp_path):
    with pytest.raises(StoreNotFoundError, match="seen from .*shared filesystem"):
        workers.cached_store(str(tmp_path / "elsewhere"))


def test_cli_search_batch_and_its_errors(built, tmp_path):
    runner = CliRunner()
    out = tmp_path / "r.zarr"
    args = ["search-batch", str(built / "store"), str(built / "q.npy"), "--out", str(out), "-k", str(K),
            "--probes", str(PROBES), "--block-rows", str(BLOCK), "--workers", "0", "--quiet"]
    res = runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "Searched 5 of 5 blocks" in res.output
    res = runner.invoke(cli, args)
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "already exists" in res.output
    res = runner.invoke(cli, [*args, "--resume"])
    assert res.exit_code == 0 and "already complete" in res.output
    res = runner.invoke(cli, ["search-batch", str(built / "store"), str(built / "q.npy"), "--out",
                              str(tmp_path / "x.zarr"), "-k", "5000", "--workers", "0"])
    assert res.exit_code == 1 and res.output.startswith("Error: k=5000") and "Traceback" not in res.output
    res = runner.invoke(cli, ["search-batch", str(built / "store"), str(built / "q.npy"), "--out",
                              str(tmp_path / "x.zarr"), "--workers", "2", "--scheduler", "tcp://x:1"])
    assert res.exit_code == 2 and "exclude each other" in res.output


# --- sharded collections ------------------------------------------------------------------


@pytest.mark.parametrize("probes", [1, PROBES, "all"])
def test_collection_search_equals_one_store_with_the_same_model(built, probes):
    queries = np.load(built / "q.npy")
    with asteria_store.open(built / "store", readonly=True) as store, \
            asteria_store.open_collection(built / "coll", readonly=True) as coll:
        assert [len(s) for s in coll.shards] == [1000, 1000, 1000]
        want = store.search(queries, K, probes=probes)
        got = coll.search(queries, K, probes=probes)
    # Same rows found; scores equal up to float32 summation order (the shards' products have
    # other shapes than the single store's).
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=2e-6)


def test_collection_probes_on_across_shards_like_one_store(built, tmp_path):
    """One probe of a query whose bucket holds fewer than k rows: each shard alone would probe
    on by itself (and find more than one store would); the collection probes on for all."""
    queries = np.load(built / "q.npy")
    with asteria_store.open(built / "store", readonly=True) as store, \
            asteria_store.open_collection(built / "coll", readonly=True) as coll:
        want = store.search(queries, 50, probes=1)
        got = coll.search(queries, 50, probes=1)
        solo = batch.merge_topk([s.search(queries, 50, probes=1) for s in coll.shards], 50)
    np.testing.assert_array_equal(got[0], want[0])
    assert not np.array_equal(solo[0], want[0])  # the naive merge differs: the test can fail


def test_collection_search_with_rerank_merges_each_shards_rerank(built):
    queries = np.load(built / "q.npy")
    with asteria_store.open_collection(built / "coll", readonly=True) as coll:
        got = coll.search(queries, K, probes=PROBES, rerank=K)
        each = batch.merge_topk([s.search(queries, K, probes=PROBES, fill=False, rerank=K) for s in coll.shards], K)
        certified = coll.search(queries, K, probes=PROBES)
        everything = coll.search(queries, K, probes=PROBES, rerank=3000)
        with pytest.raises(InvalidArgumentError, match="rerank must be an integer"):
            coll.search(queries, K, probes=PROBES, rerank=K - 1)
    full = (each[0] >= 0).all(axis=1)
    assert full.mean() > 0.9
    np.testing.assert_array_equal(got[0][full], each[0][full])
    assert not np.array_equal(got[0], certified[0])
    np.testing.assert_array_equal(everything[0], certified[0])  # rescoring every probed row: certified


def test_batch_job_on_a_collection(built, tmp_path, thread_client):
    queries = np.load(built / "q.npy")
    res = batch.search(built / "coll", built / "q.npy", tmp_path / "r.zarr", k=K, probes=PROBES,
                       block_rows=BLOCK, client=thread_client)
    assert res.blocks_run == 5
    with asteria_store.open_collection(built / "coll", readonly=True) as coll:
        want = [coll.search(queries[a:a + BLOCK], K, probes=PROBES) for a in range(0, len(queries), BLOCK)]
    ids, scores = results(tmp_path / "r.zarr")
    np.testing.assert_array_equal(ids, np.concatenate([w[0] for w in want]))
    np.testing.assert_allclose(scores, np.concatenate([w[1] for w in want]), rtol=0, atol=2e-6)
    batch.search(built / "coll", built / "coll", tmp_path / "g.zarr", k=3, probes=PROBES, exclude_self=True,
                 workers=0)
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="r")
    assert not (group["ids"][:] == group["query_ids"][:][:, None]).any()


def test_collection_ingest_places_rows_by_id_and_upserts(built, tmp_path, wordnet, thread_client):
    with asteria_store.create_collection(tmp_path / "c", shards=4, dim=384, model=built / "model.pt") as coll:
        ids = np.arange(0, 1200, 2, dtype=np.int64) + 7  # 7, 9, ...: odd ids, shards 1 and 3 only
        res = coll.ingest(wordnet.base[:600], ids=ids, client=thread_client)
        assert res.rows == 600
        assert [len(s) for s in coll.shards] == [0, 300, 0, 300]
        np.testing.assert_allclose(coll.get(ids[:5]), asteria_store_normalised(wordnet.base[:5]), atol=1e-6)
        with pytest.raises(asteria_store.DuplicateIdError):
            coll.ingest(wordnet.base[:2], ids=ids[:2])
        res = coll.ingest(wordnet.base[10:12], ids=ids[:2], on_conflict="replace")
        assert res.replaced == 2 and len(coll) == 600
        more = coll.ingest(wordnet.base[600:610])  # ids after every shard's: 1193 + 2 ...
        assert len(coll) == 610 and coll.ids()[-1] == 1215
        assert more.rows == 10
    coll2 = pickle.loads(pickle.dumps(asteria_store.open_collection(tmp_path / "c", readonly=True)))
    assert len(coll2) == 610 and coll2.readonly
    coll2.close()


def test_collection_query_delete_compact_and_verify_like_a_store(built, tmp_path, wordnet):
    with asteria_store.create_collection(tmp_path / "c", shards=3, dim=384, model=built / "model.pt") as coll:
        coll.ingest(wordnet.base[:600], ids=np.arange(600))
        q = wordnet.queries[0]
        ids, scores = coll.query(q, 5, probes="all")
        want = coll.search(q[None, :], 5, probes="all")
        assert ids.tolist() == want[0][0].tolist()
        with pytest.raises(IdNotFoundError, match=r"1 id\(s\) not in the collection \(first: 9999\)"):
            coll.delete([ids[0], 9999])
        assert len(coll) == 600  # nothing deleted
        assert coll.delete(ids[:2]).rows == 2
        assert ids[0] not in coll.query(q, 5, probes="all")[0].tolist()
        res = coll.compact()
        assert res.dropped == 2 and res.rows == 598
        report = coll.verify()
        assert report.ok and report.checked_rows == 598
    runner = CliRunner()
    np.save(tmp_path / "gone.npy", np.array([10, 11]))
    np.save(tmp_path / "q.npy", wordnet.queries[:2])
    res = runner.invoke(cli, ["delete", str(tmp_path / "c"), "--ids", str(tmp_path / "gone.npy")])
    assert res.exit_code == 0 and "Deleted 2 vectors." in res.output
    res = runner.invoke(cli, ["query", str(tmp_path / "c"), str(tmp_path / "q.npy"), "-k", "3", "--json"])
    assert res.exit_code == 0 and len(res.output.splitlines()) == 2
    assert json.loads(res.output.splitlines()[0])["ids"] == \
        asteria_store.open_collection(tmp_path / "c", readonly=True).search(wordnet.queries[:1], 3)[0][0].tolist()
    for verb in (["verify"], ["compact", "--quiet"]):
        res = runner.invoke(cli, [verb[0], str(tmp_path / "c"), *verb[1:]])
        assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["query", str(tmp_path / "c"), str(tmp_path / "q.npy"), "--where", "a = 1"])
    assert res.exit_code == 2 and "--where, --columns, --explain and --candidates are for stores" in res.output


def asteria_store_normalised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_collection_creation_is_all_or_nothing(built, tmp_path):
    with pytest.raises(InvalidArgumentError, match="shared routing model"):
        asteria_store.create_collection(tmp_path / "c", shards=2, dim=384)
    with pytest.raises(asteria_store.ModelFileError):
        asteria_store.create_collection(tmp_path / "c", shards=2, dim=384, model=tmp_path / "missing.pt")
    with pytest.raises(DimensionMismatchError):
        asteria_store.create_collection(tmp_path / "c", shards=2, dim=128, model=built / "model.pt")
    assert os.listdir(tmp_path) == []  # no half-made collection, no staging left
    with pytest.raises(StoreExistsError):
        asteria_store.create_collection(built, shards=2, dim=384, model=built / "model.pt")


# --- worker processes ---------------------------------------------------------------------


def test_worker_processes_pickled_stores_and_a_killed_worker(built, tmp_path):
    """Real worker processes: the job equals the store's own search, a Store and a Collection
    travel to workers by pickling, and a worker SIGKILLed mid-job costs nothing."""
    queries = np.load(built / "q.npy")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cl, \
            distributed.Client(cl) as client:
        with asteria_store.open(built / "store", readonly=True) as store:
            fut = client.submit(store.search, queries[:5], K, probes=PROBES)
            want5 = store.search(queries[:5], K, probes=PROBES)
            np.testing.assert_array_equal(fut.result()[0], want5[0])
        with asteria_store.open_collection(built / "coll", readonly=True) as coll:
            got = client.submit(coll.search, queries[:5], K, probes=PROBES).result()
            np.testing.assert_array_equal(got[0], want5[0])

        pids = client.run(os.getpid)
        victim = min(pids.values())
        killed = []

        def kill_one(done, total, desc):
            if not killed and done >= BLOCK:
                os.kill(victim, signal.SIGKILL)
                killed.append(done)

        res = batch.search(built / "store", built / "q.npy", tmp_path / "r.zarr", k=K, probes=PROBES,
                           block_rows=16, client=client, progress=kill_one)
    assert killed and res.blocks_run == 19
    want = by_blocks(built / "store", queries, rows=16)
    ids, scores = results(tmp_path / "r.zarr")
    # Worker processes run BLAS on one thread; scores may differ from this process's in the
    # last bit (summation order), ids not.
    np.testing.assert_array_equal(ids, want[0])
    np.testing.assert_allclose(scores, want[1], rtol=0, atol=2e-6)


def test_cli_killed_mid_job_then_resumed(built, tmp_path):
    """The whole job (client and its local workers) SIGKILLed after some blocks; --resume
    finishes it with the same results as an undisturbed run."""
    out = tmp_path / "r.zarr"
    stage = output.staging_path(out)
    args = ["search-batch", str(built / "store"), str(built / "q.npy"), "--out", str(out), "-k", str(K),
            "--probes", str(PROBES), "--block-rows", "1", "--workers", "0", "-q"]
    # The job says "block done" once each block's marker is written: the parent's cue.
    announce = ("import sys\nfrom asteria_store.batch import output\nwrite = output.write_block\n"
                "def say(*a, **kw):\n    write(*a, **kw)\n    print('block done', flush=True)\n"
                "output.write_block = say\nfrom asteria_store_cli.main import cli\ncli()")
    proc = subprocess.Popen([sys.executable, "-c", announce, *args], start_new_session=True,
                            stdout=subprocess.PIPE, text=True)
    deadline_blocks = 5  # of 300: killed with most of the job left
    try:
        deadline = time.monotonic() + 300
        for _ in range(deadline_blocks):  # each read waits for the job's next line
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, "no block done within 300 s"
            assert proc.stdout.readline() == "block done\n", "the job ended before 5 blocks"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, "the job finished before it could be killed"
    assert stage.is_dir() and not out.exists()
    cmd = [sys.executable, "-c", "from asteria_store_cli.main import cli; cli()", *args]
    res = subprocess.run([*cmd, "--resume", "--json"], capture_output=True, text=True, check=True)
    record = json.loads(res.stdout)
    assert record["blocks_skipped"] >= deadline_blocks and record["blocks_run"] + record["blocks_skipped"] == 300
    want = by_blocks(built / "store", np.load(built / "q.npy"), rows=1)
    np.testing.assert_array_equal(results(out)[0], want[0])


def test_local_cluster_workers_keep_glibc_trim_default_and_env_is_restored(monkeypatch):
    from asteria_store.batch.cluster import local_client

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    with local_client(1) as client:
        env = client.run(lambda: (os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("OMP_NUM_THREADS")))
    assert list(env.values()) == [(None, "1")]  # one BLAS/OpenMP thread per worker thread, no early trim
    assert "OMP_NUM_THREADS" not in os.environ and "MALLOC_TRIM_THRESHOLD_" not in os.environ


def test_a_job_on_a_scheduler_address(built, tmp_path, thread_client):
    queries = np.load(built / "q.npy")
    address = thread_client.scheduler.address
    res = batch.search(built / "store", built / "q.npy", tmp_path / "r.zarr", k=K, probes=PROBES, block_rows=BLOCK,
                       scheduler=address)
    assert res.blocks_run == 5 and res.workers == 1
    np.testing.assert_array_equal(results(tmp_path / "r.zarr")[0], by_blocks(built / "store", queries)[0])
