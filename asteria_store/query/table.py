"""A view's probed buckets as flat arrays, for the compiled one-query search (native.py).

One query visits a few dozen buckets, each a few row ranges of memory-mapped chunks. Built
per query in Python, those ranges cost more than scoring their rows. :class:`BucketTable`
builds each bucket's ranges once per view, the first time a query probes it, into flat
arrays that the compiled search reads directly:

* per bucket ``b``: its ranges are ``start[b]:stop[b]`` of the range arrays, and ``stored[b]``
  its stored rows (deleted ones included: what the ``candidates`` budget counts);
* per range: the chunk slot it lies in, its first row in that chunk and its length. A range
  holds live rows only (deleted rows split the extents), and never crosses a chunk edge;
* per chunk slot: the mapped chunks of ids, vectors, LRSQ codes, aux and sketch codes
  (numba typed lists, indexed by slot), and whether its codes are usable (encoded by the
  view's router) and it has sketch codes, and whether what the certified search reads
  (ids, vectors, LRSQ codes and aux) and what search by sketch reads (ids, vectors and
  sketch codes) can be read.

Every chunk of every segment of the view is mapped when the table is made, so the lists
never change afterwards: queries on other threads may read them while a bucket is added.
A chunk that cannot be read (quarantined, missing) gets an empty slot marked unreadable;
a query that probes it reads it through the segment reader, which raises its error.
"""

from __future__ import annotations

import mmap
import threading

import numpy as np

from ..errors import CorruptStoreError

_ARRAYS = ("ids", "vectors", "lrsq", "lrsq_aux", "sketch")
_PAGE = mmap.PAGESIZE


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


class BucketTable:
    """The flat range table of one view (see the module docstring)."""

    def __init__(self, view, rank: int, aux_width: int, sketch: int):
        from . import native

        self._lock = threading.Lock()
        self.slot_of: dict[tuple[int, int], int] = {}
        some = next(iter(view.segments.values()), None)  # every segment has the store's dim and dtype
        dim, vec_dtype = (some.dim, _vector_view_dtype(some.dtype)) if some else (1, np.dtype(np.float32))
        #: Bytes of one stored vector.
        self.vector_bytes = dim * vec_dtype.itemsize
        empty = {"ids": _readonly(np.zeros(0, np.int64)), "vectors": _readonly(np.zeros((0, dim), vec_dtype)),
                 "lrsq": _readonly(np.zeros((0, rank), np.uint8)),
                 "lrsq_aux": _readonly(np.zeros((0, aux_width), np.uint16)),
                 "sketch": _readonly(np.zeros((0, max(sketch, 1)), np.uint8))}
        lists: dict[str, list[np.ndarray]] = {name: [] for name in _ARRAYS}
        usable, readable, sketched, sketch_readable = [], [], [], []
        for seg, reader in sorted(view.segments.items()):
            meta = reader.lrsq_meta
            codes = (meta is not None and meta["model"] == view.codes_digest and meta["rank"] == rank
                     and meta["aux"] == aux_width)
            has_sketch = codes and sketch > 0 and meta.get("sketch") == sketch
            for ch in range(-(-reader.n // reader.chunk_rows)):
                self.slot_of[(seg, ch)] = len(usable)
                damaged = set()
                for name in _ARRAYS:
                    if name.startswith("lrsq") and not codes or name == "sketch" and not has_sketch:
                        lists[name].append(empty[name])
                        continue
                    try:
                        lists[name].append(_as_kernel_array(reader.chunk(name, ch)))
                    except CorruptStoreError:
                        lists[name].append(empty[name])
                        damaged.add(name)
                usable.append(codes)
                readable.append(not damaged - {"sketch"})
                sketched.append(has_sketch)
                sketch_readable.append(not damaged - {"lrsq", "lrsq_aux"})
        # (a view without segments: one unused element, so that the list has a type)
        self.ids, self.vectors, self.codes, self.aux, self.sketch = (
            native.typed_list(lists[name] or [empty[name]]) for name in _ARRAYS)
        self.chunks = sorted(self.slot_of, key=self.slot_of.__getitem__)
        self.usable = np.array(usable, dtype=np.bool_)
        self.sketched = np.array(sketched, dtype=np.bool_)
        self.sketch_readable = np.array(sketch_readable, dtype=np.bool_)
        self.readable = np.array(readable, dtype=np.bool_)
        n_buckets = 1
        self.start = np.full(n_buckets, -1, dtype=np.int64)
        self.stop = np.full(n_buckets, -1, dtype=np.int64)
        self.stored = np.zeros(n_buckets, dtype=np.int64)
        self.slot = np.empty(64, dtype=np.int64)
        self.first = np.empty(64, dtype=np.int64)
        self.length = np.empty(64, dtype=np.int64)
        self.n_ranges = 0
        #: Whether the last rescoring of search by sketch on this table read from storage
        #: (its rows were not all cached): the next one asks for its rows first.
        self.rescore_reads = True
        #: Per tuple of arrays: which buckets :meth:`prefetch` has asked for.
        self._advised: dict[tuple[str, ...], np.ndarray] = {}

    def chunk_of(self, slot: int) -> tuple[int, int]:
        """The (segment, chunk) of a slot."""
        return self.chunks[slot]

    def will_need(self, view, slots: np.ndarray, rows: np.ndarray) -> None:
        """Ask the kernel for the ids and vectors of rows ``rows`` of chunk slots ``slots``
        (one MADV_WILLNEED per run of adjacent pages): their reads then go to the device
        together, instead of one synchronous read per page as a compiled loop faults them
        in. The runs are found for all rows at once (a few numpy calls)."""
        if len(slots) == 0:
            return
        slots = np.asarray(slots, dtype=np.int64) << 32
        for name, row_bytes in (("vectors", self.vector_bytes), ("ids", 8)):
            first, last = rows * row_bytes // _PAGE, ((rows + 1) * row_bytes - 1) // _PAGE
            pages = np.unique(np.concatenate([slots | first, slots | last]))  # (slot << 32) | page
            breaks = np.flatnonzero(np.diff(pages) != 1) + 1
            for a, z in zip(pages[np.r_[0, breaks]].tolist(), pages[np.r_[breaks - 1, len(pages) - 1]].tolist()):
                seg, ch = self.chunks[a >> 32]
                view.segments[seg].will_need_pages(name, ch, a & 0xFFFFFFFF, z - a + 1)

    def sized(self, n_buckets: int) -> BucketTable:
        """The table, with room for keys below ``n_buckets`` (the compiled search indexes
        the bucket arrays by key unchecked)."""
        if n_buckets > len(self.start):
            with self._lock:
                if n_buckets > len(self.start):
                    self._grow_buckets(n_buckets)
        return self

    def ready(self, view, keys: np.ndarray) -> BucketTable:
        """Make sure every bucket of ``keys`` is in the table (``view``: bound to a read
        transaction, to look up extents); returns the table."""
        self.sized(int(keys.max(initial=-1)) + 1)
        if (self.start[keys] >= 0).all():
            return self
        with self._lock:
            for key in np.unique(keys[self.start[keys] < 0]).tolist():
                self._add(view, key)
        return self

    def prefetch(self, view, keys: np.ndarray, arrays: tuple[str, ...]) -> None:
        """Ask the kernel for ``arrays`` of every range of the buckets ``keys`` that are in
        the table, the first time a query asks for them in this view (one MADV_WILLNEED per
        range and array). The compiled search then finds them in the page cache or on their
        way, instead of faulting them in one synchronous read per page."""
        advised = self._advised.get(arrays)
        if advised is None or len(advised) < len(self.start):
            with self._lock:
                advised = self._advised.get(arrays)
                if advised is None or len(advised) < len(self.start):
                    grown = np.zeros(len(self.start), dtype=np.bool_)
                    if advised is not None:
                        grown[: len(advised)] = advised
                    advised = self._advised[arrays] = grown
        todo = keys[(self.start[keys] >= 0) & ~advised[keys]]
        for b in np.unique(todo).tolist() if todo.size else ():
            for r in range(int(self.start[b]), int(self.stop[b])):
                seg, ch = self.chunks[int(self.slot[r])]
                reader = view.segments[seg]
                lo = int(self.first[r])
                for name in arrays:
                    if name in reader.arrays:
                        reader.will_need(name, ch, lo, lo + int(self.length[r]))
            advised[b] = True

    def _grow_buckets(self, n: int) -> None:
        n = max(n, 2 * len(self.start))
        start, stop = np.full(n, -1, dtype=np.int64), np.full(n, -1, dtype=np.int64)
        stored = np.zeros(n, dtype=np.int64)
        m = len(self.start)
        start[:m], stop[:m], stored[:m] = self.start, self.stop, self.stored
        self.stored, self.stop, self.start = stored, stop, start  # start last: it marks a bucket added

    def _add(self, view, key: int) -> None:
        ranges, stored = [], 0
        for seg, first, n in view.extents(key):
            stored += n
            reader = view.segments[seg]
            live = view.live_mask(seg, first, n)
            runs = [(first, first + n)] if live is None else _runs(live, first)
            c = reader.chunk_rows
            for lo, hi in runs:
                for ch in range(lo // c, (hi - 1) // c + 1):  # one range per chunk
                    a, z = max(lo, ch * c), min(hi, (ch + 1) * c)
                    ranges.append((self.slot_of[(seg, ch)], a - ch * c, z - a))
        at = self.n_ranges
        if at + len(ranges) > len(self.slot):
            size = max(2 * len(self.slot), at + len(ranges))
            self.slot, self.first, self.length = (np.resize(a, size) for a in (self.slot, self.first, self.length))
        if ranges:
            self.slot[at : at + len(ranges)], self.first[at : at + len(ranges)], \
                self.length[at : at + len(ranges)] = np.array(ranges, dtype=np.int64).T
        self.n_ranges = at + len(ranges)
        self.stored[key] = stored
        self.stop[key] = self.n_ranges
        self.start[key] = at


def _runs(live: np.ndarray, first: int) -> list[tuple[int, int]]:
    """Runs ``[lo, hi)`` of True in ``live``, as rows offset by ``first``."""
    edges = np.flatnonzero(np.diff(np.concatenate([[False], live, [False]]).astype(np.int8)))
    return [(first + int(a), first + int(b)) for a, b in edges.reshape(-1, 2)]


def _vector_view_dtype(dtype: np.dtype) -> np.dtype:
    """How the kernel reads stored vectors: float32 as such, float16 as its bit patterns
    (uint16, decoded by table: numba has no float16 arithmetic)."""
    return np.dtype(np.uint16) if dtype.itemsize == 2 else np.dtype(np.float32)


def _as_kernel_array(chunk: np.ndarray) -> np.ndarray:
    """A mapped chunk in the kernel's types: ids as int64, float16 as uint16 (no copy)."""
    if chunk.dtype.kind == "u" and chunk.dtype.itemsize == 8:
        return chunk.view(np.int64)
    if chunk.dtype.kind == "f" and chunk.dtype.itemsize == 2:
        return chunk.view(np.uint16)
    if chunk.dtype.kind == "f" and chunk.dtype.byteorder not in "=|":
        return chunk.view(chunk.dtype.newbyteorder("="))
    return chunk
