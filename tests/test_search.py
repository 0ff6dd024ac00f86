"""The probed search path: batch search bucket by bucket equals one-query search, scores
exactly the probed candidates, and explains what it read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import asteria_store
from asteria_store.query.engine import probed_buckets, search_batch
from asteria_store.testing import brute_force_topk

DATA = Path(__file__).parent / "data"
K = 10


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def wordnet() -> tuple[np.ndarray, np.ndarray]:
    base = np.load(DATA / "wordnet_base_3000.f16.npy").astype(np.float32)
    queries = np.load(DATA / "wordnet_queries_200.f16.npy").astype(np.float32)
    return base, queries


@pytest.fixture(scope="module", params=["learned", "sign"])
def store(request, wordnet, tmp_path_factory):
    """The wordnet slice in two segments with some deletes, under each router."""
    base, _ = wordnet
    path = tmp_path_factory.mktemp(request.param) / "store"
    s = asteria_store.create(path, dim=384, router=request.param, bits=6)
    s.ingest(base[:2000])
    s.ingest(base[2000:])
    s.delete(np.arange(0, 3000, 37))
    yield s
    s.close()


def probed_rows(store, query: np.ndarray, probes: int, candidates=None) -> np.ndarray:
    """Ids of the live rows in the buckets one query probes (via the catalog's extents)."""
    view = store._current_view()
    router = store.router
    keys = probed_buckets(view, router.probe_keys(router.probe_input(query[None, :])[0]), probes, candidates)
    ids = []
    for key in keys:
        for seg, first, n in view.extents(key):
            rows = np.asarray(view.segments[seg].ids(first, first + n)).astype(np.int64)
            mask = view.live_mask(seg, first, n)
            ids.extend(rows if mask is None else rows[mask])
    return np.asarray(ids, dtype=np.int64)


@pytest.mark.parametrize("probes", [1, 4, 16])
def test_batch_search_equals_one_query_search(store, wordnet, probes) -> None:
    _, queries = wordnet
    ids, scores = store.search(queries, K, probes=probes)
    for qi in range(0, len(queries), 7):
        one_ids, one_scores = store.query(queries[qi], K, probes=probes)
        np.testing.assert_array_equal(ids[qi], one_ids)
        np.testing.assert_allclose(scores[qi], one_scores, rtol=0, atol=1e-6)


@pytest.mark.parametrize("probes", [1, 4, 16])
def test_probed_search_is_exact_over_the_probed_candidates(store, wordnet, probes) -> None:
    base, queries = wordnet
    ids, scores = store.search(queries, K, probes=probes)
    qn = normalise(queries)
    for qi in range(0, len(queries), 5):
        cand = probed_rows(store, qn[qi], probes)
        exp_rows, exp_scores = brute_force_topk(normalise(base[cand]), qn[qi : qi + 1], min(K, len(cand)))
        got = ids[qi][ids[qi] >= 0]
        assert len(got) == min(K, len(cand))
        assert np.isin(got, cand).all()  # only probed, live rows
        # each returned score is that row's exact score, and they are the candidates' top-k
        np.testing.assert_allclose(scores[qi][: len(got)], normalise(base[got]) @ qn[qi], rtol=0, atol=1e-5)
        np.testing.assert_allclose(scores[qi][: len(got)], exp_scores[0], rtol=0, atol=1e-5)


def test_explain_reports_what_was_read(store, wordnet) -> None:
    _, queries = wordnet
    qn = normalise(queries)
    ids, scores, stats = store.search(queries, K, probes=8, explain=True, prune=True)
    plain_ids, _ = store.search(queries, K, probes=8)
    np.testing.assert_array_equal(ids, plain_ids)
    row_bytes = 384 * 4 + 8
    for qi in range(0, len(queries), 11):
        cand = probed_rows(store, qn[qi], 8)
        assert stats.scanned[qi] == len(cand)
        assert 1 <= stats.buckets[qi] <= 8
        # without LRSQ pruning every candidate's vector and id is read (deleted rows too)
        read = len(cand) - stats.pruned[qi]
        assert stats.bytes_read[qi] >= read * row_bytes
    if store.router.kind == "sign":
        assert stats.pruned.sum() == 0
    else:  # the learned router's LRSQ bounds rule out most candidates
        assert stats.pruned.sum() > 0.5 * stats.scanned.sum()
    # Each bucket is read once for the batch, however many queries probe it.
    assert 0 < stats.batch_bytes < stats.bytes_read.sum()
    one_ids, one_scores, one = store.query(queries[3], K, probes=8, explain=True)
    # Same buckets and candidates alone or in a batch; how many are pruned depends on the
    # order thresholds tighten in, so pruned counts and bytes may differ.
    assert (one["buckets"], one["scanned"]) == (stats.buckets[3], stats.scanned[3])
    exact_ids, _, exact = store.search(queries[:2], K, probes="all", explain=True)
    assert exact.rows()[0] == {"buckets": -1, "scanned": len(store), "pruned": 0,
                               "bytes_read": 3000 * row_bytes}


def test_equal_scores_are_ordered_by_id(tmp_path) -> None:
    x = np.tile(np.eye(8, dtype=np.float32)[:1], (50, 1))  # 50 identical vectors
    with asteria_store.create(tmp_path / "s", dim=8, router="sign", bits=2) as s:
        s.ingest(x, ids=np.arange(100, 150)[::-1].copy())
        for probes in (1, "all"):
            ids, scores = s.search(x[:1], 5, probes=probes)
            assert ids[0].tolist() == [100, 101, 102, 103, 104]
            np.testing.assert_allclose(scores[0], 1.0)


@pytest.mark.parametrize("probes", [2, 8, 32])
@pytest.mark.parametrize("k", [1, 10, 50])
def test_lrsq_pruning_is_lossless(store, wordnet, probes, k) -> None:
    """Pruning by certified bounds returns exactly what scoring every probed candidate does."""
    _, queries = wordnet
    view = store._current_view()
    qn = normalise(queries)
    got_i, got_s, stats = search_batch(view, store.router, qn, k, probes, None, explain=True, prune=True)
    exp_i, exp_s = search_batch(view, store.router, qn, k, probes, None, prune=False)
    np.testing.assert_array_equal(got_i, exp_i)
    # exact scores; BLAS may round a product over fewer columns differently (~1e-7)
    np.testing.assert_allclose(got_s, exp_s, rtol=0, atol=1e-6)
    if store.router.kind == "ecvh":
        assert stats.pruned.sum() > 0


def test_verify_checks_lrsq_chunks(tmp_path, wordnet) -> None:
    base, _ = wordnet
    with asteria_store.create(tmp_path / "s", dim=384, bits=5) as s:
        s.ingest(base[:1500])
        assert s.info()["router"]["kind"] == "ecvh" and s.verify().ok
    chunk = next((tmp_path / "s" / "segments.zarr").glob("seg-*/lrsq/c/0/0"))
    chunk.write_bytes(chunk.read_bytes()[:-1])
    with asteria_store.open(tmp_path / "s", readonly=True) as s:
        problems = s.verify().problems
    assert len(problems) == 1 and "lrsq/c/0/0" in problems[0] and "bytes, expected" in problems[0]


def test_store_search_without_pruning_gives_the_same_results(store, wordnet) -> None:
    _, queries = wordnet
    ids, scores, stats = store.search(queries, K, probes=8, explain=True)
    ids_np, scores_np, stats_np = store.search(queries, K, probes=8, prune=False, explain=True)
    np.testing.assert_array_equal(ids, ids_np)
    np.testing.assert_allclose(scores, scores_np, rtol=0, atol=1e-6)
    assert stats_np.pruned.sum() == 0
    np.testing.assert_array_equal(stats.scanned, stats_np.scanned)


@pytest.mark.parametrize("probes", [1, 8, 32])
def test_one_query_pruning_is_lossless(store, wordnet, probes) -> None:
    """A single query takes the all-buckets-at-once pruning path; it must equal exact
    scoring of every probed candidate."""
    _, queries = wordnet
    for qi in range(0, len(queries), 9):
        ids, scores, stats = store.query(queries[qi], K, probes=probes, explain=True)
        exp_ids, exp_scores = store.query(queries[qi], K, probes=probes, prune=False)
        np.testing.assert_array_equal(ids, exp_ids)
        np.testing.assert_allclose(scores, exp_scores, rtol=0, atol=1e-6)
        if store.router.kind == "ecvh" and probes > 1:
            assert stats["pruned"] > 0
