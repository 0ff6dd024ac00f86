"""What the store's operations return: small frozen records (and the verify report)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class IngestResult:
    """What one ``ingest`` added."""

    rows: int
    #: The segment this ingest published (a training that followed it, see ``trained``,
    #: re-bucketed it into a new one).
    segment: int
    ids: np.ndarray = field(repr=False)
    seconds: float = 0.0
    #: True when this ingest trained the store's learned model: on a sample of the batch
    #: when the store was empty, else (the store now holding >= MIN_TRAIN_ROWS vectors, the
    #: earlier ones routed by the baseline) on a sample of the store, re-bucketing it.
    trained: bool = False
    #: Seconds spent training (0 when it did not train).
    train_seconds: float = 0.0
    #: Rows of ids already stored that this ingest replaced (``on_conflict="replace"``).
    replaced: int = 0
    #: True when the store had outgrown its index and this ingest re-fitted it (write/upkeep.py).
    refitted: bool = False
    #: Segments the tiered merge policy merged after this ingest.
    merged_segments: int = 0
    #: Rows moved by local splits of full buckets after this ingest (a tree's upkeep).
    split_rows: int = 0
    #: Seconds of that upkeep (training, re-fit, splits or merges), included in ``seconds``.
    upkeep_seconds: float = 0.0
    #: Why upkeep stopped before it was done (the device filled up; the ingest itself was
    #: committed, and the rest of the upkeep runs after a later ingest), or None.
    upkeep_deferred: str | None = None


@dataclass(frozen=True)
class TrainResult:
    """What :meth:`Store.train` did."""

    rows_trained_on: int
    rows_rebucketed: int
    buckets: int
    history: list[dict] = field(repr=False)
    seconds: float = 0.0


@dataclass(frozen=True)
class DeleteResult:
    rows: int


@dataclass(frozen=True)
class CompactResult:
    """What :meth:`Store.compact` did: every segment merged into one, deleted rows dropped
    (their space comes back once no reader pins the old segments)."""

    segments_before: int
    segments_after: int
    rows: int
    #: Deleted rows whose space was reclaimed.
    dropped: int
    seconds: float = 0.0


@dataclass
class VerifyReport:
    """Outcome of :meth:`Store.verify`. ``ok`` is False only for real damage; orphan
    segments of interrupted ingests are listed but harmless (``repair`` removes them)."""

    problems: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    checked_segments: int = 0
    checked_rows: int = 0
    #: Chunk files whose CRC-32C was recomputed and compared (0 with ``quick=True``).
    checked_chunks: int = 0
    #: Damaged chunks: ``{"segment", "array", "chunk", "rows": [first, stop), "ids": [...]}``,
    #: ``ids`` being the live ids stored in those rows (the data to restore).
    damaged: list[dict] = field(default_factory=list)
    #: Harmless findings (segments written before checksums existed, damage in rows that
    #: are all deleted).
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


__all__ = ["CompactResult", "DeleteResult", "IngestResult", "TrainResult", "VerifyReport"]
