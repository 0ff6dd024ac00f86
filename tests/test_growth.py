"""A store filled batch by batch: an index sized to its data that grows with it, tiered
segment merging, compaction, upsert, and writers that queue instead of failing."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

import asteria_store
import asteria_store.write.upkeep as upkeep_mod
from asteria_store import DuplicateIdError, StoreLockedError
from asteria_store.storage.lock import WriterLock
from asteria_store.testing import clustered_vectors
from asteria_store.write import MERGE_FACTOR, learned_plan, merge_plan

DIM = 16


def exact_top(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    s = q @ x.T
    order = np.lexsort((np.broadcast_to(ids, s.shape), -s), axis=1)[:, :k]
    return ids[order]


def more_wordnet(wordnet, n: int) -> np.ndarray:
    """The 3,000 real vectors, then normalised midpoints of random pairs of them."""
    base = np.asarray(wordnet.base, dtype=np.float32)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, len(base), (2, n - len(base)))
    mid = base[a] + base[b]
    return np.concatenate([base, mid / np.linalg.norm(mid, axis=1, keepdims=True)])


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / len(t) for f, t in zip(found, truth)]))


# --- sizing to the data -----------------------------------------------------------------------


def test_small_sign_store_is_sized_to_its_data_and_finds_neighbours(tmp_path, wordnet) -> None:
    """500 real vectors in a new store: a handful of buckets, not 4,096 (recall@10 was
    0.039 with 144 of 200 queries short of 10 results)."""
    x = np.asarray(wordnet.base[:500], dtype=np.float32)
    q = np.asarray(wordnet.queries[:100], dtype=np.float32)
    with asteria_store.create(tmp_path / "s", dim=x.shape[1], router="sign") as store:
        store.ingest(x)
        info = store.info()
        assert info["buckets"] <= 4
        ids, _ = store.search(q, 10)
    assert (ids >= 0).all()
    assert recall(ids, exact_top(x, np.arange(500), q, 10)) >= 0.9


def test_learned_store_below_training_size_serves_few_buckets(tmp_path, wordnet) -> None:
    x = np.asarray(wordnet.base[:500], dtype=np.float32)
    with asteria_store.create(tmp_path / "s", dim=x.shape[1], expected_size=1_000_000) as store:
        store.ingest(x)
        assert store.info()["pending_training"]
        assert store.info()["buckets"] <= 4
        ids, _ = store.search(np.asarray(wordnet.queries[:50], dtype=np.float32), 10)
    assert (ids >= 0).all()


def test_bucket_count_follows_the_data_flat_then_as_a_tree() -> None:
    assert learned_plan(1_000).bits < learned_plan(10_000).bits < learned_plan(100_000).bits
    flat = [learned_plan(n) for n in (300_000, 1_000_000)]
    assert [p.tree for p in flat] == [False, False] and {p.buckets for p in flat} == {2**11}
    # past the flat model's 2,048 buckets a tree keeps growing with the data
    tree = [learned_plan(n) for n in (3_000_000, 10_000_000)]
    assert all(p.tree for p in tree)
    assert 2**11 < tree[0].buckets < tree[1].buckets
    assert 300 < 10_000_000 / tree[1].buckets < 2_000  # hundreds of rows per bucket
    assert 2**tree[1].bits < tree[1].buckets  # coarse cells hold several children each


# --- growth ---------------------------------------------------------------------------------


def test_sign_store_grows_its_buckets_with_the_data(tmp_path) -> None:
    """A store filled in 40 batches ends with the buckets of one filled at once, and the
    same results as brute force over everything."""
    x = clustered_vectors(20_000, DIM, clusters=200, seed=1)
    q = clustered_vectors(20, DIM, clusters=200, seed=2)
    with asteria_store.create(tmp_path / "grown", dim=DIM, router="sign") as store:
        bits = []
        for part in np.array_split(np.arange(len(x)), 40):
            store.ingest(x[part], ids=part)
            bits.append(store.router.bits)
        info = store.info()
        ids, scores = store.search(q, 10, probes="all")
    assert bits[0] <= 2 < bits[-1]
    assert info["buckets"] == 2 ** asteria_store.model.router.bits_for_size(20_000)
    assert info["internals"]["fitted_rows"] >= 20_000 // 4  # re-fitted on the way, not sized by the first batch
    assert info["internals"]["maintenance"]["refits"] >= 2
    assert info["segments"] <= 2 * MERGE_FACTOR
    np.testing.assert_array_equal(ids, exact_top(x, np.arange(len(x)), q, 10))


def test_learned_store_refits_as_it_outgrows_its_first_sample(tmp_path, wordnet) -> None:
    """The first ingest trains on 1,000 rows (a handful of buckets); by 5,000 rows the
    store has re-fitted itself to the buckets that many rows call for."""
    x = more_wordnet(wordnet, 5_000)
    q = np.asarray(wordnet.queries[:100], dtype=np.float32)
    with asteria_store.create(tmp_path / "s", dim=x.shape[1]) as store:
        first = store.ingest(x[:1000], ids=np.arange(1000))
        assert first.trained and not first.refitted
        bits_first = store.router.bits
        refits = []
        for start in range(1000, 5000, 1000):
            result = store.ingest(x[start : start + 1000], ids=np.arange(start, start + 1000))
            refits.append(result.refitted)
        info = store.info()
        ids, _ = store.search(q, 10, probes=8)
        exact, _ = store.search(q, 10, probes="all")
    # whenever the data calls for another bucket bit: at 2,000 and 3,000 rows
    assert refits == [learned_plan(n).bits > learned_plan(n - 1000).bits for n in (2000, 3000, 4000, 5000)]
    assert refits == [True, True, False, False]
    assert info["router"] == "ecvh"
    assert info["internals"]["router"]["bits"] == learned_plan(5_000).bits > bits_first
    assert info["internals"]["fitted_rows"] == 3_000
    assert info["internals"]["maintenance"]["refits"] == 2
    np.testing.assert_array_equal(exact, exact_top(x, np.arange(5000), q, 10))
    assert recall(ids, exact) >= 0.8


def test_a_model_file_store_never_refits(tmp_path, wordnet) -> None:
    x = more_wordnet(wordnet, 4_000)
    asteria_store.train_model(x[:2000], save=tmp_path / "m.asteria-model", epochs=None)
    with asteria_store.create(tmp_path / "s", dim=x.shape[1], model=tmp_path / "m.asteria-model") as store:
        digest = store.info()["internals"]["router"]["digest"]
        for part in np.array_split(np.arange(4000), 8):
            assert not store.ingest(x[part], ids=part).refitted
        assert store.info()["internals"]["router"]["digest"] == digest
        assert not store.info()["internals"]["grows"]


# --- merging and compaction ---------------------------------------------------------------------


def test_merge_plan_tiers() -> None:
    assert merge_plan({1: 10, 2: 10, 3: 10}, factor=4, min_rows=100) == []
    assert merge_plan({1: 10, 2: 10, 3: 10, 4: 99}, factor=4, min_rows=100) == [1, 2, 3, 4]
    # Four in tier 1 ([100, 400)) merge; a big one and small ones are left alone.
    plan = merge_plan({1: 5000, 2: 150, 3: 120, 4: 399, 5: 100, 6: 10}, factor=4, min_rows=100)
    assert plan == [2, 3, 4, 5]


def test_merge_plan_rewrites_a_mostly_dead_segment_alone() -> None:
    live, stored = {1: 400, 2: 90, 3: 1000}, {1: 1000, 2: 100, 3: 1000}
    assert merge_plan(live, stored=stored, factor=4, min_rows=100) == [1]  # 600 of 1,000 rows dead
    assert merge_plan({**live, 1: 600}, stored=stored, factor=4, min_rows=100) == []  # 400 of 1,000
    assert merge_plan({1: 40, 2: 90}, stored={1: 99, 2: 100}, factor=4, min_rows=100) == []  # too few dead
    assert merge_plan(live, factor=4, min_rows=100) == []  # without stored sizes: tiers only


def test_tiered_merges_keep_segments_few_and_results_equal_one_ingest(tmp_path, monkeypatch) -> None:
    """60 small ingests with pinned bits: merges keep O(F log N) segments, and every search
    returns exactly what a store filled in one ingest returns (same buckets, same rows)."""
    monkeypatch.setattr(upkeep_mod, "MERGE_MIN_ROWS", 64)
    x = clustered_vectors(6_000, DIM, clusters=100, seed=3)
    q = clustered_vectors(30, DIM, clusters=100, seed=4)
    with asteria_store.create(tmp_path / "one", dim=DIM, router="sign", bits=6) as one:
        one.ingest(x, ids=np.arange(len(x)))
        want = one.search(q, 10, probes=4)
    with asteria_store.create(tmp_path / "grown", dim=DIM, router="sign", bits=6, chunk_rows=256) as store:
        most = 0
        for part in np.array_split(np.arange(len(x)), 60):
            store.ingest(x[part], ids=part)
            most = max(most, store.info()["segments"])
        info = store.info()
        got = store.search(q, 10, probes=4)
        assert store.verify().ok
    # tiers of 64 * 4**t rows: at most F-1 segments per tier, ~5 tiers for 6,000 rows
    assert most <= (MERGE_FACTOR - 1) * 5 + 1
    assert info["internals"]["maintenance"]["merges"] >= 10
    assert info["internals"]["router"]["bits"] == 6  # pinned: never re-sized
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_merges_copy_learned_codes_and_keep_results(tmp_path, small_learned) -> None:
    """Merging segments of a learned store copies their LRSQ codes (same model): pruned
    search returns the same as before the merge."""
    with asteria_store.open(small_learned) as store:
        q = store.get(np.arange(0, 200, 10))
        more = store.get(np.arange(200)) * 0.5 + store.get(np.arange(300, 500)) * 0.5  # (no re-fit yet)
        assert not store.ingest(more / np.linalg.norm(more, axis=1, keepdims=True),
                                ids=np.arange(10**6, 10**6 + 200)).refitted
        before = store.search(q, 10, probes=4, prune=True)
        before_all = store.search(q, 10, probes="all")
        assert store.info()["segments"] >= 2
        result = store.compact()
        assert result.segments_after == 1
        after = store.search(q, 10, probes=4, prune=True)
        assert store.verify().ok
        np.testing.assert_array_equal(after[0], before[0])
        np.testing.assert_array_equal(after[1], before[1])
        np.testing.assert_array_equal(store.search(q, 10, probes="all")[0], before_all[0])


def test_compact_drops_deleted_rows_and_returns_their_space(tmp_path) -> None:
    x = clustered_vectors(4_000, DIM, clusters=50, seed=5)
    q = clustered_vectors(10, DIM, clusters=50, seed=6)
    with asteria_store.create(tmp_path / "s", dim=DIM, router="sign", bits=5) as store:
        for part in np.array_split(np.arange(4000), 3):
            store.ingest(x[part], ids=part)
        gone = np.arange(0, 4000, 2)
        store.delete(gone)
        before = store.search(q, 10, probes=8)
        kept = store.get(np.arange(1, 4000, 2))
        disk_before = dir_bytes(store.path / "segments.zarr")
        result = store.compact()
        info = store.info()
        assert (result.segments_before, result.segments_after, result.rows, result.dropped) == (3, 1, 2000, 2000)
        assert (info["segments"], info["deleted"], info["count"]) == (1, 0, 2000)
        assert info["internals"]["rows_stored"] == 2000
        assert info["internals"]["retired"] == 0  # no reader pinned the old segments: their space is back
        assert dir_bytes(store.path / "segments.zarr") < 0.6 * disk_before
        after = store.search(q, 10, probes=8)
        np.testing.assert_array_equal(after[0], before[0])
        np.testing.assert_array_equal(store.get(np.arange(1, 4000, 2)), kept)  # bit for bit
        with pytest.raises(asteria_store.IdNotFoundError):
            store.get([0])
        again = store.compact()  # nothing left to do
        assert (again.segments_before, again.segments_after, again.dropped) == (1, 1, 0)
        assert store.verify().ok


def test_reader_keeps_its_generation_across_a_merge_and_a_refit(tmp_path) -> None:
    """A reader in the middle of a read (pinned) keeps reading its generation's segments
    while a writer compacts the store and then outgrows it (a re-fit re-buckets every row);
    the old files go once the reader lets go."""
    from asteria_store.query.engine import search_exact

    x = clustered_vectors(3_000, DIM, clusters=30, seed=7)
    q = clustered_vectors(5, DIM, clusters=30, seed=8)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    path = tmp_path / "s"
    with asteria_store.create(path, dim=DIM, router="sign") as store:
        for part in np.array_split(np.arange(3000), 3):
            store.ingest(x[part], ids=part)
        store.delete(np.arange(100))
    reader = asteria_store.open(path, readonly=True)
    want = reader.search(q, 20, probes="all")
    with reader._reads.snapshot() as snap:  # a long read, begun before the writes below
        old_segments = sorted(snap.view.segments)
        with asteria_store.open(path) as writer:
            bits = writer.router.bits
            assert writer.compact().segments_after == 1
            more = writer.ingest(clustered_vectors(9_000, DIM, clusters=30, seed=9),
                                 ids=np.arange(10**5, 10**5 + 9000))
            assert more.refitted and writer.router.bits > bits
            assert writer.info()["internals"]["retired"] >= len(old_segments)
        ids, scores = search_exact(snap.view, q, 20)  # the old generation, still whole
        np.testing.assert_array_equal(ids, want[0])
        np.testing.assert_allclose(scores, want[1], rtol=1e-6)
    with asteria_store.open(path) as writer:  # the reader let go: the old files go
        writer.ingest(clustered_vectors(10, DIM, clusters=30, seed=10))
        assert writer.info()["internals"]["retired"] == 0
    reader.close()
    for seg in old_segments:
        assert not (path / "segments.zarr" / f"seg-{seg:08d}").exists()


# --- upsert -------------------------------------------------------------------------------------


def test_upsert_replaces_existing_ids_and_adds_new_ones(tmp_path) -> None:
    x = clustered_vectors(1_000, DIM, clusters=20, seed=11)
    with asteria_store.create(tmp_path / "s", dim=DIM, router="sign", bits=3) as store:
        store.ingest(x, ids=np.arange(1000))
        generation = store.generation
        new = clustered_vectors(200, DIM, clusters=20, seed=12)
        ids = np.concatenate([np.arange(900, 1000), np.arange(5000, 5100)])  # 100 old, 100 new
        result = store.upsert(new, ids)
        assert result.replaced == 100 and result.rows == 200
        assert store.generation == generation + 1  # one commit
        assert len(store) == 1100
        unit = new / np.linalg.norm(new, axis=1, keepdims=True)
        np.testing.assert_allclose(store.get(ids), unit, atol=1e-6)
        top, scores = store.search(unit[:5], 1, probes="all")
        np.testing.assert_array_equal(top[:, 0], ids[:5])
        # the old vectors of replaced ids are gone from search
        old_unit = x[900:905] / np.linalg.norm(x[900:905], axis=1, keepdims=True)
        ids_all, _ = store.search(old_unit, 1100, probes="all")
        assert (np.sort(ids_all[0][ids_all[0] >= 0]) == np.sort(np.concatenate([np.arange(1000),
                                                                                np.arange(5000, 5100)]))).all()
        assert store.verify().ok


def test_ingest_on_conflict_error_writes_nothing(tmp_path, disk_snapshot) -> None:
    x = clustered_vectors(100, DIM, clusters=5, seed=13)
    path = tmp_path / "s"
    with asteria_store.create(path, dim=DIM, router="sign") as store:
        store.ingest(x, ids=np.arange(100))
    before = disk_snapshot(path)
    with asteria_store.open(path) as store:
        with pytest.raises(DuplicateIdError, match="on-conflict replace"):
            store.ingest(x[:10], ids=np.arange(95, 105))
        with pytest.raises(DuplicateIdError, match="more than once"):
            store.upsert(x[:2], ids=[7, 7])
        with pytest.raises(asteria_store.InvalidArgumentError, match="on_conflict"):
            store.ingest(x[:2], ids=[500, 501], on_conflict="overwrite")
    assert disk_snapshot(path) == before


# --- writers queue ------------------------------------------------------------------------------


def test_a_second_writer_waits_for_the_first_instead_of_failing(tmp_path) -> None:
    """Writers queue: an ingest started while another process holds the writer lock waits
    for it (with no deadline) and then commits; ``lock_timeout`` bounds the wait."""
    x = clustered_vectors(200, DIM, clusters=5, seed=14)
    path = tmp_path / "s"
    asteria_store.create(path, dim=DIM, router="sign").close()
    holder = WriterLock(path)
    assert holder.try_acquire()
    done = threading.Event()
    results: list = []

    def write() -> None:
        with asteria_store.open(path) as store:
            results.append(store.ingest(x, ids=np.arange(200)))
        done.set()

    try:
        with asteria_store.open(path, lock_timeout=0.2) as impatient:
            with pytest.raises(StoreLockedError):
                impatient.ingest(x, ids=np.arange(200))
        thread = threading.Thread(target=write)
        thread.start()
        assert not done.wait(timeout=0.5)  # still waiting, not failed
    finally:
        holder.release()
    thread.join()
    assert results and results[0].rows == 200
    with asteria_store.open(path, readonly=True) as store:
        assert len(store) == 200


def test_info_reports_growth_fields_as_json(tmp_path) -> None:
    with asteria_store.create(tmp_path / "s", dim=DIM, router="sign") as store:
        store.ingest(clustered_vectors(50, DIM, clusters=5, seed=15))
        info = store.info()
    assert info["internals"]["grows"] is True
    json.dumps(info)


def test_cli_on_conflict_and_compact(tmp_path) -> None:
    from asteria_store_cli.main import cli
    from click.testing import CliRunner

    x = clustered_vectors(300, DIM, clusters=5, seed=16)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "ids.npy", np.arange(300))
    path = Path(tmp_path / "s")
    runner = CliRunner()
    assert runner.invoke(cli, ["create", str(path), "--dim", str(DIM), "--router", "sign"]).exit_code == 0
    assert runner.invoke(cli, ["ingest", str(path), str(tmp_path / "x.npy"), "--ids", str(tmp_path / "ids.npy"),
                               "--quiet"]).exit_code == 0
    again = runner.invoke(cli, ["ingest", str(path), str(tmp_path / "x.npy"), "--ids", str(tmp_path / "ids.npy"),
                                "--quiet", "--on-conflict", "replace"])
    assert again.exit_code == 0, again.output
    assert "replacing 300" in again.output
    out = runner.invoke(cli, ["compact", str(path), "--quiet"])
    assert out.exit_code == 0, out.output
    assert "into 1" in out.output and "300 deleted rows dropped" in out.output
    with asteria_store.open(path, readonly=True) as store:
        assert (len(store), store.info()["segments"]) == (300, 1)
