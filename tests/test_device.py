"""The batch path on a torch device (query/device.py).

The device logic (grouped streaming, per-bucket products, ties by id, the final top k)
is torch code that runs on any device: here it runs on torch's CPU device against the
numpy engine. The CUDA test runs where torch finds a GPU and is skipped elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_same_up_to_rounding

import asteria_store
from asteria_store.errors import InvalidArgumentError
from asteria_store.query.device import check_device, search_batch_device
from asteria_store.query.engine import search_batch

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def store(routed_store):
    """conftest.routed_store: the wordnet slice in two segments with deletes, per router."""
    return routed_store


@pytest.mark.parametrize("k", [1, 10, 50])
@pytest.mark.parametrize("group_rows", [1 << 18, 300])
def test_device_path_gives_the_host_results_and_stats(store, wordnet, k, group_rows) -> None:
    """Same ids and scores as the host engine without pruning (up to float rounding), the
    same stats, whether the probed buckets go to the device in one group or in many."""
    _, queries = wordnet
    view, router = store._current_view(), store.router
    ref_i, ref_s, ref = search_batch(view, router, queries, k, 8, None, explain=True, prune=False)
    ids, scores, st = search_batch_device(view, router, queries, k, 8, None, CPU, explain=True,
                                          group_rows=group_rows)
    assert_same_up_to_rounding(ids, scores, ref_i, ref_s)
    assert (ids == ref_i).mean() > 0.99
    for name in ("buckets", "scanned", "bytes_read"):
        np.testing.assert_array_equal(getattr(st, name), getattr(ref, name))
    assert st.batch_bytes == ref.batch_bytes
    deleted = np.arange(0, 3000, 37)
    assert not np.isin(ids, deleted).any()


def test_device_path_under_a_candidates_budget(store, wordnet) -> None:
    _, queries = wordnet
    view, router = store._current_view(), store.router
    ref_i, ref_s = search_batch(view, router, queries, 10, 16, 150, prune=False)
    ids, scores = search_batch_device(view, router, queries, 10, 16, 150, CPU)
    assert_same_up_to_rounding(ids, scores, ref_i, ref_s)


def test_device_path_orders_equal_scores_by_id(tmp_path) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    dup = x[7].copy()
    x[100:160] = dup  # 61 equal vectors: ties far beyond k
    x = x[rng.permutation(300)]  # ids are row numbers: equal rows at scattered ids
    tied = np.flatnonzero((x == dup).all(axis=1))
    with asteria_store.create(tmp_path / "s", dim=16, router="sign", bits=3) as s:
        s.ingest(x)
        q = np.tile(dup / np.linalg.norm(dup), (4, 1)).astype(np.float32)
        ids, _ = search_batch_device(s._current_view(), s.router, q, 20, 3, None, CPU, group_rows=50)
        ref_i, _ = s.search(q, 20, probes=3)
        np.testing.assert_array_equal(ids, ref_i)
        np.testing.assert_array_equal(ids[0], tied[:20])  # the tied rows, by id


def test_store_search_takes_a_device(store, wordnet) -> None:
    """``device=None`` and ``"cpu"`` search here; a device torch does not have is a clear
    error; a string that is not a device is one too."""
    _, queries = wordnet
    ref = store.search(queries[:20], 10, probes=8)
    here = store.search(queries[:20], 10, probes=8, device="cpu")
    np.testing.assert_array_equal(ref[0], here[0])
    assert check_device(None) is None and check_device("cpu") is None
    with pytest.raises(InvalidArgumentError, match="torch device"):
        store.search(queries[:2], 10, device="not-a-device")
    if not torch.cuda.is_available():
        with pytest.raises(InvalidArgumentError, match="no CUDA device"):
            store.search(queries[:2], 10, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_cuda_search_gives_the_host_results(store, wordnet) -> None:
    _, queries = wordnet
    ref_i, ref_s = store.search(queries, 10, probes=8, prune=False)
    ids, scores = store.search(queries, 10, probes=8, device="cuda")
    assert_same_up_to_rounding(ids, scores, ref_i, ref_s)
    assert (ids == ref_i).mean() > 0.99
