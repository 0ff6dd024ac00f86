"""The learned store: training at the first ingest, ``Store.train`` re-bucketing, model
files, the CLI's training commands, and what a failure or a crash during training leaves.

A store created with the default ``router="learned"`` serves with the baseline sign router
until a first ingest of at least MIN_TRAIN_ROWS vectors, which trains the ECVH model on a
sample of the batch and publishes model and segment in ONE transaction. ``Store.train``
retrains and rewrites every live row into one new segment, also in one transaction. An
error midway leaves the store byte for byte as it was; a SIGKILL midway leaves the old
state plus orphan directories, which the next writable open removes.
"""

from __future__ import annotations

import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import Result

import asteria_store
from conftest import normalise, run
from asteria_store import (
    DimensionMismatchError,
    IdNotFoundError,
    InvalidInputError,
    ModelFileError,
)
from asteria_store.model import fit as fit_mod
from asteria_store.model import train as train_mod
from asteria_store.storage import catalog as catalog_mod
from asteria_store.storage import segments as seglib
from asteria_store.storage.catalog import Catalog
from asteria_store.testing import brute_force_topk, clustered_vectors, recall_at_k
from asteria_store.testing.faults import fail_on_call
from asteria_store.write import MIN_TRAIN_ROWS, learned_plan
from asteria_store.write.pipeline import SegmentPipeline

DIM = 16
K = 10


class Boom(RuntimeError):
    pass


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models train fastest on one thread; with the default two threads and another
    process busy on the machine, training 2,000 x 16 took 22 s instead of 1.5 s."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- helpers --------------------------------------------------------------------------------




def brute_force(ids: np.ndarray, vectors: np.ndarray, queries: np.ndarray, k: int):
    """Exact top-k of ``queries`` over ``(ids, vectors)``, padded like the store (-1, -inf)."""
    idx, scores = brute_force_topk(np.asarray(vectors, np.float32), normalise(queries), k)
    ids = np.asarray(ids, dtype=np.int64)
    return np.where(idx >= 0, ids[np.maximum(idx, 0)], -1), scores


def data(n: int, seed: int = 1) -> np.ndarray:
    return clustered_vectors(n, DIM, clusters=20, seed=seed)


def digest(store: asteria_store.Store) -> str:
    return store.info()["internals"]["router"]["digest"]


def model_dirs(path: Path) -> list[str]:
    return sorted(p.name for p in (path / "model").iterdir())


def live_model(path: Path) -> str:
    """The name of the model directory the catalog publishes."""
    catalog = Catalog(path / "catalog.lmdb")  # shares the process's env if one is open
    try:
        with catalog.read() as txn:
            return catalog.get_meta(txn, "router")["dir"].removeprefix("model/")
    finally:
        catalog.close()


def segment_dirs(path: Path) -> list[str]:
    return seglib.list_segment_dirs(path / "segments.zarr")


def assert_rows_in_their_buckets(store: asteria_store.Store) -> None:
    """Every stored row lies in the extent of the bucket its key names under the store's
    router now (``verify`` spot-checks 32 buckets; this checks them all)."""
    router = store.router
    view = store._current_view()
    with store._catalog.read() as txn:
        extents = list(store._catalog.iter_extents(txn))
    rows = 0
    for bucket, seg, first, n in extents:
        x = np.asarray(view.segments[seg].vectors(first, first + n), dtype=np.float32)
        assert router.consistent(x, np.full(n, bucket, dtype=np.uint64)).all(), (seg, bucket)
        rows += n
    assert rows == store.info()["internals"]["rows_stored"] > 0


# --- 1. training at the first ingest ----------------------------------------------------------


def test_first_ingest_of_min_train_rows_trains_the_model(tmp_path: Path) -> None:
    path = tmp_path / "store"
    x = data(MIN_TRAIN_ROWS + 300)
    with asteria_store.create(path, dim=DIM) as store:
        assert store.router.kind == "sign"
        assert store.info()["pending_training"] is True
        result = store.ingest(x[:MIN_TRAIN_ROWS])
        assert result.trained is True
        assert result.train_seconds > 0
        assert (result.rows, result.segment) == (MIN_TRAIN_ROWS, 1)
        assert store.router.kind == "ecvh"
        info = store.info()
        assert info["pending_training"] is False
        assert info["router"] == "ecvh"
        assert info["internals"]["router"]["bits"] == store.router.bits
        report = store.verify()
        assert report.ok, report.problems
        assert_rows_in_their_buckets(store)
        trained_digest = digest(store)
        trained_model = live_model(path)

        # A second ingest into the trained store keeps the model.
        second = store.ingest(x[MIN_TRAIN_ROWS:])
        assert second.trained is False
        assert second.train_seconds == 0.0
        assert digest(store) == trained_digest
        assert store.verify().ok
        assert_rows_in_their_buckets(store)
        assert live_model(path) == trained_model
    # The retired sign model went as soon as no reader pinned it; the trained one persists.
    assert model_dirs(path) == [trained_model]
    with asteria_store.open(path) as store:
        assert model_dirs(path) == [trained_model]
        assert store.router.kind == "ecvh"
        assert digest(store) == trained_digest
        assert store.info()["pending_training"] is False
        ids, scores = store.search(x[:20], K, probes="all")
        exp_ids, exp_scores = brute_force(np.arange(len(x)), normalise(x), x[:20], K)
        np.testing.assert_array_equal(ids, exp_ids)
        np.testing.assert_allclose(scores, exp_scores, atol=1e-5)


def test_first_ingest_below_min_train_rows_keeps_the_sign_router(tmp_path: Path) -> None:
    x = data(MIN_TRAIN_ROWS + 1200)
    with asteria_store.create(tmp_path / "store", dim=DIM) as store:
        created_digest = digest(store)
        result = store.ingest(x[: MIN_TRAIN_ROWS - 1])
        assert result.trained is False
        assert store.router.kind == "sign"
        assert store.info()["pending_training"] is True
        assert digest(store) == created_digest
        # The ingest that brings the store to MIN_TRAIN_ROWS trains on a sample of the
        # store and re-buckets every row (earlier batches were routed by the baseline).
        later = store.ingest(x[MIN_TRAIN_ROWS - 1 :])
        assert later.trained is True and later.train_seconds > 0
        assert store.router.kind == "ecvh"
        assert store.info()["pending_training"] is False
        assert store.info()["segments"] == 1
        assert len(store) == len(x)
        assert store.verify().ok
        assert_rows_in_their_buckets(store)
        # Store.train retrains any time.
        trained = store.train(epochs=1)
        assert trained.rows_rebucketed == len(x)
        assert store.router.kind == "ecvh"
        assert store.info()["pending_training"] is False
        assert len(store) == len(x)
        assert store.verify().ok
        assert_rows_in_their_buckets(store)


def test_a_sign_store_never_trains_at_ingest(tmp_path: Path) -> None:
    with asteria_store.create(tmp_path / "store", dim=DIM, router="sign", bits=4) as store:
        assert store.info()["pending_training"] is False
        result = store.ingest(data(MIN_TRAIN_ROWS))
        assert result.trained is False
        assert store.router.kind == "sign"


# --- 2. search on a learned store (real embeddings) --------------------------------------------


@pytest.fixture(scope="module")
def wordnet_truth(wordnet):
    return brute_force_topk(normalise(wordnet.base), normalise(wordnet.queries), K)


@pytest.fixture(scope="module")
def wordnet_stores(wordnet, tmp_path_factory):
    """The 3000 WordNet rows in a default learned store (trained at its first ingest) and in
    a sign store with the same number of buckets."""
    root = tmp_path_factory.mktemp("learned-wordnet")
    learned = asteria_store.create(root / "learned", dim=384)
    sign = None
    try:
        assert learned.ingest(wordnet.base).trained
        sign = asteria_store.create(root / "sign", dim=384, router="sign", bits=learned.router.bits)
        sign.ingest(wordnet.base)
        yield learned, sign
    finally:
        learned.close()
        if sign is not None:
            sign.close()


def test_exact_search_on_a_learned_store_equals_brute_force(wordnet_stores, wordnet, wordnet_truth) -> None:
    learned, _ = wordnet_stores
    exp_ids, exp_scores = wordnet_truth
    ids, scores = learned.search(wordnet.queries, K, probes="all")
    np.testing.assert_allclose(scores, exp_scores, rtol=0, atol=1e-5)
    assert recall_at_k(ids, exp_ids, K) >= 0.999  # up to exact ties in score


def test_learned_routing_beats_sign_routing_at_the_same_bits(wordnet_stores, wordnet, wordnet_truth) -> None:
    learned, sign = wordnet_stores
    assert learned.router.kind == "ecvh" and sign.router.kind == "sign"
    assert learned.router.bits == sign.router.bits  # same number of buckets: a fair match
    exp_ids, _ = wordnet_truth
    recalls = {}
    for name, store in (("learned", learned), ("sign", sign)):
        ids, _ = store.search(wordnet.queries, K)  # default probes
        recalls[name] = recall_at_k(ids, exp_ids, K)
    # Measured with 2**6 buckets and 32 probes: learned 0.979, sign 0.7615.
    assert recalls["learned"] >= recalls["sign"], recalls
    assert recalls["learned"] >= 0.9, recalls


# --- 3. Store.train re-buckets a populated store -----------------------------------------------

N_POP = 1600
DELETED = np.arange(0, N_POP, 7)
LIVE = np.setdiff1d(np.arange(N_POP), DELETED)


@pytest.fixture(scope="module")
def populated_template(tmp_path_factory) -> Path:
    """A closed learned store: 1200 rows (trained at ingest) + 400 rows, every 7th deleted,
    in two segments (bits pinned at what 1,200 rows get: no growth re-fit at 1,600)."""
    path = tmp_path_factory.mktemp("populated") / "store"
    x = data(N_POP)
    with asteria_store.create(path, dim=DIM, chunk_rows=256, bits=learned_plan(1200).bits) as store:
        assert store.ingest(x[:1200]).trained
        store.ingest(x[1200:])
        store.delete(DELETED)
    return path


@pytest.fixture
def populated(populated_template: Path, tmp_path: Path):
    """A fresh copy of the populated store, open for writing."""
    path = tmp_path / "store"
    shutil.copytree(populated_template, path)
    store = asteria_store.open(path)
    yield store
    store.close()


def test_train_rebuckets_every_live_row_into_one_segment(populated, tmp_path: Path) -> None:
    store = populated
    path = store.path
    queries = data(30, seed=9)
    vectors = store.get(LIVE)
    exact = store.search(queries, 50, probes="all")
    np.testing.assert_array_equal(exact[0], brute_force(LIVE, vectors, queries, 50)[0])
    old_digest = digest(store)
    assert segment_dirs(path) == ["seg-00000001", "seg-00000002"]

    result = store.train(epochs=1)
    assert result.rows_rebucketed == len(LIVE)
    assert result.rows_trained_on == len(LIVE)  # the stored rows are the sample
    assert result.buckets == 2**store.router.bits
    epochs = [row["epoch"] for row in result.history if isinstance(row["epoch"], int)]
    assert epochs == [0, 1]  # the k-means start, then the one epoch asked for
    assert digest(store) != old_digest
    assert len(store) == len(LIVE)
    np.testing.assert_array_equal(store.get(LIVE), vectors)
    for i in DELETED[[0, len(DELETED) // 2, -1]]:
        with pytest.raises(IdNotFoundError):
            store.get([i])
    after = store.search(queries, 50, probes="all")
    np.testing.assert_array_equal(after[0], exact[0])
    np.testing.assert_allclose(after[1], exact[1], rtol=0, atol=1e-6)  # rows moved: matmul blocking differs by an ulp
    info = store.info()
    assert (info["segments"], info["internals"]["rows_stored"], info["deleted"]) == (1, len(LIVE), 0)
    assert info["pending_training"] is False
    assert segment_dirs(path) == ["seg-00000003"]  # the old segments are gone
    report = store.verify()
    assert report.ok, report.problems
    assert report.orphans == []
    assert_rows_in_their_buckets(store)

    # Again, on a sample from a .npy file, with fewer buckets.
    sample = tmp_path / "sample.npy"
    np.save(sample, data(1000, seed=5))
    second_digest = digest(store)
    again = store.train(sample, epochs=1, bits=3)
    assert (again.rows_trained_on, again.rows_rebucketed, again.buckets) == (1000, len(LIVE), 8)
    assert store.router.bits == 3
    assert digest(store) != second_digest
    np.testing.assert_array_equal(store.get(LIVE), vectors)
    final = store.search(queries, 50, probes="all")
    np.testing.assert_array_equal(final[0], exact[0])
    np.testing.assert_allclose(final[1], exact[1], rtol=0, atol=1e-6)
    assert segment_dirs(path) == ["seg-00000004"]
    assert store.verify().ok
    assert_rows_in_their_buckets(store)
    # Every probe budget covering the 8 buckets is exact.
    np.testing.assert_array_equal(store.search(queries, 50, probes=8)[0], exact[0])
    store.close()
    assert model_dirs(path) == [live_model(path)]  # retired models went once no reader pinned them
    with asteria_store.open(path) as reopened:
        assert len(reopened) == len(LIVE)
        assert reopened.router.bits == 3


def test_a_reader_opened_before_train_follows_the_new_model(populated) -> None:
    store = populated
    queries = data(30, seed=9)
    with asteria_store.open(store.path, readonly=True) as reader:
        exact = reader.search(queries, K, probes="all")
        reader.search(queries, K)  # caches the old view and router
        old_router = reader.router
        store.train(epochs=1, bits=3)
        assert reader.router is not old_router
        assert reader.router.bits == store.router.bits == 3
        after = reader.search(queries, K, probes="all")
        np.testing.assert_array_equal(after[0], exact[0])
        np.testing.assert_allclose(after[1], exact[1], rtol=0, atol=1e-6)  # rows moved: matmul blocking differs by an ulp
        for probes in (1, 3):  # routes with the new model over the new segment
            np.testing.assert_array_equal(reader.search(queries, K, probes=probes)[0],
                                          store.search(queries, K, probes=probes)[0])
        np.testing.assert_array_equal(reader.get(LIVE[:50]), store.get(LIVE[:50]))
        assert len(reader) == len(LIVE)
        assert reader.verify().ok


def test_info_reports_the_router_a_training_just_published(tmp_path: Path) -> None:
    """info() of the handle that trained, and of one opened before, shows the catalog's
    router (it once showed the cached one: kind 'sign' next to pending_training False)."""
    path = tmp_path / "store"
    with asteria_store.create(path, dim=DIM) as writer, asteria_store.open(path, readonly=True) as reader:
        assert reader.info()["router"] == "sign"
        writer.ingest(data(MIN_TRAIN_ROWS))
        with asteria_store.open(path, readonly=True) as fresh:
            published = fresh.info()["internals"]["router"]
        assert published["kind"] == "ecvh"
        assert writer.info()["internals"]["router"] == published
        assert reader.info()["internals"]["router"] == published


# --- 4. a failure during training leaves the store as it was -----------------------------------

# point -> (owner, attribute, which call raises)
FAIL_POINTS = {
    "training": (train_mod, "holdout_metric", 2),  # after the first epoch
    "writing": (seglib.SegmentWriter, "write", 1),  # the model is saved, the segment begun
    "finishing": (seglib.SegmentWriter, "finish", 1),  # every row written, not fsynced
    "committing": (catalog_mod.Catalog, "put_ids", 1),  # inside the LMDB transaction
}


@pytest.mark.parametrize("point", list(FAIL_POINTS))
def test_failed_retrain_leaves_the_store_as_it_was(populated, disk_snapshot, monkeypatch, point) -> None:
    store = populated
    owner, name, nth = FAIL_POINTS[point]
    queries = data(10, seed=9)
    exact = store.search(queries, K, probes="all")
    before = disk_snapshot(store.path)
    models = model_dirs(store.path)
    calls = fail_on_call(monkeypatch, owner, name, nth, Boom(point))
    with pytest.raises(Boom):
        store.train(epochs=1)
    assert calls[0] == nth
    assert disk_snapshot(store.path) == before
    assert model_dirs(store.path) == models  # no model dir left over
    np.testing.assert_array_equal(store.search(queries, K, probes="all")[0], exact[0])
    monkeypatch.undo()
    assert store.train(epochs=1).rows_rebucketed == len(LIVE)
    assert store.verify().ok


@pytest.mark.parametrize("point", list(FAIL_POINTS))
def test_failed_training_first_ingest_leaves_the_store_as_it_was(tmp_path, disk_snapshot, monkeypatch,
                                                                  point) -> None:
    x = data(MIN_TRAIN_ROWS)
    with asteria_store.create(tmp_path / "store", dim=DIM) as store:
        before = disk_snapshot(store.path)
        models = model_dirs(store.path)
        calls = fail_on_call(monkeypatch, *FAIL_POINTS[point], Boom(point))
        with pytest.raises(Boom):
            store.ingest(x)
        assert calls[0] == FAIL_POINTS[point][2]
        assert disk_snapshot(store.path) == before
        assert model_dirs(store.path) == models  # no model dir left over
        assert len(store) == 0
        assert store.router.kind == "sign"
        assert store.info()["pending_training"] is True
        monkeypatch.undo()
        result = store.ingest(x)
        assert result.trained is True and result.segment == 1
        assert store.verify().ok


@pytest.mark.parametrize("exc", [Boom("interrupted"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_failed_retrain_of_a_store_trained_at_ingest_keeps_its_model(populated, disk_snapshot, monkeypatch,
                                                                      exc) -> None:
    before = disk_snapshot(populated.path)
    fail_on_call(monkeypatch, SegmentPipeline, "write_segment", 1, exc)
    with pytest.raises(type(exc)):
        populated.train(epochs=1)
    assert disk_snapshot(populated.path) == before


def test_failed_retrain_of_a_store_without_rows_keeps_its_model(tmp_path, disk_snapshot, monkeypatch) -> None:
    """Training a store that holds no rows publishes no segment. A second such train must
    still write its model elsewhere than the live one (models were once named after the
    next segment number, so it deleted the live model and a failed commit left the catalog
    pointing at nothing)."""
    path = tmp_path / "store"
    sample = data(MIN_TRAIN_ROWS)
    with asteria_store.create(path, dim=DIM) as store:
        store.train(sample, epochs=1)
        live = live_model(path)
        before = disk_snapshot(path)
        fail_on_call(monkeypatch, catalog_mod.Catalog, "clear_rows", 1, Boom("commit failed"))
        with pytest.raises(Boom):
            store.train(sample, epochs=1, seed=1)
        assert disk_snapshot(path) == before
        assert live_model(path) == live and (path / "model" / live / "router.json").is_file()
    monkeypatch.undo()
    with asteria_store.open(path, readonly=True) as again:
        assert again.verify().ok


# --- 5. a crash during training ------------------------------------------------------------------

CHILD = """
import os, signal, sys

import numpy as np
import torch

import asteria_store
from asteria_store.model import train as train_mod
from asteria_store.storage import segments
from asteria_store.testing.faults import kill_on_call
from asteria_store.write.commit import Commits
from asteria_store.write.pipeline import SegmentPipeline

torch.set_num_threads(1)
path, vectors, action, point = sys.argv[1:5]


if point == "training":  # after the first epoch, nothing written yet
    kill_on_call(train_mod, "holdout_metric", 2)
elif point == "model-saved":  # the model dir is written and fsynced, not published
    kill_on_call(SegmentPipeline, "save_model", 1, after=True)
elif point == "segment-written":  # model and segment on disk, not published
    kill_on_call(segments.SegmentWriter, "finish", 1, after=True)
elif point == "committed":  # the transaction is committed and synced
    kill_on_call(Commits, "commit", 1, after=True)
else:
    raise SystemExit(f"unknown point {point}")
store = asteria_store.open(path)
print("started", flush=True)
if action == "ingest":
    store.ingest(np.load(vectors))
else:
    store.train(epochs=1)
print("done", flush=True)
"""

N_CRASH = 2000


def run_until_killed(python_child, path: Path, vectors: Path, action: str, point: str) -> None:
    proc = python_child(CHILD, path, vectors, action, point)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, out, err)
    assert out == "started\n", err


def assert_models_after_kill(store: asteria_store.Store, before: str, *, committed: bool,
                             new_model_written: bool) -> None:
    """The catalog publishes the new model iff the kill came after the commit; the old one
    is then retired (kept for readers until the next collection), not an orphan; without
    the commit the unpublished new one (if written) is the orphan."""
    live = live_model(store.path)
    if committed:
        assert live != before
        assert store._orphan_models() == []
        assert f"model/{before}" in store._retired()[1]
        assert (store.path / "model" / before).is_dir()
    else:
        assert live == before
        orphans = store._orphan_models()
        assert len(orphans) == int(new_model_written), orphans
        assert f"model/{before}" not in orphans


# point -> (committed?, orphan segment dirs, new model dir written?) for a training first ingest
INGEST_CRASHES = {
    "training": (False, [], False),
    "model-saved": (False, [], True),
    "segment-written": (False, ["seg-00000001"], True),
    "committed": (True, [], True),
}


@pytest.mark.parametrize("point", list(INGEST_CRASHES))
def test_kill_during_a_training_first_ingest(tmp_path, python_child, point) -> None:
    path = tmp_path / "store"
    x = data(N_CRASH)
    np.save(tmp_path / "x.npy", x)
    asteria_store.create(path, dim=DIM).close()
    created_model = live_model(path)
    run_until_killed(python_child, path, tmp_path / "x.npy", "ingest", point)
    committed, orphan_segments, new_model_written = INGEST_CRASHES[point]

    with asteria_store.open(path, readonly=True) as store:
        report = store.verify()
        assert report.ok, report.problems
        assert report.orphans == orphan_segments
        assert_models_after_kill(store, created_model, committed=committed, new_model_written=new_model_written)
        assert len(store) == (N_CRASH if committed else 0)
        assert store.info()["pending_training"] is not committed
        assert store.router.kind == ("ecvh" if committed else "sign")

    with asteria_store.open(path) as store:  # a writable open removes every orphan
        assert model_dirs(path) == [live_model(path)]
        assert segment_dirs(path) == (["seg-00000001"] if committed else [])
        report = store.verify()
        assert report.ok and report.orphans == []
        if not committed:  # nothing of the killed ingest was kept: it trains again
            result = store.ingest(x)
            assert result.trained is True and result.segment == 1
            assert store.router.kind == "ecvh"
            assert store.verify().ok
        ids, _ = store.search(x[:20], K, probes="all")
        np.testing.assert_array_equal(ids, brute_force(np.arange(N_CRASH), normalise(x), x[:20], K)[0])
        assert_rows_in_their_buckets(store)


# point -> (committed?, orphan segment dirs) for Store.train (the new model is written in both)
RETRAIN_CRASHES = {
    "segment-written": (False, ["seg-00000003"]),
    # Past the commit the old segments and model are retired (not orphans), not yet removed.
    "committed": (True, []),
}


@pytest.mark.parametrize("point", list(RETRAIN_CRASHES))
def test_kill_during_retrain(tmp_path, python_child, point) -> None:
    path = tmp_path / "store"
    x = data(N_POP)
    with asteria_store.create(path, dim=DIM, router="sign", bits=4) as store:
        store.ingest(x[:800])
        store.ingest(x[800:])
        store.delete(DELETED)
        queries = data(20, seed=9)
        exact = store.search(queries, K, probes="all")
        vectors = store.get(LIVE)
    old_model = live_model(path)
    run_until_killed(python_child, path, tmp_path / "unused.npy", "train", point)
    committed, orphan_segments = RETRAIN_CRASHES[point]

    with asteria_store.open(path, readonly=True) as store:
        report = store.verify()
        assert report.ok, report.problems
        assert report.orphans == orphan_segments
        assert_models_after_kill(store, old_model, committed=committed, new_model_written=True)
        assert store.router.kind == ("ecvh" if committed else "sign")
        assert store.info()["segments"] == (1 if committed else 2)
        assert store.info()["internals"]["retired"] == (3 if committed else 0)  # two segments and a model
        assert segment_dirs(path) == ["seg-00000001", "seg-00000002", "seg-00000003"]
        assert len(store) == len(LIVE)
        after = store.search(queries, K, probes="all")
        np.testing.assert_array_equal(after[0], exact[0])
        np.testing.assert_allclose(after[1], exact[1], rtol=0, atol=1e-6)  # rows moved: matmul blocking differs by an ulp
        np.testing.assert_array_equal(store.get(LIVE), vectors)

    with asteria_store.open(path) as store:
        assert model_dirs(path) == [live_model(path)]
        assert segment_dirs(path) == (["seg-00000003"] if committed else ["seg-00000001", "seg-00000002"])
        assert store.verify().orphans == []
        result = store.train(epochs=1)
        assert result.rows_rebucketed == len(LIVE)
        assert store.verify().ok
        np.testing.assert_array_equal(store.search(queries, K, probes="all")[0], exact[0])


# --- 6. model files --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A model trained by ``train_model`` (one epoch) on 1200 vectors, saved to a file."""
    path = tmp_path_factory.mktemp("model") / "model.pt"
    x = data(1200, seed=4)
    router, history = asteria_store.train_model(x, save=path, dim=DIM, epochs=1)
    assert [row["epoch"] for row in history if isinstance(row["epoch"], int)] == [0, 1]
    return path, router, x


def test_a_store_created_from_a_model_file_uses_it_and_never_trains(tmp_path, model_file) -> None:
    path, router, x = model_file
    with asteria_store.create(tmp_path / "store", dim=DIM, model=path) as store:
        info = store.info()
        assert info["pending_training"] is False
        assert info["router"] == "ecvh"
        assert store.router.bits == router.bits
        xn = normalise(x)
        np.testing.assert_array_equal(store.router.keys(xn), router.keys(xn))
        result = store.ingest(x)
        assert result.trained is False
        assert store.router.kind == "ecvh"
        assert store.verify().ok
        assert_rows_in_their_buckets(store)
        ids, _ = store.search(x[:20], K, probes="all")
        np.testing.assert_array_equal(ids, brute_force(np.arange(len(x)), xn, x[:20], K)[0])


def test_model_file_errors_leave_no_store(tmp_path, model_file) -> None:
    stores = tmp_path / "stores"
    stores.mkdir()
    target = stores / "store"

    missing = tmp_path / "missing.pt"
    with pytest.raises(ModelFileError) as exc:
        asteria_store.create(target, dim=DIM, model=missing)
    assert str(exc.value) == f"No model file at {str(missing)!r}. Train one with `asteria-store train-model`."

    npy = tmp_path / "vectors.npy"
    np.save(npy, data(10))
    with pytest.raises(ModelFileError) as exc:
        asteria_store.create(target, dim=DIM, model=npy)
    assert re.fullmatch(re.escape(f"{str(npy)!r} is not an asteria-store model file (") + r"\w+"
                        + re.escape("). Train one with `asteria-store train-model`."), str(exc.value))

    not_a_model = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(4)}, not_a_model)
    with pytest.raises(ModelFileError) as exc:
        asteria_store.create(target, dim=DIM, model=not_a_model)
    assert str(exc.value) == (f"{str(not_a_model)!r} is not an asteria-store model file (KeyError). "
                              "Train one with `asteria-store train-model`.")
    assert isinstance(exc.value, ValueError)

    model, _, _ = model_file
    with pytest.raises(DimensionMismatchError) as exc:
        asteria_store.create(target, dim=8, model=model)
    assert str(exc.value) == (f"Expected a model of dimension 8, got one of dimension {DIM} from "
                              f"{str(model)!r}. Was it trained with --dim {DIM}?")
    assert list(stores.iterdir()) == []  # no store, no temporary sibling


def test_train_model_checks_dimension_and_sample_size(tmp_path) -> None:
    save = tmp_path / "model.pt"
    with pytest.raises(DimensionMismatchError) as exc:
        asteria_store.train_model(data(200), save=save, dim=8)
    assert str(exc.value) == f"Expected training vectors of dimension 8, got {DIM}. Pass vectors of dimension 8, or --dim {DIM} for these."
    with pytest.raises(InvalidInputError) as exc:
        asteria_store.train_model(data(99), save=save)
    assert str(exc.value) == ("Expected at least 100 training vectors, got 99. Pass a bigger sample "
                              "(or ingest more first).")
    assert list(tmp_path.iterdir()) == []


# --- 7. the CLI ------------------------------------------------------------------------------




def assert_error(result: Result, line: str) -> None:
    """The command failed cleanly (exit 1, no traceback) with exactly ``line`` on stderr."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert result.stderr.splitlines() == [line]


def save(tmp_path: Path, name: str, arr: np.ndarray) -> Path:
    path = tmp_path / name
    np.save(path, arr)
    return path


@pytest.fixture
def small_store(tmp_path: Path) -> Path:
    """A learned store holding 600 rows: too few to have trained, so still pending."""
    path = tmp_path / "store"
    with asteria_store.create(path, dim=DIM) as store:
        store.ingest(data(600))
    return path


def test_cli_train(tmp_path, small_store) -> None:
    sample = save(tmp_path, "sample.npy", data(1000, seed=5))
    result = run("train", small_store, sample, "--epochs", 1, "--bits", 4, "-q")
    assert result.exit_code == 0, result.output
    assert re.fullmatch(r"Trained on 1,000 vectors \(16 buckets\), re-bucketed 600 stored vectors "
                        r"in \d+\.\d s\.\n", result.stdout), result.stdout
    assert result.stderr == ""
    with asteria_store.open(small_store, readonly=True) as store:
        assert (store.router.kind, store.router.bits) == ("ecvh", 4)
        assert store.info()["pending_training"] is False
        assert len(store) == 600
        assert store.verify().ok


def test_cli_train_model_then_create_from_it(tmp_path) -> None:
    train = save(tmp_path, "train.npy", data(1000, seed=4))
    model = tmp_path / "m.pt"
    result = run("train-model", "--train-embeddings", train, "--dim", DIM, "--epochs", 1,
                 "--save-model", model, "-q")
    assert result.exit_code == 0, result.output
    assert re.fullmatch(re.escape(f"Saved model {str(model)!r}: dim {DIM}, ") + r"[\d,]+ buckets, LRSQ rank \d+; "
                        r"held-out scan for recall 0\.90: \d+\.\d\d% after \d+ epoch\(s\)\.\n",
                        result.stdout), result.stdout
    assert result.stderr == ""
    path = tmp_path / "store"
    result = run("create", path, "--dim", DIM, "--model", model)
    assert result.exit_code == 0, result.output
    assert re.fullmatch(re.escape(f"Created store {str(path)!r}: dim {DIM}, metric cosine, dtype float32, ")
                        + r"[\d,]+ buckets \(ecvh router\)\.\n", result.stdout), result.stdout
    result = run("ingest", path, train, "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Added 1,000 vectors as segment 1 in ")  # no training line
    with asteria_store.open(path, readonly=True) as store:
        assert store.router.kind == "ecvh" and store.info()["pending_training"] is False


def test_cli_train_model_reports_the_epochs_it_ran(tmp_path) -> None:
    """Epochs run, not rows of the history (which also holds the k-means start and may hold
    a probe-order refit)."""
    train = save(tmp_path, "train.npy", data(1000, seed=4))
    result = run("train-model", "--train-embeddings", train, "--epochs", 1, "--save-model",
                 tmp_path / "m.pt", "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith(" after 1 epoch(s).\n"), result.stdout  # patience 2: no early stop


def test_cli_train_model_with_the_wrong_dim(tmp_path) -> None:
    train = save(tmp_path, "train.npy", data(200))
    model = tmp_path / "m.pt"
    result = run("train-model", "--train-embeddings", train, "--dim", 8, "--save-model", model, "-q")
    assert_error(result, f"Error: Expected training vectors of dimension 8, got {DIM}. "
                         f"Pass vectors of dimension 8, or --dim {DIM} for these.")
    assert not model.exists()


def test_cli_ingest_into_a_fresh_learned_store_trains(tmp_path) -> None:
    path = tmp_path / "store"
    assert run("create", path, "--dim", DIM).exit_code == 0
    vectors = save(tmp_path, "x.npy", data(MIN_TRAIN_ROWS))
    result = run("ingest", path, vectors, "-q")
    assert result.exit_code == 0, result.output
    with asteria_store.open(path, readonly=True) as store:
        bits, rank = store.router.bits, store.router.lrsq.rank
    assert re.fullmatch(
        r"Trained the store's model on a sample of its vectors in \d+\.\d s: "
        rf"{2**bits:,} buckets, LRSQ rank {rank}\.\n"
        r"Added 1,000 vectors as segment 1 in \d+\.\d\d s \([\d,]+ vectors/s\)\.\n", result.stdout), result.stdout


def test_cli_train_errors_leave_the_store_as_it_was(tmp_path, small_store, disk_snapshot) -> None:
    before = disk_snapshot(small_store)
    sample = save(tmp_path, "sample.npy", data(1000, seed=5))
    assert_error(run("train", small_store, sample, "--bits", 99, "-q"),
                 "Error: bits must be an integer in [1, 20], got 99.")
    small = save(tmp_path, "small.npy", data(50, seed=5))
    assert_error(run("train", small_store, small, "-q"),
                 "Error: Expected at least 100 training vectors, got 50. Pass a bigger sample "
                 "(or ingest more first).")
    wrong_dim = save(tmp_path, "wide.npy", np.ones((200, DIM + 1), np.float32))
    assert_error(run("train", small_store, wrong_dim, "-q"),
                 f"Error: Expected training vectors of dimension {DIM}, got {DIM + 1}. "
                 f"Was the store created with --dim {DIM + 1}?")
    assert disk_snapshot(small_store) == before


# --- 8. bad input at training time --------------------------------------------------------------


@pytest.mark.parametrize("as_file", [False, True], ids=["array", "npy"])
def test_nan_in_a_training_first_ingest_changes_nothing(tmp_path, disk_snapshot, as_file) -> None:
    x = data(MIN_TRAIN_ROWS + 200)
    x[617, 3] = np.nan
    vectors = save(tmp_path, "x.npy", x) if as_file else x
    with asteria_store.create(tmp_path / "store", dim=DIM) as store:
        before = disk_snapshot(store.path)
        with pytest.raises(InvalidInputError) as exc:
            store.ingest(vectors)
        assert str(exc.value) == ("Expected finite vectors, got NaN or inf (first in row 617). "
                                  "Clean or drop those rows and retry.")
        assert disk_snapshot(store.path) == before
        assert store.info()["pending_training"] is True
        assert store.router.kind == "sign"


@pytest.mark.parametrize("training", [False, True], ids=["ingest", "training-ingest"])
def test_a_value_past_float16_range_names_its_row_and_changes_nothing(tmp_path, disk_snapshot, monkeypatch,
                                                                       training) -> None:
    """A float16 store refuses a value it cannot hold, naming the input row, whether the row
    is met when the batch is hashed or first in the training sample of a first ingest."""
    from asteria_store.model import fit

    monkeypatch.setattr(fit, "TRAIN_SAMPLE_ROWS", 500)  # a sample smaller than the batch
    n = MIN_TRAIN_ROWS + 200 if training else 300
    bad = int(fit.sample_indices(n, 500, 0)[250]) if training else 217  # sampled, not sample row 250's number
    x = data(n)
    x[bad, 5] = 1e6  # metric "ip": rows are stored as given, and float16 stops at 65504
    with asteria_store.create(tmp_path / "store", dim=DIM, dtype="float16", metric="ip") as store:
        before = disk_snapshot(store.path)
        with pytest.raises(InvalidInputError) as exc:
            store.ingest(x)
        assert str(exc.value) == ("Expected values within float16 range (|v| <= 65504) for a float16 store, "
                                  f"got a larger one in row {bad}. Rescale the vectors or use a float32 store.")
        assert disk_snapshot(store.path) == before
        assert len(store) == 0


def test_nan_in_a_train_sample_changes_nothing(populated, disk_snapshot) -> None:
    before = disk_snapshot(populated.path)
    sample = data(500, seed=5)
    sample[123, 0] = np.inf
    with pytest.raises(InvalidInputError) as exc:
        populated.train(sample, epochs=1)
    assert str(exc.value) == ("Expected finite training vectors, got NaN or inf (first in row 123). "
                              "Clean or drop those rows and retry.")
    assert disk_snapshot(populated.path) == before


def test_zero_vector_in_a_sampled_first_ingest_names_its_row(tmp_path, disk_snapshot) -> None:
    """A batch larger than TRAIN_SAMPLE_ROWS trains on a sample of it: a zero vector found
    there is named by its row in the batch, not its position in the sample."""
    n = fit_mod.TRAIN_SAMPLE_ROWS + 1000
    x = clustered_vectors(n, 4, clusters=20, seed=1)
    sampled = fit_mod.sample_indices(n, fit_mod.TRAIN_SAMPLE_ROWS, 0)
    row = int(sampled[50_000])  # in the training sample, at another position
    assert row != 50_000
    x[row] = 0
    with asteria_store.create(tmp_path / "store", dim=4) as store:
        before = disk_snapshot(store.path)
        with pytest.raises(InvalidInputError) as exc:
            store.ingest(x)
        assert disk_snapshot(store.path) == before
    assert str(exc.value) == (f"Expected non-zero vectors for metric 'cosine', got an all-zero vector "
                              f"in row {row}.")
