"""Typed, persisted store configuration.

The configuration is a frozen dataclass saved as JSON (UTF-8) in the catalog's ``meta``
database under the key ``b"config"``, next to ``b"format_version"``. Unknown keys written
by a newer minor version are ignored; a newer ``format_version`` is refused on open.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from .errors import InvalidArgumentError

#: Newest on-disk format version this code reads. Bump on any incompatible layout change.
FORMAT_VERSION = 2
#: What a new store is created at, readable by every asteria-store.
BASE_FORMAT_VERSION = 1
#: A store rises to this version in the commit that first records metadata columns
#: (storage/columns.py): an older asteria-store, which would drop them, refuses it.
COLUMNS_FORMAT_VERSION = 2
#: ... and in the commit that first records string ids (asteria_store/ids.py).
STRING_IDS_FORMAT_VERSION = 2

Metric = Literal["cosine", "ip", "l2"]
StorageDtype = Literal["float32", "float16"]

#: Target bytes of one vectors chunk file. Bigger chunks mean fewer files and mmaps,
#: smaller chunks mean less read amplification on a cold query; 8-16 MiB is a good middle.
TARGET_CHUNK_BYTES = 16 * 1024 * 1024


def default_chunk_rows(dim: int, dtype: StorageDtype) -> int:
    """Rows per chunk: the largest power of two whose vectors chunk fits TARGET_CHUNK_BYTES."""
    row_bytes = dim * (4 if dtype == "float32" else 2)
    rows = max(1, TARGET_CHUNK_BYTES // row_bytes)
    return max(256, 1 << int(math.floor(math.log2(rows))))


@dataclass(frozen=True)
class StoreConfig:
    """What a store is: fixed at ``create`` time.

    Attributes:
        dim: vector dimension.
        metric: ``"cosine"`` normalises vectors on ingest and queries on search (scores are
            cosine similarities); ``"ip"`` keeps vectors as given (scores are inner products);
            ``"l2"``: scores are squared Euclidean distances, smallest first. An l2 store
            keeps each row as ``[x, |x|^2 / 2]`` and scores ``[q, -1]`` against it (an inner
            product that ranks rows as -|q - x|^2 does: see :attr:`stored_dim`).
        dtype: storage dtype of the full vectors. ``float16`` halves disk and bytes read per
            query at a small loss of score precision (relative error <= 2**-11 per coordinate).
        chunk_rows: rows per Zarr chunk of every segment array.
    """

    dim: int
    metric: Metric = "cosine"
    dtype: StorageDtype = "float32"
    chunk_rows: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.dim, int) or isinstance(self.dim, bool) or self.dim < 1:
            raise InvalidArgumentError(f"dim must be a positive integer, got {self.dim!r}.")
        if self.metric not in ("cosine", "ip", "l2"):
            raise InvalidArgumentError(
                f"metric must be 'cosine', 'ip' or 'l2', got {self.metric!r}."
            )
        if self.dtype not in ("float32", "float16"):
            raise InvalidArgumentError(
                f"dtype must be 'float32' or 'float16', got {self.dtype!r}."
            )
        if self.chunk_rows == 0:
            object.__setattr__(self, "chunk_rows", default_chunk_rows(self.dim, self.dtype))
        if not isinstance(self.chunk_rows, int) or self.chunk_rows < 1:
            raise InvalidArgumentError(
                f"chunk_rows must be a positive integer, got {self.chunk_rows!r}."
            )

    @property
    def stored_dim(self) -> int:
        """Width of a stored row: ``dim``, plus one for ``"l2"`` (its half squared norm)."""
        return self.dim + (1 if self.metric == "l2" else 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StoreConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> StoreConfig:
        return cls.from_dict(json.loads(raw.decode("utf-8")))
