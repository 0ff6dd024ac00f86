"""The routing tree (model/tree.py): assignment, probe order, persistence, and a store
that outgrows the flat model's bucket cap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import asteria_store
from asteria_store.model import fit
from asteria_store.model.persist import load_router, save_router
from asteria_store.model.tree import TreeRouter
from asteria_store.testing import brute_force_topk, recall_at_k


def reference_keys(router: TreeRouter, x: np.ndarray) -> np.ndarray:
    """Row by row: the best child (by inner product) of the row's best coarse cells."""
    cs = router.cell_scores(x)
    out = []
    for row, s in zip(x, cs):
        cells = np.argsort(-s, kind="stable")[: router.assign_cells]
        cand = np.concatenate([np.arange(router.offsets[c], router.offsets[c + 1]) for c in cells])
        out.append(cand[np.argmax(router.children[cand] @ row)])
    return np.array(out, dtype=np.uint64)


def test_a_tree_past_the_flat_cap_has_the_buckets_asked_for(tree, tree_data) -> None:
    assert tree.kind == "tree"
    assert tree.n_buckets > 2**4  # more than the flat model may have
    planned = fit.plan_buckets(len(tree_data), len(tree_data), bits=9, flat_max_bits=4)
    assert planned.tree and 2**planned.bits == tree.n_cells
    assert abs(tree.n_buckets - planned.buckets) <= tree.n_cells  # per-cell rounding
    assert tree.n_cells < tree.n_buckets
    used = np.unique(tree.keys(tree_data).astype(np.int64))
    assert len(used) > 0.8 * tree.n_buckets  # children are placed where the data is
    assert tree.info["occupancy"]["max_over_mean"] >= 1 and tree.info["train_seconds"] > 0


def test_a_refinement_step_moves_children_to_their_rows_mean(tree, tree_data) -> None:
    """Lloyd: each child of the refined tree is the normalised mean of the rows the tree
    assigned it (computed here row by row); cells keep their children."""
    x = tree_data[:1500]
    refined = tree.refined(x)
    keys = tree.keys(x).astype(np.int64)
    np.testing.assert_array_equal(refined.offsets, tree.offsets)
    for child in np.unique(keys)[:50]:
        mean = x[keys == child].astype(np.float64).mean(axis=0)
        np.testing.assert_allclose(refined.children[child], mean / np.linalg.norm(mean), atol=1e-5)
    unused = np.setdiff1d(np.arange(tree.n_buckets), keys)
    np.testing.assert_array_equal(refined.children[unused], tree.children[unused])


def test_keys_are_the_best_child_of_the_best_cells(tree, tree_data) -> None:
    x = tree_data[:500]
    assert np.array_equal(tree.keys(x), reference_keys(tree, x))
    assert tree.consistent(x, tree.keys(x)).all()


def test_a_wrong_key_is_not_consistent(tree, tree_data) -> None:
    x = tree_data[:200]
    keys = tree.keys(x).astype(np.int64)
    scores = x @ tree.children.T
    worst = scores.argmin(axis=1)  # far from each row
    assert not tree.consistent(x, worst.astype(np.uint64)).any()
    assert not tree.consistent(x, np.full(len(x), tree.n_buckets, dtype=np.uint64)).any()
    assert tree.consistent(x, keys.astype(np.uint64)).all()


def test_probe_order_is_own_bucket_then_children_by_score_across_cells(tree, tree_data) -> None:
    q = tree_data[::97][:40]
    probes = 24
    order = tree.probe_order(q, probes)
    assert order.shape == (len(q), probes)
    assert np.array_equal(order[:, 0], tree.keys(q).astype(np.int64))
    for row, keys in zip(q, order):
        assert len(set(keys.tolist())) == probes
        s = tree.children[keys[1:]] @ row
        assert (np.diff(s) <= 1e-6).all()  # descending score after the own bucket
        # nothing skipped: every child of the expanded cells scoring above the last probe is probed
        cells = np.argsort(-tree.cell_scores(row[None, :])[0], kind="stable")[: tree.cells_for(probes)]
        cand = np.concatenate([np.arange(tree.offsets[c], tree.offsets[c + 1]) for c in cells])
        better = cand[tree.children[cand] @ row > s[-1] + 1e-6]
        assert set(better.tolist()) <= set(keys.tolist())
    spanned = {int(np.searchsorted(tree.offsets, k, side="right") - 1) for k in order.ravel().tolist()}
    assert len(spanned) > 1


def test_probe_scores_rank_buckets_as_probe_order(tree, tree_data) -> None:
    q = tree_data[5:25]
    s = tree.probe_scores(q)
    assert s.shape == (len(q), tree.n_buckets)
    full = tree.probe_order(q, tree.n_buckets)
    head = np.argsort(-s, axis=1, kind="stable")[:, :30]
    assert np.array_equal(head, full[:, :30])


def test_tree_persists_exactly(tree, tree_data, tmp_path) -> None:
    save_router(tree, tmp_path / "m")
    back = load_router(tmp_path / "m")
    assert isinstance(back, TreeRouter)
    assert back.n_buckets == tree.n_buckets and back.assign_cells == tree.assign_cells
    assert np.array_equal(back.keys(tree_data), tree.keys(tree_data))
    assert np.array_equal(back.probe_order(tree_data[:30], 16), tree.probe_order(tree_data[:30], 16))


def test_bad_offsets_are_refused(tree) -> None:
    with pytest.raises(ValueError, match="offsets"):
        TreeRouter(tree.coarse, tree.children, tree.offsets[:-1])
    bad = tree.offsets.copy()
    bad[1] = 0  # an empty cell
    with pytest.raises(ValueError, match="at least one child"):
        TreeRouter(tree.coarse, tree.children, bad)


@pytest.fixture
def small_tree_sizing(monkeypatch):
    """Sizing as a big store has it, scaled down: a tree past 2**3 buckets, ~32 rows each."""
    monkeypatch.setattr(fit, "FLAT_MAX_BITS", 3)
    monkeypatch.setattr(fit, "TREE_BUCKET_ROWS", 32)


def test_a_store_past_the_flat_cap_routes_with_a_tree_and_grows(tmp_path, wordnet, small_tree_sizing) -> None:
    torch.set_num_threads(1)
    base = np.asarray(wordnet.base, dtype=np.float32)
    queries = np.asarray(wordnet.queries, dtype=np.float32)
    with asteria_store.create(tmp_path / "s", dim=base.shape[1]) as store:
        store.ingest(base[:1500])
        first = store.info()
        assert first["router"] == "tree"
        assert first["buckets"] > 2**3
        store.ingest(base[1500:])  # twice the rows: the tree re-fits with more buckets
        info = store.info()
        assert info["router"] == "tree"
        assert info["buckets"] >= 1.5 * first["buckets"]
        assert store.verify().ok
        ids, scores = store.search(queries, 10, probes="all")
        truth_ids, truth_scores = brute_force_topk(base, queries, 10)
        assert np.allclose(scores, truth_scores, atol=1e-4)
        assert recall_at_k(ids, truth_ids, 10) >= 0.99
        probed, _, stats = store.search(queries, 10, probes=16, explain=True)
        assert recall_at_k(probed, truth_ids, 10) >= 0.8
        assert stats.scanned.mean() < 0.5 * len(base)  # a probed search reads a part of the store
        one = np.stack([store.query(q, 10)[0] for q in queries[:20]])
        assert np.array_equal(one, store.search(queries[:20], 10)[0])
