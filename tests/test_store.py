"""The public ``Store`` API: lifecycle, ingest, get, delete, search, persistence, errors.

Exact search (``probes="all"``) is checked against numpy brute force; probed search against
recall floors measured on seeded clustered data; every error against its exact message, its
builtin mix-in, and a store left byte-for-byte as it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import asteria_store
from conftest import normalise
import asteria_store.io as io_mod
import asteria_store.write.pipeline as pipeline_mod
from asteria_store import (
    FORMAT_VERSION,
    AsteriaError,
    CorruptStoreError,
    DimensionMismatchError,
    DuplicateIdError,
    IdNotFoundError,
    InvalidArgumentError,
    InvalidInputError,
    ReadOnlyError,
    StoreClosedError,
    StoreExistsError,
    StoreLockedError,
    StoreNotFoundError,
    UnsupportedFormatError,
)
from asteria_store.config import BASE_FORMAT_VERSION
from asteria_store.model.router import bits_for_size
from asteria_store.storage import catalog as catalog_mod
from asteria_store.storage.catalog import Catalog
from asteria_store.testing import brute_force_topk, clustered_vectors, recall_at_k

DIM = 32


# --- references -----------------------------------------------------------------------------




def brute_force(ids: np.ndarray, vectors: np.ndarray, queries: np.ndarray, k: int):
    """Exact top-k of ``queries`` over ``(ids, vectors)``, padded like the store (-1, -inf)."""
    idx, scores = brute_force_topk(np.asarray(vectors, np.float32), queries, k)
    ids = np.asarray(ids, dtype=np.int64)
    return np.where(idx >= 0, ids[np.maximum(idx, 0)], -1), scores


def seeded(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


@pytest.fixture
def probed_store(tmp_path: Path, clustered) -> asteria_store.Store:
    """The clustered base (2000 rows) in three segments, 2**8 buckets, 64-row chunks, baseline
    router (the learned path has its own tests: test_learned_store.py)."""
    store = asteria_store.create(tmp_path / "probed", dim=DIM, bits=8, chunk_rows=64, router="sign")
    for part in np.split(np.arange(2000), [700, 1300]):
        store.ingest(clustered.base[part])
    yield store
    store.close()


# --- lifecycle ------------------------------------------------------------------------------


def test_create_makes_an_empty_open_store(tmp_path: Path) -> None:
    path = tmp_path / "store"
    store = asteria_store.create(path, dim=DIM)
    try:
        assert isinstance(store, asteria_store.Store)
        assert len(store) == 0
        assert store.dim == DIM
        assert store.path == path
        assert not store.readonly
        assert sorted(p.name for p in path.iterdir()) == ["catalog.lmdb", "model", "readers", "segments.zarr", "writer.lock"]
        # Built in a temporary sibling and renamed: no debris next to the store.
        assert [p.name for p in tmp_path.iterdir()] == ["store"]
        assert repr(store) == f"<asteria_store.Store {str(path)!r} dim=32 0 vectors>"
    finally:
        store.close()
    assert repr(store) == f"<asteria_store.Store {str(path)!r} dim=32 closed>"


def test_create_into_an_existing_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    with asteria_store.create(tmp_path / "store", dim=4) as store:
        assert len(store) == 0


def test_create_with_bad_config_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match=r"^dim must be a positive integer, got 0\.$"):
        asteria_store.create(tmp_path / "store", dim=0)
    with pytest.raises(InvalidArgumentError, match=r"^metric must be 'cosine', 'ip' or 'l2', got 'l1'\.$"):
        asteria_store.create(tmp_path / "store", dim=4, metric="l1")
    with pytest.raises(InvalidArgumentError, match=r"^bits must be an integer in \[1, 62\], got 0\.$"):
        asteria_store.create(tmp_path / "store", dim=4, bits=0)
    assert list(tmp_path.iterdir()) == []


def test_open_close_and_context_manager(tmp_path: Path) -> None:
    path = tmp_path / "store"
    asteria_store.create(path, dim=DIM).close()
    with asteria_store.open(path) as store:
        store.ingest(seeded(5))
        assert len(store) == 5
    with pytest.raises(StoreClosedError):
        len(store)
    store.close()  # idempotent
    with asteria_store.Store(path) as again:
        assert len(again) == 5
    # Every handle released its share of the process-wide LMDB environment.
    assert os.path.realpath(path / "catalog.lmdb") not in catalog_mod._envs


def test_two_handles_share_one_environment_and_see_each_others_writes(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with asteria_store.create(path, dim=DIM) as writer, asteria_store.open(path, readonly=True) as reader:
        assert len(reader) == 0
        x = seeded(20)
        writer.ingest(x)
        assert len(reader) == 20
        ids, _ = reader.search(x[:3], 1, probes="all")
        np.testing.assert_array_equal(ids[:, 0], [0, 1, 2])
        writer.delete([1])
        ids, _ = reader.search(x[:3], 1, probes="all")
        assert 1 not in ids


def test_info_keys_and_values(tmp_store) -> None:
    x = seeded(100)
    tmp_store.ingest(x[:60])
    tmp_store.ingest(x[60:])
    tmp_store.delete([0, 5, 70])
    info = tmp_store.info()
    assert set(info) == {  # short: the rest is under "internals"
        "path", "format_version", "dim", "metric", "dtype", "count", "deleted", "segments", "buckets", "router",
        "pending_training", "kernel", "generation", "disk_bytes", "internals", "columns", "ids",
    }
    assert set(info["internals"]) == {
        "chunk_rows", "rows_stored", "extents", "next_id", "router", "fitted_rows", "grows", "retired",
        "maintenance",
    }
    # A learned store's baseline serves until MIN_TRAIN_ROWS vectors: sized for that many.
    expected_bits = bits_for_size(1_000)
    assert expected_bits == 2
    keys = tmp_store.router.keys(tmp_store.get(np.setdiff1d(np.arange(100), [0, 5, 70])))
    assert info["path"] == str(tmp_store.path)
    assert info["format_version"] == BASE_FORMAT_VERSION  # no metadata columns: any version reads it
    assert info["columns"] == {}
    assert (info["dim"], info["metric"], info["dtype"]) == (32, "cosine", "float32")
    assert info["internals"]["chunk_rows"] == 131072  # largest power of two with <= 16 MiB of float32 rows
    assert (info["count"], info["segments"], info["internals"]["rows_stored"], info["deleted"]) == (97, 2, 100, 3)
    assert info["generation"] == 3  # two ingests and one delete
    assert info["router"] == "sign"
    assert {k: v for k, v in info["internals"]["router"].items() if k != "digest"} == {
        "kind": "sign", "bits": expected_bits, "dim": 32, "seed": 0,
    }
    assert len(info["internals"]["router"]["digest"]) == 16
    int(info["internals"]["router"]["digest"], 16)
    # Extents are (bucket, segment) pairs: at least the distinct live keys, at most one per row.
    assert len(np.unique(keys)) <= info["internals"]["extents"] <= 100
    assert info["disk_bytes"] > 2 * 4 * DIM * 100
    json.dumps(info)  # JSON-able as promised


# --- ingest ---------------------------------------------------------------------------------


def test_auto_ids_are_consecutive_across_ingests(tmp_store) -> None:
    x = seeded(25)
    first = tmp_store.ingest(x[:10])
    second = tmp_store.ingest(x[10:])
    assert (first.rows, first.segment, first.trained) == (10, 1, False)
    assert (second.rows, second.segment) == (15, 2)
    np.testing.assert_array_equal(first.ids, np.arange(10))
    np.testing.assert_array_equal(second.ids, np.arange(10, 25))
    assert first.ids.dtype == np.uint64
    assert len(tmp_store) == 25
    np.testing.assert_allclose(tmp_store.get(np.arange(25)), normalise(x), atol=1e-7)


def test_explicit_ids(tmp_store) -> None:
    x = seeded(3)
    result = tmp_store.ingest(x, ids=[100, 5, 42])
    np.testing.assert_array_equal(result.ids, [100, 5, 42])
    np.testing.assert_allclose(tmp_store.get([5, 42, 100]), normalise(x)[[1, 2, 0]], atol=1e-7)
    ids, _ = tmp_store.search(x, 1, probes="all")
    np.testing.assert_array_equal(ids[:, 0], [100, 5, 42])


def test_auto_ids_continue_above_explicit_large_ids(tmp_store) -> None:
    tmp_store.ingest(seeded(2), ids=np.array([1000, 7], dtype=np.uint64))
    np.testing.assert_array_equal(tmp_store.ingest(seeded(3, seed=1)).ids, [1001, 1002, 1003])
    # Explicit ids below the counter do not pull it back.
    tmp_store.ingest(seeded(1, seed=2), ids=[3])
    np.testing.assert_array_equal(tmp_store.ingest(seeded(1, seed=3)).ids, [1004])
    assert len(tmp_store) == 7


def test_largest_id_is_accepted(tmp_store) -> None:
    top = 2**63 - 1
    tmp_store.ingest(seeded(1), ids=np.array([top], dtype=np.uint64))
    ids, _ = tmp_store.search(seeded(1), 1, probes="all")
    assert ids.dtype == np.int64 and ids[0, 0] == top


def test_ingest_from_npy_path_equals_ingest_from_array(tmp_path: Path, clustered) -> None:
    x = np.asarray(clustered.base[:500])
    ids = np.arange(1000, 1500, dtype=np.int64)[::-1].copy()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "ids.npy", ids)
    with asteria_store.create(tmp_path / "a", dim=DIM, chunk_rows=64) as a, \
            asteria_store.create(tmp_path / "b", dim=DIM, chunk_rows=64) as b:
        ra = a.ingest(x, ids=ids)
        rb = b.ingest(tmp_path / "x.npy", ids=str(tmp_path / "ids.npy"))
        np.testing.assert_array_equal(ra.ids, rb.ids)
        np.testing.assert_array_equal(a.get(ids), b.get(ids))
        for probes in ("all", 8):
            ia, sa = a.search(clustered.queries, 10, probes=probes)
            ib, sb = b.search(clustered.queries, 10, probes=probes)
            np.testing.assert_array_equal(ia, ib)
            np.testing.assert_array_equal(sa, sb)
        # Queries from a .npy path too.
        np.save(tmp_path / "q.npy", np.asarray(clustered.queries))
        np.testing.assert_array_equal(
            b.search(tmp_path / "q.npy", 10, probes="all")[0], a.search(clustered.queries, 10, probes="all")[0]
        )
        assert a.info()["count"] == b.info()["count"] == 500


def test_ingest_in_many_blocks_and_windows_equals_ingest_in_one(
    tmp_path: Path, clustered, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pass 1 hashes block by block, pass 2 writes window by window and gathers rows in
    batches: shrink all three so a small input crosses every boundary."""
    x = np.asarray(clustered.base[:1000])
    np.save(tmp_path / "x.npy", x)
    with asteria_store.create(tmp_path / "one", dim=DIM, bits=6, chunk_rows=64) as one:
        one.ingest(x)
        want_vectors = one.get(np.arange(1000))
        want = one.search(clustered.queries, 10, probes=4)
    monkeypatch.setattr(pipeline_mod, "_HASH_BLOCK_ROWS", 97)
    monkeypatch.setattr(pipeline_mod, "_WRITE_WINDOW_BYTES", 3 * 64 * DIM * 4)  # 3 chunks a window
    monkeypatch.setattr(io_mod, "_GATHER_ROWS", 13)
    with asteria_store.create(tmp_path / "many", dim=DIM, bits=6, chunk_rows=64) as many:
        many.ingest(tmp_path / "x.npy")
        np.testing.assert_array_equal(many.get(np.arange(1000)), want_vectors)
        for got, exp in zip(many.search(clustered.queries, 10, probes=4), want):
            np.testing.assert_array_equal(got, exp)
        assert many.verify().ok
        # A bad row deep in a later block is reported by its row in the whole input.
        bad = x.copy()
        bad[700, 3] = np.nan
        with pytest.raises(InvalidInputError, match=r"\(first in row 700\)"):
            many.ingest(bad)
        bad[700, 3] = 0.0
        bad[650] = 0.0
        with pytest.raises(InvalidInputError, match=r"all-zero vector in row 650\.$"):
            many.ingest(bad)
        assert len(many) == 1000


def test_ingest_accepts_float16_float64_and_integer_input(tmp_store) -> None:
    x = seeded(10)
    tmp_store.ingest(x.astype(np.float16))
    tmp_store.ingest(x.astype(np.float64))
    tmp_store.ingest(np.arange(1, 1 + 10 * DIM, dtype=np.int32).reshape(10, DIM))
    np.testing.assert_allclose(tmp_store.get(np.arange(10)), normalise(x.astype(np.float16)), atol=1e-7)
    np.testing.assert_allclose(tmp_store.get(np.arange(10, 20)), normalise(x), atol=1e-7)
    np.testing.assert_allclose(
        tmp_store.get(np.arange(20, 30)),
        normalise(np.arange(1, 1 + 10 * DIM).reshape(10, DIM)), atol=1e-7,
    )


def test_float16_storage(tmp_path: Path, clustered) -> None:
    x = np.asarray(clustered.base[:300])
    with asteria_store.create(tmp_path / "s", dim=DIM, dtype="float16", chunk_rows=64) as store:
        store.ingest(x)
        assert store.info()["dtype"] == "float16"
        stored = normalise(x).astype(np.float16).astype(np.float32)
        got = store.get(np.arange(300))
        assert got.dtype == np.float32
        # The store normalises in float64: a coordinate may round to the neighbouring
        # float16 value of the float32-normalised one (one float16 ulp, 2**-10 relative).
        np.testing.assert_allclose(got, stored, rtol=2**-10, atol=0)
        ids, scores = store.search(clustered.queries, 10, probes="all")
        exp_ids, exp_scores = brute_force(np.arange(300), got, normalise(clustered.queries), 10)
        np.testing.assert_array_equal(ids, exp_ids)
        np.testing.assert_allclose(scores, exp_scores, rtol=0, atol=1e-6)
        # Half the bytes of float32 on disk: 64 rows x 32 dims x 2 bytes per chunk file.
        chunk = store.path / "segments.zarr" / "seg-00000001" / "vectors" / "c" / "0" / "0"
        assert chunk.stat().st_size == 64 * DIM * 2


def test_metric_ip_keeps_vectors_and_scores_raw_inner_products(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((200, DIM)) * rng.uniform(0.1, 10.0, (200, 1))).astype(np.float32)
    x[7] = 0.0  # a zero vector is fine for "ip"
    q = (rng.standard_normal((20, DIM)) * 3.0).astype(np.float32)
    with asteria_store.create(tmp_path / "s", dim=DIM, metric="ip", chunk_rows=64) as store:
        store.ingest(x)
        np.testing.assert_array_equal(store.get(np.arange(200)), x)  # not normalised
        ids, scores = store.search(q, 5, probes="all")
        exp_ids, exp_scores = brute_force(np.arange(200), x, q, 5)
        np.testing.assert_array_equal(ids, exp_ids)
        np.testing.assert_allclose(scores, exp_scores, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(scores, np.take_along_axis(q @ x.T, ids, axis=1), rtol=1e-5, atol=1e-4)
        # Queries are not normalised either: doubling a query doubles its scores.
        ids2, scores2 = store.search(2 * q, 5, probes="all")
        np.testing.assert_array_equal(ids2, ids)
        np.testing.assert_allclose(scores2, 2 * scores, rtol=1e-5)
        # The longest vector's best match is itself, scored by its squared norm (not 1).
        longest = int(np.argmax(np.linalg.norm(x, axis=1)))
        ids, scores = store.search(x[[longest]], 1, probes="all")
        assert ids[0, 0] == longest
        assert scores[0, 0] == pytest.approx(float(x[longest] @ x[longest]), rel=1e-5)


def test_metric_cosine_normalises_vectors_and_queries(tmp_store) -> None:
    rng = np.random.default_rng(0)
    x = seeded(50) * rng.uniform(0.01, 100.0, (50, 1)).astype(np.float32)
    q = seeded(5, seed=1)
    tmp_store.ingest(x)
    got = tmp_store.get(np.arange(50))
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(got, normalise(x), atol=1e-7)
    ids, scores = tmp_store.search(q, 50, probes="all")
    cos = normalise(q) @ normalise(x).T
    np.testing.assert_allclose(scores, np.take_along_axis(cos, ids, axis=1), atol=1e-6)
    assert np.all(np.abs(scores) <= 1.0 + 1e-6)
    ids5, scores5 = tmp_store.search(q * 50.0, 50, probes="all")  # scale-free queries
    np.testing.assert_array_equal(ids5, ids)
    np.testing.assert_allclose(scores5, scores, atol=1e-6)


# --- get and delete -------------------------------------------------------------------------


def test_get_returns_vectors_in_the_requested_order(tmp_path: Path) -> None:
    x = seeded(150)
    with asteria_store.create(tmp_path / "s", dim=DIM, chunk_rows=64) as store:
        store.ingest(x[:100])
        store.ingest(x[100:])
        want = [149, 7, 64, 7, 0, 120, 63]
        np.testing.assert_allclose(store.get(want), normalise(x)[want], atol=1e-7)
        np.testing.assert_allclose(store.get(np.array(want, dtype=np.uint64)), normalise(x)[want], atol=1e-7)
        np.save(tmp_path / "ids.npy", np.array(want))
        np.testing.assert_allclose(store.get(tmp_path / "ids.npy"), normalise(x)[want], atol=1e-7)
        np.testing.assert_allclose(store.get(5), normalise(x)[[5]], atol=1e-7)  # a scalar id


def test_delete_removes_from_search_and_get(tmp_store) -> None:
    x = seeded(50)
    tmp_store.ingest(x)
    result = tmp_store.delete([3, 10, 10])
    assert result.rows == 2
    assert len(tmp_store) == 48
    with pytest.raises(IdNotFoundError):
        tmp_store.get([3])
    ids, scores = tmp_store.search(x, 50, probes="all")
    live = np.setdiff1d(np.arange(50), [3, 10])
    for row_ids, row_scores in zip(ids, scores):
        np.testing.assert_array_equal(np.sort(row_ids[:48]), live)
        np.testing.assert_array_equal(row_ids[48:], [-1, -1])
        assert np.all(np.isneginf(row_scores[48:]))
    probed, _ = tmp_store.search(x[:4], 50, probes=2**12)  # every bucket: same set of rows
    np.testing.assert_array_equal(np.sort(probed, axis=1), np.sort(ids[:4], axis=1))
    with pytest.raises(IdNotFoundError):
        tmp_store.delete([3])


def test_no_ids_delete_and_get_nothing(tmp_store) -> None:
    """``[]`` (float64 to numpy) is no ids: delete commits nothing, get returns no rows."""
    tmp_store.ingest(seeded(20))
    generation = tmp_store.generation
    for empty in ([], np.array([], dtype=np.uint64), ()):
        assert tmp_store.delete(empty).rows == 0
        assert tmp_store.get(empty).shape == (0, 32)
    assert tmp_store.generation == generation and len(tmp_store) == 20
    with pytest.raises(InvalidInputError, match="integer ids"):
        tmp_store.delete([1.5])


def test_a_deleted_id_can_be_ingested_again(tmp_store) -> None:
    x = seeded(20)
    tmp_store.ingest(x)
    tmp_store.delete([3])
    y = seeded(1, seed=9)
    assert tmp_store.ingest(y, ids=[3]).ids.tolist() == [3]
    assert len(tmp_store) == 20
    np.testing.assert_allclose(tmp_store.get([3]), normalise(y), atol=1e-7)
    ids, _ = tmp_store.search(np.vstack([y, x[3:4]]), 1, probes="all")
    assert ids[0, 0] == 3  # the new vector is found under id 3
    assert ids[1, 0] != 3  # the old one is gone
    tmp_store.delete([3])
    assert len(tmp_store) == 19
    assert tmp_store.info()["deleted"] == 2


# --- search ---------------------------------------------------------------------------------


def test_exact_search_equals_brute_force_across_segments_with_deletes(probed_store, clustered) -> None:
    dead = np.random.default_rng(0).choice(2000, 150, replace=False)
    probed_store.delete(dead)
    live = np.setdiff1d(np.arange(2000), dead)
    assert probed_store.info()["segments"] == 3
    queries = np.vstack([clustered.queries, clustered.base[:50]])  # includes deleted and live rows
    ids, scores = probed_store.search(queries, 10, probes="all")
    exp_ids, exp_scores = brute_force(live, normalise(clustered.base[live]), normalise(queries), 10)
    assert ids.shape == scores.shape == (150, 10)
    assert ids.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(ids, exp_ids)
    np.testing.assert_allclose(scores, exp_scores, rtol=0, atol=1e-5)
    assert not np.isin(ids, dead).any()


def test_query_of_one_vector_equals_search_of_a_batch_of_one(probed_store, clustered) -> None:
    q = np.asarray(clustered.queries[3])
    for probes in ("all", 1, 32):
        ids, scores = probed_store.query(q, 10, probes=probes)
        batch_ids, batch_scores = probed_store.search(q[None, :], 10, probes=probes)
        assert ids.shape == scores.shape == (10,)
        np.testing.assert_array_equal(ids, batch_ids[0])
        np.testing.assert_array_equal(scores, batch_scores[0])
        np.testing.assert_array_equal(probed_store.query(q[None, :], 10, probes=probes)[0], ids)


def test_probed_search_with_default_probes(probed_store, clustered) -> None:
    queries = normalise(clustered.queries)
    ids, scores = probed_store.search(clustered.queries, 10)
    truth, _ = brute_force(np.arange(2000), normalise(clustered.base), queries, 10)
    assert ids.shape == (100, 10)
    assert np.all((ids >= 0) & (ids < 2000))
    assert all(len(set(row)) == 10 for row in ids.tolist())
    assert np.all(np.diff(scores, axis=1) <= 0)  # best first
    # Scores are exact for the ids returned.
    stored = probed_store.get(ids.ravel()).reshape(100, 10, DIM)
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", stored, queries), atol=1e-5)
    # Measured 0.808 (2**8 buckets, 32 probes); chance is 10 / 2000 = 0.005.
    assert recall_at_k(ids, truth, 10) >= 0.7


def test_more_probes_never_lower_recall(probed_store, clustered) -> None:
    truth, _ = brute_force(np.arange(2000), normalise(clustered.base), normalise(clustered.queries), 10)
    per_query = {}
    for probes in (1, 8, 64):
        ids, _ = probed_store.search(clustered.queries, 10, probes=probes)
        per_query[probes] = np.array([len(np.intersect1d(f, t)) for f, t in zip(ids, truth)])
    assert np.all(per_query[8] >= per_query[1])
    assert np.all(per_query[64] >= per_query[8])
    # Measured: 0.100 with 1 probe, 0.474 with 8, 0.925 with 64.
    assert per_query[1].mean() / 10 < 0.3
    assert per_query[64].mean() / 10 >= 0.85
    # Probing every bucket is exact.
    ids, scores = probed_store.search(clustered.queries, 10, probes=2**8)
    exact_ids, exact_scores = probed_store.search(clustered.queries, 10, probes="all")
    np.testing.assert_array_equal(ids, exact_ids)
    np.testing.assert_allclose(scores, exact_scores, atol=1e-6)


def test_a_stored_vector_is_found_in_its_home_bucket(probed_store, clustered) -> None:
    ids, scores = probed_store.search(clustered.base, 1, probes=1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(2000))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def test_candidates_caps_the_rows_scored(probed_store, clustered) -> None:
    store = probed_store
    all_ids = np.arange(2000)
    keys = store.router.keys(store.get(all_ids))  # the bucket of every row
    queries = normalise(clustered.queries[:20])
    probe_rows = store.router.probe_input(queries)
    for cap in (1, 20, 60):
        ids, scores = store.search(clustered.queries[:20], 5, probes=64, candidates=cap)
        for qi in range(20):
            # Probing stops once `cap` rows are gathered: whole buckets, in probe order.
            gathered = []
            for visited, key in enumerate(store.router.probe_keys(probe_rows[qi])):
                if visited >= 64 or len(gathered) >= cap:
                    break
                gathered.extend(all_ids[keys == key].tolist())
            exp_ids, exp_scores = brute_force(
                np.array(gathered), normalise(clustered.base[gathered]), queries[qi : qi + 1], 5
            )
            np.testing.assert_array_equal(ids[qi], exp_ids[0])
            np.testing.assert_allclose(scores[qi], exp_scores[0], atol=1e-5)
    # A cap above every candidate changes nothing.
    np.testing.assert_array_equal(
        store.search(clustered.queries, 10, probes=16, candidates=10**9)[0],
        store.search(clustered.queries, 10, probes=16)[0],
    )


@pytest.mark.parametrize("probes", ["all", 4, 2**12])
def test_k_larger_than_the_store_pads_with_minus_one(tmp_store, probes) -> None:
    x = seeded(5)
    tmp_store.ingest(x)
    ids, scores = tmp_store.search(np.vstack([x, seeded(2, seed=1)]), 8, probes=probes)
    assert ids.shape == scores.shape == (7, 8)
    found = ids >= 0
    if probes != 4:  # every row is visited
        assert found.sum(axis=1).tolist() == [5] * 7
        np.testing.assert_array_equal(np.sort(ids[:, :5], axis=1), np.tile(np.arange(5), (7, 1)))
    # Padding comes last: -1 ids with -inf scores, and only there.
    for row_ids, row_scores, row_found in zip(ids, scores, found):
        n = int(row_found.sum())
        assert row_found[:n].all() and not row_found[n:].any()
        assert np.all(np.isneginf(row_scores[n:])) and np.all(np.isfinite(row_scores[:n]))


@pytest.mark.parametrize("probes", ["all", 32])
def test_search_of_an_empty_store(tmp_store, probes) -> None:
    ids, scores = tmp_store.search(seeded(3), 4, probes=probes)
    np.testing.assert_array_equal(ids, np.full((3, 4), -1))
    assert np.all(np.isneginf(scores))


# --- persistence ----------------------------------------------------------------------------


def test_reopen_persists_everything(tmp_path: Path, clustered) -> None:
    path = tmp_path / "store"
    with asteria_store.create(path, dim=DIM, bits=6, chunk_rows=64, seed=3) as store:
        store.ingest(clustered.base[:300])
        store.ingest(clustered.base[300:500], ids=np.arange(1000, 1200))
        store.delete([0, 1, 1100])
        info = store.info()
        live = np.concatenate([np.arange(2, 300), np.arange(1000, 1100), np.arange(1101, 1200)])
        vectors = store.get(live)
        exact = store.search(clustered.queries, 10, probes="all")
        probed = store.search(clustered.queries, 10, probes=4)
        keys = store.router.keys(vectors)
    with asteria_store.open(path) as store:
        assert len(store) == 497
        assert store.info() == info
        np.testing.assert_array_equal(store.get(live), vectors)
        np.testing.assert_array_equal(store.router.keys(vectors), keys)
        for got, want in zip(store.search(clustered.queries, 10, probes="all"), exact):
            np.testing.assert_array_equal(got, want)
        for got, want in zip(store.search(clustered.queries, 10, probes=4), probed):
            np.testing.assert_array_equal(got, want)
        with pytest.raises(IdNotFoundError):
            store.get([1100])
        assert store.ingest(clustered.base[500:501]).ids.tolist() == [1200]  # the counter persisted


# --- readonly and closed stores -------------------------------------------------------------


def test_readonly_store_refuses_writes(tmp_path: Path, disk_snapshot) -> None:
    path = tmp_path / "store"
    x = seeded(10)
    with asteria_store.create(path, dim=DIM) as store:
        store.ingest(x)
    before = disk_snapshot(path)
    with asteria_store.open(path, readonly=True) as store:
        assert store.readonly
        message = f"The store {str(path)!r} was opened read-only."
        for write in (lambda: store.ingest(x), lambda: store.delete([1]), lambda: store.verify(repair=True)):
            with pytest.raises(ReadOnlyError) as info:
                write()
            assert isinstance(info.value, PermissionError)
            assert str(info.value) == message
        assert len(store) == 10  # reading works
        assert store.search(x[:1], 1, probes="all")[0][0, 0] == 0
        assert store.verify().ok
    assert disk_snapshot(path) == before


def test_a_closed_store_refuses_everything(tmp_store) -> None:
    x = seeded(3)
    tmp_store.ingest(x)
    tmp_store.close()
    message = f"The store {str(tmp_store.path)!r} is closed."
    calls = [
        lambda s: len(s), lambda s: s.info(), lambda s: s.ingest(x), lambda s: s.delete([0]),
        lambda s: s.get([0]), lambda s: s.search(x), lambda s: s.query(x[0]), lambda s: s.verify(),
    ]
    for call in calls:
        with pytest.raises(StoreClosedError) as info:
            call(tmp_store)
        assert isinstance(info.value, RuntimeError)
        assert str(info.value) == message


# --- errors ---------------------------------------------------------------------------------

ERROR_BASES = [
    (StoreNotFoundError, FileNotFoundError),
    (StoreExistsError, FileExistsError),
    (UnsupportedFormatError, ValueError),
    (CorruptStoreError, RuntimeError),
    (ReadOnlyError, PermissionError),
    (StoreLockedError, RuntimeError),
    (StoreClosedError, RuntimeError),
    (InvalidInputError, ValueError),
    (DimensionMismatchError, InvalidInputError),
    (InvalidArgumentError, ValueError),
    (DuplicateIdError, InvalidInputError),
    (IdNotFoundError, KeyError),
]


@pytest.mark.parametrize("error, builtin", ERROR_BASES, ids=[e.__name__ for e, _ in ERROR_BASES])
def test_errors_mix_in_builtins(error, builtin) -> None:
    assert issubclass(error, AsteriaError)
    assert issubclass(error, builtin)
    assert set(asteria_store.__all__) >= {error.__name__, "AsteriaError"}


def test_id_not_found_error_prints_one_plain_line() -> None:
    assert str(IdNotFoundError("Id 3 is not in the store.")) == "Id 3 is not in the store."


def _garbage(path: Path) -> Path:
    path.write_bytes(b"this is not a numpy file at all")
    return path


def _npz(path: Path) -> Path:
    np.savez(path, x=np.ones((3, DIM), np.float32))
    return path


def _with_nan(row: int, value: float = np.nan) -> np.ndarray:
    x = np.ones((10, DIM), dtype=np.float32)
    x[row, 5] = value
    return x


ONES = np.ones((3, DIM), dtype=np.float32)

# (action(store, tmp_path), error, builtin, message with {tmp} for tmp_path)
BAD_CALLS = [
    pytest.param(lambda s, p: s.ingest(np.ones((3, 16), np.float32)), DimensionMismatchError, ValueError,
                 "Expected vectors of dimension 32, got 16. Was the store created with --dim 16?",
                 id="ingest-wrong-dim"),
    pytest.param(lambda s, p: s.search(np.ones((2, 16), np.float32)), DimensionMismatchError, ValueError,
                 "Expected queries of dimension 32, got 16. Was the store created with --dim 16?",
                 id="search-wrong-dim"),
    pytest.param(lambda s, p: s.query(np.ones(16, np.float32)), DimensionMismatchError, ValueError,
                 "Expected queries of dimension 32, got 16. Was the store created with --dim 16?",
                 id="query-wrong-dim"),
    pytest.param(lambda s, p: s.ingest(_with_nan(7)), InvalidInputError, ValueError,
                 "Expected finite vectors, got NaN or inf (first in row 7). Clean or drop those rows and retry.",
                 id="ingest-nan"),
    pytest.param(lambda s, p: s.ingest(_with_nan(9, np.inf)), InvalidInputError, ValueError,
                 "Expected finite vectors, got NaN or inf (first in row 9). Clean or drop those rows and retry.",
                 id="ingest-inf"),
    pytest.param(lambda s, p: s.search(_with_nan(2, -np.inf)), InvalidInputError, ValueError,
                 "Expected finite queries, got NaN or inf (first in row 2). Clean or drop those rows and retry.",
                 id="search-inf"),
    pytest.param(lambda s, p: s.ingest(np.full((2, DIM), "a")), InvalidInputError, ValueError,
                 "Expected vectors with a real numeric dtype (float or int), got dtype <U1.", id="ingest-str"),
    pytest.param(lambda s, p: s.ingest(np.zeros((2, DIM), bool)), InvalidInputError, ValueError,
                 "Expected vectors with a real numeric dtype (float or int), got dtype bool.", id="ingest-bool"),
    pytest.param(lambda s, p: s.search(np.zeros((2, DIM), complex)), InvalidInputError, ValueError,
                 "Expected queries with a real numeric dtype (float or int), got dtype complex128.",
                 id="search-complex"),
    pytest.param(lambda s, p: s.ingest(np.ones(DIM, np.float32)), InvalidInputError, ValueError,
                 "Expected vectors as a 2-D array of shape (n, d), got 1-D shape (32,). "
                 "For one vector, pass vec[None, :].", id="ingest-1d"),
    pytest.param(lambda s, p: s.search(np.ones(DIM, np.float32)), InvalidInputError, ValueError,
                 "Expected queries as a 2-D array of shape (n, d), got 1-D shape (32,). "
                 "For one vector, pass vec[None, :].", id="search-1d"),
    pytest.param(lambda s, p: s.ingest(np.ones((0, DIM), np.float32)), InvalidInputError, ValueError,
                 "Expected at least one row of vectors, got an empty array.", id="ingest-empty"),
    pytest.param(lambda s, p: s.search(np.ones((0, DIM), np.float32)), InvalidInputError, ValueError,
                 "Expected at least one row of queries, got an empty array.", id="search-empty"),
    pytest.param(lambda s, p: s.query(np.ones((2, DIM), np.float32)), InvalidInputError, ValueError,
                 "query takes one vector, got 2; use search() for a batch.", id="query-two"),
    pytest.param(lambda s, p: s.ingest(np.vstack([ONES, np.zeros((1, DIM))])), InvalidInputError, ValueError,
                 "Expected non-zero vectors for metric 'cosine', got an all-zero vector in row 3.",
                 id="ingest-zero-vector"),
    pytest.param(lambda s, p: s.search(np.zeros((1, DIM))), InvalidInputError, ValueError,
                 "Expected non-zero queries for metric 'cosine', got an all-zero vector in row 0.",
                 id="search-zero-vector"),
    pytest.param(lambda s, p: s.search(ONES, k=0), InvalidArgumentError, ValueError,
                 "k must be a positive integer, got 0.", id="k-zero"),
    pytest.param(lambda s, p: s.search(ONES, k=-3), InvalidArgumentError, ValueError,
                 "k must be a positive integer, got -3.", id="k-negative"),
    pytest.param(lambda s, p: s.query(ONES[0], k=2.5), InvalidArgumentError, ValueError,
                 "k must be a positive integer, got 2.5.", id="k-float"),
    pytest.param(lambda s, p: s.search(ONES, probes=0), InvalidArgumentError, ValueError,
                 "probes must be a positive integer or 'all', got 0.", id="probes-zero"),
    pytest.param(lambda s, p: s.search(ONES, probes="some"), InvalidArgumentError, ValueError,
                 "probes must be a positive integer or 'all', got 'some'.", id="probes-str"),
    pytest.param(lambda s, p: s.search(ONES, candidates=0), InvalidArgumentError, ValueError,
                 "candidates must be a positive integer or None, got 0.", id="candidates-zero"),
    pytest.param(lambda s, p: s.ingest(ONES, ids=[100, 101, 100]), DuplicateIdError, ValueError,
                 "Expected unique ids, got id 100 more than once in this batch.", id="duplicate-in-batch"),
    pytest.param(lambda s, p: s.ingest(ONES, ids=[20, 5, 3]), DuplicateIdError, ValueError,
                 "Expected new ids, got 2 already in the store (first: 3). Delete them first, choose other ids, "
                 "or replace them (upsert, or ingest --on-conflict replace).",
                 id="duplicate-in-store"),
    pytest.param(lambda s, p: s.ingest(ONES, ids=[1, 2]), InvalidInputError, ValueError,
                 "Expected 3 ids (one per vector), got 2.", id="ids-wrong-length"),
    pytest.param(lambda s, p: s.ingest(ONES, ids=[20, -1, 21]), InvalidInputError, ValueError,
                 "Expected non-negative ids, got -1.", id="ids-negative"),
    pytest.param(lambda s, p: s.ingest(ONES, ids=[20.0, 21.0, 22.0]), InvalidInputError, ValueError,
                 "Expected integer ids, got dtype float64.", id="ids-float"),
    pytest.param(lambda s, p: s.ingest(ONES, ids=[[20, 21, 22]]), InvalidInputError, ValueError,
                 "Expected ids as a 1-D array, got shape (1, 3).", id="ids-2d"),
    pytest.param(lambda s, p: s.ingest(ONES[:1], ids=np.array([2**63], np.uint64)), InvalidInputError, ValueError,
                 "Expected ids below 2**63, got 9223372036854775808.", id="ids-too-large"),
    pytest.param(lambda s, p: s.ingest(p / "missing.npy"), InvalidInputError, ValueError,
                 "Cannot read vectors file '{tmp}/missing.npy': no such file.", id="npy-missing"),
    pytest.param(lambda s, p: s.ingest(p), InvalidInputError, ValueError,
                 "Cannot read vectors file '{tmp}': it is a directory.", id="npy-directory"),
    pytest.param(lambda s, p: s.ingest(_npz(p / "x.npz")), InvalidInputError, ValueError,
                 "Cannot read vectors file '{tmp}/x.npz': expected a .npy array, got an .npz archive.",
                 id="npz"),
    pytest.param(lambda s, p: s.ingest(ONES, ids=p / "missing-ids.npy"), InvalidInputError, ValueError,
                 "Cannot read ids file '{tmp}/missing-ids.npy': no such file.", id="ids-npy-missing"),
    pytest.param(lambda s, p: s.delete([1, 50, 60]), IdNotFoundError, KeyError,
                 "Cannot delete: 2 id(s) not in the store (first: 50). Nothing was deleted.", id="delete-missing"),
    pytest.param(lambda s, p: s.delete([-2]), InvalidInputError, ValueError,
                 "Expected non-negative ids, got -2.", id="delete-negative"),
    pytest.param(lambda s, p: s.get([1, 50]), IdNotFoundError, KeyError,
                 "Id 50 is not in the store.", id="get-missing"),
]


@pytest.mark.parametrize("action, error, builtin, message", BAD_CALLS)
def test_bad_calls_are_refused_with_a_pinned_message(
    tmp_store, tmp_path, disk_snapshot, action, error, builtin, message
) -> None:
    tmp_store.ingest(seeded(10))
    before = disk_snapshot(tmp_store.path)
    with pytest.raises(error) as info:
        action(tmp_store, tmp_path)
    assert isinstance(info.value, AsteriaError) and isinstance(info.value, builtin)
    assert str(info.value) == message.format(tmp=tmp_path)
    # Nothing changed: not the catalog, not a file, not the live count.
    assert disk_snapshot(tmp_store.path) == before
    assert len(tmp_store) == 10
    np.testing.assert_allclose(tmp_store.get(np.arange(10)), normalise(seeded(10)), atol=1e-7)


def test_unreadable_npy_file(tmp_store, tmp_path, disk_snapshot) -> None:
    before = disk_snapshot(tmp_store.path)
    path = _garbage(tmp_path / "bad.npy")
    with pytest.raises(InvalidInputError) as info:
        tmp_store.ingest(path)
    assert str(info.value) == (
        f"Cannot read vectors file {str(path)!r}: not a .npy file (save arrays with numpy.save)."
    )
    truncated = tmp_path / "truncated.npy"
    np.save(truncated, np.ones((100, DIM), np.float32))
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(InvalidInputError) as info:
        tmp_store.ingest(truncated)
    # A real .npy header with too little data: the reason in parentheses is numpy's own words.
    assert str(info.value).startswith(f"Cannot read vectors file {str(truncated)!r}: not a valid .npy file (")
    assert str(info.value).endswith(").")
    assert disk_snapshot(tmp_store.path) == before


def test_missing_store(tmp_path: Path) -> None:
    path = tmp_path / "nope"
    with pytest.raises(StoreNotFoundError) as info:
        asteria_store.open(path)
    assert isinstance(info.value, FileNotFoundError)
    assert str(info.value) == f"No store at {str(path)!r}. Create one with `asteria-store create {path} --dim D`."
    with pytest.raises(StoreNotFoundError) as info:
        asteria_store.open(tmp_path)  # a directory, but no store
    assert str(info.value) == (
        f"No asteria-store at {str(tmp_path)!r}: the directory has no catalog. "
        "Create one with `asteria-store create`."
    )
    assert not path.exists()


def test_create_over_an_existing_store_or_file(tmp_path: Path, disk_snapshot) -> None:
    path = tmp_path / "store"
    with asteria_store.create(path, dim=DIM) as store:
        store.ingest(seeded(4))
    before = disk_snapshot(path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / "file").write_text("x")
    for target in (path, tmp_path / "full"):
        with pytest.raises(StoreExistsError) as info:
            asteria_store.create(target, dim=DIM)
        assert isinstance(info.value, FileExistsError)
        assert str(info.value) == (
            f"Cannot create a store at {str(target)!r}: it already exists. "
            "Open it instead, or choose a new path."
        )
    with pytest.raises(StoreExistsError) as info:
        asteria_store.create(tmp_path / "file", dim=DIM)
    assert str(info.value) == (f"Cannot create a store at {str(tmp_path / 'file')!r}: it is a file. "
                               "A store is a directory: choose a new path.")
    with pytest.raises(StoreNotFoundError) as missing:
        asteria_store.open(tmp_path / "file")
    assert str(missing.value) == f"No asteria-store at {str(tmp_path / 'file')!r}: it is a file, and a store is a directory."
    assert (tmp_path / "file").read_text() == "x"
    assert disk_snapshot(path) == before
    with asteria_store.open(path) as store:
        assert len(store) == 4


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "store"
    asteria_store.create(path, dim=DIM).close()
    catalog = Catalog(path / "catalog.lmdb")
    try:
        catalog.write(lambda txn: catalog.put_meta(txn, "format_version", 999))
    finally:
        catalog.close()
    with pytest.raises(UnsupportedFormatError) as info:
        asteria_store.open(path)
    assert isinstance(info.value, ValueError)
    assert str(info.value) == (
        f"The store at {str(path)!r} has format version 999; this asteria-store reads versions "
        f"up to {FORMAT_VERSION}. Upgrade asteria-store."
    )
    # The failed open released the LMDB environment it took.
    assert os.path.realpath(path / "catalog.lmdb") not in catalog_mod._envs


def test_a_tampered_model_is_refused_on_open(tmp_path: Path) -> None:
    path = tmp_path / "store"
    asteria_store.create(path, dim=DIM).close()
    (projection,) = (path / "model").glob("*/projection.npy")
    raw = bytearray(projection.read_bytes())
    raw[-1] ^= 0x01
    projection.write_bytes(bytes(raw))
    with pytest.raises(CorruptStoreError) as info:
        asteria_store.open(path)
    assert str(info.value) == (
        f"The store's model in {str(projection.parent)!r} does not match the catalog's digest; "
        "it was modified or partially written."
    )


# --- extreme values and float16 storage -------------------------------------------------


def test_float16_storage_refuses_values_it_cannot_hold(tmp_path: Path, disk_snapshot) -> None:
    with asteria_store.create(tmp_path / "s", dim=4, metric="ip", dtype="float16") as store:
        before = disk_snapshot(store.path)
        with pytest.raises(InvalidInputError):
            store.ingest(np.array([[1e5, 0, 0, 0], [1, 2, 3, 4]], dtype=np.float32))
        assert disk_snapshot(store.path) == before


@pytest.mark.parametrize("scale", [1e20, 1e-30], ids=["huge", "tiny"])
def test_cosine_normalises_rows_of_extreme_norm(tmp_path: Path, scale: float) -> None:
    x = np.array([[scale, scale, 0.0, 0.0]], dtype=np.float32)
    assert np.isfinite(x).all() and (x != 0).any()
    with asteria_store.create(tmp_path / "s", dim=4) as store:
        store.ingest(x)
        np.testing.assert_allclose(store.get([0]), [[2**-0.5, 2**-0.5, 0.0, 0.0]], atol=1e-6)


def test_verify_accepts_a_healthy_float16_store(tmp_path: Path) -> None:
    x = clustered_vectors(2000, DIM, clusters=20, seed=8)
    with asteria_store.create(tmp_path / "s", dim=DIM, dtype="float16", bits=5) as store:
        store.ingest(x)
        # The store is fine: every row is found by exact search...
        ids, _ = store.search(x, 1, probes="all")
        np.testing.assert_array_equal(ids[:, 0], np.arange(2000))
        # ...and verify should say so (it reports "seg-00000001: rows 0.. do not hash to
        # their bucket 0").
        report = store.verify()
        assert report.problems == []


def test_normalising_in_blocks_equals_one_float64_pass_and_names_the_row() -> None:
    """normalise_rows works in float64 blocks of rows (bounded memory): the result equals
    normalising the whole matrix in float64 at once, and a zero row past the first block
    is named by its own number."""
    from asteria_store.io import normalise_rows

    rng = np.random.default_rng(7)
    x = rng.standard_normal((10_000, 48)).astype(np.float32)
    x[6_000] *= np.float32(1e-30)  # a tiny row: float64 keeps its norm
    x64 = x.astype(np.float64)
    whole = (x64 / np.sqrt((x64 * x64).sum(axis=1))[:, None]).astype(np.float32)
    np.testing.assert_allclose(normalise_rows(x, "cosine", what="vectors"), whole, rtol=1e-6, atol=0)
    x[9_001] = 0
    with pytest.raises(asteria_store.InvalidInputError, match="row 9101"):
        normalise_rows(x, "cosine", what="vectors", offset=100)
