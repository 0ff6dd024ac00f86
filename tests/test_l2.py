"""The l2 metric: squared Euclidean distances, smallest first, on rows of any norm."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import asteria_store
from asteria_store import InvalidArgumentError
from asteria_store.testing import clustered_vectors

DIM = 32


def data(n: int, seed: int) -> np.ndarray:
    """Clustered rows scaled by norms from 0.5 to 3 (cosine and l2 neighbours differ)."""
    rng = np.random.default_rng(seed)
    return clustered_vectors(n, DIM, clusters=20, seed=seed) * rng.uniform(0.5, 3, (n, 1)).astype(np.float32)


def l2_truth(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    d2 = ((q[:, None, :].astype(np.float64) - x[None].astype(np.float64)) ** 2).sum(-1)
    order = np.argsort(d2, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(d2, order, 1)


@pytest.fixture(scope="module")
def l2_store(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    x = data(3000, 0)
    s = asteria_store.create(tmp_path_factory.mktemp("l2") / "s", dim=DIM, metric="l2")
    s.ingest(x[:2000], metadata={"half": np.arange(2000) % 2})
    s.ingest(x[2000:], metadata={"half": np.arange(2000, 3000) % 2})
    yield s, x
    s.close()


def test_exact_search_is_brute_force_euclidean(l2_store) -> None:
    s, x = l2_store
    q = data(40, 1) * 1.5
    ids, dist = s.search(q, 10, probes="all")
    ref, ref_d = l2_truth(x, q, 10)
    np.testing.assert_array_equal(ids, ref)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-4, atol=1e-3)
    assert (np.diff(dist, axis=1) >= 0).all()  # smallest first


def test_probed_search_routes_by_euclidean_distance(l2_store) -> None:
    """The trained model routes l2 queries to their Euclidean neighbours (on these rows the
    inner-product top 10 shares almost none of them), probing half the buckets."""
    s, x = l2_store
    q = data(100, 2)
    ref, _ = l2_truth(x, q, 10)
    ids, dist = s.search(q, 10, probes=16)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref)])
    ip_truth = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10]
    ip_overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ip_truth, ref)])
    assert recall >= 0.9 and ip_overlap < 0.1
    d2 = ((q[:, None, :] - x[ids]) ** 2).sum(-1)
    np.testing.assert_allclose(dist, d2, rtol=1e-4, atol=1e-3)  # exact distances of what it found


def test_rerank_filters_get_and_fetch_speak_l2(l2_store) -> None:
    s, x = l2_store
    q = data(30, 3)
    ids, dist = s.search(q, 10, probes=16, rerank=50)
    ref, _ = l2_truth(x, q, 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, ref)]) >= 0.85
    odd = np.arange(3000) % 2 == 1
    ids, dist = s.search(q, 5, where="half = 1", probes="all")
    ref_odd, _ = l2_truth(x[odd], q, 5)
    np.testing.assert_array_equal(ids, np.flatnonzero(odd)[ref_odd])
    np.testing.assert_allclose(s.get([3, 2999]), x[[3, 2999]], rtol=1e-6)
    got = np.stack(s.fetch([7], vectors=True).column("vector").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(got, x[[7]], rtol=1e-6)


def test_l2_store_survives_compaction_and_retraining(tmp_path: Path) -> None:
    import torch

    torch.set_num_threads(1)
    x = data(1500, 4)
    q = data(10, 5)
    with asteria_store.create(tmp_path / "s", dim=DIM, metric="l2") as s:
        s.ingest(x)
        s.delete(np.arange(0, 1500, 5))
        s.compact()
        s.train(epochs=1)
        keep = np.arange(1500) % 5 != 0
        ids, _ = s.search(q, 10, probes="all")
        ref, _ = l2_truth(x[keep], q, 10)
        np.testing.assert_array_equal(ids, np.flatnonzero(keep)[ref])
        assert s.verify().ok and s.info()["metric"] == "l2"


def test_l2_refuses_a_model_file_and_collections(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="An l2 store trains its own model"):
        asteria_store.create(tmp_path / "s", dim=DIM, metric="l2", model=tmp_path / "m.pt")
    with pytest.raises(InvalidArgumentError, match="metric must be 'cosine' or 'ip' for a model file"):
        asteria_store.create_collection(tmp_path / "c", shards=2, dim=DIM, metric="l2", train=data(500, 6))
    assert not (tmp_path / "s").exists() and not (tmp_path / "c").exists()
