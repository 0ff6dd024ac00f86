"""The write side of a store: ingest and upsert, delete, train, and the index's upkeep.

Every write builds its data, fsyncs it, and publishes it in ONE LMDB write transaction: a
crash at any point leaves either the old state or the new one, the only debris being an
unpublished segment or model directory (removed by the next writable open or ``verify
--repair``). Directories a commit replaces are retired, not deleted, and collected once no
reader pins a generation that still shows them (reads.py, storage/pins.py).

Upkeep after each ingest, under the same writer lock (one step at most, each its own commit):

* **First training** of a learned store, once it holds ``MIN_TRAIN_ROWS`` vectors.
* **Growth re-fit**: once the data calls for more buckets than the model has (the bucket
  count one ingest of all of it would get: one more bit per doubling), or a learned model's
  training sample could be twice as big (the store grew ``GROWTH_FACTOR``-fold since the
  fit), the model is re-fitted on a sample of the stored rows (warm-started from the
  current one) and every row is re-bucketed into one new segment. Sign stores re-draw
  their hasher with more bits. Each row is rewritten ~2x in all as the store doubles.
* **Tiered merge** (LSM-like): segments fall in tiers by live rows (``MERGE_MIN_ROWS`` and
  then powers of ``MERGE_FACTOR``); a tier holding ``MERGE_FACTOR`` segments is merged into
  one, dropping deleted rows. Bucket keys and LRSQ codes are copied, not recomputed. The
  number of segments, and so of extents per probed bucket, stays O(MERGE_FACTOR x log N).

Long work runs under the writer lock, and other writers QUEUE for it (they wait as long as
it is held, and say so after a second when showing progress): a concurrent ingest is
delayed, never failed. Readers are never blocked: they read their own snapshot.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal, NamedTuple

import numpy as np

from .errors import (
    AsteriaError,
    CorruptStoreError,
    DiskFullError,
    DuplicateIdError,
    IdNotFoundError,
    InvalidArgumentError,
    InvalidInputError,
)
from .io import ArrayLike, VectorSource, load_ids, normalise_rows
from .model.fit import (
    TRAIN_SAMPLE_ROWS,
    BucketPlan,
    check_sample_size,
    plan_buckets,
    sample_indices,
    sample_rows_for,
    train_config,
    training_sample,
)
from .model.persist import save_router
from .model.router import Router, SignHasher, bits_for_size
from .progress import ProgressLike, make_progress
from .query.engine import View
from .reads import ReadSide, as_id_array, mib
from .results import CompactResult, DeleteResult, IngestResult, TrainResult
from .storage import segments as seglib
from .storage.catalog import retired_dirs, retired_name, segment_name
from .storage.lock import WriterLock
from .storage.pins import oldest_pin
from .translate import catalog_error

MODEL_DIR = "model"

#: Largest external id: ids are returned as int64, with -1 marking "no result".
MAX_ID = 2**63 - 1

#: A learned store trains once it holds at least MIN_TRAIN_ROWS vectors (at the first
#: ingest that big, or the ingest that brings it there), on a uniform sample of at most
#: TRAIN_SAMPLE_ROWS (model/fit.py) of them.
MIN_TRAIN_ROWS = 1_000

#: A learned index is also re-fitted (same buckets, a bigger training sample) when the live
#: count reaches this multiple of what it was fitted for, until the sample is full.
GROWTH_FACTOR = 2

#: Tiered merging: segments under MERGE_MIN_ROWS live rows form tier 0, then tier t holds
#: [MERGE_MIN_ROWS * F**(t-1), MERGE_MIN_ROWS * F**t); a tier with F segments is merged.
MERGE_FACTOR = 4
MERGE_MIN_ROWS = 32_768

#: Rows hashed per block in ingest's first pass, and rows written per window in the second.
_HASH_BLOCK_ROWS = 16384
_WRITE_WINDOW_BYTES = 16 * 1024 * 1024

OnConflict = Literal["error", "replace"]


class Written(NamedTuple):
    """A segment written but not yet published."""

    keys: np.ndarray  # bucket key of each row, sorted
    ids: np.ndarray  # id of each row, in segment order
    chunk_rows: int
    lrsq: dict | None  # the segment record's LRSQ entry
    checksums: dict[str, np.ndarray]  # CRC-32C per chunk, per array


def learned_plan(count: int, *, pinned: int | None = None) -> BucketPlan:
    """How a learned model trained now on a store of ``count`` rows is sized: the
    training's own rule (model/fit.py ``plan_buckets``) for the sample the store draws."""
    return plan_buckets(count, min(count, sample_rows_for(count, bits=pinned)), bits=pinned)


def merge_plan(live_rows: dict[int, int], *, factor: int | None = None,
               min_rows: int | None = None) -> list[int]:
    """The segments to merge next (the lowest tier holding ``factor`` of them), or [].
    ``factor`` and ``min_rows`` default to MERGE_FACTOR and MERGE_MIN_ROWS as they are at
    the call (tests and tools may change them)."""
    factor = factor or MERGE_FACTOR
    min_rows = min_rows or MERGE_MIN_ROWS
    tiers: dict[int, list[int]] = {}
    for seg, rows in live_rows.items():
        tier = 0 if rows < min_rows else 1 + int(math.log(rows / min_rows, factor) + 1e-9)
        tiers.setdefault(tier, []).append(seg)
    for tier in sorted(tiers):
        if len(tiers[tier]) >= factor:
            return sorted(tiers[tier])
    return []


class WriteSide:
    """Ingest, upsert, delete, train, compact, and the upkeep that follows each ingest."""

    def __init__(self, reads: ReadSide, *, lock_timeout: float | None = None):
        self.reads = reads
        self.path = reads.path
        self.config = reads.config
        self.catalog = reads.catalog
        self.lock_timeout = lock_timeout

    @property
    def segments_root(self):
        return self.reads.segments_root

    def lock(self, progress: ProgressLike = None) -> WriterLock:
        """The writer lock; writers queue for it (``lock_timeout``: None waits as long as
        another writer holds it)."""
        def say() -> None:
            print(f"waiting for another process writing to {str(self.path)!r}...", file=sys.stderr)

        return WriterLock(self.path, timeout=self.lock_timeout, on_wait=say if progress else None)

    # -- ingest --------------------------------------------------------------------------

    def ingest(self, vectors: ArrayLike, ids: ArrayLike | None, *, on_conflict: OnConflict,
               progress: ProgressLike) -> IngestResult:
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
                if ids is None:
                    id_arr = cat.free_ids(txn, next_id, n, MAX_ID)
                    if id_arr is None:
                        raise InvalidInputError(f"Cannot assign {n} automatic ids: fewer are free below 2**63. "
                                                "Pass explicit ids.")
                else:
                    id_arr = load_ids(ids, n=n)
                    if int(id_arr.max()) > MAX_ID:
                        raise InvalidInputError(f"Expected ids below 2**63, got {int(id_arr.max())}.")
                    self._check_ids(txn, id_arr, new=on_conflict == "error")
            self._check_disk_space(n)
            # Automatic ids continue after the largest id given so far, while that fits.
            next_id = max(next_id, int(id_arr.max()) + 1) if int(id_arr.max()) < MAX_ID else next_id

            router, model_rec, train_s = self.reads.router, None, 0.0
            with self._attempt(seg, n) as attempt:
                if pending is not None and empty and n >= MIN_TRAIN_ROWS:
                    t0 = time.perf_counter()
                    expected = max(n, pending.get("expected_size") or 0)
                    sample = self._sample_rows(source, sample_rows_for(expected, bits=pending.get("bits")),
                                               pending["seed"])
                    router, _ = self._fit(sample, pending, expected=expected, init=None, progress=progress)
                    attempt.model = model_rec = self._save_model(router)
                    train_s = time.perf_counter() - t0
                written = self._write_bucketed(
                    seg, source, id_arr, router, (model_rec or {"digest": self.reads.router_digest})["digest"],
                    progress)
                replaced = self._publish_segment(seg, written, next_id=next_id, model=model_rec,
                                                 replace=on_conflict == "replace")
                attempt.published = True
            self.collect_garbage()
            upkeep = self._upkeep(progress)
        trained = model_rec is not None or upkeep.trained
        return IngestResult(rows=n, segment=seg, ids=id_arr, seconds=time.perf_counter() - started,
                            trained=trained, train_seconds=train_s + upkeep.train_seconds,
                            replaced=replaced, refitted=upkeep.refitted, merged_segments=upkeep.merged,
                            upkeep_seconds=upkeep.seconds)

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
                         replace: bool = False) -> int:
        """Make a written segment visible: extents, ids, checksums, counters in ONE
        transaction (with ``model``, the model trained for it goes live too, retiring the
        old; with ``replace``, rows of ids already stored are deleted in the same
        transaction). Returns how many rows it replaced."""
        replaced = [0]

        def publish(txn):
            cat = self.catalog
            if cat.get_meta(txn, "next_segment") != seg:
                raise CorruptStoreError("The catalog changed during ingest despite the writer lock.")
            generation = int(cat.get_meta(txn, "generation")) + 1
            count = int(cat.get_meta(txn, "count"))
            if replace:
                found, segs, rows = cat.locate(txn, written.ids)
                if found.any():
                    cat.delete_ids(txn, written.ids[found], segs[found], rows[found])
                    replaced[0] = int(found.sum())
            self._put_segment(txn, seg, written)
            cat.put_meta(txn, "next_segment", seg + 1)
            cat.put_meta(txn, "next_id", next_id)
            cat.put_meta(txn, "count", count + len(written.ids) - replaced[0])
            if model is not None:  # the model trained for this segment goes live with it
                cat.retire(txn, generation, model=cat.get_meta(txn, "router")["dir"])
                cat.put_meta(txn, "router", model)
                cat.put_meta(txn, "pending_training", None)
                self._set_growth(txn, fitted_rows=len(written.ids))
            cat.put_meta(txn, "generation", generation)

        self._commit(publish)
        return replaced[0]

    def _put_segment(self, txn, seg: int, written: Written, *, overwrite_ids: bool = False) -> None:
        """Record a written segment: its record, bucket extents, id map and checksums."""
        cat = self.catalog
        n = len(written.ids)
        bounds = np.flatnonzero(np.diff(written.keys)) + 1
        starts = np.concatenate([[0], bounds]).astype(np.int64)
        counts = np.diff(np.concatenate([starts, [n]])).astype(np.int64)
        cat.put_segment(txn, seg, _segment_record(n, written.chunk_rows, written.lrsq))
        cat.put_extents(txn, seg, written.keys[starts], starts, counts)
        cat.put_ids(txn, seg, written.ids, overwrite=overwrite_ids)
        cat.put_checksums(txn, seg, written.checksums)

    # -- delete --------------------------------------------------------------------------

    def delete(self, ids: ArrayLike) -> DeleteResult:
        id_arr = np.unique(as_id_array(ids))
        with self.lock():
            with self.catalog.read() as txn:
                found, segs, rows = self.catalog.locate(txn, id_arr)
            if not found.all():
                missing = id_arr[~found]
                raise IdNotFoundError(
                    f"Cannot delete: {len(missing)} id(s) not in the store (first: {int(missing[0])}). "
                    "Nothing was deleted."
                )

            def publish(txn):
                cat = self.catalog
                cat.delete_ids(txn, id_arr, segs, rows)
                cat.put_meta(txn, "count", int(cat.get_meta(txn, "count")) - len(id_arr))
                cat.put_meta(txn, "generation", int(cat.get_meta(txn, "generation")) + 1)

            self._commit(publish)
        return DeleteResult(rows=len(id_arr))

    # -- training and re-fits ------------------------------------------------------------

    def train(self, sample: ArrayLike | None, settings: dict, *, progress: ProgressLike) -> TrainResult:
        train_config(**settings, expected_size=1)  # validate before any work
        src = VectorSource(sample, dim=self.config.dim, what="training vectors") if sample is not None else None
        with self.lock(progress):
            result = self._retrain(src, settings, init=None, progress=progress, pinned_bits=settings.get("bits"))
            self.collect_garbage()
        return result

    def _retrain(self, src: VectorSource | None, settings: dict, *, init: Router | None,
                 progress: ProgressLike, upkeep: bool = False, pinned_bits: int | None = None) -> TrainResult:
        """Train a model on ``src`` (None: a sample of the stored rows) and re-bucket the
        store with it (the writer lock is held). ``pinned_bits``: bits the store keeps as it
        grows (the user's choice; a growth re-fit's own target is not pinned)."""
        started = time.perf_counter()
        view = self.reads.current_view()
        stored = StoredRows(view)
        size = sample_rows_for(stored.n, bits=settings.get("bits"))
        x = self._sample_rows(src if src is not None else stored, size, settings.get("seed", 0))
        router, history = self._fit(check_sample_size(x), settings, expected=max(stored.n, len(x)), init=init,
                                    progress=progress)
        self._rebucket(router, view, stored, progress, started=started, pinned_bits=pinned_bits,
                       upkeep=upkeep)
        return TrainResult(rows_trained_on=len(x), rows_rebucketed=stored.n, buckets=router.n_buckets,
                           history=history, seconds=time.perf_counter() - started)

    def _fit(self, sample: np.ndarray, settings: dict, *, expected: int, init: Router | None,
             progress: ProgressLike):
        from .model.train import train  # torch: imported only to train

        cfg = train_config(bits=settings.get("bits"), ecc=settings.get("ecc", True), epochs=settings.get("epochs"),
                           batch_size=settings.get("batch_size", 1024),
                           rank=settings.get("rank"), seed=settings.get("seed", 0),
                           device=settings.get("device", "auto"), expected_size=expected)
        warm = init is not None and init.kind in ("ecvh", "tree") and init.dim == self.config.dim
        return train(sample, cfg, progress=progress, init=init if warm else None)

    def _rebucket(self, router: Router, view: View, stored: StoredRows, progress: ProgressLike, *,
                  started: float, pinned_bits: int | None, upkeep: bool) -> None:
        """Write every live row bucketed by ``router`` into ONE new segment and publish it
        with the model, retiring every old segment and the old model, in ONE transaction."""
        with self.catalog.read() as txn:
            seg = int(self.catalog.get_meta(txn, "next_segment"))
        with self._attempt(seg, stored.n) as attempt:
            self._check_disk_space(stored.n)
            attempt.model = model_rec = self._save_model(router)
            written = self._write_bucketed(seg, stored, stored.ids(), router, model_rec["digest"],
                                           progress) if stored.n else None
            seconds = time.perf_counter() - started

            def publish(txn):
                cat = self.catalog
                if int(cat.get_meta(txn, "generation")) != view.generation:
                    raise CorruptStoreError("The catalog changed during training despite the writer lock.")
                generation = view.generation + 1
                old_model = cat.get_meta(txn, "router")["dir"]
                cat.clear_rows(txn)
                if written is not None:
                    self._put_segment(txn, seg, written)
                    cat.put_meta(txn, "next_segment", seg + 1)
                cat.put_meta(txn, "router", model_rec)
                cat.put_meta(txn, "pending_training", None)
                cat.put_meta(txn, "damaged", None)  # every damaged chunk was in a retired segment
                cat.retire(txn, generation, segments=list(view.segments), model=old_model)
                growth = {"fitted_rows": stored.n}
                if pinned_bits is not None:
                    growth["bits"] = pinned_bits
                self._set_growth(txn, **growth)
                if upkeep:
                    self._count_upkeep(txn, "refits", stored.n, seconds)
                cat.put_meta(txn, "generation", generation)

            self._commit(publish)
            attempt.published = True

    def _growth_target(self, count: int, growth: dict) -> int | None:
        """The bits a growth re-fit would pass to training now (``growth``: the catalog's
        record; 0: let the sizing rule choose a tree's buckets), or None when none is due:
        when the data calls for GROWTH_FACTOR times the buckets the model has (what one
        ingest of all of it would get), or, for a flat learned model, when the store has
        grown GROWTH_FACTOR-fold since the fit and the training sample could be twice as
        big."""
        if not growth.get("grow"):
            return None
        router = self.reads.router
        pinned = growth.get("bits")
        if router.kind == "sign":
            target = pinned or bits_for_size(count)
            return target if target > router.bits else None
        plan = learned_plan(count, pinned=pinned)
        if plan.buckets >= GROWTH_FACTOR * router.n_buckets:
            return pinned or (0 if plan.tree else plan.bits)
        if plan.tree or router.kind == "tree":
            return None
        fitted = int(growth.get("fitted_rows") or 0)
        trained_on = int(router.info.get("trained_on") or 0)
        sample_grows = min(count, TRAIN_SAMPLE_ROWS) >= 2 * (trained_on + min(1000, max(1, trained_on // 9)))
        return max(plan.bits, router.bits) if sample_grows and count >= GROWTH_FACTOR * max(fitted, 1) else None

    # -- merging -------------------------------------------------------------------------

    def compact(self, *, progress: ProgressLike) -> CompactResult:
        """Merge every segment into one, dropping deleted rows."""
        started = time.perf_counter()
        with self.lock(progress):
            view = self.reads.current_view()
            before = len(view.segments)
            stored = sum(r.n for r in view.segments.values())
            if before > 1 or stored > view.count:
                self._merge(sorted(view.segments), progress, what="compact")
            self.collect_garbage()
            after = len(self.reads.current_view().segments)
        return CompactResult(segments_before=before, segments_after=after, rows=view.count,
                             dropped=stored - view.count, seconds=time.perf_counter() - started)

    def _merge(self, segs: list[int], progress: ProgressLike, *, what: str = "merges") -> None:
        """Rewrite segments ``segs`` (live rows only, keys and codes copied) as ONE new
        segment, published in ONE transaction that retires them (writer lock held)."""
        started = time.perf_counter()
        view = self.reads.current_view()
        cat = self.catalog
        with cat.read() as txn:
            seg = int(cat.get_meta(txn, "next_segment"))
            keys, buckets = _segment_keys(cat, txn, segs, view)
        rows = StoredRows(view, segs)
        row_keys = np.concatenate([keys[s][live] for s, (_, live) in zip(segs, rows.parts)]) \
            if rows.n else np.empty(0, dtype=np.uint64)
        with self._attempt(seg, rows.n) as attempt:
            self._check_disk_space(rows.n)
            written = self._write_bucketed(seg, rows, rows.ids(), self.reads.router, self.reads.router_digest,
                                           progress, keys=row_keys) if rows.n else None
            seconds = time.perf_counter() - started

            def publish(txn):
                if int(cat.get_meta(txn, "generation")) != view.generation:
                    raise CorruptStoreError("The catalog changed during a merge despite the writer lock.")
                generation = view.generation + 1
                for s in segs:
                    cat.drop_segment(txn, s, buckets[s])
                if written is not None:
                    self._put_segment(txn, seg, written, overwrite_ids=True)
                    cat.put_meta(txn, "next_segment", seg + 1)
                damaged = cat.get_meta(txn, "damaged") or {}
                if damaged:
                    cat.put_meta(txn, "damaged", {s: d for s, d in damaged.items() if int(s) not in segs} or None)
                cat.retire(txn, generation, segments=segs)
                self._count_upkeep(txn, what, rows.n, seconds)
                cat.put_meta(txn, "generation", generation)

            self._commit(publish)
            attempt.published = True

    # -- upkeep after an ingest ----------------------------------------------------------

    def _upkeep(self, progress: ProgressLike) -> _Upkeep:
        """First training, growth re-fit, or tiered merges (writer lock held)."""
        started = time.perf_counter()
        view = self.reads.current_view()
        with self.catalog.read() as txn:
            pending = self.catalog.get_meta(txn, "pending_training")
            growth = self.catalog.get_meta(txn, "growth") or {}
        if pending is not None:
            if view.count < MIN_TRAIN_ROWS:
                return _Upkeep()
            # Earlier small batches went to the baseline router: now that the store holds
            # enough, train on a sample of it and re-bucket it.
            result = self._retrain(None, {"bits": pending.get("bits"), "seed": pending.get("seed", 0)},
                                   init=None, progress=progress, pinned_bits=pending.get("bits"))
            self.collect_garbage()
            return _Upkeep(trained=True, train_seconds=result.seconds, seconds=time.perf_counter() - started)
        target = self._growth_target(view.count, growth)
        if target is not None:
            router = self.reads.router
            if router.kind == "sign":
                fresh = SignHasher.random(self.config.dim, target, seed=growth.get("seed", 0))
                self._rebucket(fresh, view, StoredRows(view), progress, started=started,
                               pinned_bits=growth.get("bits"), upkeep=True)
                self.collect_garbage()
                return _Upkeep(refitted=True, seconds=time.perf_counter() - started)
            result = self._retrain(None, {"bits": growth.get("bits") or target or None, "seed": growth.get("seed", 0)},
                                   init=router, progress=progress, upkeep=True, pinned_bits=growth.get("bits"))
            self.collect_garbage()
            return _Upkeep(trained=True, refitted=True, train_seconds=result.seconds,
                           seconds=time.perf_counter() - started)
        merged = 0
        while True:
            view = self.reads.current_view()
            damaged = {s for s in view.segments if view.segments[s].quarantined}
            plan = merge_plan({s: r.n - len(view.deleted.get(s, ())) for s, r in view.segments.items()
                               if s not in damaged})
            if not plan:
                break
            self._merge(plan, progress)
            merged += len(plan)
            self.collect_garbage()
        return _Upkeep(merged=merged, seconds=time.perf_counter() - started if merged else 0.0)

    def _set_growth(self, txn, **fields) -> None:
        growth = self.catalog.get_meta(txn, "growth")
        if growth is not None:
            self.catalog.put_meta(txn, "growth", {**growth, **fields})

    def _count_upkeep(self, txn, what: str, rows: int, seconds: float) -> None:
        stats = self.catalog.get_meta(txn, "maintenance") or {}
        stats[what] = stats.get(what, 0) + 1
        stats[f"{what}_rows"] = stats.get(f"{what}_rows", 0) + int(rows)
        stats[f"{what}_seconds"] = round(stats.get(f"{what}_seconds", 0.0) + seconds, 3)
        self.catalog.put_meta(txn, "maintenance", stats)

    # -- writing segments ----------------------------------------------------------------

    def _sample_rows(self, source: VectorSource | StoredRows, size: int, seed: int) -> np.ndarray:
        """A seeded uniform sample of at most ``size`` rows, in stored form."""
        if isinstance(source, StoredRows):
            return source.take(sample_indices(source.n, size, seed))
        return self._as_stored(training_sample(source, size, seed, self.config.metric))

    def _save_model(self, router: Router) -> dict[str, str]:
        """Write ``router`` under model/<kind>-g<generation it will be published at>
        (fsynced; the caller holds the writer lock); the catalog record to publish."""
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

    def _write_bucketed(self, seg: int, rows, ids: np.ndarray, router: Router, digest: str,
                        progress: ProgressLike, *, keys: np.ndarray | None = None) -> Written:
        """Hash ``rows`` with ``router`` (or take their ``keys``), sort them by bucket and
        write them as segment ``seg`` (not yet published): what publishing it needs."""
        if keys is None:
            keys = self._hash_rows(rows, progress, router)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        del keys
        seg_ids = ids[order]
        # Small segments get small chunks: Zarr pads the edge chunk to full size.
        chunk_rows = min(self.config.chunk_rows, max(256, 1 << (len(ids) - 1).bit_length()))
        lrsq, sums = self._write_segment(seg, rows, order, seg_ids, chunk_rows, progress, router, digest)
        return Written(sorted_keys, seg_ids, chunk_rows, lrsq, sums)

    def _hash_rows(self, source: VectorSource | StoredRows, progress: ProgressLike, router: Router) -> np.ndarray:
        """Pass 1: validate every row (finite, non-zero for cosine) and compute its bucket key."""
        keys = np.empty(source.n, dtype=np.uint64)
        bar = make_progress(progress, total=source.n, desc="hashing")
        try:
            for start, block in source.blocks(_HASH_BLOCK_ROWS):
                x = block
                if not isinstance(source, StoredRows):  # stored rows are in stored form
                    x = normalise_rows(block, self.config.metric, what="vectors", offset=start)
                    x = self._as_stored(x, offset=start)
                keys[start : start + len(block)] = router.keys(x)
                bar.update(len(block))
        finally:
            bar.close()
        return keys

    def _as_stored(self, x: np.ndarray, *, offset: int = 0) -> np.ndarray:
        """``x`` as the segment will hold it (float16 storage rounds), so keys computed from
        it are the keys of the stored rows; refuses values the storage dtype cannot hold."""
        if self.config.dtype != "float16":
            return x
        too_big = np.abs(x) > np.finfo(np.float16).max
        if too_big.any():
            bad = offset + int(np.argwhere(too_big)[0][0])
            raise InvalidInputError(
                f"Expected values within float16 range (|v| <= 65504) for a float16 store, got "
                f"a larger one in row {bad}. Rescale the vectors or use a float32 store."
            )
        return x.astype(np.float16).astype(np.float32)

    def _write_segment(self, seg: int, source: VectorSource | StoredRows, order: np.ndarray,
                       seg_ids: np.ndarray, chunk_rows: int, progress: ProgressLike,
                       router: Router, model_digest: str) -> tuple[dict | None, dict[str, np.ndarray]]:
        """Pass 2: write rows in bucket order (``order``), chunk-aligned windows, then fsync.

        With a learned router, every row's LRSQ codes (of its stored form) are written too:
        copied when the source rows already hold codes of this model (a merge), else
        encoded. Returns the segment record's ``lrsq`` entry (None without) and the chunk
        checksums."""
        n, dim = source.n, self.config.dim
        window = max(chunk_rows, (_WRITE_WINDOW_BYTES // (dim * 4)) // chunk_rows * chunk_rows)
        quantizer = router.lrsq
        lrsq = None if quantizer is None else {"rank": quantizer.rank, "aux": quantizer.aux_width,
                                               "block": quantizer.block, "model": model_digest}
        copy_codes = quantizer is not None and isinstance(source, StoredRows) and source.has_codes(model_digest)
        writer = seglib.SegmentWriter(self.segments_root, segment_name(seg), n=n, dim=dim,
                                      dtype=self.config.dtype, chunk_rows=chunk_rows,
                                      lrsq_widths=None if lrsq is None else (lrsq["rank"], lrsq["aux"]))
        bar = make_progress(progress, total=n, desc="writing")
        try:
            for start in range(0, n, window):
                rows = order[start : start + window]
                inv = np.argsort(rows, kind="stable")
                ascending = rows[inv]  # ascending reads, then back to key order
                block = np.empty((len(rows), dim), dtype=np.float32)
                block[inv] = source.take(ascending)
                if not isinstance(source, StoredRows):
                    block = normalise_rows(block, self.config.metric, what="vectors")
                codes = None
                if copy_codes:
                    c, a = source.take_codes(ascending)
                    codes = (np.empty_like(c), np.empty_like(a))
                    codes[0][inv], codes[1][inv] = c, a
                elif quantizer is not None:  # bounds must hold for the rows as stored
                    codes = quantizer.encode(router.rotate(self._as_stored(block)))
                writer.write(start, block, seg_ids[start : start + len(rows)], codes)
                bar.update(len(rows))
            sums = writer.finish()
        finally:
            bar.close()
        return lrsq, sums

    def _check_disk_space(self, n: int) -> None:
        """Refuse up front a write that cannot fit on the device (the segment and its codes)."""
        need = self._segment_bytes(n)
        free = shutil.disk_usage(self.path).free
        if need > free:
            raise DiskFullError(
                f"Not enough space on the device of {str(self.path)!r}: writing {n:,} rows needs about "
                f"{mib(need)}, {mib(free)} are free. Free some space and retry; the store is unchanged."
            )

    def _segment_bytes(self, n: int) -> int:
        row = self.config.dim * np.dtype(self.config.dtype).itemsize + 8
        quantizer = self.reads.router.lrsq
        if quantizer is not None:
            row += quantizer.rank + 2 * quantizer.aux_width
        return n * row

    def _write_error(self, exc: OSError, n: int) -> AsteriaError:
        """A failed write (nothing was published) as an asteria error naming what it needed."""
        return catalog_error(self.path, exc, writing=(
            f"while writing {n:,} rows (about {mib(self._segment_bytes(n))} needed, "
            f"{mib(shutil.disk_usage(self.path).free)} free after cleanup)"))

    @contextmanager
    def _attempt(self, seg: int, n: int) -> Iterator[_Attempt]:
        """One write of segment ``seg`` (``n`` rows): unless the block marks it published,
        its segment directory and the model saved for it (``attempt.model``) are removed
        on the way out, and an OS error becomes a one-line asteria error."""
        attempt = _Attempt()
        try:
            yield attempt
        except OSError as exc:
            raise self._write_error(exc, n) from None
        finally:
            if not attempt.published:
                self._discard_unpublished(seg, attempt.model)

    def _discard_unpublished(self, seg: int, model: dict | None = None) -> None:
        """Remove the directory of segment ``seg`` unless the catalog has published it, and
        the directory of the newly saved ``model`` record, if any, with it."""
        with self.catalog.read() as txn:
            if seg in self.catalog.segments(txn):
                return
        if (self.segments_root / segment_name(seg)).exists():
            seglib.remove_segment(self.segments_root, segment_name(seg))
        if model is not None:
            shutil.rmtree(self.path / model["dir"], ignore_errors=True)

    def _commit(self, fn) -> None:
        """Publish ``fn``'s changes in one durable transaction."""
        self.catalog.write(fn)
        self.catalog.env.sync(True)
        self.reads.view = None

    # -- garbage and debris --------------------------------------------------------------

    def collect_garbage(self) -> list[str]:
        """Remove retired segment and model directories no live reader can still need
        (every pin at or past the generation that retired them); returns what went."""
        if self.catalog.readonly_env:
            return []
        with self.catalog.read() as txn:
            retired = self.catalog.retired(txn)
        if not retired:
            return []
        floor = oldest_pin(self.path)
        done = [r for r in retired if floor is None or r["at"] <= floor]
        for r in done:
            target = self.segments_root / retired_name(r) if "segment" in r else self.path / retired_name(r)
            if target.exists():
                shutil.rmtree(target)
        if done:
            seglib.fsync_dir(self.segments_root)
            self.catalog.write(lambda txn: self.catalog.forget_retired(txn, done))
        return [retired_name(r) for r in done]

    def retired(self) -> tuple[set[str], set[str]]:
        """Names of retired segment dirs and model dirs (kept while readers pin them)."""
        with self.catalog.read() as txn:
            return retired_dirs(self.catalog.retired(txn))

    def orphans(self) -> list[str]:
        with self.catalog.read() as txn:
            live = {segment_name(s) for s in self.catalog.segments(txn)}
            retired = retired_dirs(self.catalog.retired(txn))[0]
        return [d for d in seglib.list_segment_dirs(self.segments_root) if d not in live | retired]

    def orphan_models(self) -> list[str]:
        """Model directories no catalog record points at (one trained by an ingest or
        ``train`` that did not commit), as ``model/<name>``; retired ones are not orphans."""
        with self.catalog.read() as txn:
            keep = {self.catalog.get_meta(txn, "router")["dir"]} | retired_dirs(self.catalog.retired(txn))[1]
        root = self.path / MODEL_DIR
        return sorted(f"{MODEL_DIR}/{p.name}" for p in root.iterdir()
                      if p.is_dir() and f"{MODEL_DIR}/{p.name}" not in keep)

    def remove_orphan_models(self) -> list[str]:
        removed = self.orphan_models()
        for rel in removed:
            shutil.rmtree(self.path / rel, ignore_errors=True)
        return removed

    def record_damage(self, damaged: list[dict], *, lock_held: bool) -> None:
        """Record damaged chunks in the catalog, so every reader refuses them."""
        lock = self.lock()
        if not lock_held:
            lock.acquire()
        try:
            def record(txn):
                cat = self.catalog
                live = cat.segments(txn)
                raw = cat.get_meta(txn, "damaged") or {}
                for d in damaged:
                    if d["segment"] in live:  # (a retrain meanwhile rewrote it: nothing to flag)
                        chunks = raw.setdefault(str(d["segment"]), {}).setdefault(d["array"], [])
                        if d["chunk"] not in chunks:
                            chunks.append(d["chunk"])
                cat.put_meta(txn, "damaged", raw)
                cat.put_meta(txn, "generation", int(cat.get_meta(txn, "generation")) + 1)

            self._commit(record)
        finally:
            if not lock_held:
                lock.release()


class _Attempt:
    """What :meth:`WriteSide._attempt` cleans up unless the write was published."""

    def __init__(self) -> None:
        self.model: dict | None = None
        self.published = False


class _Upkeep(NamedTuple):
    trained: bool = False
    refitted: bool = False
    merged: int = 0
    train_seconds: float = 0.0
    seconds: float = 0.0


def _segment_record(n: int, chunk_rows: int, lrsq: dict | None) -> dict:
    record = {"rows": n, "chunk_rows": chunk_rows, "created": time.time()}
    if lrsq is not None:  # {"rank", "aux", "block", "model": digest of the encoding model}
        record["lrsq"] = lrsq
    return record


def _segment_keys(cat, txn, segs: list[int], view: View) -> tuple[dict[int, np.ndarray], dict[int, list[int]]]:
    """The bucket key of every row of each segment in ``segs`` (from its extents), and the
    buckets each one has extents in."""
    wanted = set(segs)
    keys = {s: np.zeros(view.segments[s].n, dtype=np.uint64) for s in segs}
    buckets: dict[int, list[int]] = {s: [] for s in segs}
    for bucket, seg, first, n in cat.iter_extents(txn):
        if seg in wanted:
            keys[seg][first : first + n] = bucket
            buckets[seg].append(bucket)
    return keys, buckets


class StoredRows:
    """The live rows of a view's segments (all, or ``segs``) as one ``(n, d)`` source:
    ``blocks`` in storage order and ``take`` of ascending row numbers, like VectorSource."""

    def __init__(self, view: View, segs: list[int] | None = None):
        self.parts = []
        for seg in sorted(view.segments) if segs is None else segs:
            reader = view.segments[seg]
            mask = view.live_mask(seg, 0, reader.n)
            self.parts.append((reader, np.arange(reader.n) if mask is None else np.flatnonzero(mask)))
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

    def has_codes(self, digest: str) -> bool:
        """Whether every part holds LRSQ codes encoded by the model of ``digest``."""
        return all(r.lrsq_meta is not None and r.lrsq_meta.get("model") == digest for r, _ in self.parts)

    def take_codes(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The stored LRSQ codes and aux values of ascending ``rows``."""
        reader0 = self.parts[0][0]
        codes = np.empty((len(rows), reader0.lrsq_meta["rank"]), dtype=np.uint8)
        aux = np.empty((len(rows), reader0.lrsq_meta["aux"]), dtype=np.float16)
        for sel, (c, a) in self._gather(rows, lambda r, idx: (r.take("lrsq", idx), r.take("lrsq_aux", idx))):
            codes[sel], aux[sel] = c, a
        return codes, aux

    def blocks(self, block_rows: int):
        for p, (reader, live) in enumerate(self.parts):
            for start in range(0, len(live), block_rows):
                rows = live[start : start + block_rows]
                block = np.asarray(reader.vectors(int(rows[0]), int(rows[-1]) + 1), dtype=np.float32)
                yield int(self.offsets[p]) + start, block[rows - rows[0]]

    def ids(self) -> np.ndarray:
        return np.concatenate([np.asarray(r.ids(0, r.n))[live] for r, live in self.parts]) \
            if self.parts else np.empty(0, dtype=np.uint64)


__all__ = ["GROWTH_FACTOR", "MERGE_FACTOR", "MERGE_MIN_ROWS", "MIN_TRAIN_ROWS", "StoredRows", "WriteSide",
           "learned_plan", "merge_plan"]
