"""Local splits of a routing tree's buckets (model/tree.py ``TreeRouter.split``,
write/rewrite.py ``Rewrites.split``): an overfull bucket is split in two, only its rows
move, and the store's results, ids and codes stay what they were."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import asteria_store
from asteria_store.model import fit
from asteria_store.model.persist import load_router, save_router
from asteria_store.model.tree import TreeRouter, two_means
from asteria_store.testing import brute_force_topk, recall_at_k
from asteria_store.write import upkeep


def fullest(keys: np.ndarray, n: int, count: int) -> list[int]:
    return np.argsort(-np.bincount(keys, minlength=n), kind="stable")[:count].tolist()


def test_a_split_moves_only_the_rows_of_the_split_leaves(tree, tree_data) -> None:
    keys = tree.keys(tree_data).astype(np.int64)
    big = fullest(keys, tree.n_buckets, 6)
    split, renumber = tree.split({b: tree_data[keys == b] for b in big})
    assert split.n_buckets == tree.n_buckets + len(big)
    assert split.n_nodes == tree.n_nodes == split.trained_buckets
    assert (np.diff(renumber) >= 1).all()  # rising: segments sorted by old keys stay sorted
    new = split.keys(tree_data).astype(np.int64)
    others = ~np.isin(keys, big)
    np.testing.assert_array_equal(new[others], renumber[keys[others]])
    for b in big:
        halves = new[keys == b] - renumber[b]
        assert set(halves.tolist()) == {0, 1}  # both halves used, nothing leaves them
    assert split.consistent(tree_data, new.astype(np.uint64)).all()
    # the halves of a split leaf are not interchangeable
    moved = np.isin(keys, big)
    assert not split.consistent(tree_data[moved], (new[moved] ^ 1).astype(np.uint64)).all()


def test_split_leaves_split_again_and_persist(tree, tree_data, tmp_path) -> None:
    keys = tree.keys(tree_data).astype(np.int64)
    once, _ = tree.split({b: tree_data[keys == b] for b in fullest(keys, tree.n_buckets, 4)})
    k1 = once.keys(tree_data).astype(np.int64)
    again = fullest(k1, once.n_buckets, 4)
    twice, renumber = once.split({b: tree_data[k1 == b] for b in again})
    k2 = twice.keys(tree_data).astype(np.int64)
    np.testing.assert_array_equal(k2[~np.isin(k1, again)], renumber[k1[~np.isin(k1, again)]])
    assert twice.consistent(tree_data, k2.astype(np.uint64)).all()
    save_router(twice, tmp_path / "m")
    save_router(tree, tmp_path / "unsplit")
    # format 2: a reader of format 1 would load the nodes alone and misroute, so it refuses;
    # 4 where the tree has a residual sketch (its segments hold codes of rows minus their
    # node centroids), split or not
    assert tree.lrsq.sketch is not None and tree.lrsq.sketch.residual > 0
    unsplit = 4
    assert json.loads((tmp_path / "unsplit" / "router.json").read_text())["format_version"] == unsplit
    assert json.loads((tmp_path / "m" / "router.json").read_text())["format_version"] == max(2, unsplit)
    back = load_router(tmp_path / "m")
    np.testing.assert_array_equal(back.keys(tree_data), twice.keys(tree_data))
    np.testing.assert_array_equal(back.probe_order(tree_data[:40], 16), twice.probe_order(tree_data[:40], 16))


def test_probe_order_after_splits_starts_at_the_own_leaf_and_ranks_leaves(tree, tree_data) -> None:
    keys = tree.keys(tree_data).astype(np.int64)
    split, _ = tree.split({b: tree_data[keys == b] for b in fullest(keys, tree.n_buckets, 8)})
    q = tree_data[::101][:30]
    order = split.probe_order(q, 12)
    np.testing.assert_array_equal(order[:, 0], split.keys(q).astype(np.int64))
    for row, ks in zip(q, order):
        assert len(set(ks.tolist())) == len(ks)
        assert (np.diff(split.leaves[ks[1:]] @ row) <= 1e-6).all()


def test_two_means_refuses_rows_that_do_not_separate() -> None:
    same = np.tile(np.eye(8, dtype=np.float32)[:1], (50, 1))
    assert two_means(same) is None
    two = np.concatenate([same, np.tile(np.eye(8, dtype=np.float32)[1:2], (50, 1))])
    left, right = two_means(two)
    assert {int(np.argmax(left)), int(np.argmax(right))} == {0, 1}


def test_bad_split_structures_are_refused(tree, tree_data) -> None:
    keys = tree.keys(tree_data).astype(np.int64)
    split, _ = tree.split({b: tree_data[keys == b] for b in fullest(keys, tree.n_buckets, 2)})
    arrays = split.arrays()
    bad = dict(arrays, node_root=arrays["node_root"].copy())
    bad["node_root"][0] = bad["node_root"][1]  # two nodes share a subtree, one leaf is orphaned
    with pytest.raises(ValueError, match="exactly one node"):
        TreeRouter.from_saved(split.config(), bad)


@pytest.fixture
def small_tree_sizing(monkeypatch):
    """A tree past 2**3 buckets of ~32 rows, that splits instead of re-fitting."""
    monkeypatch.setattr(fit, "FLAT_MAX_BITS", 3)
    monkeypatch.setattr(fit, "TREE_BUCKET_ROWS", 32)
    monkeypatch.setattr(upkeep, "SPLIT_STEP_ROWS", 400)  # several split commits per ingest


def test_a_growing_store_splits_its_full_buckets_and_keeps_its_results(tmp_path, wordnet,
                                                                        small_tree_sizing) -> None:
    from asteria_store.query.engine import search_exact

    torch.set_num_threads(1)
    base = np.asarray(wordnet.base, dtype=np.float32)
    queries = np.asarray(wordnet.queries, dtype=np.float32)
    path = tmp_path / "s"
    with asteria_store.create(path, dim=base.shape[1]) as store:
        store.ingest(base[:1500])
        first = store.info()
        first_rows = store.get(np.arange(1500))
    assert first["router"] == "tree"
    reader = asteria_store.open(path, readonly=True)
    want = reader.search(queries[:20], 10, probes="all")
    with reader._reads.snapshot() as snap, asteria_store.open(path) as store:  # a long read meanwhile
        store.ingest(base[1500:2200])
        store.ingest(base[2200:])  # 2x the rows: buckets overflow, no re-fit is due yet
        ids, scores = search_exact(snap.view, queries[:20], 10)  # the old generation, whole
        np.testing.assert_array_equal(ids, want[0])
        info = store.info()
        done = info["internals"]["maintenance"]
        assert done.get("splits", 0) >= 2 and done.get("refits", 0) == 0
        assert info["buckets"] > first["buckets"]
        assert info["internals"]["router"]["nodes"] == first["buckets"]
        assert store.verify().ok
        np.testing.assert_array_equal(store.get(np.arange(1500)), first_rows)  # moved rows bit for bit
        np.testing.assert_array_equal(np.sort(store.ids()), np.arange(len(base)))
        # every stored row sits in the bucket the split tree gives it; none is overfull
        reads = store._reads
        with reads.snapshot() as now:
            router = reads.router
            limit = upkeep.SPLIT_FACTOR * fit.TREE_BUCKET_ROWS
            for bucket in range(router.n_buckets):
                live = []
                for seg, first_row, n in now.view.extents(bucket):
                    mask = now.view.live_mask(seg, first_row, n)
                    rows = np.asarray(now.view.segments[seg].vectors(first_row, first_row + n), dtype=np.float32)
                    live.append(rows if mask is None else rows[mask])
                live = np.concatenate(live) if live else np.zeros((0, base.shape[1]), dtype=np.float32)
                assert router.consistent(live, np.full(len(live), bucket, dtype=np.uint64)).all()
                assert len(live) <= limit or two_means(live) is None
            # the moved rows' codes were copied: every segment's codes still serve the bounds
            assert all(r.lrsq_meta["model"] == now.view.codes_digest for r in now.view.segments.values())
        ids, scores = store.search(queries, 10, probes="all")
        truth_ids, truth_scores = brute_force_topk(base, queries, 10)
        np.testing.assert_allclose(scores, truth_scores, atol=1e-4)
        probed = store.search(queries, 10, probes=16)[0]
        assert recall_at_k(probed, truth_ids, 10) >= 0.8
    reader.close()


@pytest.mark.parametrize("fault", ["mid-write", "up-front"])
def test_a_disk_that_fills_during_a_split_defers_it_and_loses_nothing(tmp_path, wordnet, small_tree_sizing,
                                                                       monkeypatch, fault) -> None:
    """An OS error while the split's segment is written, or the split's up-front space
    check: either way the ingest stands and the split waits for the next one."""
    import errno
    import shutil
    from collections import namedtuple

    from asteria_store.storage import segments as seglib
    from asteria_store.testing.faults import fail_on_call

    torch.set_num_threads(1)
    base = np.asarray(wordnet.base, dtype=np.float32)
    with asteria_store.create(tmp_path / "s", dim=base.shape[1]) as store:
        store.ingest(base[:1500])
        splits = store.info()["internals"]["maintenance"].get("splits", 0)
        if fault == "mid-write":  # the ingest's own segment is write 1, the first split's write 2
            fail_on_call(monkeypatch, seglib.SegmentWriter, "write", 2, OSError(errno.ENOSPC, "No space left"))
            message = "No space left"
        else:  # room for the ingest (the first check), none for the split after it
            real, calls = shutil.disk_usage, [0]

            def disk_usage(path):
                calls[0] += 1
                usage = real(path)
                return usage if calls[0] == 1 else namedtuple("usage", "total used free")(usage.total, usage.used, 0)

            monkeypatch.setattr(shutil, "disk_usage", disk_usage)
            message = "Not enough space on the device"
        with pytest.warns(asteria_store.UpkeepDeferredWarning, match=f"upkeep was deferred: {message}"):
            result = store.ingest(base[1500:2200])
        assert result.split_rows == 0 and message in result.upkeep_deferred
        assert len(store) == 2200
        assert store.info()["internals"]["maintenance"].get("splits", 0) == splits
        report = store.verify()
        assert report.ok and report.orphans == []
        np.testing.assert_allclose(store.get(np.arange(1500, 2200)),
                                   base[1500:2200] / np.linalg.norm(base[1500:2200], axis=1, keepdims=True),
                                   atol=1e-6)
        if fault == "up-front":  # space again (the mid-write fault fails one call only)
            monkeypatch.setattr(shutil, "disk_usage", real)
        later = store.ingest(base[2200:])  # the deferred splits run
        assert later.split_rows > 0 and later.upkeep_deferred is None
        assert store.verify().ok


def test_cli_ingest_into_a_tree_store_reports_its_buckets_and_splits(tmp_path, wordnet, small_tree_sizing) -> None:
    import re

    from click.testing import CliRunner

    from asteria_store_cli.main import cli

    torch.set_num_threads(1)
    base = np.asarray(wordnet.base, dtype=np.float32)
    path = tmp_path / "s"
    np.save(tmp_path / "a.npy", base[:1500])
    np.save(tmp_path / "b.npy", base[1500:])
    assert CliRunner().invoke(cli, ["create", str(path), "--dim", "384"]).exit_code == 0
    first = CliRunner().invoke(cli, ["ingest", str(path), str(tmp_path / "a.npy"), "-q"])
    assert first.exit_code == 0, first.output
    with asteria_store.open(path, readonly=True) as store:
        trained = store.router.trained_buckets
        rank = store.router.lrsq.rank
    assert re.search(rf"Trained the store's model on a sample of its vectors in \d+\.\d s: [\d,]+ buckets, "
                     rf"LRSQ rank {rank}\.", first.stdout), first.stdout
    second = CliRunner().invoke(cli, ["ingest", str(path), str(tmp_path / "b.npy"), "-q"])
    assert second.exit_code == 0, second.output
    with asteria_store.open(path, readonly=True) as store:
        buckets = store.router.n_buckets
    assert buckets > trained
    assert re.search(rf"Split full buckets: [\d,]+ rows moved, {buckets:,} buckets now\.", second.stdout), \
        second.stdout


def test_a_model_file_store_never_splits(tmp_path, wordnet, small_tree_sizing) -> None:
    """A store made from a model file keeps that model (a collection's shards share one),
    however full its buckets get."""
    torch.set_num_threads(1)
    base = np.asarray(wordnet.base, dtype=np.float32)
    asteria_store.train_model(base[:1500], save=tmp_path / "m.pt", dim=base.shape[1], seed=0)
    with asteria_store.create(tmp_path / "s", dim=base.shape[1], model=tmp_path / "m.pt") as store:
        buckets = store.info()["buckets"]
        assert store.router.kind == "tree"
        result = store.ingest(base)  # 2x the rows the model was sized for: full buckets
        assert result.split_rows == 0
        assert store.info()["buckets"] == buckets
        assert store.info()["internals"]["maintenance"].get("splits", 0) == 0


@pytest.mark.parametrize("probes", [1, 7, 40])
def test_compiled_tree_routing_probes_as_probe_order(tree, tree_data, probes) -> None:
    """The one-query path's compiled routing (query/native.py) gives the tree's probe order
    and rotation, unsplit and split (leaves under split trees)."""
    from asteria_store.query import native

    keys = tree.keys(tree_data).astype(np.int64)
    big = fullest(keys, tree.n_buckets, 12)
    split, _ = tree.split({b: tree_data[keys == b] for b in big})
    # rows of the split leaves (they go down split trees), rows whose own leaf is not the
    # leaf they score best with (it must be probed first all the same), and others
    for router in (tree, split):
        own = router.keys(tree_data).astype(np.int64)
        other = np.flatnonzero((tree_data @ router.leaves.T).argmax(axis=1) != own)
        assert len(other) > 0 or router is tree  # unsplit: the own leaf is the best-scoring one
        q = np.concatenate([tree_data[np.isin(keys, big)][::2], tree_data[other[:40]], tree_data[3::13]])
        routing = router.compiled_routing()
        assert routing is not None
        want = router.probe_order(q, probes)
        same = 0
        for v, ref in zip(q, want):
            got, qy = native.route(routing, v, probes)
            assert got[0] == ref[0]  # the own leaf
            same += np.array_equal(got, ref)
            np.testing.assert_allclose(qy, router.rotate(v[None, :])[0], atol=1e-5)
        assert same >= len(q) - 2  # the rest: equal scores rounded apart (BLAS sums in another order)
