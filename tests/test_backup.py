"""``backup``: a consistent copy of a live store, whatever commits while it copies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import asteria_store
from asteria_store import backup as backup_mod
from asteria_store.errors import InvalidArgumentError, StoreExistsError
from asteria_store.testing import clustered_vectors
from asteria_store_cli.main import cli

DIM = 16


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    """Two ingests with metadata and string ids, some deletes (trained at the first)."""
    path = tmp_path / "store"
    x = clustered_vectors(1500, DIM, clusters=12, seed=0)
    with asteria_store.create(path, dim=DIM, chunk_rows=256) as s:
        s.ingest(x[:1000], ids=[f"r{i}" for i in range(1000)], metadata={"n": np.arange(1000)})
        s.ingest(x[1000:], ids=[f"r{i}" for i in range(1000, 1500)], metadata={"n": np.arange(1000, 1500)})
        s.delete([f"r{i}" for i in range(0, 1500, 9)])
    return path


def contents(path: Path) -> tuple:
    with asteria_store.open(path, readonly=True) as s:
        ids = s.ids()
        return ids.tolist(), s.get(ids), s.fetch(ids).to_pydict(), s.search(clustered_vectors(4, DIM, seed=5), 10)


def test_a_backup_opens_verifies_and_holds_what_the_store_held(store_path: Path, tmp_path: Path) -> None:
    before = contents(store_path)
    with asteria_store.open(store_path) as s:
        segments = s.info()["segments"]
        result = s.backup(tmp_path / "copy")
        s.ingest(clustered_vectors(10, DIM, seed=9), ids=[f"late{i}" for i in range(10)])  # after: not in it
    assert result.rows == len(before[0]) and result.segments == segments
    with asteria_store.open(tmp_path / "copy") as copy:
        assert copy.verify().ok
        assert copy.id_kind == "string" and copy.info()["columns"] == {"n": "int64"}
    after = contents(tmp_path / "copy")
    assert after[0] == before[0]
    np.testing.assert_array_equal(after[1], before[1])
    assert after[2] == before[2]
    assert after[3][0].tolist() == before[3][0].tolist()


def test_a_compaction_during_the_copy_changes_nothing_in_it(store_path: Path, tmp_path: Path, monkeypatch) -> None:
    """A writer compacts (retiring every segment the copy is reading) between two files of
    the copy: the copy still holds the snapshot it began with, whole."""
    before = contents(store_path)
    with asteria_store.open(store_path, readonly=True) as s:
        segments = s.info()["segments"]
    original = backup_mod._copy
    compacted = []

    def copy_then_compact(src, dst, bar):
        n = original(src, dst, bar)
        if not compacted:
            with asteria_store.open(store_path) as writer:
                compacted.append(writer.compact().segments_before)
                writer.delete(["r1"])
        return n

    monkeypatch.setattr(backup_mod, "_copy", copy_then_compact)
    with asteria_store.open(store_path, readonly=True) as s:
        s.backup(tmp_path / "copy")
    assert compacted == [segments]
    with asteria_store.open(tmp_path / "copy") as copy:
        assert copy.verify().ok and copy.info()["segments"] == segments
        assert copy.info()["deleted"] > 0  # the source's compaction dropped them; the copy kept its snapshot
    after = contents(tmp_path / "copy")
    assert after[0] == before[0] and after[2] == before[2]
    np.testing.assert_array_equal(after[1], before[1])


def test_a_failed_backup_leaves_nothing(store_path: Path, tmp_path: Path, monkeypatch) -> None:
    def fail(src, dst, bar):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(backup_mod, "_copy", fail)
    with asteria_store.open(store_path, readonly=True) as s:
        with pytest.raises(asteria_store.AsteriaError):
            s.backup(tmp_path / "copy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_backup_refuses_an_existing_or_nested_destination(store_path: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    with asteria_store.open(store_path, readonly=True) as s:
        with pytest.raises(StoreExistsError, match="it already exists"):
            s.backup(tmp_path / "taken")
        with pytest.raises(InvalidArgumentError, match="into itself"):
            s.backup(store_path / "inside")
        with pytest.raises(InvalidArgumentError, match="its directory does not exist"):
            s.backup(tmp_path / "no" / "copy")


def test_cli_backup(store_path: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["backup", str(store_path), str(tmp_path / "copy"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("Backed up 1,333 vectors (")
    res = CliRunner().invoke(cli, ["verify", str(tmp_path / "copy"), "--quiet"])
    assert res.exit_code == 0 and res.output.strip().endswith("OK")
