"""Only asteria errors: every failure a tester found leaking as a raw error, or hanging,
or misbehaving on careless input, one test each (issue: readers that are never wrong).

Rows 1-3, 5 and 7 of that list (reads across retrains, ``get`` racing a commit, retired
maps, read-only deployments, fork) are in test_readers.py; row 4 (silent corruption) in
test_checksums.py. Here: row 6 (raw errors) and row 8 (hostile or careless input).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import signal
from pathlib import Path
from types import SimpleNamespace

import lmdb
import numpy as np
import pytest
from asteria_store_cli.main import cli
from click.testing import CliRunner

import asteria_store
import asteria_store.write.pipeline as pipeline_mod
from asteria_store import (
    CorruptStoreError,
    DiskFullError,
    InvalidArgumentError,
    InvalidInputError,
)
from asteria_store.storage import segments as seglib
from asteria_store.storage.catalog import Catalog
from asteria_store.testing import clustered_vectors
from asteria_store.testing.faults import fail_on_call

DIM = 16


@pytest.fixture
def learned(small_learned: Path) -> Path:
    return small_learned  # conftest: 1,200 trained rows, dim 16, chunks of 256


def x(n: int, seed: int = 1) -> np.ndarray:
    return clustered_vectors(n, DIM, clusters=12, seed=seed)


# --- row 6: raw errors ------------------------------------------------------------------


def test_disk_full_during_ingest_is_one_line_and_changes_nothing(learned, disk_snapshot, monkeypatch) -> None:
    with asteria_store.open(learned) as store:
        before = disk_snapshot(learned)
        fail_on_call(monkeypatch, seglib.SegmentWriter, "write", 1,
                     OSError(errno.ENOSPC, "No space left on device"))
        with pytest.raises(OSError) as raised:  # `except OSError` keeps working
            store.ingest(x(500))
        assert isinstance(raised.value, DiskFullError)
        assert re.fullmatch(r"No space left on the device of .* while writing 500 rows \(about .* MiB needed, .* "
                            r"free after cleanup\)\. Free some space and retry; the store is unchanged\.",
                            str(raised.value))
        assert disk_snapshot(learned) == before


def test_disk_full_during_retrain_is_one_line_and_changes_nothing(learned, disk_snapshot, monkeypatch) -> None:
    with asteria_store.open(learned) as store:
        before = disk_snapshot(learned)
        fail_on_call(monkeypatch, seglib.SegmentWriter, "finish", 1, OSError(errno.ENOSPC, "No space left"))
        with pytest.raises(DiskFullError, match="while writing 1,200 rows"):
            store.train(epochs=1)
        assert disk_snapshot(learned) == before


def test_an_ingest_that_cannot_fit_is_refused_up_front(learned, disk_snapshot, monkeypatch) -> None:
    with asteria_store.open(learned) as store:
        before = disk_snapshot(learned)
        monkeypatch.setattr(pipeline_mod.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
        with pytest.raises(DiskFullError, match=r"writing 500 rows needs about 0\.0 MiB, 0\.0 MiB are free"):
            store.ingest(x(500))
        assert disk_snapshot(learned) == before


def damage_catalog(path: Path, db: str, key: bytes, value: bytes | None) -> None:
    """Write (or, with value None, delete) one raw key of one catalog database."""
    cat = Catalog(path / "catalog.lmdb")
    try:
        cat.write(lambda txn: txn.put(key, value, db=cat.dbs[db]) if value is not None
                  else txn.delete(key, db=cat.dbs[db]))
    finally:
        cat.close()


def test_a_damaged_segment_key_is_a_corrupt_store_error(learned) -> None:
    damage_catalog(learned, "segments", b"\x00\x01", b"{}")  # a 2-byte key where 4 are due
    with asteria_store.open(learned, readonly=True) as store:
        with pytest.raises(CorruptStoreError, match=r"is damaged \(error: unpack requires a buffer of 4 bytes\); "
                                                    r"run `asteria-store verify"):
            store.search(x(2), 5)


def test_a_missing_catalog_record_is_a_corrupt_store_error(learned) -> None:
    damage_catalog(learned, "meta", b"router", None)
    with pytest.raises(CorruptStoreError, match=r"is damaged \(KeyError: 'router'\)"):
        asteria_store.open(learned, readonly=True)
    result = CliRunner().invoke(cli, ["info", str(learned)])
    assert result.exit_code == 1
    assert result.output.startswith("Error: The catalog of ") and result.output.count("\n") == 1


def test_an_undecodable_catalog_value_is_a_corrupt_store_error(learned) -> None:
    damage_catalog(learned, "meta", b"count", b"{not json")
    with pytest.raises(CorruptStoreError, match="JSONDecodeError"):
        asteria_store.open(learned, readonly=True)


def test_an_lmdb_corruption_is_a_corrupt_store_error(learned, monkeypatch) -> None:
    with asteria_store.open(learned, readonly=True) as store:
        fail_on_call(monkeypatch, Catalog, "tombstones", 1, lmdb.CorruptedError("mdb_get: MDB_CORRUPTED"))
        store._view = None
        with pytest.raises(CorruptStoreError, match="CorruptedError: mdb_get: MDB_CORRUPTED"):
            store.get([1])


def test_a_damaged_model_header_is_a_corrupt_store_error(learned) -> None:
    model = next((learned / "model").iterdir())
    npy = sorted(model.glob("*.npy"))[0]
    raw = npy.read_bytes()
    end = raw.index(b"}")
    npy.write_bytes(raw[: end - 3] + b"((" + raw[end - 1 :])  # unbalanced: a TokenError in numpy
    with pytest.raises(CorruptStoreError, match=f"Cannot read the store's model file .*{npy.name}"):
        asteria_store.open(learned, readonly=True)


@pytest.mark.parametrize("shape", ["(4611686018427387904, 4611686018427387904)", "(-5, 16)", "(12, 16"])
def test_a_hostile_npy_header_is_an_invalid_input_error(tmp_path, learned, shape) -> None:
    path = tmp_path / "bad.npy"
    np.save(path, np.zeros((12, DIM), dtype=np.float32))
    raw = path.read_bytes()
    header = raw[10:].split(b"\n", 1)[0].decode("latin1")
    fixed = header.replace("(12, 16)", shape)
    fixed = fixed + " " * (len(header) - len(fixed)) if len(fixed) <= len(header) else fixed[: len(header)]
    path.write_bytes(raw[:10] + fixed.encode("latin1") + raw[10 + len(header) :])
    with asteria_store.open(learned) as store:
        with pytest.raises(InvalidInputError, match="not a valid .npy file"):
            store.ingest(path)


# --- row 8: hostile or careless input ---------------------------------------------------


@pytest.fixture
def alarm():
    """Fail instead of hanging forever (a FIFO with no writer would block a read)."""
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("blocked"))
    signal.alarm(20)
    yield
    signal.alarm(0)


def test_a_fifo_is_refused_not_read(tmp_path, learned, alarm) -> None:
    fifo = tmp_path / "vectors.npy"
    os.mkfifo(fifo)
    with asteria_store.open(learned) as store:
        with pytest.raises(InvalidInputError, match="not a regular file"):
            store.ingest(fifo)
        with pytest.raises(InvalidInputError, match="not a regular file"):
            store.search(fifo, 5)
    result = CliRunner().invoke(cli, ["query", str(learned), str(fifo)])
    assert result.exit_code == 1
    assert result.output == f"Error: Cannot read queries file {str(fifo)!r}: not a regular file.\n"


def test_a_huge_k_is_refused_before_allocating(learned) -> None:
    with asteria_store.open(learned, readonly=True) as store:
        with pytest.raises(InvalidArgumentError, match=r"k=1,000,000,000 is more than the 1,200 vectors"):
            store.search(x(1), k=10**9)
        with pytest.raises(InvalidArgumentError, match=r"search in smaller batches"):
            store.search(x(20_000), k=60_000)
        ids, scores = store.search(x(2), k=2000, probes="all")  # beyond the count: padded
        assert ids.shape == (2, 2000) and (ids[:, 1200:] == -1).all()


def test_automatic_ids_keep_working_next_to_the_largest_id(learned) -> None:
    top = 2**63 - 1
    with asteria_store.open(learned) as store:
        store.ingest(x(3), ids=[top, 1201, 1203])  # the counter (1200) stays: top + 1 cannot be an id
        res = store.ingest(x(4, seed=2))
        assert res.ids.tolist() == [1200, 1202, 1204, 1205]  # free ids from the counter on
        res = store.ingest(x(2, seed=3))
        assert res.ids.tolist() == [1206, 1207]
        assert len(store) == 1209
        assert store.get([top]).shape == (1, DIM)
        assert store.verify().ok


def test_killed_creates_leave_nothing_behind(tmp_path) -> None:
    stale = tmp_path / ".store.creating-dead"
    stale.mkdir()
    (stale / ".creating.lock").touch()  # its create was killed: nobody holds the lock
    live = tmp_path / ".store.creating-live"
    live.mkdir()
    fd = os.open(live / ".creating.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a create still running
    try:
        asteria_store.create(tmp_path / "store", dim=DIM).close()
        assert sorted(p.name for p in tmp_path.iterdir()) == [".store.creating-live", "store"]
    finally:
        os.close(fd)
    asteria_store.open(tmp_path / "store").close()  # a writable open cleans up too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_disk_full_during_create_leaves_nothing(tmp_path, monkeypatch) -> None:
    fail_on_call(monkeypatch, seglib, "create_root", 1, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(DiskFullError, match="No space left on the device of"):
        asteria_store.create(tmp_path / "store", dim=DIM)
    assert list(tmp_path.iterdir()) == []
