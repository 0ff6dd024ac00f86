"""The segment pipeline: rows in, one bucketed segment on disk, fsynced, not yet published.

An ingest, a re-bucketing and a merge all write their rows the same way:

* **pass 1** (:meth:`SegmentPipeline.hash_rows`): validate every row (finite, non-zero
  for cosine, within float16 range for a float16 store) and compute its bucket key from
  the row as the segment will hold it, block by block;
* **pass 2** (:meth:`SegmentPipeline.write_segment`): write the rows sorted by bucket key,
  in chunk-aligned windows, with their LRSQ codes (copied when the source already holds
  codes of this model, as in a merge, else encoded), then fsync. When the stored form of
  every row fits ``_KEEP_STORED_BYTES``, pass 1 keeps it (:class:`PreparedRows`) and pass
  2 writes from it: the input is read, validated and rounded once.

What publishing needs comes back as :class:`Written`; commit.py publishes it. Around
each write, :meth:`SegmentPipeline.attempt` removes the debris of a write that was not
published (its segment directory, and a model saved for it) and turns an OS error into
a one-line asteria error; :meth:`SegmentPipeline.check_disk_space` refuses up front a
write that cannot fit. :class:`StoredRows` reads a store's own live rows back as a
source, for re-bucketing and merging.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np

from ..errors import AsteriaError, CorruptStoreError, DiskFullError, InvalidInputError
from ..io import VectorSource, normalise_rows
from ..model.fit import sample_indices, training_sample
from ..model.persist import save_router
from ..model.router import Router
from ..progress import ProgressLike, make_progress
from ..query.engine import View
from ..reads import ReadSide, mib
from ..storage import segments as seglib
from ..storage.catalog import segment_name
from ..translate import catalog_error

MODEL_DIR = "model"

#: Rows hashed per block in pass 1, and bytes of rows written per window in pass 2.
_HASH_BLOCK_ROWS = 16384
_WRITE_WINDOW_BYTES = 16 * 1024 * 1024

#: Stored-form rows pass 1 keeps for pass 2, at most (bytes).
_KEEP_STORED_BYTES = 256 * 1024 * 1024


def _rotated_centers(router: Router, keys: np.ndarray) -> np.ndarray | None:
    """The rotated bucket centres (n, D) that a residual sketch codes the rows of buckets
    ``keys`` against (None for a sketch of the rows themselves); each distinct bucket
    rotated once (rows come in bucket order: a window holds few)."""
    buckets, inverse = np.unique(np.asarray(keys, dtype=np.int64), return_inverse=True)
    centers = router.centers(buckets)
    return None if centers is None else router.rotate(centers)[inverse]

class Written(NamedTuple):
    """A segment written but not yet published."""

    keys: np.ndarray  # bucket key of each row, sorted
    ids: np.ndarray  # id of each row, in segment order
    chunk_rows: int
    lrsq: dict | None  # the segment record's LRSQ entry
    checksums: dict[str, np.ndarray]  # CRC-32C per chunk, per array
    columns: list[str] | None = None  # the metadata columns its files hold


class SegmentPipeline:
    """Writes segments and models of one open handle (the caller holds the writer lock)."""

    def __init__(self, reads: ReadSide):
        self.reads = reads
        self.path = reads.path
        self.config = reads.config
        self.catalog = reads.catalog
        self.segments_root = reads.segments_root

    def next_segment(self) -> int:
        """The number the next segment written will have."""
        with self.catalog.read() as txn:
            return int(self.catalog.get_meta(txn, "next_segment"))

    def sample_rows(self, source: VectorSource | StoredRows, size: int, seed: int) -> np.ndarray:
        """A seeded uniform sample of at most ``size`` rows, in stored form."""
        if isinstance(source, StoredRows):
            return source.take(sample_indices(source.n, size, seed))
        return self.as_stored(training_sample(source, size, seed, self.config.metric), in_place=True,
                              rows=sample_indices(source.n, size, seed))

    def save_model(self, router: Router) -> dict[str, str]:
        """Write ``router`` under model/<kind>-g<generation it will be published at>
        (fsynced); the catalog record to publish."""
        with self.catalog.read() as txn:
            generation = int(self.catalog.get_meta(txn, "generation"))
            live = self.catalog.get_meta(txn, "router")["dir"]
        name = f"{router.kind}-g{generation + 1}"
        model_dir = self.path / MODEL_DIR / name
        if f"{MODEL_DIR}/{name}" == live:
            raise CorruptStoreError(f"The live model {live!r} was published at a later generation than the catalog's.")
        if model_dir.exists():  # debris of an interrupted attempt at this same generation
            shutil.rmtree(model_dir)
        digest = save_router(router, model_dir)
        seglib.fsync_dir(model_dir.parent)
        return {"dir": f"{MODEL_DIR}/{name}", "digest": digest}

    def write_bucketed(self, seg: int, rows, ids: np.ndarray, router: Router, codes: str,
                       progress: ProgressLike, *, keys: np.ndarray | None = None,
                       columns: TableColumns | None = None) -> Written:
        """Hash ``rows`` with ``router`` (or take their ``keys``), sort them by bucket and
        write them as segment ``seg`` (not yet published), LRSQ codes labelled ``codes`` (a
        router record's codes_digest): what publishing it needs. ``columns``: the rows'
        metadata; stored rows (:class:`StoredRows`) bring their own."""
        if keys is None:
            keys, prepared = self.hash_rows(rows, progress, router)
            rows = prepared or rows
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        del keys
        seg_ids = ids[order]
        # Small segments get small chunks: Zarr pads the edge chunk to full size.
        chunk_rows = min(self.config.chunk_rows, max(256, 1 << (len(ids) - 1).bit_length()))
        if columns is None and isinstance(rows, StoredRows) and rows.schema:
            columns = rows
        lrsq, sums = self.write_segment(seg, rows, order, sorted_keys, seg_ids, chunk_rows, progress, router, codes,
                                        columns=columns)
        return Written(sorted_keys, seg_ids, chunk_rows, lrsq, sums,
                       None if columns is None else [e["name"] for e in columns.schema])

    def hash_rows(self, source: VectorSource | StoredRows, progress: ProgressLike,
                  router: Router) -> tuple[np.ndarray, PreparedRows | None]:
        """Pass 1: validate every row (finite, non-zero for cosine) and compute its bucket
        key; and, when they fit ``_KEEP_STORED_BYTES``, the rows in stored form."""
        keys = np.empty(source.n, dtype=np.uint64)
        dtype = np.dtype(self.config.dtype)
        keep = not isinstance(source, StoredRows) and source.n * source.dim * dtype.itemsize <= _KEEP_STORED_BYTES
        kept = np.empty((source.n, self.config.stored_dim), dtype=dtype) if keep else None
        bar = make_progress(progress, total=source.n, desc="hashing")
        try:
            for start, block in source.blocks(_HASH_BLOCK_ROWS):
                x = block
                if not isinstance(source, StoredRows):  # stored rows are in stored form
                    x = normalise_rows(block, self.config.metric, what="vectors", offset=start)
                    x = self.as_stored(x, offset=start)
                keys[start : start + len(block)] = router.keys(x)
                if kept is not None:
                    kept[start : start + len(block)] = x  # exact: x is rounded to the storage dtype
                bar.update(len(block))
        finally:
            bar.close()
        return keys, None if kept is None else PreparedRows(kept)

    def as_stored(self, x: np.ndarray, *, offset: int = 0, in_place: bool = False,
                  rows: np.ndarray | None = None) -> np.ndarray:
        """``x`` as the segment will hold it (float16 storage rounds), so keys computed from
        it are the keys of the stored rows; refuses values the storage dtype cannot hold,
        naming the input row (``offset`` + the row of ``x``, or ``rows[row]``). Works in
        blocks (a training sample is hundreds of MB); ``in_place``: rounds ``x`` itself,
        which the caller owns."""
        if self.config.dtype != "float16":
            return x
        out = x if in_place else np.empty_like(x, dtype=np.float32)
        for s in range(0, len(x), _HASH_BLOCK_ROWS):
            block = x[s : s + _HASH_BLOCK_ROWS]
            too_big = np.abs(block) > np.finfo(np.float16).max
            if too_big.any():
                bad = s + int(np.argwhere(too_big)[0][0])
                bad = int(rows[bad]) if rows is not None else offset + bad
                raise InvalidInputError(
                    f"Expected values within float16 range (|v| <= 65504) for a float16 store, got "
                    f"a larger one in row {bad}. Rescale the vectors or use a float32 store."
                )
            out[s : s + len(block)] = block.astype(np.float16)
        return out

    def write_segment(self, seg: int, source: VectorSource | StoredRows | PreparedRows, order: np.ndarray,
                      sorted_keys: np.ndarray, seg_ids: np.ndarray, chunk_rows: int, progress: ProgressLike,
                      router: Router, codes: str, *, columns: TableColumns | StoredRows | None = None
                      ) -> tuple[dict | None, dict[str, np.ndarray]]:
        """Pass 2: write rows in bucket order (``order``; their keys ``sorted_keys``),
        chunk-aligned windows, then fsync; with ``columns``, their metadata too.

        With a learned router, every row's LRSQ codes (of its stored form) are written too:
        copied when the source rows already hold codes of this model (a merge), else
        encoded. Returns the segment record's ``lrsq`` entry (None without) and the chunk
        checksums."""
        n, dim = source.n, self.config.stored_dim
        window = max(chunk_rows, (_WRITE_WINDOW_BYTES // (dim * 4)) // chunk_rows * chunk_rows)
        quantizer = router.lrsq
        sketch = None if quantizer is None else quantizer.sketch
        lrsq = None if quantizer is None else {"rank": quantizer.rank, "aux": quantizer.aux_width,
                                               "block": quantizer.block, "model": codes}
        if sketch is not None:
            lrsq["sketch"] = sketch.m
        copy_codes = quantizer is not None and isinstance(source, StoredRows) and source.has_codes(codes)
        stored_form = isinstance(source, (StoredRows, PreparedRows))
        writer = seglib.SegmentWriter(self.segments_root, segment_name(seg), n=n, dim=dim,
                                      dtype=self.config.dtype, chunk_rows=chunk_rows,
                                      lrsq_widths=None if lrsq is None else (lrsq["rank"], lrsq["aux"],
                                                                             lrsq.get("sketch", 0)),
                                      columns=columns is not None)
        bar = make_progress(progress, total=n, desc="writing")
        try:
            for start in range(0, n, window):
                rows = order[start : start + window]
                inv = np.argsort(rows, kind="stable")
                ascending = rows[inv]  # ascending reads, then back to key order
                taken = source.take(ascending)
                if not stored_form:
                    taken = normalise_rows(taken, self.config.metric, what="vectors")
                block = np.empty((len(rows), dim), dtype=np.float32)
                block[inv] = taken
                codes = None
                if copy_codes:
                    taken = source.take_codes(ascending)
                    codes = tuple(np.empty_like(c) for c in taken)
                    for mine, theirs in zip(codes, taken):
                        mine[inv] = theirs
                elif quantizer is not None:  # bounds must hold for the rows as stored
                    y = router.rotate(block if stored_form else self.as_stored(block))
                    codes = quantizer.encode(y)
                    if sketch is not None:
                        codes += (sketch.encode(y, _rotated_centers(router, sorted_keys[start : start + len(rows)])),)
                meta = None if columns is None else columns.take_columns(ascending).take(np.argsort(inv))
                writer.write(start, block, seg_ids[start : start + len(rows)], codes, meta)
                bar.update(len(rows))
            sums = writer.finish()
        finally:
            bar.close()
        return lrsq, sums

    def check_disk_space(self, n: int) -> None:
        """Refuse up front a write that cannot fit on the device (the segment and its codes)."""
        need = self.segment_bytes(n)
        free = shutil.disk_usage(self.path).free
        if need > free:
            raise DiskFullError(
                f"Not enough space on the device of {str(self.path)!r}: writing {n:,} rows needs about "
                f"{mib(need)}, {mib(free)} are free. Free some space and retry; the store is unchanged."
            )

    def segment_bytes(self, n: int) -> int:
        row = self.config.stored_dim * np.dtype(self.config.dtype).itemsize + 8
        quantizer = self.reads.router.lrsq
        if quantizer is not None:
            row += quantizer.rank + 2 * quantizer.aux_width + (quantizer.sketch.m if quantizer.sketch else 0)
        return n * row

    def write_error(self, exc: OSError, n: int) -> AsteriaError:
        """A failed write (nothing was published) as an asteria error naming what it needed."""
        return catalog_error(self.path, exc, writing=(
            f"while writing {n:,} rows (about {mib(self.segment_bytes(n))} needed, "
            f"{mib(shutil.disk_usage(self.path).free)} free after cleanup)"))

    @contextmanager
    def attempt(self, seg: int, n: int) -> Iterator[Attempt]:
        """One write of segment ``seg`` (``n`` rows): unless the block marks it published,
        its segment directory and the model saved for it (``attempt.model``) are removed
        on the way out, and an OS error becomes a one-line asteria error."""
        attempt = Attempt()
        try:
            yield attempt
        except AsteriaError:  # already one line (a DiskFullError is an OSError too)
            raise
        except OSError as exc:
            raise self.write_error(exc, n) from None
        finally:
            if not attempt.published:
                self.discard_unpublished(seg, attempt.model)

    def discard_unpublished(self, seg: int, model: dict | None = None) -> None:
        """Remove the directory of segment ``seg`` unless the catalog has published it, and
        the directory of the newly saved ``model`` record, if any, with it."""
        with self.catalog.read() as txn:
            if seg in self.catalog.segments(txn):
                return
        if (self.segments_root / segment_name(seg)).exists():
            seglib.remove_segment(self.segments_root, segment_name(seg))
        if model is not None:
            shutil.rmtree(self.path / model["dir"], ignore_errors=True)


class Attempt:
    """What :meth:`SegmentPipeline.attempt` cleans up unless the write was published."""

    def __init__(self) -> None:
        self.model: dict | None = None
        self.published = False


class TableColumns:
    """Metadata of an ingest's rows (a pyarrow Table in input order, cast to the store's
    ``schema``): ``take_columns`` of row numbers, like :class:`StoredRows`."""

    def __init__(self, table, schema: list[dict]):
        self.table = table
        self.schema = schema

    def take_columns(self, rows: np.ndarray):
        return self.table.take(rows)


class PreparedRows:
    """Rows already in stored form (validated, normalised, rounded to the storage dtype),
    kept by pass 1 for pass 2: ``take`` of row numbers, like VectorSource."""

    def __init__(self, rows: np.ndarray):
        self.rows = rows
        self.n, self.dim = rows.shape

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self.rows[rows].astype(np.float32, copy=False)


def live_rows(view: View, segs: list[int] | None = None) -> dict[int, np.ndarray]:
    """The live rows of each segment of ``view`` (all, or ``segs``), ascending: neither
    deleted nor in a gap (rows a split moved out have no extent and no tombstone)."""
    out = {}
    for seg in sorted(view.segments) if segs is None else segs:
        n = view.segments[seg].n
        mask = view.live_mask(seg, 0, n)
        out[seg] = np.arange(n) if mask is None else np.flatnonzero(mask)
    return out


class StoredRows:
    """Live rows of a view's segments (:func:`live_rows`, or some of them) as one ``(n,
    d)`` source: ``blocks`` in storage order and ``take`` of ascending row numbers, like
    VectorSource."""

    def __init__(self, view: View, rows: dict[int, np.ndarray]):
        """``rows``: the rows (ascending) of each segment, in segment order."""
        self.parts = [(view.segments[seg], np.asarray(r, dtype=np.int64)) for seg, r in sorted(rows.items())]
        #: The store's metadata columns (catalog schema entries), empty without.
        self.schema = list(view.schema or [])
        self.offsets = np.cumsum([0] + [len(rows) for _, rows in self.parts])
        self.n = int(self.offsets[-1])
        self.dim = self.parts[0][0].dim if self.parts else 0

    def _gather(self, rows: np.ndarray, read) -> list[np.ndarray]:
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        pieces = []
        for p in np.unique(part).tolist():
            sel = part == p
            reader, live = self.parts[p]
            pieces.append((sel, read(reader, live[rows[sel] - self.offsets[p]])))
        return pieces

    def take(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        for sel, values in self._gather(rows, lambda r, idx: r.take_vectors(idx)):
            out[sel] = values
        return out

    def take_columns(self, rows: np.ndarray):
        """The metadata of ascending ``rows`` (a pyarrow Table of :attr:`schema`)."""
        import pyarrow as pa

        pieces = self._gather(rows, lambda r, idx: r.take_columns(idx, self.schema))
        return pa.concat_tables([t for _, t in pieces]) if pieces else \
            self.parts[0][0].take_columns(np.empty(0, dtype=np.int64), self.schema)

    def has_codes(self, codes: str) -> bool:
        """Whether every part holds LRSQ codes labelled ``codes`` (and so the sketch codes
        of that model, where it has a sketch)."""
        return all(r.lrsq_meta is not None and r.lrsq_meta.get("model") == codes for r, _ in self.parts)

    def take_codes(self, rows: np.ndarray) -> tuple[np.ndarray, ...]:
        """The stored LRSQ codes and aux values of ascending ``rows``, and their sketch
        codes where the segments hold them."""
        meta = self.parts[0][0].lrsq_meta
        names = ("lrsq", "lrsq_aux") + (("sketch",) if meta.get("sketch") else ())
        widths = (meta["rank"], meta["aux"], meta.get("sketch"))
        out = tuple(np.empty((len(rows), w), dtype=np.float16 if name == "lrsq_aux" else np.uint8)
                    for name, w in zip(names, widths))
        for sel, parts in self._gather(rows, lambda r, idx: [r.take(name, idx) for name in names]):
            for o, p in zip(out, parts):
                o[sel] = p
        return out

    def blocks(self, block_rows: int):
        for p, (reader, live) in enumerate(self.parts):
            for start in range(0, len(live), block_rows):
                rows = live[start : start + block_rows]
                block = np.asarray(reader.vectors(int(rows[0]), int(rows[-1]) + 1), dtype=np.float32)
                yield int(self.offsets[p]) + start, block[rows - rows[0]]

    def ids(self) -> np.ndarray:
        return np.concatenate([np.asarray(r.ids(0, r.n))[live] for r, live in self.parts]) \
            if self.parts else np.empty(0, dtype=np.uint64)


__all__ = ["MODEL_DIR", "Attempt", "PreparedRows", "SegmentPipeline", "StoredRows", "TableColumns", "Written",
           "live_rows"]
