"""Concurrency across processes: readers see whole commits only; writers take turns.

Readers are child interpreters with the store opened read-only, searching in a loop with
``k`` above the store's size, so every result row is the whole live id set. Each result is
recorded as a digest of that set; the parent, which writes meanwhile, checks that every
digest is one of the states it committed (never a mix), in commit order.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import time
from pathlib import Path

import numpy as np
import pytest

import asteria_store
from asteria_store import IdNotFoundError
from asteria_store.storage import catalog, segments
from asteria_store.testing import clustered_vectors

DIM = 16
BITS = 4  # 16 buckets: probes=16 visits every bucket, so probed search also sees all rows
N_A = 2000
N_BATCH = 3000
K = 16384
#: A small initial LMDB map for the readers test, so that the writer grows it meanwhile.
SMALL_MAP = 128 * 1024

READER = """
import hashlib, json, os, sys, time
from pathlib import Path

import numpy as np

import asteria_store
from asteria_store.storage import catalog

path, queries, out, stop, k, n_buckets, map_size = sys.argv[1:8]
k, n_buckets = int(k), int(n_buckets)
catalog.INITIAL_MAP_SIZE = int(map_size)
store = asteria_store.open(path, readonly=True)
q = np.load(queries)


def observe():
    # One search per mode; per search, the digest of each query's result id set.
    seen = []
    for probes in ("all", n_buckets):
        ids, _ = store.search(q, k=k, probes=probes)
        seen.append([hashlib.sha256(np.sort(row[row >= 0]).tobytes()).hexdigest() for row in ids])
    return seen


observations = [observe()]
problems = []
print(len(observations), flush=True)  # progress the writer waits on (stdout)
deadline = time.monotonic() + 600  # a guard only: the stop file ends it
while not os.path.exists(stop) and time.monotonic() < deadline:
    observations.append(observe())
    print(len(observations), flush=True)
    if len(observations) % 4 == 0:  # a read-only verify must not block on, or trip over, the writer
        problems.extend(store.verify().problems)
observations.append(observe())  # after the stop file: the final state
Path(out).write_text(json.dumps({"observations": observations, "problems": problems}))
"""

WRITER = """
import json, sys
from pathlib import Path

import numpy as np

import asteria_store
path, data, timeout = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
store = asteria_store.open(path, lock_timeout=None if timeout == "default" else float(timeout))
print("go", flush=True)
try:
    # progress on: a writer that waits for the lock says so on stderr (after ~1 s)
    result = store.ingest(np.load(data / "b.npy"), ids=np.load(data / "b_ids.npy"), progress=True)
    print(json.dumps({"ok": True, "rows": result.rows}))
except asteria_store.StoreLockedError as exc:
    print(json.dumps({"ok": False, "error": type(exc).__name__, "message": str(exc)}))
store.close()
"""


def digest(ids: np.ndarray) -> str:
    return hashlib.sha256(np.sort(ids.astype(np.int64)).tobytes()).hexdigest()


class Progress:
    """A reader's progress: the count of searches it prints on stdout, one per line,
    waited on with ``select`` (blocking until a line comes), with a deadline."""

    def __init__(self, proc):
        self.proc = proc
        self.searches = 0
        self._partial = b""

    def now(self) -> int:
        """The searches it has finished by now (every line already written is read)."""
        while self._read(0):
            pass
        return self.searches

    def wait(self, n: int, *, timeout: float = 60.0) -> None:
        """Block until the reader has finished ``n`` searches; fail at the deadline or if it
        exits first."""
        deadline = time.monotonic() + timeout
        while self.searches < n:
            left = deadline - time.monotonic()
            assert left > 0, f"the reader never finished {n} searches (it did {self.searches})"
            self._read(left)

    def _read(self, timeout: float) -> bool:
        """Read what the reader wrote, waiting up to ``timeout`` s for it; whether any came."""
        fd = self.proc.stdout.fileno()
        if not select.select([fd], [], [], timeout)[0]:
            return False
        chunk = os.read(fd, 65536)
        assert chunk, f"the reader exited: {self.proc.communicate()}"
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        if lines:
            self.searches = int(lines[-1])
        return True


def test_readers_see_whole_commits_only(tmp_path, python_child, monkeypatch):
    """Two reader processes search while this one ingests four batches and deletes some
    ids. The catalog starts with a small LMDB map that these commits grow several times,
    so the readers also have to follow the map's growth. Now and then the readers also run
    a read-only verify, which must find nothing wrong mid-ingest."""
    monkeypatch.setattr(catalog, "INITIAL_MAP_SIZE", SMALL_MAP)
    rng = np.random.default_rng(0)
    path = tmp_path / "store"
    store = asteria_store.create(path, dim=DIM, bits=BITS, chunk_rows=1024)
    live = np.arange(N_A, dtype=np.uint64)
    store.ingest(clustered_vectors(N_A, DIM, clusters=20, seed=1), ids=live)
    queries = tmp_path / "q.npy"
    np.save(queries, clustered_vectors(3, DIM, clusters=20, seed=2))
    states = [digest(live)]

    stop = tmp_path / "stop"
    readers = []
    for r in range(2):
        out = tmp_path / f"reader{r}.json"
        proc = python_child(READER, path, queries, out, stop, K, 2**BITS, SMALL_MAP)
        readers.append((proc, out, Progress(proc)))
    for _, _, progress in readers:
        progress.wait(1)

    # Commits while the readers search: four ingests and a delete, with pauses so that
    # the readers also catch the states in between.
    next_id = 10_000
    for step in range(5):
        if step == 3:
            gone = rng.choice(live, size=300, replace=False)
            store.delete(gone)
            live = np.setdiff1d(live, gone)
        else:
            new = np.arange(next_id, next_id + N_BATCH, dtype=np.uint64)
            next_id += N_BATCH
            store.ingest(clustered_vectors(N_BATCH, DIM, clusters=20, seed=10 + step), ids=new)
            live = np.concatenate([live, new])
        states.append(digest(live))
        # each reader finishes a search begun after this commit before the next one
        for _, _, progress in readers:
            progress.wait(progress.now() + 2)
    assert len(store) == len(live) < K
    assert store._catalog.env.info()["map_size"] >= 4 * SMALL_MAP
    stop.touch()

    for proc, out, _ in readers:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        recorded = json.loads(out.read_text())
        assert recorded["problems"] == []
        observations = recorded["observations"]
        last = 0
        for observation in observations:
            for search in observation:
                # One search: every query saw the same, whole, committed state...
                assert len(set(search)) == 1
                assert search[0] in states, "a reader saw a state that was never committed"
                # ... and never an older one than a search before it.
                index = states.index(search[0])
                assert index >= last
                last = index
        # The first search ran before any commit, the last after all of them.
        assert states.index(observations[0][0][0]) == 0
        assert states.index(observations[-1][-1][0]) == len(states) - 1
    report = store.verify()
    assert report.ok, report.problems
    store.close()


def make_writer_data(tmp_path: Path, n: int) -> tuple[Path, np.ndarray, np.ndarray]:
    data = tmp_path / "data"
    data.mkdir()
    b = clustered_vectors(n, DIM, clusters=20, seed=5)
    b_ids = np.arange(n, dtype=np.uint64) + 1_000_000
    np.save(data / "b.npy", b)
    np.save(data / "b_ids.npy", b_ids)
    return data, b, b_ids


@pytest.mark.parametrize("lock_timeout", ["default", "0.2"])
def test_second_writer_waits_or_raises_locked(tmp_path, python_child, monkeypatch, lock_timeout):
    """Writer 2 starts ingesting while this process is mid-ingest, holding the lock. With the
    default lock timeout it waits and succeeds once the lock is free; with a short one it
    raises StoreLockedError and adds nothing. Either way the store stays consistent."""
    path = tmp_path / "store"
    store = asteria_store.create(path, dim=DIM, bits=BITS, chunk_rows=256)
    a = clustered_vectors(N_A, DIM, clusters=20, seed=1)
    a_ids = np.arange(N_A, dtype=np.uint64)
    store.ingest(a, ids=a_ids)
    data, b, b_ids = make_writer_data(tmp_path, 1000)
    c = clustered_vectors(1000, DIM, clusters=20, seed=6)
    c_ids = np.arange(1000, dtype=np.uint64) + 2_000_000

    writer2 = []
    original_write = segments.SegmentWriter.write

    def write_with_rival(self, *args, **kwargs):
        if not writer2:  # first window of C: start writer 2 while we hold the lock
            proc = python_child(WRITER, path, data, lock_timeout)
            writer2.append(proc)
            assert proc.stdout.readline() == "go\n", proc.communicate()
            if lock_timeout == "default":  # it says it waits for the lock we hold
                for line in iter(proc.stderr.readline, ""):
                    if "waiting for another process writing" in line:
                        break
                else:
                    raise AssertionError(proc.communicate())
            else:
                proc.wait(timeout=60)  # it gives up while we still hold the lock
        return original_write(self, *args, **kwargs)

    monkeypatch.setattr(segments.SegmentWriter, "write", write_with_rival)
    store.ingest(c, ids=c_ids)
    monkeypatch.undo()
    out, err = writer2[0].communicate(timeout=60)
    assert writer2[0].returncode == 0, err
    result = json.loads(out.splitlines()[-1])

    if lock_timeout == "default":
        assert result == {"ok": True, "rows": len(b)}
        expected = [(a, a_ids), (c, c_ids), (b, b_ids)]
    else:
        assert result["error"] == "StoreLockedError"
        assert result["message"] == (
            f"Another process is writing to {str(path)!r} (waited 0.2 s for its writer lock). "
            "Retry when it is done."
        )
        expected = [(a, a_ids), (c, c_ids)]
        for i in b_ids[[0, -1]]:
            with pytest.raises(IdNotFoundError):
                store.get([i])
    assert len(store) == sum(len(x) for x, _ in expected)
    for x, ids in expected:
        np.testing.assert_allclose(store.get(ids), x, atol=1e-6)
    report = store.verify()
    assert report.ok, report.problems
    assert report.orphans == []
    store.close()


def test_two_writer_processes_both_succeed(tmp_path, python_child):
    """Two processes ingesting at the same time, no hooks: they take turns. (A sign store:
    on a learned one the first ingest also trains under the writer lock, which on a loaded
    machine outlasts the second writer's 30 s wait; issue 10 moves training out of the lock.)"""
    path = tmp_path / "store"
    asteria_store.create(path, dim=DIM, bits=BITS, chunk_rows=1024, router="sign").close()
    batches = []
    for w in range(2):
        data = tmp_path / f"data{w}"
        data.mkdir()
        x = clustered_vectors(50_000, DIM, clusters=20, seed=20 + w)
        ids = np.arange(50_000, dtype=np.uint64) + 1_000_000 * (w + 1)
        np.save(data / "b.npy", x)
        np.save(data / "b_ids.npy", ids)
        batches.append((data, x, ids))
    procs = [python_child(WRITER, path, data, "default") for data, _, _ in batches]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert json.loads(out.splitlines()[-1]) == {"ok": True, "rows": 50_000}
    with asteria_store.open(path, readonly=True) as store:
        report = store.verify()
        assert report.ok, report.problems
        assert report.orphans == []
        assert len(store) == 100_000
        for _, x, ids in batches:
            np.testing.assert_allclose(store.get(ids[::97]), x[::97], atol=1e-6)
        assert store.info()["segments"] == 2
