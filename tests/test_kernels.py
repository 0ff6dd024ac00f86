"""Scoring kernels and threads of the batch path: neither changes a result."""

from __future__ import annotations

import numpy as np
import torch
import pytest
from conftest import assert_same_up_to_rounding

import asteria_store
from asteria_store.query import kernels

K = 10


@pytest.fixture(scope="module")
def store(routed_store):
    """conftest.routed_store: the wordnet slice in two segments with deletes, per router."""
    return routed_store


@pytest.mark.parametrize("k", [1, 10, 50])
@pytest.mark.parametrize("prune", [False, "auto", True])
def test_bf16_kernel_gives_the_f32_results(store, wordnet, k, prune) -> None:
    """bfloat16 products plus exact rescoring of every row within the certified error of
    a threshold: the same ids and exact scores as float32 scoring."""
    _, queries = wordnet
    ref_i, ref_s = store.search(queries, k, probes=8, prune=prune, kernel="f32")
    ids, scores = store.search(queries, k, probes=8, prune=prune, kernel="bf16")
    assert_same_up_to_rounding(ids, scores, ref_i, ref_s)
    assert (ids == ref_i).mean() > 0.99


@pytest.mark.parametrize("kernel", kernels.KERNELS)
def test_threads_do_not_change_results(store, wordnet, kernel) -> None:
    """Buckets are split between threads, each bucket scored by one product of the same
    shape: results are identical, scores to the bit."""
    _, queries = wordnet
    one = store.search(queries, K, probes=8, threads=1, kernel=kernel, explain=True)
    two = store.search(queries, K, probes=8, threads=2, kernel=kernel, explain=True)
    three = store.search(queries, K, probes=8, threads=3, kernel=kernel)
    for a, b in ((one, two), (one, three)):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    for name in ("buckets", "scanned", "bytes_read", "pruned"):
        np.testing.assert_array_equal(getattr(one[2], name), getattr(two[2], name))
    assert one[2].batch_bytes == two[2].batch_bytes


@pytest.mark.parametrize("kernel", kernels.KERNELS)
def test_equal_scores_are_ordered_by_id_in_every_kernel(tmp_path, kernel) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    x[100:160] = x[7]  # 61 equal vectors: ties far beyond k
    with asteria_store.create(tmp_path / "s", dim=16, router="sign", bits=3) as s:
        s.ingest(x)
        for threads in (1, 2):
            ids, scores = s.search(np.tile(x[7], (5, 1)), 20, probes=3, kernel=kernel, threads=threads)
            np.testing.assert_array_equal(ids[0], [7, *range(100, 119)])
            assert (scores[:, :20] == scores[0, 0]).all()


@pytest.mark.parametrize("scale", [1.0, 37.0])
def test_bf16_error_bound_holds(scale) -> None:
    """|exact - bfloat16 score| <= error_scale(q) * max row norm, for unnormalised rows
    (inner product metric) too; and the bound is not vacuous."""
    rng = np.random.default_rng(int(scale))
    q = (rng.standard_normal((64, 384)) * scale).astype(np.float32)
    v = (rng.standard_normal((500, 384)) * rng.uniform(0.1, 3, (500, 1))).astype(np.float32)
    out = np.empty((64, 500), dtype=np.float32)
    vmax = kernels.score_into("bf16", q, v, out)
    exact = q.astype(np.float64) @ v.T.astype(np.float64)
    bound = kernels.error_scale("bf16", q)[:, None] * vmax
    err = np.abs(exact - out)
    assert (err <= bound).all()
    assert err.max() > 0.01 * bound.max()  # an approximation, and a bound of its size
    assert (kernels.error_scale("f32", q) == 0).all()


def test_kernel_choice_and_bad_arguments(store, wordnet, monkeypatch) -> None:
    _, queries = wordnet
    assert store.info()["kernel"] in kernels.KERNELS
    monkeypatch.setenv("ASTERIA_KERNEL", "bf16")
    assert store.info()["kernel"] == "bf16"
    monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    monkeypatch.delenv("ASTERIA_KERNEL")
    assert kernels.default_kernel() == "bf16"
    for flags in ({"avx2"}, {"avx2", "avx512f", "avx512_bf16"}):
        monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset(flags))
        assert kernels.default_kernel() == "f32"
    with pytest.raises(asteria_store.InvalidArgumentError, match="kernel must be"):
        store.search(queries[:2], K, kernel="int4")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(asteria_store.InvalidArgumentError, match="threads must be"):
            store.search(queries[:2], K, threads=bad)


def test_compiled_one_query_bounds_are_certified(store, wordnet) -> None:
    """The compiled bound pass over the mapped codes (one query's path) brackets every
    exact score and matches the numpy estimate of model/lrsq.py."""
    from asteria_store.query import native

    if store.router.kind != "ecvh":
        pytest.skip("LRSQ codes come with the learned router")
    _, queries = wordnet
    view, router = store._current_view(), store.router
    keys = np.arange(router.n_buckets)  # every bucket: every stored row
    table = view.table(router.lrsq, router.n_buckets).ready(view, keys)
    q = queries[:20] / np.linalg.norm(queries[:20], axis=1, keepdims=True)
    for v in q:
        qy = router.rotate(v[None, :])
        lo, hi, ids = native.intervals(table, keys, router.lrsq.query_terms(qy[0]))
        np.testing.assert_array_equal(np.sort(ids), store.ids().astype(np.int64))  # the live rows
        vecs = store.get(ids)
        exact = vecs.astype(np.float64) @ v.astype(np.float64)
        assert (lo <= exact).all() and (exact <= hi).all()
        assert np.median(hi - lo) < 0.5  # not vacuous (scores span [-1, 1])
        codes, aux = _codes_of(view, ids)
        _, lo_np, hi_np = router.lrsq.estimate(qy, codes, aux)
        np.testing.assert_allclose(lo, lo_np[0], atol=2e-5)
        np.testing.assert_allclose(hi, hi_np[0], atol=2e-5)


def _codes_of(view, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stored LRSQ codes and aux of ``ids`` (live ids: each stored once)."""
    found = {}
    for reader in view.segments.values():
        stored = reader.ids(0, reader.n).astype(np.int64)
        for row in np.flatnonzero(np.isin(stored, ids)).tolist():
            found[int(stored[row])] = (reader.read("lrsq", row, row + 1)[0], reader.read("lrsq_aux", row, row + 1)[0])
    return np.array([found[i][0] for i in ids.tolist()]), np.array([found[i][1] for i in ids.tolist()])


def test_one_query_reads_buckets_that_span_chunks(tmp_path, wordnet) -> None:
    """With 64-row chunks every bucket spans several chunks (and two segments): the one-query
    path's row ranges, split per chunk, give the unpruned batch path's results."""
    import torch

    base, queries = wordnet
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        s = asteria_store.create(tmp_path / "s", dim=384, bits=4, chunk_rows=64)
        s.ingest(base[:2000])
        s.ingest(base[2000:])
    finally:
        torch.set_num_threads(before)
    with s:
        view = s._current_view()
        table = view.table(s.router.lrsq, s.router.n_buckets).ready(view, np.arange(2**s.router.bits))
        assert table.n_ranges > 3000 // 64  # ranges split at chunk edges
        assert (table.length[: table.n_ranges] <= 64).all()
        q = queries[:40]
        ref_i, ref_s = s.search(q, K, probes=3, prune=False)
        for j, v in enumerate(q):
            ids, scores, info = s.query(v, K, probes=3, explain=True)
            assert info["pruned"] > 0  # the compiled one-query path ran
            assert_same_up_to_rounding(ids[None], scores[None], ref_i[j : j + 1], ref_s[j : j + 1])


def test_one_blas_thread_holds_while_any_search_runs_and_restores_after() -> None:
    """Nested and concurrent holders: BLAS stays at one thread until the last one leaves,
    then gets back its own count. (Checked from the main thread: once torch is imported,
    OpenBLAS ignores thread counts set from other threads.)"""
    import threading

    libs = kernels._blas_libs()
    if not libs:
        pytest.skip("numpy's BLAS is not visible to threadpoolctl")
    own = [lib.get_num_threads() for lib in libs]
    for lib in libs:
        lib.set_num_threads(2)  # a count to restore that differs from 1
    before = [lib.get_num_threads() for lib in libs]
    assert before == [2] * len(libs)

    def hold_and_leave() -> None:
        with kernels.one_blas_thread():
            pass

    with kernels.one_blas_thread():
        assert [lib.get_num_threads() for lib in libs] == [1] * len(libs)
        t = threading.Thread(target=hold_and_leave)  # a concurrent search comes and goes
        t.start()
        t.join()
        with kernels.one_blas_thread():  # a nested one
            pass
        assert [lib.get_num_threads() for lib in libs] == [1] * len(libs)  # still held
    assert [lib.get_num_threads() for lib in libs] == before
    for lib, n in zip(libs, own):
        lib.set_num_threads(n)


def test_bf16_products_run_on_few_shapes() -> None:
    """oneDNN keeps a compiled kernel per matrix shape it has multiplied: the bf16 kernel
    tiles and pads so that any number of bucket sizes costs a handful of shapes. The shapes
    are read from torch's profiler, i.e. what was actually multiplied; results stay within
    the bound for every shape."""
    rng = np.random.default_rng(5)
    sizes = [(int(a), int(b)) for a, b in zip(rng.integers(1, 600, 150), rng.integers(1, 2500, 150))]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        for nq, n in sizes:
            q = rng.standard_normal((nq, 32)).astype(np.float32)
            v = rng.standard_normal((n, 32)).astype(np.float32)
            out = np.empty((nq, n), dtype=np.float32)
            vmax = kernels.score_into("bf16", q, v, out)
            bound = kernels.error_scale("bf16", q)[:, None] * vmax
            assert (np.abs(q.astype(np.float64) @ v.T.astype(np.float64) - out) <= bound).all()
    shapes = {tuple(map(tuple, e.input_shapes[:2])) for e in prof.events() if e.name == "aten::mm"}
    assert shapes, "no bf16 product was recorded"
    assert len(shapes) <= 9 * 8 < len(set(sizes))
    assert {(a[0], b[1]) for a, b in shapes} <= set().union(*(kernels.bf16_shapes(nq, n) for nq, n in sizes))


def test_blockwise_codes_of_older_models_still_prune_losslessly(tmp_path, wordnet) -> None:
    """A model trained with LRSQ blocks of 32 (the default before one block): the compiled
    one-query path's bounds of several blocks are certified and give the unpruned batch
    path's results."""
    import torch

    from asteria_store.model.persist import save_model_file
    from asteria_store.model.train import TrainConfig, train
    from asteria_store.query import native

    base, queries = wordnet
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        unit = base / np.linalg.norm(base, axis=1, keepdims=True)
        router, _ = train(unit[:2000], TrainConfig(bits=4, block=32, energy=0.97, device="cpu"))
        save_model_file(router, tmp_path / "model.pt")
        s = asteria_store.create(tmp_path / "s", dim=384, model=tmp_path / "model.pt")
        s.ingest(base)
    finally:
        torch.set_num_threads(before)
    with s:
        lrsq = s.router.lrsq
        assert lrsq.block == 32 and lrsq.n_blocks > 1
        view = s._current_view()
        keys = np.arange(s.router.n_buckets)
        table = view.table(lrsq, s.router.n_buckets).ready(view, keys)
        q = queries[:40] / np.linalg.norm(queries[:40], axis=1, keepdims=True)
        for v in q[:10]:
            qy = s.router.rotate(v[None, :])
            lo, hi, ids = native.intervals(table, keys, lrsq.query_terms(qy[0]))
            exact = s.get(ids).astype(np.float64) @ v.astype(np.float64)
            assert (lo <= exact).all() and (exact <= hi).all()
            assert np.median(hi - lo) < 0.5
            _, lo_np, hi_np = lrsq.estimate(qy, *_codes_of(view, ids))  # the numpy interval
            np.testing.assert_allclose(lo, lo_np[0], atol=2e-5)
            np.testing.assert_allclose(hi, hi_np[0], atol=2e-5)
        ref_i, ref_s = s.search(q, K, probes=4, prune=False)
        for j, v in enumerate(q):
            ids, scores, info = s.query(v, K, probes=4, explain=True)
            assert info["pruned"] > 0
            assert_same_up_to_rounding(ids[None], scores[None], ref_i[j : j + 1], ref_s[j : j + 1])
