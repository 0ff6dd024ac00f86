"""Contract tests of the LMDB catalog: byte layout, range scans, ids, tombstones, map growth."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest

from asteria_store.storage import catalog as catalog_mod
from asteria_store.storage.catalog import (
    Catalog,
    pack_id,
    pack_ids,
    pack_loc,
    segment_name,
    unpack_loc,
)


@pytest.fixture
def catalog(tmp_path: Path):
    cat = Catalog(tmp_path / "catalog.lmdb", create=True)
    yield cat
    cat.close()


# --- key and value packing ------------------------------------------------------------------


def test_pack_ids_is_big_endian_so_byte_order_is_numeric_order() -> None:
    rng = np.random.default_rng(0)
    ids = np.concatenate([
        rng.integers(0, 2**63 - 1, size=500, dtype=np.uint64),
        np.array([0, 1, 255, 256, 257, 65535, 65536, 2**32, 2**63 - 1], dtype=np.uint64),
    ])
    keys = pack_ids(ids)
    assert all(len(k) == 8 for k in keys)
    assert keys == [struct.pack(">Q", int(i)) for i in ids]
    assert keys == [pack_id(int(i)) for i in ids]
    assert sorted(keys) == pack_ids(np.sort(ids))
    assert [struct.unpack(">Q", k)[0] for k in keys] == ids.tolist()
    # Signed input packs the same as unsigned.
    assert pack_ids(np.array([1, 2**40], dtype=np.int64)) == pack_ids(np.array([1, 2**40], dtype=np.uint64))
    assert pack_ids(np.array([], dtype=np.uint64)) == []


def test_locations_are_little_endian_and_round_trip() -> None:
    assert pack_loc(1, 2) == b"\x01\x00\x00\x00" + b"\x02" + b"\x00" * 7
    for seg, row in [(0, 0), (1, 2**40 + 3), (2**32 - 1, 2**64 - 1)]:
        assert unpack_loc(pack_loc(seg, row)) == (seg, row)


def test_segment_name() -> None:
    assert segment_name(1) == "seg-00000001"
    assert segment_name(123456789) == "seg-123456789"


# --- meta and segments ----------------------------------------------------------------------


def test_meta_is_json_and_segments_are_ordered(catalog: Catalog) -> None:
    def fill(txn):
        catalog.put_meta(txn, "count", 3)
        catalog.put_meta(txn, "config", {"dim": 4, "metric": "ip"})
        catalog.put_segment(txn, 10, {"rows": 5})
        catalog.put_segment(txn, 2, {"rows": 7, "chunk_rows": 256})

    catalog.write(fill)
    with catalog.read() as txn:
        assert catalog.get_meta(txn, "count") == 3
        assert catalog.get_meta(txn, "missing") is None
        assert catalog.get_meta(txn, "missing", 17) == 17
        assert catalog.all_meta(txn) == {"config": {"dim": 4, "metric": "ip"}, "count": 3}
        assert list(catalog.segments(txn).items()) == [(2, {"rows": 7, "chunk_rows": 256}), (10, {"rows": 5})]
    dump = catalog.dump()
    assert dump["meta"] == [(b"config", b'{"dim": 4, "metric": "ip"}'), (b"count", b"3")]
    assert [k for k, _ in dump["segments"]] == [b"\x00\x00\x00\x02", b"\x00\x00\x00\x0a"]


def test_a_failing_write_changes_nothing(catalog: Catalog) -> None:
    catalog.write(lambda txn: catalog.put_meta(txn, "count", 1))
    before = catalog.dump()

    def half(txn):
        catalog.put_meta(txn, "count", 2)
        catalog.put_ids(txn, 1, np.arange(5, dtype=np.uint64))
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        catalog.write(half)
    assert catalog.dump() == before


# --- bucket extents -------------------------------------------------------------------------

# Neighbouring buckets whose big-endian keys share leading bytes with bucket 1 or 257,
# plus buckets that share the low byte (1 and 2**56 + 1, 2**8 + 1 and 2**16 + 2**8 + 1).
BUCKETS_SEG1 = [0, 1, 2, 256, 257, 2**16 + 257, 2**56 + 1, 2**63 - 1]
BUCKETS_SEG2 = [1, 257, 2**56]


@pytest.fixture
def extents_catalog(catalog: Catalog) -> Catalog:
    def fill(txn):
        n = len(BUCKETS_SEG1)
        catalog.put_extents(txn, 1, np.array(BUCKETS_SEG1, dtype=np.uint64),
                            np.arange(n) * 10, np.full(n, 10))
        catalog.put_extents(txn, 2, np.array(BUCKETS_SEG2, dtype=np.uint64),
                            np.array([0, 3, 4]), np.array([3, 1, 9]))
        # A third segment with a segment id sorting after the others (big-endian u32).
        catalog.put_extents(txn, 300, np.array([1], dtype=np.uint64), np.array([0]), np.array([2]))

    catalog.write(fill)
    return catalog


def test_extents_range_scan_returns_only_the_bucket_asked_for(extents_catalog: Catalog) -> None:
    cat = extents_catalog
    with cat.read() as txn:
        assert cat.extents(txn, 1) == [(1, 10, 10), (2, 0, 3), (300, 0, 2)]
        assert cat.extents(txn, 257) == [(1, 40, 10), (2, 3, 1)]
        assert cat.extents(txn, 256) == [(1, 30, 10)]
        assert cat.extents(txn, 0) == [(1, 0, 10)]
        assert cat.extents(txn, 2**56) == [(2, 4, 9)]
        assert cat.extents(txn, 2**56 + 1) == [(1, 60, 10)]
        assert cat.extents(txn, 2**16 + 257) == [(1, 50, 10)]
        assert cat.extents(txn, 2**63 - 1) == [(1, 70, 10)]
        # Empty buckets: between keys, and past the last key.
        for empty in (3, 258, 2**16, 2**56 + 2, 2**63, 2**64 - 1):
            assert cat.extents(txn, empty) == []


def test_extents_byte_layout_and_iteration(extents_catalog: Catalog) -> None:
    cat = extents_catalog
    raw = cat.dump()["buckets"]
    assert len(raw) == len(BUCKETS_SEG1) + len(BUCKETS_SEG2) + 1
    assert all(len(k) == 12 and len(v) == 16 for k, v in raw)
    assert (struct.pack(">QI", 257, 2), struct.pack("<QQ", 3, 1)) in raw
    assert [k for k, _ in raw] == sorted(k for k, _ in raw)
    with cat.read() as txn:
        rows = list(cat.iter_extents(txn))
    assert [r[:2] for r in rows] == sorted(
        [(b, 1) for b in BUCKETS_SEG1] + [(b, 2) for b in BUCKETS_SEG2] + [(1, 300)]
    )
    assert (257, 2, 3, 1) in rows


# --- ids and tombstones ---------------------------------------------------------------------


def test_put_ids_locate_and_existing_ids(catalog: Catalog) -> None:
    catalog.write(lambda txn: catalog.put_ids(txn, 1, np.array([30, 10, 20], dtype=np.uint64)))
    catalog.write(lambda txn: catalog.put_ids(txn, 2, np.array([2**62, 5], dtype=np.uint64)))
    with catalog.read() as txn:
        found, segs, rows = catalog.locate(txn, np.array([20, 99, 30, 5, 2**62], dtype=np.uint64))
        np.testing.assert_array_equal(found, [True, False, True, True, True])
        np.testing.assert_array_equal(segs, [1, 0, 1, 2, 2])
        np.testing.assert_array_equal(rows, [2, 0, 0, 1, 0])
        existing = catalog.existing_ids(txn, np.array([99, 30, 10, 7, 2**62], dtype=np.uint64))
        assert existing.dtype == np.uint64
        assert existing.tolist() == [10, 30, 2**62]
        assert catalog.existing_ids(txn, np.array([1, 2], dtype=np.uint64)).tolist() == []
        assert list(catalog.iter_ids(txn)) == [(5, 2, 1), (10, 1, 1), (20, 1, 2), (30, 1, 0), (2**62, 2, 0)]
    raw = dict(catalog.dump()["ids"])
    assert raw[struct.pack(">Q", 20)] == struct.pack("<IQ", 1, 2)


def test_delete_ids_leaves_tombstones(catalog: Catalog) -> None:
    catalog.write(lambda txn: catalog.put_ids(txn, 1, np.arange(100, 110, dtype=np.uint64)))
    catalog.write(lambda txn: catalog.put_ids(txn, 3, np.arange(200, 205, dtype=np.uint64)))
    with catalog.read() as txn:
        assert catalog.tombstones(txn) == {}
        doomed = np.array([107, 101, 204, 109], dtype=np.uint64)
        _, segs, rows = catalog.locate(txn, doomed)
    catalog.write(lambda txn: catalog.delete_ids(txn, doomed, segs, rows))
    with catalog.read() as txn:
        found, _, _ = catalog.locate(txn, np.array([107, 101, 204, 109, 100], dtype=np.uint64))
        np.testing.assert_array_equal(found, [False, False, False, False, True])
        tomb = catalog.tombstones(txn)
        assert sorted(tomb) == [1, 3]
        assert tomb[1].dtype == np.int64
        np.testing.assert_array_equal(tomb[1], [1, 7, 9])  # sorted rows
        np.testing.assert_array_equal(tomb[3], [4])
        assert len(list(catalog.iter_ids(txn))) == 11
    raw = dict(catalog.dump()["tombstones"])
    assert raw[struct.pack(">IQ", 1, 7)] == struct.pack("<Q", 107)
    # A deleted id may be put again (in a new segment).
    catalog.write(lambda txn: catalog.put_ids(txn, 4, np.array([107], dtype=np.uint64)))
    with catalog.read() as txn:
        assert catalog.locate(txn, np.array([107], dtype=np.uint64))[1].tolist() == [4]


# --- environment cache and map growth -------------------------------------------------------


def test_one_shared_environment_per_path(tmp_path: Path) -> None:
    path = tmp_path / "c"
    key = os.path.realpath(path)
    a = Catalog(path, create=True)
    b = Catalog(tmp_path / "." / "c")  # another spelling of the same path
    try:
        assert a.env is b.env
        a.write(lambda txn: a.put_meta(txn, "x", 1))
        a.close()
        a.close()  # idempotent: releases its share once
        with b.read() as txn:  # still open for b
            assert b.get_meta(txn, "x") == 1
        assert key in catalog_mod._envs
    finally:
        b.close()
    assert key not in catalog_mod._envs


def test_write_grows_the_map_when_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(catalog_mod, "INITIAL_MAP_SIZE", 64 * 1024)
    path = tmp_path / "small"  # a fresh path: a fresh environment with the small map
    cat = Catalog(path, create=True)
    try:
        assert cat.env.info()["map_size"] == 64 * 1024
        ids = np.arange(20_000, dtype=np.uint64) * 7  # ~1 MiB of keys and values
        calls = []

        def put(txn):
            calls.append(1)
            cat.put_ids(txn, 1, ids)
            cat.put_meta(txn, "count", len(ids))

        cat.write(put)
        assert len(calls) > 1  # ran out of map at least once, and was rerun
        assert cat.env.info()["map_size"] >= 1024 * 1024
        with cat.read() as txn:
            found, segs, rows = cat.locate(txn, ids[::997])
            assert found.all() and (segs == 1).all()
            np.testing.assert_array_equal(rows, np.arange(0, 20_000, 997))
            assert cat.get_meta(txn, "count") == 20_000
            assert sum(1 for _ in cat.iter_ids(txn)) == 20_000
    finally:
        cat.close()
    # Reopened with the same small initial map, the environment adopts the file's size.
    cat = Catalog(path)
    try:
        assert cat.env.info()["map_size"] >= 1024 * 1024
        with cat.read() as txn:
            assert sum(1 for _ in cat.iter_ids(txn)) == 20_000
        cat.write(lambda txn: cat.put_ids(txn, 2, np.arange(1, 5000, 7, dtype=np.uint64) * 7 + 3))
    finally:
        cat.close()
