"""The commit protocol: how a write becomes visible, in ONE durable LMDB transaction.

Every publish of the write side (an ingest's segment, a delete, a re-bucketing, a merge, a
damage record) goes through :meth:`Commits.commit`, which

1. opens the catalog's write transaction;
2. checks that the catalog still holds what the caller's work was based on (``expect``,
   e.g. the generation of the view a merge read): the writer lock should make that
   certain, so a mismatch means another process wrote anyway, and nothing is committed;
3. runs the caller's changes, which see the generation being published;
4. puts a new model live (``model``) and retires what the commit replaces (the old model,
   ``retire``'d segments): their directories are collected once no reader pins a
   generation that still shows them (gc.py);
5. raises the generation by one, commits and fsyncs the environment, and drops the
   handle's cached view.

Data a commit points at (segment and model directories) is written and fsynced before it
(pipeline.py); a crash before step 5's sync leaves the old state, after it the new one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import lmdb
import numpy as np

from ..errors import CorruptStoreError
from ..reads import ReadSide
from ..storage.catalog import Catalog
from .pipeline import Written

T = TypeVar("T")


class Commits:
    """The commit protocol of one open handle (the caller holds the writer lock)."""

    def __init__(self, reads: ReadSide):
        self.reads = reads
        self.catalog = reads.catalog

    def commit(self, changes: Callable[[lmdb.Transaction, int], T], *, what: str = "a write",
               expect: Mapping[str, int] | None = None, retire: Sequence[int] = (),
               model: dict[str, str] | None = None) -> T:
        """Publish ``changes(txn, generation)`` (``generation``: the one this commit
        publishes) in ONE durable transaction, and return what it returns.

        ``expect``: catalog meta values the caller's work was based on (``{"generation":
        view.generation}``); if one changed, :class:`CorruptStoreError` names ``what`` was
        under way and nothing is written. ``retire``: segments this commit replaces.
        ``model``: the catalog record of a model that goes live with this commit (the old
        one is retired and any pending first training is done). ``changes`` may be run
        again (the catalog's map grew), so it must only touch the transaction.
        """
        cat = self.catalog

        def publish(txn: lmdb.Transaction) -> T:
            for key, value in (expect or {}).items():
                if int(cat.get_meta(txn, key)) != value:
                    raise CorruptStoreError(f"The catalog changed during {what} despite the writer lock.")
            generation = int(cat.get_meta(txn, "generation")) + 1
            result = changes(txn, generation)
            old_model = None
            if model is not None:
                old_model = cat.get_meta(txn, "router")["dir"]
                cat.put_meta(txn, "router", model)
                cat.put_meta(txn, "pending_training", None)
            if retire or old_model is not None:
                cat.retire(txn, generation, segments=list(retire), model=old_model)
            cat.put_meta(txn, "generation", generation)
            return result

        result = cat.write(publish)
        cat.env.sync(True)
        self.reads.view = None
        return result


def record_segment(cat: Catalog, txn: lmdb.Transaction, seg: int, written: Written, *,
                   overwrite_ids: bool = False) -> None:
    """Record a written segment (its record, bucket extents, id map and checksums) and
    move ``next_segment`` past it. ``overwrite_ids``: its ids may be mapped already (a
    merge moves them)."""
    n = len(written.ids)
    bounds = np.flatnonzero(np.diff(written.keys)) + 1
    starts = np.concatenate([[0], bounds]).astype(np.int64)
    counts = np.diff(np.concatenate([starts, [n]])).astype(np.int64)
    cat.put_segment(txn, seg, _segment_record(n, written.chunk_rows, written.lrsq, written.columns))
    cat.put_extents(txn, seg, written.keys[starts], starts, counts)
    cat.put_ids(txn, seg, written.ids, overwrite=overwrite_ids)
    cat.put_checksums(txn, seg, written.checksums)
    cat.put_meta(txn, "next_segment", seg + 1)


def _segment_record(n: int, chunk_rows: int, lrsq: dict | None, columns: list[str] | None) -> dict:
    record = {"rows": n, "chunk_rows": chunk_rows, "created": time.time()}
    if lrsq is not None:  # {"rank", "aux", "block", "model": digest of the encoding model}
        record["lrsq"] = lrsq
    if columns:  # the metadata columns its files hold (storage/columns.py)
        record["columns"] = columns
    return record


__all__ = ["Commits", "record_segment"]
