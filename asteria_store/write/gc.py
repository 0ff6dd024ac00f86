"""Garbage collection and damage records: what the catalog no longer points at, and what it
must refuse.

* **Retired directories.** A commit that replaces segments or a model retires their
  directories (commit.py) instead of deleting them: a reader may still be searching the
  generation that shows them. :meth:`Garbage.collect` removes those that every live
  reader's pin (storage/pins.py) has moved past.
* **Orphans.** A segment or model directory the catalog never published (the debris of a
  write interrupted by a crash) is an orphan: removed by the next writable open, or
  ``verify --repair``, under the writer lock.
* **Damage records.** Chunks ``verify`` found damaged are recorded in the catalog's
  ``damaged`` entry (:func:`mark_damaged`) so that every reader refuses them, until a
  rewrite retires their segment (:func:`forget_damage`).
"""

from __future__ import annotations

import shutil

import lmdb

from ..reads import ReadSide
from ..storage import segments as seglib
from ..storage.catalog import Catalog, retired_dirs, retired_name, segment_name
from ..storage.pins import oldest_pin
from .pipeline import MODEL_DIR


class Garbage:
    """Retired and orphan directories of one open handle."""

    def __init__(self, reads: ReadSide):
        self.path = reads.path
        self.catalog = reads.catalog
        self.segments_root = reads.segments_root

    def collect(self) -> list[str]:
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
        """Segment directories neither published nor retired."""
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


def mark_damaged(cat: Catalog, txn: lmdb.Transaction, damaged: list[dict]) -> None:
    """Add ``damaged`` chunks ({segment, array, chunk}) of live segments to the record."""
    live = cat.segments(txn)
    raw = cat.get_meta(txn, "damaged") or {}
    for d in damaged:
        if d["segment"] in live:  # (a retrain meanwhile rewrote it: nothing to flag)
            chunks = raw.setdefault(str(d["segment"]), {}).setdefault(d["array"], [])
            if d["chunk"] not in chunks:
                chunks.append(d["chunk"])
    cat.put_meta(txn, "damaged", raw)


def forget_damage(cat: Catalog, txn: lmdb.Transaction, segs: list[int] | None = None) -> None:
    """Drop the damage records of segments ``segs`` (None: of every segment), which the
    commit retires."""
    if segs is None:
        cat.put_meta(txn, "damaged", None)
        return
    damaged = cat.get_meta(txn, "damaged") or {}
    if damaged:
        cat.put_meta(txn, "damaged", {s: d for s, d in damaged.items() if int(s) not in segs} or None)


__all__ = ["Garbage", "forget_damage", "mark_damaged"]
