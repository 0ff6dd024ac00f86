"""Where a batch job's queries come from, described small enough to send with every task.

- a ``.npy`` file: memory-mapped, each task reads its rows;
- a Zarr array (a directory with an array's ``zarr.json``, e.g. ``group.zarr/vectors``);
- a store or a collection: its own vectors (a kNN graph of the store); the job writes
  their ids to the output's ``query_ids`` array and each task reads them from there;
- an in-memory array (Python API): each task is sent its block.

``fingerprint`` is what ``resume`` compares: a job resumes only on the same queries.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import DimensionMismatchError, InvalidInputError
from ..io import VectorSource
from ..store import CATALOG_DIR
from .collection import is_collection

Kind = Literal["npy", "zarr", "store", "collection", "array"]


@dataclass(frozen=True)
class QuerySource:
    kind: Kind
    n: int
    dim: int
    path: str | None = None
    lock: bool = True
    fingerprint: dict = field(default_factory=dict)

    @property
    def has_ids(self) -> bool:
        """Queries that are stored vectors, with ids (a kNN graph can exclude each own id)."""
        return self.kind in ("store", "collection")

    def read(self, start: int, stop: int, *, query_ids: np.ndarray | None = None,
             block: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start:stop`` as float32, checked finite (the error names the row)."""
        if self.kind == "array":
            return VectorSource(block, dim=self.dim, what="queries").read(0, len(block), row_offset=start)
        if self.kind == "npy":
            return VectorSource(self.path, dim=self.dim, what="queries").read(start, stop)
        if self.kind == "zarr":
            import zarr

            raw = zarr.open_array(self.path, mode="r")[start:stop]
            return VectorSource(raw, dim=self.dim, what="queries").read(0, len(raw), row_offset=start)
        from .workers import cached_collection, cached_store

        owner = cached_store(self.path, self.lock) if self.kind == "store" else cached_collection(self.path, self.lock)
        return owner.get(query_ids)


def query_source(queries: Any, *, dim: int, lock: bool = True) -> tuple[QuerySource, np.ndarray | None]:
    """Describe ``queries`` (path or array) and check its dimension. Also returns, for an
    in-memory array, the array (sent to tasks block by block); for a store or collection,
    its live ids (ascending: the queries' order)."""
    if not isinstance(queries, (str, os.PathLike)):
        src = VectorSource(queries, dim=dim, what="queries")
        arr = src.array
        digest = _digest(arr)
        return QuerySource("array", src.n, src.dim, fingerprint={
            "kind": "array", "shape": list(arr.shape), "dtype": str(arr.dtype), "blake2b": digest}), arr
    p = Path(queries)
    if p.is_dir():
        if (p / CATALOG_DIR).is_dir() or is_collection(p):
            from ..store import Store
            from .collection import Collection

            kind: Kind = "collection" if is_collection(p) else "store"
            where = str(p.resolve())
            with (Collection if kind == "collection" else Store)(where, readonly=True, lock=lock) as owner:
                if owner.dim != dim:
                    raise DimensionMismatchError(f"Expected queries of dimension {dim}, got the {owner.dim}-"
                                                 f"dimensional vectors of {str(p)!r}.")
                gen = owner.generation
                ids = owner.ids()
            return QuerySource(kind, len(ids), dim, path=where, lock=lock, fingerprint={
                "kind": kind, "path": where, "generation": list(gen) if isinstance(gen, tuple) else gen,
            }), ids
        meta = p / "zarr.json"
        if meta.is_file():
            try:
                node = json.loads(meta.read_text()).get("node_type")
            except (OSError, ValueError):
                node = None
            if node == "array":
                import zarr

                arr = zarr.open_array(str(p), mode="r")
                if arr.ndim != 2 or arr.dtype.kind not in "fiu":
                    raise InvalidInputError(f"Expected queries as a 2-D numeric Zarr array, got {arr.dtype} of shape "
                                            f"{arr.shape} at {str(p)!r}.")
                if arr.shape[1] != dim:
                    raise DimensionMismatchError(f"Expected queries of dimension {dim}, got {arr.shape[1]} in {str(p)!r}.")
                if arr.shape[0] == 0:
                    raise InvalidInputError(f"Expected at least one query, got an empty array at {str(p)!r}.")
                return QuerySource("zarr", int(arr.shape[0]), dim, path=str(p.resolve()), fingerprint={
                    "kind": "zarr", "path": str(p.resolve()), "shape": list(arr.shape), "dtype": str(arr.dtype)}), None
            if node == "group":
                raise InvalidInputError(f"{str(p)!r} is a Zarr group; give the query array inside it "
                                        f"(for example {str(p / 'vectors')!r}).")
        raise InvalidInputError(f"Cannot read queries from {str(p)!r}: a directory that is neither a Zarr array, "
                                "a store nor a collection.")
    src = VectorSource(p, dim=dim, what="queries")  # checks the file, its dtype and dimension
    st = p.stat()
    return QuerySource("npy", src.n, src.dim, path=str(p.resolve()), fingerprint={
        "kind": "npy", "path": str(p.resolve()), "shape": list(src.array.shape), "dtype": str(src.array.dtype),
        "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}), None


def _digest(arr: np.ndarray) -> str:
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    for start in range(0, len(flat), 1 << 26):
        h.update(flat[start:start + (1 << 26)])
    return h.hexdigest()


__all__ = ["QuerySource", "query_source"]
