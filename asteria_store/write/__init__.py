"""The write side of a store: ingest and upsert, delete, train, and the index's upkeep.

Every write builds its data, fsyncs it, and publishes it in ONE LMDB write transaction: a
crash at any point leaves either the old state or the new one, the only debris being an
unpublished segment or model directory (removed by the next writable open or ``verify
--repair``). Directories a commit replaces are retired, not deleted, and collected once no
reader pins a generation that still shows them (reads.py, storage/pins.py).

One module per job:

* ``commands.py``: :class:`WriteSide`, the entry points (ingest, delete, train, compact,
  damage records), each under the writer lock;
* ``upkeep.py``: the upkeep policy after each ingest (first training, growth re-fits,
  tiered merges): when, and what;
* ``rewrite.py``: the rewrites that policy and ``train``/``compact`` call for (re-fit and
  re-bucket, merge);
* ``pipeline.py``: the segment pipeline (hash rows, write a bucketed segment, save a model,
  disk checks, debris of unpublished attempts), and :class:`StoredRows`;
* ``commit.py``: the commit protocol, the one way a write is published;
* ``gc.py``: garbage collection of retired directories, orphans, damage records.
"""

from .commands import MAX_ID, OnConflict, WriteSide
from .pipeline import MODEL_DIR, StoredRows
from .upkeep import GROWTH_FACTOR, MERGE_FACTOR, MERGE_MIN_ROWS, MIN_TRAIN_ROWS, learned_plan, merge_plan

__all__ = ["GROWTH_FACTOR", "MAX_ID", "MERGE_FACTOR", "MERGE_MIN_ROWS", "MIN_TRAIN_ROWS", "MODEL_DIR", "OnConflict",
           "StoredRows", "WriteSide", "learned_plan", "merge_plan"]
