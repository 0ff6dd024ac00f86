"""The probed search path: batch search bucket by bucket equals one-query search, scores
exactly the probed candidates, and explains what it read."""

from __future__ import annotations

import numpy as np
import pytest

import asteria_store
from asteria_store.query.engine import search_batch
from asteria_store.testing import brute_force_topk
from conftest import assert_same_up_to_rounding, normalise

K = 10




@pytest.fixture(scope="module")
def store(routed_store):
    """conftest.routed_store: the wordnet slice in two segments with deletes, per router."""
    return routed_store


def probed_buckets(view, probe_keys, probes: int, candidates: int | None) -> list[int]:
    """The first ``probes`` bucket keys of ``probe_keys``, stopping once ``candidates``
    rows (stored, deleted ones included) have been gathered: the budget rule, written
    independently of the engine's vectorised one."""
    out: list[int] = []
    total = 0
    for visited, key in enumerate(probe_keys):
        if visited >= probes or (candidates is not None and total >= candidates):
            break
        out.append(key)
        if candidates is not None:
            total += sum(ext[2] for ext in view.extents(key))
    return out


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
        assert s.info()["router"] == "ecvh" and s.verify().ok
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


# --- the batch engine's building blocks ---------------------------------------------------


def test_probe_order_is_the_start_of_probe_keys(store, wordnet) -> None:
    """The vectorised batch probe order equals each query's lazy probe sequence."""
    from asteria_store.query.engine import probe_order

    _, queries = wordnet
    qn = normalise(queries[:40])
    router = store.router
    got = probe_order(router, qn, 12)
    rows = router.probe_input(qn)
    for qi in range(len(qn)):
        expected = [key for _, key in zip(range(12), router.probe_keys(rows[qi]))]
        assert got[qi].tolist() == expected


def test_top_order_breaks_ties_by_index_like_a_stable_sort() -> None:
    from asteria_store.model.router import top_order

    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, size=(50, 40)).astype(np.float32)  # many ties
    scores[:, 5] = np.inf
    distinct = rng.permutation(40).astype(np.float32)[None, :]  # one row, no ties
    for p in (1, 3, 7, 19, 40):
        np.testing.assert_array_equal(top_order(scores, p), np.argsort(-scores, axis=1, kind="stable")[:, :p])
        for row in (scores[:1], scores[7:8], distinct):  # one query takes its own path
            np.testing.assert_array_equal(top_order(row, p), np.argsort(-row, axis=1, kind="stable")[:, :p])


@pytest.mark.parametrize("k", [1, 5, 30])
def test_select_then_select_equals_one_selection(k) -> None:
    """Top-k by (score desc, id asc) is a total order: selecting per part, then from the
    parts' selections, gives what one selection over everything gives (ties included)."""
    from asteria_store.query.engine import _select, _sorted

    rng = np.random.default_rng(k)
    s = rng.integers(0, 6, size=(20, 90)).astype(np.float32)  # heavy ties
    ids = rng.permutation(1000)[:90].astype(np.int64)
    whole = _sorted(*_select(s, ids, k))
    parts = [_select(s[:, a:b], ids[a:b], k) for a, b in ((0, 10), (10, 55), (55, 90))]
    merged = _sorted(*_select(np.concatenate([p[0] for p in parts], axis=1),
                              np.concatenate([p[1] for p in parts], axis=1), k))
    for a, b in zip(whole, merged):
        np.testing.assert_array_equal(a, b)
    order = np.lexsort((np.broadcast_to(ids, s.shape), -s), axis=-1)[:, :k]
    np.testing.assert_array_equal(whole[1], ids[order])


@pytest.mark.parametrize("k", [1, 10, 50])
def test_every_prune_mode_gives_the_same_results(store, wordnet, k) -> None:
    """prune=True (every bucket), "auto" (small bucket groups only) and False agree."""
    _, queries = wordnet
    ref_i, ref_s = store.search(queries, k, probes=8, prune=False)
    for mode in (True, "auto"):
        ids, scores = store.search(queries, k, probes=8, prune=mode)
        np.testing.assert_array_equal(ids, ref_i)
        np.testing.assert_allclose(scores, ref_s, rtol=0, atol=1e-6)


def test_batch_in_several_query_blocks_equals_one_block(store, wordnet, monkeypatch) -> None:
    """A batch split into query blocks (bounded memory) gives the same results."""
    from asteria_store.query import engine

    _, queries = wordnet
    ids, scores = store.search(queries, K, probes=4)
    monkeypatch.setattr(engine, "_BLOCK_CELLS", 7 * 64)  # blocks of 7 queries (64 buckets)
    ids2, scores2 = store.search(queries, K, probes=4)
    np.testing.assert_array_equal(ids, ids2)
    np.testing.assert_allclose(scores, scores2, rtol=0, atol=1e-6)


def test_prune_must_be_a_known_mode(store, wordnet) -> None:
    _, queries = wordnet
    with pytest.raises(asteria_store.InvalidArgumentError, match="prune must be"):
        store.search(queries[:2], K, prune="sometimes")


def test_auto_batch_prunes_only_small_bucket_groups(store, wordnet) -> None:
    """In a big batch most buckets are shared by many queries and read whole; alone, a
    query prunes (learned router)."""
    _, queries = wordnet
    _, _, forced = store.search(queries, K, probes=8, prune=True, explain=True)
    _, _, auto = store.search(queries, K, probes=8, explain=True)
    assert auto.pruned.sum() <= forced.pruned.sum()
    if store.router.kind == "ecvh":
        assert auto.pruned.sum() < forced.pruned.sum()  # buckets many queries share are read whole
        one = store.query(queries[0], K, probes=8, explain=True)[2]
        assert one["pruned"] > 0


def test_a_small_store_returns_k_results_for_every_query(wordnet, tmp_path) -> None:
    """A 500-vector sign store sized for a million vectors (4,096 buckets): its probed
    buckets often hold fewer than k rows, so queries probe on until they have k."""
    base, queries = wordnet
    with asteria_store.create(tmp_path / "store", dim=384, router="sign", expected_size=1_000_000) as store:
        store.ingest(base[:500])
        assert 2**store.router.bits == 4096
        view = store._current_view()
        qs = normalise(queries)
        plain = search_batch(view, store.router, qs, K, 32, None, explain=True)
        short = np.flatnonzero((plain[0] >= 0).sum(axis=1) < K)
        assert len(short) > len(qs) // 4  # the case this fixes (fails without probing on)
        ids, scores, stats = store.search(queries, K, explain=True)
        assert (ids >= 0).all()
        assert (stats.buckets[short] > 32).all()
        # A query that probed on has exactly the result of the search at its final budget.
        for row in short[:5]:
            again = store.search(queries[row : row + 1], K, probes=int(stats.buckets[row]))
            np.testing.assert_array_equal(again[0][0], ids[row])
            np.testing.assert_allclose(again[1][0], scores[row], rtol=0, atol=1e-6)  # batch vs alone: an ulp
        # The others are untouched.
        full = np.setdiff1d(np.arange(len(qs)), short)
        np.testing.assert_array_equal(ids[full], plain[0][full])
        # Fewer live rows than k: every row, then -1.
        ids, _ = store.search(queries[:3], 600)
        assert ((ids >= 0).sum(axis=1) == 500).all()


@pytest.mark.parametrize("threads", [1, 2])
def test_a_batch_sharing_few_buckets_is_searched_query_by_query(store, wordnet, threads) -> None:
    """queries x probes <= buckets: each query goes through the compiled one-query path (on
    the pool's threads), with the results and per-query stats of searching each alone, and
    the results of the unpruned batch passes."""
    from asteria_store.query import engine

    if store.router.lrsq is None:
        pytest.skip("the compiled path prunes with LRSQ codes (learned router)")
    _, queries = wordnet
    probes = 1
    qs = queries[: engine.EACH_MAX_SHARING * store.router.n_buckets // probes]
    assert len(qs) >= engine._POOL_MIN_QUERIES  # a pool runs them when threads > 1
    ids, scores, stats = store.search(qs, K, probes=probes, threads=threads, explain=True)
    assert stats.pruned.sum() > 0  # pruned: the compiled path (the batch passes prune none here)
    ref_i, ref_s = store.search(qs, K, probes=probes, prune=False, threads=threads)
    assert_same_up_to_rounding(ids, scores, ref_i, ref_s)
    for j in (0, len(qs) // 2, len(qs) - 1):
        one_i, one_s, info = store.query(qs[j], K, probes=probes, explain=True)
        np.testing.assert_array_equal(ids[j], one_i)
        assert stats.rows()[j] == info
    assert stats.batch_bytes == stats.bytes_read.sum()
