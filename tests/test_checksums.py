"""Checksummed data: a flipped byte in any chunk is found by ``verify``, with the ids of
the rows it holds, and no read returns a damaged value without an error once it has."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import asteria_store
from asteria_store import CorruptStoreError
from asteria_store.storage.segments import chunk_path

DIM = 16
N = 1200
CHUNK = 256


@pytest.fixture
def store_path(small_learned: Path) -> Path:
    """A learned store (vectors, ids, LRSQ codes) of N rows in one segment, chunks of CHUNK
    rows (conftest's ``small_learned``)."""
    return small_learned


def flip_byte(path: Path, array: str, chunk: int, offset: int = 100) -> None:
    f = chunk_path(path / "segments.zarr" / "seg-00000001", array, chunk)
    raw = bytearray(f.read_bytes())
    raw[offset] ^= 0x40
    f.write_bytes(bytes(raw))


def stored_ids(store: asteria_store.Store, rows: range) -> list[int]:
    reader = store._current_view().segments[1]
    return [int(i) for i in reader.ids(rows.start, rows.stop)]


def test_a_clean_store_verifies_every_chunk(store_path: Path) -> None:
    with asteria_store.open(store_path, readonly=True) as store:
        report = store.verify()
        assert report.ok, report.problems
        assert report.checked_chunks == 5 * 5  # vectors, ids, lrsq, lrsq_aux, sketch; 5 chunks each
        assert report.damaged == [] and report.notes == []
        assert store.verify(quick=True).checked_chunks == 0


@pytest.mark.parametrize("array", ["vectors", "ids", "lrsq", "lrsq_aux", "sketch"])
def test_verify_finds_a_flipped_byte_in_every_kind_of_chunk(store_path: Path, array: str) -> None:
    with asteria_store.open(store_path, readonly=True) as store:
        expected_ids = stored_ids(store, range(2 * CHUNK, 3 * CHUNK))
    flip_byte(store_path, array, 2)
    with asteria_store.open(store_path, readonly=True) as store:
        # Sampling alone misses damaged data (what checksums are for); quick still compares
        # every stored id with the catalog's id map.
        assert store.verify(quick=True).ok is (array != "ids")
        report = store.verify()
    assert not report.ok
    assert [(d["array"], d["chunk"], d["rows"]) for d in report.damaged] == [(array, 2, [512, 768])]
    # The ids come from the catalog's id map, right even when the ids chunk is the damaged one.
    assert report.damaged[0]["ids"] == expected_ids
    assert any(f"chunk 2 of {array} (rows 512-767) is damaged" in p for p in report.problems)


def test_rerank_refuses_a_damaged_sketch_chunk_once_verify_flagged_it(store_path: Path) -> None:
    with asteria_store.open(store_path, readonly=True) as store:
        query = store.get(stored_ids(store, range(2 * CHUNK, 2 * CHUNK + 1)))
        n_buckets = store.router.n_buckets
        assert store.search(query, 5, probes=n_buckets, rerank=20)[0].shape == (1, 5)
    flip_byte(store_path, "sketch", 2)
    with asteria_store.open(store_path) as store:
        assert [d["array"] for d in store.verify().damaged] == ["sketch"]
        with pytest.raises(CorruptStoreError, match="Chunk 2 of seg-00000001/sketch is damaged"):
            store.search(query, 5, probes=n_buckets, rerank=20)
        assert store.search(query, 5, probes=n_buckets)[0].shape == (1, 5)  # certified search reads no sketch


def test_reads_refuse_damaged_vectors_once_verify_flagged_them(store_path: Path) -> None:
    with asteria_store.open(store_path, readonly=True) as store:
        damaged_ids = stored_ids(store, range(CHUNK, 2 * CHUNK))
        other = stored_ids(store, range(0, 4))
        good = store.get(damaged_ids[:3])
    flip_byte(store_path, "vectors", 1, offset=0)  # the first value of row 256
    with asteria_store.open(store_path, readonly=True) as reader:
        assert not np.array_equal(reader.get(damaged_ids[:1]), good[:1])  # silent before verify
        with asteria_store.open(store_path) as writer:
            report = writer.verify()  # a writable handle records the damage in the catalog
            assert [d["chunk"] for d in report.damaged] == [1]
        # Every reader (this one opened before the verify) now refuses those rows...
        with pytest.raises(CorruptStoreError, match="Chunk 1 of seg-00000001/vectors is damaged"):
            reader.get(damaged_ids[:1])
        with pytest.raises(CorruptStoreError):
            reader.search(good[:1], 5, probes="all")
        # ... and still serves the others.
        assert reader.get(other).shape == (4, DIM)
    # Deleting the damaged rows lifts the refusal: no live row is left in the chunk.
    with asteria_store.open(store_path) as writer:
        writer.delete(damaged_ids)
        ids, _ = writer.search(good[:1], 5, probes="all")
        assert not set(ids[0].tolist()) & set(damaged_ids)
        report = writer.verify()
        assert report.ok, report.problems
        assert report.notes == ["seg-00000001: chunk 1 of vectors (rows 256-511) is damaged but holds only deleted rows"]
        writer.train(epochs=1)  # a retrain rewrites the live rows: the damage is gone
        assert writer.verify().notes == []


def test_a_read_only_verify_flags_damage_for_its_own_handle(store_path: Path) -> None:
    with asteria_store.open(store_path, readonly=True) as store:
        damaged_ids = stored_ids(store, range(0, 2))
    flip_byte(store_path, "vectors", 0)
    with asteria_store.open(store_path, readonly=True) as store, \
            asteria_store.open(store_path, readonly=True) as other:
        assert not store.verify().ok
        with pytest.raises(CorruptStoreError):
            store.get(damaged_ids)
        other.get(damaged_ids)  # not recorded in the catalog: other handles do not know
    with asteria_store.open(store_path) as writer:
        assert writer.verify(repair=True).damaged[0]["ids"][:2] == damaged_ids
    with asteria_store.open(store_path, readonly=True) as store:
        with pytest.raises(CorruptStoreError):
            store.get(damaged_ids)


def test_cli_verify_lists_damaged_ids_and_exits_1(store_path: Path) -> None:
    from asteria_store_cli.main import cli
    from click.testing import CliRunner

    flip_byte(store_path, "lrsq_aux", 4)
    result = CliRunner().invoke(cli, ["verify", str(store_path), "--quiet"])
    assert result.exit_code == 1
    assert "chunk 4 of lrsq_aux (rows 1024-1199) is damaged (checksum mismatch); it holds 176 live id(s)" in result.output
    assert "Run `asteria-store verify --repair`" in result.output
    quick = CliRunner().invoke(cli, ["verify", str(store_path), "--quick", "--quiet"])
    assert quick.exit_code == 0 and quick.output.endswith("OK\n")
