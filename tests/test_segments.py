"""Contract tests of segments: any Zarr v3 reader sees what SegmentWriter wrote, chunk files
are raw little-endian rows of full size, and SegmentReader slices across chunk boundaries."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.storage import LocalStore

from asteria_store import CorruptStoreError
from asteria_store.storage import segments as seglib

N, DIM, CHUNK = 150, 8, 64  # three chunks, the last one partial (22 rows)
NAME = "seg-00000001"


def source(dtype: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((N, DIM)).astype(np.float32)
    ids = rng.permutation(10_000)[:N].astype(np.uint64) + np.uint64(2**40)
    return vectors, ids


@pytest.fixture(params=["float32", "float16"])
def written(request, tmp_path: Path):
    """A segment written window by window (chunk-aligned, like ingest), then finished."""
    dtype = request.param
    root = tmp_path / "segments.zarr"
    seglib.create_root(root)
    vectors, ids = source(dtype)
    writer = seglib.SegmentWriter(root, NAME, n=N, dim=DIM, dtype=dtype, chunk_rows=CHUNK)
    for start in range(0, N, CHUNK):
        writer.write(start, vectors[start : start + CHUNK], ids[start : start + CHUNK])
    writer.finish()
    expected = vectors.astype(dtype)
    return root, dtype, expected, ids


def test_zarr_reads_back_what_was_written(written) -> None:
    root, dtype, vectors, ids = written
    group = zarr.open_group(LocalStore(os.fspath(root), read_only=True), mode="r")
    assert list(group.group_keys()) == [NAME]
    arr = group[f"{NAME}/vectors"]
    assert arr.shape == (N, DIM)
    assert arr.chunks == (CHUNK, DIM)
    assert arr.dtype == np.dtype(dtype)
    assert arr.compressors == () and arr.filters == ()
    np.testing.assert_array_equal(arr[:], vectors)
    np.testing.assert_array_equal(group[f"{NAME}/ids"][:], ids)
    # zarr.open_array on the same store and path agrees.
    direct = zarr.open_array(LocalStore(os.fspath(root), read_only=True), path=f"{NAME}/ids", mode="r")
    assert direct.dtype == np.dtype("uint64") and direct.chunks == (CHUNK,)
    np.testing.assert_array_equal(direct[60:70], ids[60:70])


def test_chunk_files_are_raw_little_endian_rows_of_full_size(written) -> None:
    root, dtype, vectors, ids = written
    item = np.dtype(dtype).itemsize
    n_chunks = -(-N // CHUNK)
    assert sorted(os.listdir(root / NAME / "vectors" / "c")) == [str(i) for i in range(n_chunks)]
    for c in range(n_chunks):
        rows = slice(c * CHUNK, min(N, (c + 1) * CHUNK))
        filled = rows.stop - rows.start
        vec_file = root / NAME / "vectors" / "c" / str(c) / "0"
        id_file = root / NAME / "ids" / "c" / str(c)
        assert vec_file.stat().st_size == CHUNK * DIM * item  # the edge chunk is padded
        assert id_file.stat().st_size == CHUNK * 8
        raw = np.frombuffer(vec_file.read_bytes(), dtype=np.dtype(dtype).newbyteorder("<"))
        raw = raw.reshape(CHUNK, DIM)
        np.testing.assert_array_equal(raw[:filled], vectors[rows])
        assert not raw[filled:].any()  # padding is the fill value, 0
        raw_ids = np.frombuffer(id_file.read_bytes(), dtype="<u8")
        np.testing.assert_array_equal(raw_ids[:filled], ids[rows])


@pytest.mark.parametrize("start, stop", [(0, 150), (0, 1), (60, 70), (63, 64), (64, 65), (63, 129),
                                         (100, 150), (128, 150), (149, 150), (0, 64)])
def test_reader_slices_across_chunk_boundaries(written, start: int, stop: int) -> None:
    root, dtype, vectors, ids = written
    reader = seglib.SegmentReader(root, NAME, n=N, dim=DIM, dtype=dtype, chunk_rows=CHUNK)
    try:
        got = reader.vectors(start, stop)
        assert got.dtype == np.dtype(dtype) and got.shape == (stop - start, DIM)
        np.testing.assert_array_equal(got, vectors[start:stop])
        np.testing.assert_array_equal(reader.ids(start, stop), ids[start:stop])
    finally:
        reader.close()


def test_reader_takes_rows_by_index_as_float32(written) -> None:
    root, dtype, vectors, _ = written
    reader = seglib.SegmentReader(root, NAME, n=N, dim=DIM, dtype=dtype, chunk_rows=CHUNK)
    rows = np.array([149, 0, 64, 63, 64, 100])
    got = reader.take_vectors(rows)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, vectors[rows].astype(np.float32))
    reader.close()


def test_reader_reports_a_missing_chunk(written) -> None:
    root, dtype, _, _ = written
    (root / NAME / "vectors" / "c" / "1" / "0").unlink()
    reader = seglib.SegmentReader(root, NAME, n=N, dim=DIM, dtype=dtype, chunk_rows=CHUNK)
    np.asarray(reader.vectors(0, 10))  # chunk 0 is fine
    with pytest.raises(CorruptStoreError, match=r"^Segment chunk .* is missing or truncated .*"
                                                r"run `asteria-store verify`\.$"):
        reader.vectors(60, 70)


def test_writer_replaces_a_stale_orphan(tmp_path: Path) -> None:
    root = tmp_path / "segments.zarr"
    seglib.create_root(root)
    (root / NAME / "junk").mkdir(parents=True)
    (root / NAME / "junk" / "file").write_bytes(b"x")
    writer = seglib.SegmentWriter(root, NAME, n=3, dim=2, dtype="float32", chunk_rows=4)
    writer.write(0, np.ones((3, 2), np.float32), np.arange(3, dtype=np.uint64))
    writer.finish()
    assert not (root / NAME / "junk").exists()
    assert seglib.list_segment_dirs(root) == [NAME]


def test_list_and_remove_segments(tmp_path: Path) -> None:
    root = tmp_path / "segments.zarr"
    assert seglib.list_segment_dirs(root) == []  # no root yet
    seglib.create_root(root)
    assert (root / "zarr.json").is_file()
    for name in ("seg-00000002", "seg-00000001"):
        writer = seglib.SegmentWriter(root, name, n=1, dim=2, dtype="float32", chunk_rows=1)
        writer.write(0, np.ones((1, 2), dtype=np.float32), np.zeros(1, dtype=np.uint64))
        writer.finish()
    (root / "not-a-segment").mkdir()
    assert seglib.list_segment_dirs(root) == ["seg-00000001", "seg-00000002"]
    seglib.remove_segment(root, "seg-00000001")
    assert seglib.list_segment_dirs(root) == ["seg-00000002"]


def test_finish_returns_the_crc32c_of_every_chunk(tmp_path: Path) -> None:
    root = tmp_path / "segments.zarr"
    seglib.create_root(root)
    writer = seglib.SegmentWriter(root, "seg-00000001", n=5, dim=2, dtype="float32", chunk_rows=2)
    vectors = np.arange(10, dtype=np.float32).reshape(5, 2)
    writer.write(0, vectors, np.arange(5, dtype=np.uint64))
    sums = writer.finish()
    assert sorted(sums) == ["ids", "vectors"]
    assert [len(v) for v in sums.values()] == [3, 3]
    # Known answers: the chunk files hold the rows (the edge chunk zero-padded), little-endian.
    import google_crc32c

    first = google_crc32c.value(vectors[:2].astype("<f4").tobytes())
    last_ids = google_crc32c.value(np.array([4, 0], dtype="<u8").tobytes())
    assert (int(sums["vectors"][0]), int(sums["ids"][2])) == (first, last_ids)


def test_fsync_tree_syncs_every_file_and_directory_children_first(tmp_path: Path, monkeypatch) -> None:
    """A directory's entries are durable only once it is fsynced, after what it holds."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_bytes(b"data")
    (tmp_path / "a" / "g").write_bytes(b"more")
    synced: list[str] = []
    real_fsync = os.fsync

    def record(fd: int) -> None:
        synced.append(os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), tmp_path))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    seglib.fsync_tree(tmp_path / "a")
    assert sorted(synced) == sorted(["a", "a/b", "a/b/f", "a/g"])
    assert synced.index("a/b/f") < synced.index("a/b") < synced.index("a")
    assert synced.index("a/g") < synced.index("a")
    with pytest.raises(FileNotFoundError):
        seglib.fsync_dir(tmp_path / "missing")


def test_dense_gathers_ask_for_their_span_and_sparse_ones_do_not(written, monkeypatch) -> None:
    """A merge reads runs of rows: one read-ahead request per chunk for the span (without
    it a cold compact of 3M rows took 2.1x as long: docs/scale.md). A query's scattered
    survivors are not spans: nothing is asked for them. The rows come back either way."""
    root, dtype, expected, _ = written
    reader = seglib.SegmentReader(root, NAME, n=N, dim=DIM, dtype=dtype, chunk_rows=CHUNK)
    asked = []
    real = seglib.SegmentReader.will_need
    monkeypatch.setattr(seglib.SegmentReader, "will_need",
                        lambda self, array, index, lo, hi: (asked.append((index, lo, hi)),
                                                           real(self, array, index, lo, hi)))
    dense = np.array([r for r in range(10, 140) if r % 3])
    np.testing.assert_array_equal(reader.take("vectors", dense), expected[dense])
    assert sorted(asked) == [(0, 10, 63), (1, 0, 64), (2, 0, 12)]  # first to last row taken, per chunk
    asked.clear()
    sparse = np.array([1, 60, 70, 127])
    np.testing.assert_array_equal(reader.take("vectors", sparse), expected[sparse])
    assert asked == []
