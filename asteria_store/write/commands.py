"""The write commands of an open handle: ingest (and upsert), delete, train, compact, and
recording damage that ``verify`` found.

Each command validates its input, takes the writer lock, and hands the work to the rest
of the package: the segment pipeline (pipeline.py) writes and fsyncs, the commit protocol
(commit.py) publishes, re-fits and merges are rewrites (rewrite.py), the upkeep policy
(upkeep.py) runs after each ingest, and garbage collection (gc.py) follows every commit
that retired something.

Long work runs under the writer lock, and other writers QUEUE for it (they wait as long as
it is held, and say so after a second when showing progress): a concurrent ingest is
delayed, never failed. Readers are never blocked: they read their own snapshot.
"""

from __future__ import annotations

import sys
import time
from typing import Literal

import numpy as np

from ..config import COLUMNS_FORMAT_VERSION, STRING_IDS_FORMAT_VERSION
from ..errors import DuplicateIdError, IdNotFoundError, InvalidArgumentError, InvalidInputError
from ..io import ArrayLike, VectorSource, load_ids
from ..model.fit import sample_rows_for, train_config
from ..progress import ProgressLike
from ..ids import as_id_array, check_kind, given_ids, id_kind, is_string_ids, load_names, to_internal
from ..reads import ReadSide
from ..results import CompactResult, DeleteResult, IngestResult, TrainResult
from ..storage.lock import WriterLock
from .commit import Commits, record_segment
from .gc import Garbage, mark_damaged
from ..storage import columns as collib
from .pipeline import SegmentPipeline, TableColumns, Written
from .rewrite import Rewrites
from .upkeep import MIN_TRAIN_ROWS, Upkeep, set_growth

#: Largest external id: ids are returned as int64, with -1 marking "no result".
MAX_ID = 2**63 - 1

OnConflict = Literal["error", "replace"]


class WriteSide:
    """Ingest, upsert, delete, train, compact, and the upkeep that follows each ingest."""

    def __init__(self, reads: ReadSide, *, lock_timeout: float | None = None):
        self.reads = reads
        self.path = reads.path
        self.config = reads.config
        self.catalog = reads.catalog
        self.lock_timeout = lock_timeout
        self.pipeline = SegmentPipeline(reads)
        self.commits = Commits(reads)
        self.garbage = Garbage(reads)
        self.rewrites = Rewrites(reads, self.pipeline, self.commits)
        self.upkeep = Upkeep(reads, self.rewrites, self.garbage)

    def lock(self, progress: ProgressLike = None) -> WriterLock:
        """The writer lock; writers queue for it (``lock_timeout``: None waits as long as
        another writer holds it)."""
        def say() -> None:
            print(f"waiting for another process writing to {str(self.path)!r}...", file=sys.stderr)

        return WriterLock(self.path, timeout=self.lock_timeout, on_wait=say if progress else None)

    # -- ingest --------------------------------------------------------------------------

    def ingest(self, vectors: ArrayLike, ids: ArrayLike | None, *, on_conflict: OnConflict,
               progress: ProgressLike, metadata=None) -> IngestResult:
        if on_conflict not in ("error", "replace"):
            raise InvalidArgumentError(f"on_conflict must be 'error' or 'replace', got {on_conflict!r}.")
        started = time.perf_counter()
        source = VectorSource(vectors, dim=self.config.dim, what="vectors")
        n = source.n
        with self.lock(progress):
            self.reads.current_view()  # the router as of now (another process may have trained)
            cat = self.catalog
            with cat.read() as txn:
                next_id = int(cat.get_meta(txn, "next_id"))
                seg = int(cat.get_meta(txn, "next_segment"))
                pending = cat.get_meta(txn, "pending_training")
                empty = not cat.segments(txn)
                kind = id_kind(cat, txn)
                ids = None if ids is None else given_ids(ids)
                strings = ids is not None and is_string_ids(ids)
                check_kind(kind, strings)
                names = None
                if strings:  # internal ids: a known string keeps its own, a new one gets a free one
                    names = load_names(ids, n=n)
                    found, id_arr = cat.lookup_names(txn, names)
                    if on_conflict == "error" and found.any():
                        raise DuplicateIdError(
                            f"Expected new ids, got {int(found.sum())} already in the store (first: "
                            f"{names[int(np.flatnonzero(found)[0])]!r}). Delete them first, choose other ids, or "
                            "replace them (upsert, or ingest --on-conflict replace).")
                    fresh = cat.free_ids(txn, next_id, int((~found).sum()), MAX_ID)
                    if fresh is None:
                        raise InvalidInputError(f"Cannot assign {n} internal ids: fewer are free below 2**63.")
                    id_arr[~found] = fresh
                    given = np.array(names, dtype=object)  # what the result reports
                    names = ([names[i] for i in np.flatnonzero(~found).tolist()], fresh)
                elif ids is None:
                    id_arr = cat.free_ids(txn, next_id, n, MAX_ID)
                    if id_arr is None:
                        raise InvalidInputError(f"Cannot assign {n} automatic ids: fewer are free below 2**63. "
                                                "Pass explicit ids.")
                else:
                    id_arr = load_ids(ids, n=n)
                    if int(id_arr.max()) > MAX_ID:
                        raise InvalidInputError(f"Expected ids below 2**63, got {int(id_arr.max())}.")
                    self._check_ids(txn, id_arr, new=on_conflict == "error")
                schema = cat.get_meta(txn, "schema")
            columns = None
            if metadata is not None:  # checked against the schema before anything is written
                table, schema = collib.conform(metadata, n, schema)
                columns = TableColumns(table, schema) if schema else None
            self.pipeline.check_disk_space(n)
            # Automatic ids continue after the largest id given so far, while that fits.
            next_id = max(next_id, int(id_arr.max()) + 1) if int(id_arr.max()) < MAX_ID else next_id

            router, model_rec, train_s = self.reads.router, None, 0.0
            with self.pipeline.attempt(seg, n) as attempt:
                if pending is not None and empty and n >= MIN_TRAIN_ROWS:
                    t0 = time.perf_counter()
                    expected = max(n, pending.get("expected_size") or 0)
                    # no name holds the sample: its memory is free before the rows are written
                    router, _ = self.rewrites.fit(self.pipeline.sample_rows(
                        source, sample_rows_for(expected, bits=pending.get("bits")), pending["seed"]),
                        pending, expected=expected, init=None, progress=progress)
                    attempt.model = model_rec = self.pipeline.save_model(router)
                    train_s = time.perf_counter() - t0
                written = self.pipeline.write_bucketed(
                    seg, source, id_arr, router, model_rec["digest"] if model_rec else self.reads.codes_digest,
                    progress, columns=columns)
                replaced = self._publish_segment(seg, written, next_id=next_id, model=model_rec,
                                                 replace=on_conflict == "replace", schema=schema, names=names)
                attempt.published = True
            self.garbage.collect()
            upkeep = self.upkeep.run(progress)
        trained = model_rec is not None or upkeep.trained
        return IngestResult(rows=n, segment=seg, ids=given if strings else id_arr, seconds=time.perf_counter() - started,
                            trained=trained, train_seconds=train_s + upkeep.train_seconds,
                            replaced=replaced, refitted=upkeep.refitted, merged_segments=upkeep.merged,
                            split_rows=upkeep.split_rows, upkeep_seconds=upkeep.seconds,
                            upkeep_deferred=upkeep.deferred)

    def _check_ids(self, txn, ids: np.ndarray, *, new: bool) -> None:
        uniq, counts = np.unique(ids, return_counts=True)
        if len(uniq) != len(ids):
            dup = int(uniq[counts > 1][0])
            raise DuplicateIdError(f"Expected unique ids, got id {dup} more than once in this batch.")
        if not new:
            return
        existing = self.catalog.existing_ids(txn, uniq)
        if len(existing):
            raise DuplicateIdError(
                f"Expected new ids, got {len(existing)} already in the store (first: "
                f"{int(existing[0])}). Delete them first, choose other ids, or replace them "
                "(upsert, or ingest --on-conflict replace)."
            )

    def _publish_segment(self, seg: int, written: Written, *, next_id: int, model: dict | None = None,
                         replace: bool = False, schema: list[dict] | None = None,
                         names: tuple[list[str], np.ndarray] | None = None) -> int:
        """Make a written segment visible: extents, ids, checksums, counters in ONE commit
        (with ``model``, the model trained for it goes live too, retiring the old; with
        ``replace``, rows of ids already stored are deleted in the same commit; ``schema``:
        the store's metadata columns, new ones included; ``names``: string ids new to the
        store and the internal ids they map to). Returns how many rows it replaced."""
        cat = self.catalog

        def changes(txn, generation: int) -> int:
            replaced = 0
            if replace:
                found, segs, rows = cat.locate(txn, written.ids)
                if found.any():
                    cat.delete_ids(txn, written.ids[found], segs[found], rows[found])
                    replaced = int(found.sum())
            record_segment(cat, txn, seg, written)
            cat.put_meta(txn, "next_id", next_id)
            cat.put_meta(txn, "count", int(cat.get_meta(txn, "count")) + len(written.ids) - replaced)
            if model is not None:  # trained for this segment: sized for its rows
                set_growth(cat, txn, fitted_rows=len(written.ids))
            if schema and schema != cat.get_meta(txn, "schema"):
                cat.put_meta(txn, "schema", schema)
                _raise_format(cat, txn, COLUMNS_FORMAT_VERSION)
            if names is not None:
                cat.put_names(txn, *names)
                if cat.get_meta(txn, "id_kind") != "string":
                    cat.put_meta(txn, "id_kind", "string")
                    _raise_format(cat, txn, STRING_IDS_FORMAT_VERSION)
            elif cat.get_meta(txn, "id_kind") is None:
                cat.put_meta(txn, "id_kind", "int")
            return replaced

        return self.commits.commit(changes, what="ingest", expect={"next_segment": seg}, model=model)

    # -- delete --------------------------------------------------------------------------

    def delete(self, ids: ArrayLike) -> DeleteResult:
        ids = given_ids(ids)
        if isinstance(ids, (list, tuple, np.ndarray)) and len(ids) == 0:  # nothing to delete: no commit
            return DeleteResult(rows=0)
        strings = is_string_ids(ids)
        given = list(dict.fromkeys(load_names(ids, unique=False))) if strings else np.unique(as_id_array(ids))
        if len(given) == 0:
            return DeleteResult(rows=0)
        with self.lock():
            with self.catalog.read() as txn:
                id_arr = to_internal(self.catalog, txn, given, missing="keep")
                found, segs, rows = self.catalog.locate(txn, id_arr)
            if not found.all():
                first = given[int(np.flatnonzero(~found)[0])]
                raise IdNotFoundError(
                    f"Cannot delete: {int((~found).sum())} id(s) not in the store (first: "
                    f"{first!r}). Nothing was deleted." if strings else
                    f"Cannot delete: {int((~found).sum())} id(s) not in the store (first: {int(first)}). "
                    "Nothing was deleted."
                )

            def changes(txn, generation: int) -> None:
                cat = self.catalog
                cat.delete_ids(txn, id_arr, segs, rows)
                if strings:
                    cat.delete_names(txn, id_arr)
                cat.put_meta(txn, "count", int(cat.get_meta(txn, "count")) - len(id_arr))

            self.commits.commit(changes, what="a delete")
        return DeleteResult(rows=len(id_arr))

    # -- train and compact ---------------------------------------------------------------

    def train(self, sample: ArrayLike | None, settings: dict, *, progress: ProgressLike) -> TrainResult:
        train_config(**settings, expected_size=1)  # validate before any work
        src = VectorSource(sample, dim=self.config.dim, what="training vectors") if sample is not None else None
        with self.lock(progress):
            result = self.rewrites.retrain(src, settings, init=None, progress=progress,
                                           pinned_bits=settings.get("bits"))
            self.garbage.collect()
        return result

    def compact(self, *, progress: ProgressLike) -> CompactResult:
        """Merge every segment into one, dropping deleted rows."""
        started = time.perf_counter()
        with self.lock(progress):
            view = self.reads.current_view()
            before = len(view.segments)
            stored = sum(r.n for r in view.segments.values())
            if before > 1 or stored > view.count:
                self.rewrites.merge(sorted(view.segments), progress, what="compact")
            self.garbage.collect()
            after = len(self.reads.current_view().segments)
        return CompactResult(segments_before=before, segments_after=after, rows=view.count,
                             dropped=stored - view.count, seconds=time.perf_counter() - started)

    # -- damage --------------------------------------------------------------------------

    def record_damage(self, damaged: list[dict], *, lock_held: bool) -> None:
        """Record damaged chunks in the catalog, so every reader refuses them."""
        lock = self.lock()
        if not lock_held:
            lock.acquire()
        try:
            self.commits.commit(lambda txn, generation: mark_damaged(self.catalog, txn, damaged),
                                what="a damage record")
        finally:
            if not lock_held:
                lock.release()


def _raise_format(cat, txn, version: int) -> None:
    """Raise the store's format version to ``version`` (a feature that older readers must
    refuse has just been recorded)."""
    if int(cat.get_meta(txn, "format_version")) < version:
        cat.put_meta(txn, "format_version", version)


__all__ = ["MAX_ID", "OnConflict", "WriteSide"]
