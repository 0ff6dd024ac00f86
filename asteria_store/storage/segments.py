"""Immutable segments: Zarr v3 arrays with uncompressed, memory-mappable chunks.

Layout under ``segments.zarr/`` (a Zarr v3 group), one sub-group per segment::

    seg-00000001/vectors   (n, d) float32 or float16, little-endian, chunks (chunk_rows, d)
    seg-00000001/ids       (n,)   uint64, little-endian, chunks (chunk_rows,)
    seg-00000001/lrsq      (n, r) uint8 LRSQ codes, chunks (chunk_rows, r)      [learned router]
    seg-00000001/lrsq_aux  (n, a) float16 LRSQ bound data, chunks (chunk_rows, a) [learned router]
    seg-00000001/sketch    (n, m) uint8 sketch codes, chunks (chunk_rows, m)  [model with a sketch]
    seg-00000001/columns/c/<i>  metadata columns of chunk i, an Arrow IPC file [store with columns]

Every array uses the single ``bytes`` codec (no compression, no filters), the default
chunk key encoding (``c/<i>/<j>``), and ``write_empty_chunks=True``, so each chunk file is
exactly ``chunk_rows * row_bytes`` raw bytes (edge chunks are padded to full size, as Zarr
does). The query path memory-maps those files directly; any Zarr reader sees the same data.

A segment is written, then every file and directory of it fsynced, and only then published
by the catalog, together with the CRC-32C of every chunk file (read back after writing;
``verify`` recomputes them; the query path never does). Until published it is an orphan
that ``verify --repair`` may delete.
"""

from __future__ import annotations

import mmap
import os
import secrets
import shutil
from pathlib import Path

import google_crc32c
import numpy as np

from ..errors import CorruptStoreError
from . import columns as collib

#: Every mapped chunk is advised MADV_RANDOM: the kernel reads no pages around a fault.
#: A query reads a bucket's ids and codes as whole row ranges, announced to the kernel first
#: (:meth:`SegmentReader.will_need`: MADV_WILLNEED of exactly those pages, one request per
#: range), and its rescoring reads a few hundred scattered vectors, a page each. Read-around
#: (~128 KiB per fault) made a cold query read 10-25x the bytes it used (docs/scale.md).
_PAGE = mmap.PAGESIZE

#: A gather whose rows fill at least 1/_DENSE_SPAN of their span reads the span in one go.
_DENSE_SPAN = 4

_ARRAY_CONFIG = {"write_empty_chunks": True}


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """fsync every file and directory under ``root`` (and ``root`` itself), bottom-up; a
    file ``root`` is fsynced alone."""
    root = os.fspath(root)
    if os.path.isfile(root):
        fsync_dir(root)
        return
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory (its entries) or, given one, a file."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to a temporary sibling, fsync it and rename it to ``path``: a crash
    leaves the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def publish_dir(tmp: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Make the directory ``tmp`` durable (every file and directory fsynced) and rename it
    to ``target`` (absent, or an empty directory), then fsync the parent: a crash leaves
    ``target`` whole or not there at all."""
    fsync_tree(tmp)
    target = Path(target)
    if target.exists():
        target.rmdir()  # empty (an error otherwise: never replace data)
    os.rename(tmp, target)
    fsync_dir(target.parent)


def dir_mode() -> int:
    """The mode a new directory gets under this process's umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o777 & ~mask


def create_root(path: str | os.PathLike[str]) -> None:
    """Create the empty ``segments.zarr`` group."""
    import zarr  # only writers need zarr (readers map the chunk files): a fast start
    from zarr.storage import LocalStore

    zarr.open_group(LocalStore(os.fspath(path)), mode="w", zarr_format=3)


#: Arrays of a segment, in the order ``verify`` checks them ("columns": its metadata
#: columns, storage/columns.py, not a Zarr array but chunked and checksummed alike).
ARRAYS = ("vectors", "ids", "lrsq", "lrsq_aux", "sketch", "columns")


def chunk_path(segment_dir: str | os.PathLike[str], array: str, index: int) -> Path:
    """The file of chunk ``index`` of ``array`` (2-D arrays: key ``c/<i>/0``)."""
    if array == "columns":
        return collib.chunk_file(segment_dir, index)
    path = Path(segment_dir) / array / "c" / str(index)
    return path if array == "ids" else path / "0"


def file_crc32c(path: str | os.PathLike[str]) -> int:
    """CRC-32C of a whole file, read in 16 MiB pieces."""
    crc = google_crc32c.Checksum()
    with open(path, "rb") as fh:
        while piece := fh.read(16 << 20):
            crc.update(piece)
    return int.from_bytes(crc.digest(), "big")


class SegmentWriter:
    """Writes one segment, chunk-aligned window by window."""

    def __init__(self, root: str | os.PathLike[str], name: str, *, n: int, dim: int,
                 dtype: str, chunk_rows: int, lrsq_widths: tuple[int, int, int] | None = None,
                 columns: bool = False):
        """``lrsq_widths``: (rank, aux, sketch) widths of the rows' LRSQ codes, their aux
        values and their sketch codes (0: no sketch); None: no codes. ``columns``: the
        rows have metadata columns (:meth:`write` takes them as a pyarrow Table)."""
        self.root = Path(root)
        self.name = name
        self.n = n
        self.chunk_rows = chunk_rows
        self.dtype = np.dtype(dtype).newbyteorder("<")
        import zarr
        from zarr.storage import LocalStore

        if (self.root / name).exists():  # a stale orphan of an interrupted ingest
            shutil.rmtree(self.root / name)
        store = LocalStore(os.fspath(self.root))
        zarr.open_group(store, path=name, mode="w", zarr_format=3)
        common = dict(compressors=None, filters=None, config=_ARRAY_CONFIG, overwrite=True)
        self.vectors = zarr.create_array(
            store, name=f"{name}/vectors", shape=(n, dim), chunks=(chunk_rows, dim),
            dtype=self.dtype, fill_value=0.0, **common,
        )
        self.ids = zarr.create_array(
            store, name=f"{name}/ids", shape=(n,), chunks=(chunk_rows,),
            dtype="<u8", fill_value=0, **common,
        )
        self.lrsq = self.lrsq_aux = self.sketch = None
        self.columns = columns
        if lrsq_widths is not None:
            rank, aux, sketch = lrsq_widths
            self.lrsq = zarr.create_array(store, name=f"{name}/lrsq", shape=(n, rank), chunks=(chunk_rows, rank),
                                          dtype="|u1", fill_value=0, **common)
            self.lrsq_aux = zarr.create_array(store, name=f"{name}/lrsq_aux", shape=(n, aux),
                                              chunks=(chunk_rows, aux), dtype="<f2", fill_value=0.0, **common)
            if sketch:
                self.sketch = zarr.create_array(store, name=f"{name}/sketch", shape=(n, sketch),
                                                chunks=(chunk_rows, sketch), dtype="|u1", fill_value=0, **common)

    def write(self, start: int, vectors: np.ndarray, ids: np.ndarray, lrsq: tuple | None = None,
              columns=None) -> None:
        """Rows from ``start`` (a chunk's first row); ``lrsq``: their (codes, aux) or
        (codes, aux, sketch codes); ``columns``: their metadata (a pyarrow Table)."""
        stop = start + len(vectors)
        self.vectors[start:stop] = vectors.astype(self.dtype, copy=False)
        self.ids[start:stop] = ids.astype("<u8", copy=False)
        if self.lrsq is not None:
            self.lrsq[start:stop] = lrsq[0]
            self.lrsq_aux[start:stop] = lrsq[1].astype("<f2", copy=False)
        if self.sketch is not None:
            self.sketch[start:stop] = lrsq[2]
        if self.columns:
            c = self.chunk_rows
            for lo in range(0, len(vectors), c):
                collib.write_chunk(self.root / self.name, (start + lo) // c, columns.slice(lo, c))

    def finish(self) -> dict[str, np.ndarray]:
        """Make the segment durable (all files and directories fsynced); returns the CRC-32C
        of every chunk of every array (``{array: uint32 per chunk}``), for the catalog."""
        n_chunks = (self.n + self.chunk_rows - 1) // self.chunk_rows
        arrays = ["vectors", "ids"] + (["lrsq", "lrsq_aux"] if self.lrsq is not None else []) \
            + (["sketch"] if self.sketch is not None else []) + (["columns"] if self.columns else [])
        sums = {a: np.array([file_crc32c(chunk_path(self.root / self.name, a, c)) for c in range(n_chunks)],
                            dtype=np.uint32) for a in arrays}
        fsync_tree(self.root / self.name)
        fsync_dir(self.root)
        return sums


class SegmentReader:
    """Row access to one published segment through memory-mapped chunk files."""

    def __init__(self, root: str | os.PathLike[str], name: str, *, n: int, dim: int,
                 dtype: str, chunk_rows: int, lrsq: dict | None = None, columns: list[str] | None = None):
        """``columns``: the metadata columns its files hold (the segment record's)."""
        self.dir = Path(root) / name
        self.n = n
        self.dim = dim
        self.chunk_rows = chunk_rows
        self.dtype = np.dtype(dtype).newbyteorder("<")
        #: The segment record's LRSQ entry ({"rank", "aux", "model"}, and "sketch": its
        #: sketch's bytes a row, where it has one), None without codes.
        self.lrsq_meta = lrsq
        self._arrays: dict[str, tuple[np.dtype, int | None]] = {
            "vectors": (self.dtype, dim), "ids": (np.dtype("<u8"), None)}
        if lrsq is not None:
            self._arrays["lrsq"] = (np.dtype("u1"), lrsq["rank"])
            self._arrays["lrsq_aux"] = (np.dtype("<f2"), lrsq["aux"])
            if lrsq.get("sketch"):
                self._arrays["sketch"] = (np.dtype("u1"), lrsq["sketch"])
        #: The metadata columns this segment's files hold (none: every column reads as nulls).
        self.column_names = list(columns or [])
        self._column_chunks: dict[int, object] = {}
        self._maps: dict[tuple[str, int], np.ndarray] = {}
        self._mmaps: dict[tuple[str, int], mmap.mmap] = {}
        #: Chunks ``verify`` found damaged: ``{(array, chunk): message}``; reading one raises.
        self.quarantined: dict[tuple[str, int], str] = {}

    @property
    def arrays(self) -> tuple[str, ...]:
        """The arrays this segment holds (of :data:`ARRAYS`)."""
        return tuple(self._arrays) + (("columns",) if self.column_names else ())

    def quarantine(self, damaged: dict[tuple[str, int], str]) -> None:
        """Refuse to read these chunks from now on (with their message)."""
        self.quarantined = dict(damaged)
        for key in damaged:
            self._maps.pop(key, None)
            self._mmaps.pop(key, None)
            if key[0] == "columns":
                self._column_chunks.pop(key[1], None)

    def chunk(self, array: str, index: int) -> np.ndarray:
        """Chunk ``index`` of ``array``, memory-mapped read-only (a plain ndarray over the
        map: slicing a ``np.memmap`` subclass costs several times more per call)."""
        key = (array, index)
        m = self._maps.get(key)
        if m is None:
            m = self._maps[key] = self._map(array, index)
        return m

    def _map(self, array: str, index: int) -> np.ndarray:
        key = (array, index)
        if key in self.quarantined:
            raise CorruptStoreError(self.quarantined[key])
        dtype, width = self._arrays[array]
        path = chunk_path(self.dir, array, index)
        shape = (self.chunk_rows,) if width is None else (self.chunk_rows, width)
        size = int(np.prod(shape)) * dtype.itemsize
        try:
            with open(path, "rb") as fh:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            if len(mm) < size:
                raise ValueError(f"{len(mm)} bytes, expected {size}")
        except (OSError, ValueError) as exc:
            raise CorruptStoreError(
                f"Segment chunk {str(path)!r} is missing or truncated ({exc}); "
                "run `asteria-store verify`."
            ) from None
        mm.madvise(mmap.MADV_RANDOM)
        self._mmaps[key] = mm
        return np.frombuffer(mm, dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    def will_need(self, array: str, index: int, lo: int, hi: int) -> None:
        """Ask the kernel to read rows ``[lo, hi)`` of chunk ``index`` of ``array`` now, in one
        request (MADV_WILLNEED of exactly their pages): the reads that follow find them in
        the page cache or on their way. Costs ~1 us when they are already there."""
        if hi <= lo:
            return
        dtype, width = self._arrays[array]
        row = dtype.itemsize * (width or 1)
        first = lo * row // _PAGE
        self.will_need_pages(array, index, first, -(-hi * row // _PAGE) - first)

    def will_need_pages(self, array: str, index: int, first: int, count: int) -> None:
        """:meth:`will_need` of ``count`` pages of chunk ``index`` of ``array`` from page
        ``first`` (pages of :data:`mmap.PAGESIZE` bytes from the chunk's start)."""
        self.chunk(array, index)
        self._mmaps[(array, index)].madvise(mmap.MADV_WILLNEED, first * _PAGE, count * _PAGE)

    def read(self, array: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of ``array`` (one of :data:`ARRAYS`): a
        view of the memory-mapped chunk, or a copy where the range spans chunks. Their pages
        are asked for first (:meth:`will_need`)."""
        c = self.chunk_rows
        parts = []
        for i in range(start // c, (stop - 1) // c + 1):
            lo = max(start, i * c) - i * c
            hi = min(stop, (i + 1) * c) - i * c
            self.will_need(array, i, lo, hi)
            parts.append(self.chunk(array, i)[lo:hi])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def vectors(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as a (possibly memory-mapped) array of the storage dtype."""
        return self.read("vectors", start, stop)

    def ids(self, start: int, stop: int) -> np.ndarray:
        return self.read("ids", start, stop)

    def take(self, array: str, rows: np.ndarray) -> np.ndarray:
        """Rows of ``array`` by index (any order), one gather per chunk touched."""
        rows = np.asarray(rows, dtype=np.int64)
        c = self.chunk_rows
        dtype, width = self._arrays[array]
        out = np.empty((len(rows),) if width is None else (len(rows), width), dtype=dtype)
        if len(rows) == 0:
            return out
        chunk = rows // c
        first, last = int(chunk.min()), int(chunk.max())
        if first == last:
            out[:] = self._gather(array, first, rows - first * c)
            return out
        for i in np.unique(chunk).tolist():
            sel = chunk == i
            out[sel] = self._gather(array, i, rows[sel] - i * c)
        return out

    def _gather(self, array: str, index: int, local: np.ndarray) -> np.ndarray:
        """Rows ``local`` of one chunk. Rows that fill most of their span (a merge reading
        runs of its sources, a re-bucketing) ask for the span first, in one request: with
        no read-around, faulting them in page by page is one synchronous read per page.
        A query's few scattered survivors are read page by page."""
        lo, hi = int(local.min()), int(local.max()) + 1
        if hi - lo <= _DENSE_SPAN * len(local):
            self.will_need(array, index, lo, hi)
        return self.chunk(array, index)[local]

    def take_vectors(self, rows: np.ndarray) -> np.ndarray:
        """Rows by index as float32 (for ``Store.get`` and exact rescoring)."""
        return self.take("vectors", rows).astype(np.float32, copy=False)

    def column_chunk(self, index: int):
        """The metadata columns of chunk ``index`` (a pyarrow Table, memory-mapped)."""
        table = self._column_chunks.get(index)
        if table is None:
            if ("columns", index) in self.quarantined:
                raise CorruptStoreError(self.quarantined[("columns", index)])
            path = collib.chunk_file(self.dir, index)
            try:
                table = collib.read_chunk(self.dir, index)
            except Exception as exc:  # an OS error, or Arrow's on a torn file
                raise CorruptStoreError(
                    f"Segment chunk {str(path)!r} is missing or damaged ({type(exc).__name__}); "
                    "run `asteria-store verify`.") from None
            self._column_chunks[index] = table
        return table

    def columns_table(self, schema: list[dict]):
        """Every row's metadata as one pyarrow Table of ``schema``'s columns, without copying
        (its chunks' memory maps, concatenated)."""
        import pyarrow as pa

        if not self.column_names:
            return collib.null_table(self.n, schema)
        n_chunks = -(-self.n // self.chunk_rows)
        return collib.conform_table(pa.concat_tables([self.column_chunk(i) for i in range(n_chunks)]), schema)

    def take_columns(self, rows: np.ndarray, schema: list[dict]):
        """Metadata of rows by index (ascending) as a pyarrow Table with exactly the columns
        of ``schema`` (the store's; a column this segment lacks is nulls)."""
        import pyarrow as pa

        rows = np.asarray(rows, dtype=np.int64)
        if not self.column_names:
            return collib.null_table(len(rows), schema)
        c = self.chunk_rows
        chunk = rows // c
        parts = [self.column_chunk(i).take(pa.array(rows[chunk == i] - i * c)) for i in np.unique(chunk).tolist()]
        if not parts:
            return collib.null_table(0, schema)
        return collib.conform_table(pa.concat_tables(parts), schema)

    def close(self) -> None:
        self._maps.clear()
        self._mmaps.clear()
        self._column_chunks.clear()


def list_segment_dirs(root: str | os.PathLike[str]) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("seg-"))


def remove_segment(root: str | os.PathLike[str], name: str) -> None:
    shutil.rmtree(Path(root) / name)
    fsync_dir(root)
