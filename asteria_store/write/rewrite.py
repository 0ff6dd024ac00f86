"""Rewrites of stored rows: training a model and re-bucketing the store with it, and
merging segments.

Both write the rows they keep into ONE new segment (pipeline.py) and publish it in ONE
commit (commit.py) that retires the segments it replaces:

* :meth:`Rewrites.retrain` fits a model on a sample (given, or drawn from the stored rows)
  and :meth:`Rewrites.rebucket` rewrites every live row under it; the model goes live in
  the same commit. ``Store.train``, the first training of a learned store and growth
  re-fits (upkeep.py) all come here.
* :meth:`Rewrites.merge` rewrites some segments' live rows with their bucket keys and
  LRSQ codes copied, not recomputed: tiered merges (upkeep.py) and ``compact``.

The writer lock is held throughout, so the catalog cannot change under a rewrite: the
commit checks the generation it read, and refuses if it did.
"""

from __future__ import annotations

import time

import numpy as np

from ..io import VectorSource
from ..model.fit import check_sample_size, sample_rows_for, train_config
from ..model.router import Router
from ..progress import ProgressLike
from ..query.engine import View
from ..reads import ReadSide
from ..results import TrainResult
from ..storage.catalog import Catalog
from .commit import Commits, record_segment
from .gc import forget_damage
from .pipeline import SegmentPipeline, StoredRows, live_rows
from .upkeep import count_upkeep, set_growth


class Rewrites:
    """Re-fits, re-bucketings and merges of one open handle (writer lock held)."""

    def __init__(self, reads: ReadSide, pipeline: SegmentPipeline, commits: Commits):
        self.reads = reads
        self.config = reads.config
        self.catalog = reads.catalog
        self.pipeline = pipeline
        self.commits = commits

    def retrain(self, src: VectorSource | None, settings: dict, *, init: Router | None,
                progress: ProgressLike, upkeep: bool = False, pinned_bits: int | None = None) -> TrainResult:
        """Train a model on ``src`` (None: a sample of the stored rows) and re-bucket the
        store with it. ``pinned_bits``: bits the store keeps as it grows (the user's
        choice; a growth re-fit's own target is not pinned)."""
        started = time.perf_counter()
        view = self.reads.current_view()
        stored = StoredRows(view, live_rows(view))
        size = sample_rows_for(stored.n, bits=settings.get("bits"))
        x = self.pipeline.sample_rows(src if src is not None else stored, size, settings.get("seed", 0))
        router, history = self.fit(check_sample_size(x), settings, expected=max(stored.n, len(x)), init=init,
                                   progress=progress)
        trained_on = len(x)
        del x  # free before every row is rewritten
        self.rebucket(router, view, stored, progress, started=started, pinned_bits=pinned_bits, upkeep=upkeep)
        return TrainResult(rows_trained_on=trained_on, rows_rebucketed=stored.n, buckets=router.n_buckets,
                           history=history, seconds=time.perf_counter() - started)

    def fit(self, sample: np.ndarray, settings: dict, *, expected: int, init: Router | None,
            progress: ProgressLike):
        """A model trained on ``sample`` for a store of ``expected`` rows, warm-started from
        ``init`` where it is a learned model of this dimension; ``(router, history)``."""
        from ..model.train import train  # torch: imported only to train

        cfg = train_config(bits=settings.get("bits"), ecc=settings.get("ecc", True), epochs=settings.get("epochs"),
                           batch_size=settings.get("batch_size", 1024),
                           rank=settings.get("rank"), seed=settings.get("seed", 0),
                           device=settings.get("device", "auto"), expected_size=expected,
                           l2=self.config.metric == "l2")
        warm = init is not None and init.kind in ("ecvh", "tree") and init.dim == self.config.stored_dim
        return train(sample, cfg, progress=progress, init=init if warm else None)

    def rebucket(self, router: Router, view: View, stored: StoredRows, progress: ProgressLike, *,
                 started: float, pinned_bits: int | None, upkeep: bool) -> None:
        """Write every live row bucketed by ``router`` into ONE new segment and publish it
        with the model, retiring every old segment and the old model, in ONE commit."""
        cat = self.catalog
        seg = self.pipeline.next_segment()
        with self.pipeline.attempt(seg, stored.n) as attempt:
            self.pipeline.check_disk_space(stored.n)
            attempt.model = model_rec = self.pipeline.save_model(router)
            written = self.pipeline.write_bucketed(seg, stored, stored.ids(), router, model_rec["digest"],
                                                   progress) if stored.n else None
            seconds = time.perf_counter() - started

            def changes(txn, generation: int) -> None:
                cat.clear_rows(txn)
                if written is not None:
                    record_segment(cat, txn, seg, written)
                forget_damage(cat, txn)  # every damaged chunk was in a retired segment
                growth = {"fitted_rows": stored.n}
                if pinned_bits is not None:
                    growth["bits"] = pinned_bits
                set_growth(cat, txn, **growth)
                if upkeep:
                    count_upkeep(cat, txn, "refits", stored.n, seconds)

            self.commits.commit(changes, what="training", expect={"generation": view.generation},
                                retire=list(view.segments), model=model_rec)
            attempt.published = True

    def merge(self, segs: list[int], progress: ProgressLike, *, what: str = "merges") -> None:
        """Rewrite segments ``segs`` (live rows only, keys and codes copied) as ONE new
        segment, published in ONE commit that retires them; counted as upkeep ``what``."""
        started = time.perf_counter()
        view = self.reads.current_view()
        cat = self.catalog
        with cat.read() as txn:
            seg = int(cat.get_meta(txn, "next_segment"))
            keys, buckets = _segment_keys(cat, txn, segs, view)
        rows = StoredRows(view, live_rows(view, segs))
        row_keys = np.concatenate([keys[s][live] for s, (_, live) in zip(sorted(segs), rows.parts)]) \
            if rows.n else np.empty(0, dtype=np.uint64)
        with self.pipeline.attempt(seg, rows.n) as attempt:
            self.pipeline.check_disk_space(rows.n)
            written = self.pipeline.write_bucketed(seg, rows, rows.ids(), self.reads.router,
                                                   self.reads.codes_digest, progress,
                                                   keys=row_keys) if rows.n else None
            seconds = time.perf_counter() - started

            def changes(txn, generation: int) -> None:
                for s in segs:
                    cat.drop_segment(txn, s, buckets[s])
                if written is not None:
                    record_segment(cat, txn, seg, written, overwrite_ids=True)
                forget_damage(cat, txn, segs)
                count_upkeep(cat, txn, what, rows.n, seconds)

            self.commits.commit(changes, what="a merge", expect={"generation": view.generation}, retire=segs)
            attempt.published = True

    def split(self, leaves: list[int], progress: ProgressLike) -> int:
        """Split each of ``leaves`` (buckets of a tree router) in two (model/tree.py
        ``TreeRouter.split``): their live rows move to ONE new segment under their new keys,
        with their LRSQ codes copied (the quantizer does not change), and ONE commit
        publishes it with the new model, points the rows' ids at it and renumbers every
        other bucket's extents. Their old places keep no extent: they are no longer part
        of the store (:func:`live_rows`), and need no tombstone. Returns the rows moved
        (0: no leaf separated, nothing written)."""
        started = time.perf_counter()
        view = self.reads.current_view()
        router = self.reads.router
        cat = self.catalog
        picked: dict[int, list[np.ndarray]] = {}  # rows of each segment, ascending
        leaf_of: dict[int, list[np.ndarray]] = {}
        with cat.read() as txn:
            seg = int(cat.get_meta(txn, "next_segment"))
            for leaf in sorted(leaves):  # a segment holds its buckets in key order
                for s, first, n in cat.extents(txn, leaf):
                    rows = np.arange(first, first + n)
                    mask = view.live_mask(s, first, n)
                    rows = rows if mask is None else rows[mask]
                    picked.setdefault(s, []).append(rows)
                    leaf_of.setdefault(s, []).append(np.full(len(rows), leaf))
        segs = sorted(picked)
        rows = {s: np.concatenate(picked[s]) for s in segs}
        leaf = np.concatenate([np.concatenate(leaf_of[s]) for s in segs]) if segs else np.empty(0, dtype=np.int64)
        x = StoredRows(view, rows).take(np.arange(len(leaf)))  # StoredRows order: by segment
        tree, renumber = router.split({b: x[leaf == b] for b in sorted(leaves)})
        split_leaves = np.flatnonzero(np.diff(np.append(renumber, tree.n_buckets)) == 2)
        moving = np.isin(leaf, split_leaves)
        if not moving.any():
            return 0
        keys = tree.descend(x[moving], router.node_of(leaf[moving])).astype(np.uint64)
        del x
        bounds = np.cumsum([0] + [len(rows[s]) for s in segs])
        keep = {s: rows[s][moving[a:b]] for s, a, b in zip(segs, bounds[:-1], bounds[1:])}
        keep = {s: r for s, r in keep.items() if len(r)}
        moved = StoredRows(view, keep)
        ids = moved.ids()
        with self.pipeline.attempt(seg, moved.n) as attempt:
            self.pipeline.check_disk_space(moved.n)
            attempt.model = model_rec = {**self.pipeline.save_model(tree), "codes": self.reads.codes_digest}
            written = self.pipeline.write_bucketed(seg, moved, ids, tree, self.reads.codes_digest, progress,
                                                   keys=keys)
            seconds = time.perf_counter() - started

            def changes(txn, generation: int) -> None:
                # the rows' old places lose their extents (no tombstones: the ids move)
                cat.renumber_buckets(txn, renumber, drop=split_leaves)
                record_segment(cat, txn, seg, written, overwrite_ids=True)
                count_upkeep(cat, txn, "splits", moved.n, seconds)

            self.commits.commit(changes, what="a split", expect={"generation": view.generation}, model=model_rec)
            attempt.published = True
        return moved.n


def _segment_keys(cat: Catalog, txn, segs: list[int], view: View) -> tuple[dict[int, np.ndarray],
                                                                            dict[int, list[int]]]:
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


__all__ = ["Rewrites"]
