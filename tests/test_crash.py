"""Crash safety: a writer killed with SIGKILL mid-ingest leaves the old state or the new one.

A child interpreter opens the store, ingests batch A (committed), records what the store
then returns, and starts ingesting batch B. It is killed at a chosen point of B's ingest
(an internal function is patched to SIGKILL its own process) or at a random wall-clock
time. The parent then checks, read-only, that the store verifies, holds exactly A (or,
past the commit, exactly A and B), and that the only debris is an orphan segment directory
that ``verify(repair=True)`` or a writable open removes.
"""

from __future__ import annotations

import select
import signal
import time
from pathlib import Path

import numpy as np
import pytest

import asteria_store
from asteria_store import IdNotFoundError, ReadOnlyError
from asteria_store.storage.lock import WriterLock
from asteria_store.testing import clustered_vectors

DIM = 16
N_A = 600
N_B = 1000
K = 4096  # more than every row: a probes="all" search returns the whole live set
CHUNK_ROWS = 64
B_SEGMENT = "seg-00000002"  # A is segment 1

CHILD = """
import os, signal, sys
from pathlib import Path

import numpy as np

import asteria_store
import asteria_store.write.pipeline as pipeline_mod
from asteria_store.storage import catalog, segments
from asteria_store.testing.faults import kill_on_call
from asteria_store.write.commit import Commits

path, data, point, k = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])


store = asteria_store.open(path)
a_ids = np.load(data / "a_ids.npy")
store.ingest(np.load(data / "a.npy"), ids=a_ids)
ids, scores = store.search(np.load(data / "q.npy"), k=k, probes="all")
np.savez(data / "before.npz", ids=ids, scores=scores, vectors=store.get(a_ids), count=len(store))
print("A committed", flush=True)

pipeline_mod._HASH_BLOCK_ROWS = 64
pipeline_mod._WRITE_WINDOW_BYTES = 64 * store.dim * 4  # one 64-row chunk per write
if point == "hashing":  # pass 1, before any segment file exists
    kill_on_call(store._router, "keys", 2)
elif point == "writing":  # pass 2, some chunks written
    kill_on_call(segments.SegmentWriter, "write", 2)
elif point == "written":  # segment complete and fsynced, not published
    kill_on_call(segments.SegmentWriter, "finish", 1, after=True)
elif point == "committing":  # inside the LMDB write transaction
    kill_on_call(catalog.Catalog, "put_ids", 1)
elif point == "committed":  # the transaction is committed and synced
    kill_on_call(Commits, "commit", 1, after=True)
elif point == "deleting":  # inside the LMDB write transaction of a delete
    kill_on_call(catalog.Catalog, "delete_ids", 1)
    store.delete(a_ids[:10])
elif point == "ready":  # the parent kills at a time of its choosing
    written = [0]
    write = segments.SegmentWriter.write

    def write_and_say(self, *args, **kwargs):  # one line per chunk written: the parent's cue
        write(self, *args, **kwargs)
        written[0] += 1
        print(f"wrote {written[0]}", flush=True)

    segments.SegmentWriter.write = write_and_say
    print("ready", flush=True)
else:
    raise SystemExit(f"unknown point {point}")
store.ingest(np.load(data / "b.npy"), ids=np.load(data / "b_ids.npy"))
print("B done", flush=True)
"""

# point -> (is B committed?, orphan segment directories the kill leaves behind)
POINTS = {
    "hashing": (False, []),
    "writing": (False, [B_SEGMENT]),
    "written": (False, [B_SEGMENT]),
    "committing": (False, [B_SEGMENT]),
    "committed": (True, []),
}


def make_data(tmp_path: Path, *, n_a: int = N_A, n_b: int = N_B, dim: int = DIM,
              chunk_rows: int = CHUNK_ROWS) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """An empty store and the child's inputs: A and B with disjoint explicit ids, queries."""
    data = tmp_path / "data"
    data.mkdir()
    arrays = {
        "a": clustered_vectors(n_a, dim, clusters=20, seed=1),
        "a_ids": np.arange(n_a, dtype=np.uint64) * 3 + 7,
        "b": clustered_vectors(n_b, dim, clusters=20, seed=2),
        "b_ids": np.arange(n_b, dtype=np.uint64) + 1_000_000,
        "q": clustered_vectors(5, dim, clusters=20, seed=3),
    }
    for name, arr in arrays.items():
        np.save(data / f"{name}.npy", arr)
    path = tmp_path / "store"
    asteria_store.create(path, dim=dim, bits=4, chunk_rows=chunk_rows).close()
    return path, data, arrays


def run_until_killed(python_child, path: Path, data: Path, point: str, *, k: int = K) -> str:
    proc = python_child(CHILD, path, data, point, k)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, out, err)
    assert "A committed" in out, err
    assert "B done" not in out
    return out


def assert_holds_exactly_a(store: asteria_store.Store, data: Path, arrays: dict[str, np.ndarray],
                           *, k: int = K) -> None:
    """The store returns exactly what it returned after A's commit; nothing of B."""
    before = np.load(data / "before.npz")
    assert len(store) == int(before["count"]) == len(arrays["a"])
    np.testing.assert_array_equal(store.get(arrays["a_ids"]), before["vectors"])
    ids, scores = store.search(arrays["q"], k=k, probes="all")
    np.testing.assert_array_equal(ids, before["ids"])
    np.testing.assert_array_equal(scores, before["scores"])
    assert not np.isin(arrays["b_ids"].astype(np.int64), ids).any()
    for i in arrays["b_ids"][[0, len(arrays["b_ids"]) // 2, -1]]:
        with pytest.raises(IdNotFoundError):
            store.get([i])


def assert_holds_a_and_b(store: asteria_store.Store, data: Path, arrays: dict[str, np.ndarray],
                         *, k: int = K) -> None:
    before = np.load(data / "before.npz")
    assert len(store) == len(arrays["a"]) + len(arrays["b"])
    np.testing.assert_array_equal(store.get(arrays["a_ids"]), before["vectors"])
    np.testing.assert_allclose(store.get(arrays["b_ids"]), arrays["b"], atol=1e-6)
    ids, _ = store.search(arrays["q"], k=k, probes="all")
    everything = np.sort(np.concatenate([arrays["a_ids"], arrays["b_ids"]]).astype(np.int64))
    for row in ids:
        if k >= len(everything):
            np.testing.assert_array_equal(np.sort(row[row >= 0]), everything)
        else:
            assert np.isin(row, everything).all()


@pytest.mark.parametrize("point", list(POINTS))
def test_kill_during_ingest_leaves_old_or_new_state(tmp_path, python_child, point):
    path, data, arrays = make_data(tmp_path)
    committed, orphans = POINTS[point]
    run_until_killed(python_child, path, data, point)
    orphan_dirs = [path / "segments.zarr" / name for name in orphans]

    # Read-only: the store opens, verifies, and holds the old state (or, past the commit,
    # the new one); the orphan is reported, not an error, and left alone.
    with asteria_store.open(path, readonly=True) as store:
        report = store.verify()
        assert report.ok, report.problems
        assert report.orphans == orphans
        assert report.removed == []
        if committed:
            assert_holds_a_and_b(store, data, arrays)
        else:
            assert_holds_exactly_a(store, data, arrays)
        with pytest.raises(ReadOnlyError):
            store.verify(repair=True)
    assert all(d.is_dir() for d in orphan_dirs)

    # Writable, while another writer holds the lock: open leaves the orphan alone (it could
    # be that writer's segment); verify(repair=True), once the lock is free, removes it.
    holder = WriterLock(path)
    assert holder.try_acquire()
    try:
        store = asteria_store.open(path)
    finally:
        holder.release()
    with store:
        assert all(d.is_dir() for d in orphan_dirs)
        report = store.verify(repair=True)
        assert report.ok, report.problems
        assert report.orphans == orphans
        assert report.removed == orphans
        assert not any(d.exists() for d in orphan_dirs)
        report = store.verify()
        assert report.ok and report.orphans == []
        if committed:
            assert_holds_a_and_b(store, data, arrays)
        else:
            assert_holds_exactly_a(store, data, arrays)
            # Nothing of B was kept: neither its ids nor the counters it would have bumped.
            result = store.ingest(arrays["b"], ids=arrays["b_ids"])
            assert result.segment == 2
            assert_holds_a_and_b(store, data, arrays)
            assert store.verify().ok


def test_writable_open_removes_orphan_of_killed_ingest(tmp_path, python_child):
    path, data, arrays = make_data(tmp_path)
    run_until_killed(python_child, path, data, "written")
    orphan = path / "segments.zarr" / B_SEGMENT
    assert orphan.is_dir()
    with asteria_store.open(path) as store:  # no writer holds the lock: the orphan goes
        assert not orphan.exists()
        report = store.verify()
        assert report.ok and report.orphans == []
        assert_holds_exactly_a(store, data, arrays)


# Kill points of a long ingest (B: 100k rows, 98 chunks of 1024 rows), chosen by what the
# child reports rather than by seconds: its "wrote <n>" line after each chunk of B it
# writes, or its exit. Until every chunk is written B cannot be committed, so the store
# must hold exactly A; from the last chunk on, A or A and B.
KILL_STAGES = {"hashing": 0, "early writing": 3, "mid writing": 49, "every chunk written": 98, "after B": None}
_B_CHUNKS = 98


def _read_until(proc, line: str, timeout: float = 120.0) -> None:
    """Read the child's lines until ``line`` (each read waits for the child to print);
    fail if it exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no {line!r} from the child within {timeout} s"
        got = proc.stdout.readline()
        assert got, f"the child exited before {line!r}: {proc.communicate()}"
        if got == line + "\n":
            return


@pytest.mark.parametrize("stage", list(KILL_STAGES))
def test_kill_at_a_stage_of_a_long_ingest_leaves_old_or_new_state(tmp_path, python_child, stage):
    path, data, arrays = make_data(tmp_path, n_b=100_000, chunk_rows=1024)
    k = N_A + 10  # the whole of A; of A and B, a top-k
    proc = python_child(CHILD, path, data, "ready", k)
    lines = [proc.stdout.readline() for _ in range(2)]
    assert lines == ["A committed\n", "ready\n"], proc.communicate()
    need = KILL_STAGES[stage]
    if need is None:
        proc.wait(timeout=120)  # B's ingest and what follows it, to the end
    elif need:
        _read_until(proc, f"wrote {need}")
    proc.kill()
    out, err = proc.communicate(timeout=60)
    finished = "B done" in out
    assert proc.returncode in ((0, -signal.SIGKILL) if finished else (-signal.SIGKILL,)), err

    with asteria_store.open(path, readonly=True) as store:
        report = store.verify()
        assert report.ok, report.problems
        if need is not None and need < _B_CHUNKS:
            assert len(store) == N_A  # killed while writing B: it cannot have been committed
        if need is None:
            assert finished and len(store) == N_A + len(arrays["b"])
        if len(store) == N_A:
            assert not finished
            assert report.orphans in ([], [B_SEGMENT])
            assert_holds_exactly_a(store, data, arrays, k=k)
        else:  # B committed; the training that follows may have been killed (its segment)
            assert report.orphans in ([], ["seg-00000003"])
            assert_holds_a_and_b(store, data, arrays, k=k)
    with asteria_store.open(path) as store:
        assert store.verify().orphans == []


def test_kill_inside_delete_commit_deletes_nothing(tmp_path, python_child):
    path, data, arrays = make_data(tmp_path)
    run_until_killed(python_child, path, data, "deleting")
    with asteria_store.open(path, readonly=True) as store:
        report = store.verify()
        assert report.ok, report.problems
        assert report.orphans == []
        assert_holds_exactly_a(store, data, arrays)


WRITER = """
import sys
from pathlib import Path

import numpy as np

import asteria_store

path, data = sys.argv[1], Path(sys.argv[2])
with asteria_store.open(path) as store:
    store.ingest(np.load(data / "b.npy"), ids=np.load(data / "b_ids.npy"))
    print(len(store))
"""


def test_writer_killed_inside_commit_while_others_keep_store_open(tmp_path, python_child):
    """While this process keeps the store open, the LMDB lock file is not reset between
    writers: the next writer must recover the write lock the killed one held."""
    path, data, arrays = make_data(tmp_path)
    with asteria_store.open(path, readonly=True) as holder:
        run_until_killed(python_child, path, data, "committing")
        assert_holds_exactly_a(holder, data, arrays)
        proc = python_child(WRITER, path, data)
        out, err = proc.communicate(timeout=60)  # a lost write lock would hang here
        assert proc.returncode == 0, err
        assert int(out) == N_A + N_B
        assert_holds_a_and_b(holder, data, arrays)
        report = holder.verify()
        assert report.ok and report.orphans == []


KILLED_READER = """
import os, signal, sys

import asteria_store
from asteria_store.storage import catalog


def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


catalog.Catalog.locate = die  # called inside the read transaction of get()
asteria_store.open(sys.argv[1], readonly=True).get([7])
"""


def test_killed_reader_does_not_pin_catalog_pages(tmp_path, python_child):
    """A process killed inside a read transaction leaves its LMDB reader slot behind. While
    another process keeps the store open, that stale slot pins the snapshot it read, so no
    page freed by a later commit can be reused. The store must clear such slots (LMDB's
    mdb_reader_check) so that the catalog stays bounded."""
    path, _, arrays = make_data(tmp_path)
    with asteria_store.open(path) as store:
        store.ingest(arrays["a"], ids=arrays["a_ids"])
        env = store._catalog.env
        deletes = iter(arrays["a_ids"].tolist())

        def growth_over_commits() -> int:
            start = env.info()["last_pgno"]
            for _ in range(40):
                store.delete([next(deletes)])
            return env.info()["last_pgno"] - start

        growth_over_commits()  # warm up LMDB's free list
        baseline = growth_over_commits()
        proc = python_child(KILLED_READER, path)
        _, err = proc.communicate(timeout=60)
        if proc.returncode != -signal.SIGKILL:  # not an AssertionError: never an xfail
            pytest.fail(f"the reader was not killed: {err}")
        # A writable open and the next commits are where the store can clean up after
        # crashed processes (it removes their orphan segments there too).
        asteria_store.open(path).close()
        assert growth_over_commits() <= baseline + 8
