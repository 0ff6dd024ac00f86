"""Writes are atomic: an error midway leaves the store exactly as it was.

"Exactly" means byte for byte: every key and value of every LMDB database, and every file
and directory under ``segments.zarr/`` and ``model/`` (with its sha256). In particular an
ingest that fails after it began writing its segment removes that segment's directory
itself; it does not leave an orphan for the next open or ``verify --repair``.
"""

from __future__ import annotations

import numpy as np
import pytest

import asteria_store
import asteria_store.write.pipeline as pipeline_mod
from asteria_store import (
    DimensionMismatchError,
    DuplicateIdError,
    IdNotFoundError,
    InvalidInputError,
    ReadOnlyError,
)
from asteria_store.storage import catalog as catalog_mod
from asteria_store.storage import segments
from asteria_store.testing import clustered_vectors
from asteria_store.testing.faults import fail_on_call

DIM = 8
N = 500


class Boom(RuntimeError):
    pass


@pytest.fixture
def store(tmp_path):
    """A store with two segments and a tombstone: the state every failure must keep."""
    s = asteria_store.create(tmp_path / "store", dim=DIM, bits=3, chunk_rows=64, router="sign")
    s.ingest(clustered_vectors(N, DIM, clusters=10, seed=1))
    s.ingest(clustered_vectors(N, DIM, clusters=10, seed=2))
    s.delete([3, 600])
    yield s
    s.close()


def new_vectors(n: int = 2000) -> np.ndarray:
    return clustered_vectors(n, DIM, clusters=10, seed=3)


def count_calls(monkeypatch, owner, name: str) -> list[int]:
    """Count the calls of ``owner.name``; return the counter."""
    original = getattr(owner, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def assert_still_usable(store) -> None:
    """After the failure the store works normally, and reuses the failed segment number."""
    expected_segment = store.info()["segments"] + 1
    n = len(store)
    result = store.ingest(new_vectors(100))
    assert result.segment == expected_segment
    assert len(store) == n + 100
    report = store.verify()
    assert report.ok, report.problems
    assert report.orphans == []


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_value_in_last_block(store, disk_snapshot, monkeypatch, bad):
    x = new_vectors()
    x[-1, DIM - 1] = bad
    monkeypatch.setattr(pipeline_mod, "_HASH_BLOCK_ROWS", 64)
    calls = count_calls(monkeypatch, store._router, "keys")
    before = disk_snapshot(store.path)
    with pytest.raises(InvalidInputError, match="first in row 1999"):
        store.ingest(x)
    assert calls[0] == len(x) // 64  # every block before the last was hashed
    assert disk_snapshot(store.path) == before
    assert_still_usable(store)


@pytest.mark.parametrize("ids", ["within_batch", "already_stored"])
def test_duplicate_ids(store, disk_snapshot, ids):
    given = np.arange(5000, 5000 + 2000, dtype=np.uint64)
    if ids == "within_batch":
        given[-1] = given[0]
    else:
        given[-1] = 7  # id 7 is live in the first segment
    before = disk_snapshot(store.path)
    with pytest.raises(DuplicateIdError):
        store.ingest(new_vectors(), ids=given)
    assert disk_snapshot(store.path) == before
    assert_still_usable(store)


@pytest.mark.parametrize(
    ("vectors", "ids", "error"),
    [
        (np.ones((10, DIM + 1), np.float32), None, DimensionMismatchError),
        (np.ones((10, DIM), np.float32), np.arange(9), InvalidInputError),
        (np.ones((10, DIM), np.float32), -np.arange(10), InvalidInputError),
        (np.ones((10, DIM), np.float32), np.arange(10, dtype=np.uint64) + np.uint64(2**63),
         InvalidInputError),
        (np.zeros((10, DIM), np.float32), None, InvalidInputError),  # zero vector, cosine
    ],
    ids=["wrong_dim", "ids_length", "negative_ids", "ids_too_big", "zero_vector"],
)
def test_invalid_input(store, disk_snapshot, vectors, ids, error):
    before = disk_snapshot(store.path)
    with pytest.raises(error):
        store.ingest(vectors, ids=ids)
    assert disk_snapshot(store.path) == before
    assert_still_usable(store)


@pytest.mark.parametrize("exc", [Boom("disk full"), KeyboardInterrupt()],
                         ids=["error", "interrupt"])
def test_error_while_writing_segment(store, disk_snapshot, monkeypatch, exc):
    monkeypatch.setattr(pipeline_mod, "_WRITE_WINDOW_BYTES", 64 * DIM * 4)  # one chunk per write
    calls = fail_on_call(monkeypatch, segments.SegmentWriter, "write", 3, exc)
    before = disk_snapshot(store.path)
    with pytest.raises(type(exc)):
        store.ingest(new_vectors())
    assert calls[0] == 3  # two windows were on disk when it failed
    assert disk_snapshot(store.path) == before  # ... and are gone: no orphan left
    monkeypatch.undo()
    assert_still_usable(store)


def test_progress_callback_cancels_while_writing(store, disk_snapshot, monkeypatch):
    """A caller cancels from its progress callback (public API, no patching of internals)."""
    monkeypatch.setattr(pipeline_mod, "_WRITE_WINDOW_BYTES", 64 * DIM * 4)
    seen = []

    def progress(done, total, desc):
        seen.append((desc, done))
        if desc == "writing" and done >= 256:
            raise Boom("cancelled by the caller")

    before = disk_snapshot(store.path)
    with pytest.raises(Boom):
        store.ingest(new_vectors(), progress=progress)
    assert seen[-1] == ("writing", 256)
    assert disk_snapshot(store.path) == before
    assert_still_usable(store)


def test_error_after_segment_is_written(store, disk_snapshot, monkeypatch):
    disk_full = OSError(28, "No space left on device")
    fail_on_call(monkeypatch, segments.SegmentWriter, "finish", 1, disk_full)
    before = disk_snapshot(store.path)
    with pytest.raises(OSError):
        store.ingest(new_vectors())
    assert disk_snapshot(store.path) == before
    monkeypatch.undo()
    assert_still_usable(store)


@pytest.mark.parametrize("method", ["put_ids", "put_extents", "put_segment"])
def test_error_inside_commit_transaction(store, disk_snapshot, monkeypatch, method):
    fail_on_call(monkeypatch, catalog_mod.Catalog, method, 1, Boom("commit failed"))
    before = disk_snapshot(store.path)
    with pytest.raises(Boom):
        store.ingest(new_vectors())
    assert disk_snapshot(store.path) == before
    monkeypatch.undo()
    assert_still_usable(store)


def test_delete_with_one_missing_id_deletes_nothing(store, disk_snapshot):
    before = disk_snapshot(store.path)
    with pytest.raises(IdNotFoundError, match="Nothing was deleted"):
        store.delete([10, 11, 12, 999_999])
    with pytest.raises(IdNotFoundError):
        store.delete([10, 3])  # 3 is already deleted
    assert disk_snapshot(store.path) == before
    assert len(store.get([10, 11, 12])) == 3


def test_error_inside_delete_transaction(store, disk_snapshot, monkeypatch):
    fail_on_call(monkeypatch, catalog_mod.Catalog, "delete_ids", 1, Boom("commit failed"))
    before = disk_snapshot(store.path)
    with pytest.raises(Boom):
        store.delete([10, 11])
    assert disk_snapshot(store.path) == before


def test_readonly_store_refuses_every_write(store, disk_snapshot):
    path = store.path
    store.close()
    (path / "segments.zarr" / "seg-00000009").mkdir()  # an orphan repair would remove
    before = disk_snapshot(path)
    with asteria_store.open(path, readonly=True) as ro:
        message = f"The store {str(path)!r} was opened read-only."
        with pytest.raises(ReadOnlyError) as info:
            ro.ingest(new_vectors(10))
        assert str(info.value) == message
        with pytest.raises(ReadOnlyError):
            ro.delete([10])
        with pytest.raises(ReadOnlyError):
            ro.verify(repair=True)
        report = ro.verify()
        assert report.ok and report.orphans == ["seg-00000009"]
        assert len(ro.get([10])) == 1
    assert disk_snapshot(path) == before


# --- LMDB map growth --------------------------------------------------------------------

GROW = """
import sys

import numpy as np

import asteria_store
from asteria_store.storage import catalog

catalog.INITIAL_MAP_SIZE = 1 << 20
path, n = sys.argv[1], int(sys.argv[2])
with asteria_store.open(path) as store:
    rng = np.random.default_rng(1)
    ids = rng.permutation(n).astype(np.uint64) * 7 + 3  # unsorted, none of the parent's
    store.ingest(rng.standard_normal((n, 4)).astype(np.float32), ids=ids)
    np.save(sys.argv[3], ids)
    print(store._catalog.env.info()["map_size"])
"""


def test_catalog_map_grows_past_its_initial_size(tmp_path, monkeypatch, python_child):
    """With a 1 MiB initial map, one ingest of 150k ids in this process and one of 150k
    ids in another overflow it several times; a reader holding the store open throughout
    follows the file's growth."""
    monkeypatch.setattr(catalog_mod, "INITIAL_MAP_SIZE", 1 << 20)  # envs opened from now
    path = tmp_path / "store"
    n = 150_000
    store = asteria_store.create(path, dim=4, metric="ip", bits=8, router="sign")  # storage test: no training
    reader = asteria_store.open(path, readonly=True)  # shares this process's env
    assert store._catalog.env.info()["map_size"] == 1 << 20
    rng = np.random.default_rng(0)
    mine = np.arange(n, dtype=np.uint64) * 7
    x = rng.standard_normal((n, 4)).astype(np.float32)
    store.ingest(x, ids=mine)
    assert store._catalog.env.info()["map_size"] >= 4 << 20
    assert len(reader) == n

    proc = python_child(GROW, path, n, tmp_path / "theirs.npy")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert int(out) > store._catalog.env.info()["map_size"]  # it grew beyond our mapping
    theirs = np.load(tmp_path / "theirs.npy")

    assert len(reader) == 2 * n
    assert reader._catalog.env.info()["map_size"] >= int(out)  # it adopted the new size
    np.testing.assert_array_equal(reader.get(mine), x)
    assert len(reader.get(theirs)) == n
    store.ingest(x[:10], ids=np.arange(10, dtype=np.uint64) * 7 + 1)  # and we can still write
    assert len(store) == 2 * n + 10
    report = store.verify()
    assert report.ok, report.problems
    reader.close()
    store.close()
