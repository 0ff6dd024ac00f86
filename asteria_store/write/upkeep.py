"""Upkeep policy: when the index re-fits itself, which buckets it splits and which
segments it merges.

After each ingest, under the same writer lock, the first training or a growth re-fit if
one is due, else splits and then merges (each step its own commit):

* **First training** of a learned store, once it holds ``MIN_TRAIN_ROWS`` vectors.
* **Growth re-fit**: once the data calls for more buckets than the model has (the bucket
  count one ingest of all of it would get: one more bit per doubling), or a learned model's
  training sample could be twice as big (the store grew ``GROWTH_FACTOR``-fold since the
  fit), the model is re-fitted on a sample of the stored rows (warm-started from the
  current one) and every row is re-bucketed into one new segment. Sign stores re-draw
  their hasher with more bits. Each row is rewritten ~2x in all as the store doubles.
* **Local splits** (a tree router's): a bucket holding more than ``SPLIT_FACTOR x
  TREE_BUCKET_ROWS`` live rows is split in two (model/tree.py), its rows moved to a new
  segment; other rows stay where they are. Up to ``SPLIT_STEP_ROWS`` rows per commit,
  fullest buckets first. A tree is re-fitted only when the data calls for
  ``TREE_REFIT_FACTOR`` times the buckets it was trained with (its coarse cells and
  training sample then grow too).
* **Tiered merge** (LSM-like): segments fall in tiers by live rows (``MERGE_MIN_ROWS`` and
  then powers of ``MERGE_FACTOR``); a tier holding ``MERGE_FACTOR`` segments is merged into
  one, dropping deleted rows. Bucket keys and LRSQ codes are copied, not recomputed. The
  number of segments, and so of extents per probed bucket, stays O(MERGE_FACTOR x log N).

The plans are here (:func:`learned_plan`, :meth:`Upkeep.growth_target`, :func:`merge_plan`);
the rewrites they call for are rewrite.py's. The catalog keeps the growth state (``growth``)
and counts the upkeep done (``maintenance``): :func:`set_growth`, :func:`count_upkeep`.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, NamedTuple

import lmdb
import numpy as np

from ..errors import DiskFullError
from ..model import fit
from ..model.fit import TRAIN_SAMPLE_ROWS, BucketPlan, plan_buckets, sample_rows_for
from ..model.router import SignHasher, bits_for_size
from ..progress import ProgressLike
from ..reads import ReadSide
from ..storage.catalog import Catalog
from .gc import Garbage
from .pipeline import StoredRows, live_rows

if TYPE_CHECKING:
    from .rewrite import Rewrites

#: A learned store trains once it holds at least MIN_TRAIN_ROWS vectors (at the first
#: ingest that big, or the ingest that brings it there), on a uniform sample of at most
#: TRAIN_SAMPLE_ROWS (model/fit.py) of them.
MIN_TRAIN_ROWS = 1_000

#: A learned index is also re-fitted (same buckets, a bigger training sample) when the live
#: count reaches this multiple of what it was fitted for, until the sample is full.
GROWTH_FACTOR = 2

#: A tree's bucket splits once it holds more than SPLIT_FACTOR x fit.TREE_BUCKET_ROWS live
#: rows (its halves then hold about TREE_BUCKET_ROWS each).
SPLIT_FACTOR = 2

#: Rows moved by one split commit, at most (they are held in RAM as float32 meanwhile).
SPLIT_STEP_ROWS = 131_072

#: A tree re-fits when the data calls for this many times the buckets it was trained with;
#: in between, splits keep its buckets at their size.
TREE_REFIT_FACTOR = 4

#: A segment more than this fraction of whose rows are dead (deleted, or moved out by
#: splits) is rewritten alone: the store's bytes stay under ~2x its live rows'.
DEAD_MAX_FRACTION = 0.5

#: Tiered merging: segments under MERGE_MIN_ROWS live rows form tier 0, then tier t holds
#: [MERGE_MIN_ROWS * F**(t-1), MERGE_MIN_ROWS * F**t); a tier with F segments is merged.
MERGE_FACTOR = 4
MERGE_MIN_ROWS = 32_768


def learned_plan(count: int, *, pinned: int | None = None) -> BucketPlan:
    """How a learned model trained now on a store of ``count`` rows is sized: the
    training's own rule (model/fit.py ``plan_buckets``) for the sample the store draws."""
    return plan_buckets(count, min(count, sample_rows_for(count, bits=pinned)), bits=pinned)


def merge_plan(live: dict[int, int], *, stored: dict[int, int] | None = None, factor: int | None = None,
               min_rows: int | None = None) -> list[int]:
    """The segments to merge next: the lowest tier holding ``factor`` of them (by ``live``
    rows), else the segment with the most dead rows (``stored`` - ``live``: deleted, or
    moved out by splits) if they are over DEAD_MAX_FRACTION of it and at least
    ``min_rows``, alone; or []. ``factor`` and ``min_rows`` default to MERGE_FACTOR and
    MERGE_MIN_ROWS as they are at the call (tests and tools may change them)."""
    factor = factor or MERGE_FACTOR
    min_rows = min_rows or MERGE_MIN_ROWS
    tiers: dict[int, list[int]] = {}
    for seg, rows in live.items():
        tier = 0 if rows < min_rows else 1 + int(math.log(rows / min_rows, factor) + 1e-9)
        tiers.setdefault(tier, []).append(seg)
    for tier in sorted(tiers):
        if len(tiers[tier]) >= factor:
            return sorted(tiers[tier])
    dead = {s: stored[s] - rows for s, rows in live.items()} if stored is not None else {}
    worst = max(dead, key=lambda s: (dead[s], -s), default=None)
    if worst is not None and dead[worst] >= max(min_rows, DEAD_MAX_FRACTION * stored[worst]):
        return [worst]
    return []


class UpkeepDone(NamedTuple):
    """What one ingest's upkeep did."""

    trained: bool = False
    refitted: bool = False
    split_rows: int = 0
    merged: int = 0
    train_seconds: float = 0.0
    seconds: float = 0.0
    #: Why upkeep stopped early (the device filled up), or None.
    deferred: str | None = None


class Upkeep:
    """The upkeep after an ingest (the caller holds the writer lock)."""

    def __init__(self, reads: ReadSide, rewrites: Rewrites, garbage: Garbage):
        self.reads = reads
        self.rewrites = rewrites
        self.garbage = garbage

    def run(self, progress: ProgressLike) -> UpkeepDone:
        """First training, growth re-fit, or splits and tiered merges. A step that runs out
        of disk space stops the upkeep there: the steps committed before it stay, that step
        changed nothing, and the rest waits for the next ingest (``deferred`` says why)."""
        started = time.perf_counter()
        done = {"split_rows": 0, "merged": 0}
        try:
            return self._steps(progress, started, done)
        except DiskFullError as exc:
            return UpkeepDone(**done, seconds=time.perf_counter() - started, deferred=str(exc))

    def _steps(self, progress: ProgressLike, started: float, done: dict[str, int]) -> UpkeepDone:
        view = self.reads.current_view()
        cat = self.reads.catalog
        with cat.read() as txn:
            pending = cat.get_meta(txn, "pending_training")
            growth = cat.get_meta(txn, "growth") or {}
        if pending is not None:
            if view.count < MIN_TRAIN_ROWS:
                return UpkeepDone()
            # Earlier small batches went to the baseline router: now that the store holds
            # enough, train on a sample of it and re-bucket it.
            result = self.rewrites.retrain(None, {"bits": pending.get("bits"), "seed": pending.get("seed", 0)},
                                           init=None, progress=progress, pinned_bits=pending.get("bits"))
            self.garbage.collect()
            return UpkeepDone(trained=True, train_seconds=result.seconds, seconds=time.perf_counter() - started)
        target = self.growth_target(view.count, growth)
        if target is not None:
            router = self.reads.router
            if router.kind == "sign":
                fresh = SignHasher.random(self.reads.config.stored_dim, target, seed=growth.get("seed", 0))
                self.rewrites.rebucket(fresh, view, StoredRows(view, live_rows(view)), progress, started=started,
                                       pinned_bits=growth.get("bits"), upkeep=True)
                self.garbage.collect()
                return UpkeepDone(refitted=True, seconds=time.perf_counter() - started)
            result = self.rewrites.retrain(
                None, {"bits": growth.get("bits") or target or None, "seed": growth.get("seed", 0)},
                init=router, progress=progress, upkeep=True, pinned_bits=growth.get("bits"))
            self.garbage.collect()
            return UpkeepDone(trained=True, refitted=True, train_seconds=result.seconds,
                              seconds=time.perf_counter() - started)
        # A store that does not grow (a model file's: collections share one) keeps its buckets.
        leaves, overfull = self.split_plan(self.reads.current_view()) if growth.get("grow") else ([], 0)
        for _ in range(2 + overfull // SPLIT_STEP_ROWS):  # bounded: halves are not split again
            moved = self.rewrites.split(leaves, progress) if leaves else 0
            if not moved:
                break
            done["split_rows"] += moved
            self.garbage.collect()
            leaves, _ = self.split_plan(self.reads.current_view())
        while True:
            view = self.reads.current_view()
            damaged = [s for s in view.segments if view.segments[s].quarantined]
            live = {s: len(rows) for s, rows in live_rows(view).items() if s not in damaged}
            plan = merge_plan(live, stored={s: view.segments[s].n for s in live})
            if not plan:
                break
            self.rewrites.merge(plan, progress)
            done["merged"] += len(plan)
            self.garbage.collect()
        return UpkeepDone(**done, seconds=time.perf_counter() - started if any(done.values()) else 0.0)

    def split_plan(self, view) -> tuple[list[int], int]:
        """The buckets of a tree router to split next: those holding more than
        SPLIT_FACTOR x TREE_BUCKET_ROWS live rows, fullest first, up to SPLIT_STEP_ROWS rows
        (at least one bucket), and the live rows of all such buckets; ([], 0) for other
        routers."""
        router = self.reads.router
        if router.kind != "tree":
            return [], 0
        live = np.zeros(router.n_buckets, dtype=np.int64)
        with self.reads.catalog.read() as txn:
            for bucket, seg, first, n in self.reads.catalog.iter_extents(txn):
                dead = view.deleted.get(seg)
                if dead is not None and len(dead):
                    n -= int(np.searchsorted(dead, first + n) - np.searchsorted(dead, first))
                live[bucket] += n
        over = np.flatnonzero(live > SPLIT_FACTOR * fit.TREE_BUCKET_ROWS)
        over = over[np.argsort(-live[over], kind="stable")]
        rows = np.cumsum(live[over])
        take = max(1, int(np.searchsorted(rows, SPLIT_STEP_ROWS, side="right")))
        return sorted(over[:take].tolist()), int(rows[-1]) if len(rows) else 0

    def growth_target(self, count: int, growth: dict) -> int | None:
        """The bits a growth re-fit would pass to training now (``growth``: the catalog's
        record; 0: let the sizing rule choose a tree's buckets), or None when none is due:
        when the data calls for GROWTH_FACTOR times the buckets the model has (a tree:
        TREE_REFIT_FACTOR times the buckets it was trained with; what one ingest of all of
        it would get), or, for a flat learned model, when the store has
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
        factor = TREE_REFIT_FACTOR if router.kind == "tree" else GROWTH_FACTOR
        if plan.buckets >= factor * router.trained_buckets:
            return pinned or (0 if plan.tree else plan.bits)
        if plan.tree or router.kind == "tree":
            return None
        fitted = int(growth.get("fitted_rows") or 0)
        trained_on = int(router.info.get("trained_on") or 0)
        sample_grows = min(count, TRAIN_SAMPLE_ROWS) >= 2 * (trained_on + min(1000, max(1, trained_on // 9)))
        return max(plan.bits, router.bits) if sample_grows and count >= GROWTH_FACTOR * max(fitted, 1) else None


def set_growth(cat: Catalog, txn: lmdb.Transaction, **fields) -> None:
    """Update the catalog's growth record (a store without one does not grow)."""
    growth = cat.get_meta(txn, "growth")
    if growth is not None:
        cat.put_meta(txn, "growth", {**growth, **fields})


def count_upkeep(cat: Catalog, txn: lmdb.Transaction, what: str, rows: int, seconds: float) -> None:
    """Count one upkeep step of kind ``what`` (refits, merges, compact) in ``maintenance``."""
    stats = cat.get_meta(txn, "maintenance") or {}
    stats[what] = stats.get(what, 0) + 1
    stats[f"{what}_rows"] = stats.get(f"{what}_rows", 0) + int(rows)
    stats[f"{what}_seconds"] = round(stats.get(f"{what}_seconds", 0.0) + seconds, 3)
    cat.put_meta(txn, "maintenance", stats)


__all__ = ["DEAD_MAX_FRACTION", "GROWTH_FACTOR", "MERGE_FACTOR", "MERGE_MIN_ROWS", "MIN_TRAIN_ROWS", "SPLIT_FACTOR", "SPLIT_STEP_ROWS",
           "TREE_REFIT_FACTOR", "Upkeep", "UpkeepDone",
           "count_upkeep", "learned_plan", "merge_plan", "set_growth"]
