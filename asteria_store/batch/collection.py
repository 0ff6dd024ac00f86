"""Sharded collections: one logical set of vectors split over several ordinary stores.

A collection is a directory::

    coll/
      collection.json    {"format": "asteria-collection", "version": 1, "shards": [...], ...}
      model.pt           the routing model every shard uses (trained once, shared)
      shard-000/ ...     ordinary stores, each usable on its own
      writer.lock        one collection writer at a time (id assignment)

Row placement: id ``i`` lives in shard ``i % n_shards``, so an id's shard is known without
a lookup and an upsert lands where the old row is. Every shard routes with the same model
file (a model-file store never re-fits), so a query probes the same buckets in every shard
and the exact merge of the shards' top-k lists equals the result of one store holding
everything, with the same model and probe settings: the shards are searched without their
own probe-on (``fill=False``) and the collection probes on, across shards, for the queries
whose probed buckets hold fewer than ``k`` rows in all.

Writes are atomic per shard, not across shards: an ingest that fails part-way has
published some shards' rows; re-run it with ``on_conflict="replace"`` (and explicit ids)
to finish it idempotently. Creation is atomic: the directory appears complete or not at all.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..config import Metric, StorageDtype
from ..errors import (
    IdNotFoundError,
    InvalidArgumentError,
    InvalidInputError,
    ReadOnlyError,
    StoreExistsError,
    StoreNotFoundError,
    UnsupportedFormatError,
)
from ..io import ArrayLike, VectorSource, load_ids
from ..progress import ProgressLike, make_progress
from ..query.engine import DEFAULT_PROBES, Probes
from ..reads import as_id_array, check_k
from ..results import CompactResult, DeleteResult, IngestResult, VerifyReport
from ..storage.lock import WriterLock
from ..storage.segments import fsync_dir, write_atomic
from ..store import Store, create
from .topk import merge_topk

COLLECTION_FILE = "collection.json"
MODEL_FILE = "model.pt"
FORMAT = "asteria-collection"
VERSION = 1
#: Rows gathered for one shard before one ``Store.ingest`` call (bounds a task's memory).
INGEST_ROWS = 262_144


def is_collection(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / COLLECTION_FILE).is_file()


def create_collection(
    path: str | os.PathLike[str],
    *,
    shards: int,
    dim: int,
    model: str | os.PathLike[str] | None = None,
    train: ArrayLike | None = None,
    metric: Metric = "cosine",
    dtype: StorageDtype = "float32",
    bits: int | None = None,
    expected_size: int | None = None,
    epochs: int | None = None,
    seed: int = 0,
    progress: ProgressLike = None,
) -> Collection:
    """Create a collection of ``shards`` empty stores sharing one routing model.

    The model is a model file (``model=``, from :func:`asteria_store.train_model`) or is
    trained here on ``train`` (an array or ``.npy`` of sample vectors; ``expected_size``:
    the collection's expected total, which sizes the buckets). Returns it open for writing.
    """
    from ..model.fit import train_model
    from ..model.persist import load_model_file

    path = Path(path)
    if isinstance(shards, bool) or not isinstance(shards, (int, np.integer)) or not 1 <= shards <= 4096:
        raise InvalidArgumentError(f"shards must be an integer from 1 to 4096, got {shards!r}.")
    if (model is None) == (train is None):
        raise InvalidArgumentError(
            "A collection needs one shared routing model: give model= (a model file from "
            "train_model / `asteria-store train-model`) or train= (sample vectors to train one on)."
        )
    if path.exists():
        raise StoreExistsError(f"{str(path)!r} already exists; choose a new path for the collection.")
    if not path.parent.is_dir():
        raise StoreNotFoundError(f"Cannot create {str(path)!r}: the directory {str(path.parent)!r} does not exist.")
    staging = path.parent / f".{path.name}.creating-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        if train is not None:
            train_model(train, save=staging / MODEL_FILE, dim=dim, metric=metric, bits=bits,
                        expected_size=expected_size, epochs=epochs, seed=seed, progress=progress)
        else:
            if bits is not None:
                raise InvalidArgumentError("bits= is for training (train=); a model file has its own.")
            load_model_file(model)  # a missing or foreign file: one line, before any copy
            shutil.copyfile(model, staging / MODEL_FILE)
        names = [f"shard-{i:03d}" for i in range(int(shards))]
        for name in names:
            create(staging / name, dim=dim, metric=metric, dtype=dtype, model=staging / MODEL_FILE,
                   seed=seed).close()
        write_atomic(staging / COLLECTION_FILE, json.dumps({
            "format": FORMAT, "version": VERSION, "dim": int(dim), "metric": metric, "dtype": dtype,
            "shards": names, "model": MODEL_FILE, "placement": "id % shards",
        }, indent=1).encode())
        fsync_dir(staging)
        os.rename(staging, path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Collection(path)


def open_collection(path: str | os.PathLike[str], *, readonly: bool = False, lock: bool = True,
                    lock_timeout: float | None = None) -> Collection:
    """Open an existing collection (options as for :func:`asteria_store.open`)."""
    return Collection(path, readonly=readonly, lock=lock, lock_timeout=lock_timeout)


def _reopen(path: str, readonly: bool, lock: bool, lock_timeout: float | None) -> Collection:
    return Collection(path, readonly=readonly, lock=lock, lock_timeout=lock_timeout)


def read_manifest(path: Path) -> dict[str, Any]:
    file = path / COLLECTION_FILE
    if not file.is_file():
        if path.exists():
            raise StoreNotFoundError(f"{str(path)!r} is not an asteria-store collection (no {COLLECTION_FILE}).")
        raise StoreNotFoundError(f"No collection at {str(path)!r}.")
    try:
        record = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise StoreNotFoundError(f"Cannot read {str(file)!r}: {exc}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("shards"), list):
        raise StoreNotFoundError(f"{str(file)!r} is not an asteria-store collection record.")
    if int(record.get("version", 0)) > VERSION:
        raise UnsupportedFormatError(
            f"The collection at {str(path)!r} has version {record['version']}; this asteria-store "
            f"reads versions up to {VERSION}. Upgrade asteria-store."
        )
    return record


@dataclass(frozen=True)
class CollectionIngestResult:
    """What one collection ingest did: each shard's own ingests (one per ``INGEST_ROWS``
    of its rows; none for a shard that got no rows)."""

    rows: int
    replaced: int
    shards: tuple[tuple[IngestResult, ...], ...]
    seconds: float

    @property
    def shard_rows(self) -> tuple[int, ...]:
        return tuple(sum(r.rows for r in results) for results in self.shards)


class Collection:
    """Several stores searched as one (see the module docstring). Pickles as what reopens it."""

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False, lock: bool = True,
                 lock_timeout: float | None = None):
        self.path = Path(path)
        self.readonly = readonly
        self._lock_option = lock
        self._lock_timeout = lock_timeout
        self.manifest = read_manifest(self.path)
        self.shard_paths = [self.path / name for name in self.manifest["shards"]]
        self.shards: list[Store] = []
        try:
            for p in self.shard_paths:
                self.shards.append(Store(p, readonly=readonly, lock=lock, lock_timeout=lock_timeout))
        except BaseException:
            self.close()
            raise

    def __reduce__(self):
        return (_reopen, (str(self.path), self.readonly, self._lock_option, self._lock_timeout))

    def close(self) -> None:
        for s in self.shards:
            s.close()

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<asteria_store.Collection {str(self.path)!r} shards={len(self.shards)} count={len(self):,}>"

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    @property
    def generation(self) -> tuple[int, ...]:
        """Each shard's catalog generation (a batch job checks none changed under it)."""
        return tuple(s.generation for s in self.shards)

    def shard_of(self, ids: np.ndarray) -> np.ndarray:
        return (np.asarray(ids, dtype=np.uint64) % np.uint64(len(self.shards))).astype(np.int64)

    def info(self) -> dict[str, Any]:
        infos = [s.info() for s in self.shards]
        return {
            "path": str(self.path), "kind": "collection", "shards": len(infos),
            "placement": self.manifest["placement"], "dim": self.dim, "metric": self.manifest["metric"],
            "count": sum(i["count"] for i in infos), "disk_bytes": sum(i["disk_bytes"] for i in infos),
            "buckets": infos[0]["buckets"], "generation": [i["generation"] for i in infos],
            "shard_counts": [i["count"] for i in infos],
        }

    def ids(self) -> np.ndarray:
        """Every live id, ascending (uint64)."""
        return np.sort(np.concatenate([s.ids() for s in self.shards]))

    def get(self, ids: ArrayLike) -> np.ndarray:
        id_arr = as_id_array(ids)
        out = np.empty((len(id_arr), self.dim), dtype=np.float32)
        where = self.shard_of(id_arr)
        for s in np.unique(where).tolist():
            sel = where == s
            out[sel] = self.shards[s].get(id_arr[sel])
        return out

    # -- search --------------------------------------------------------------------------

    def search(self, queries: ArrayLike, k: int = 10, *, probes: Probes = DEFAULT_PROBES,
               prune: bool | Literal["auto"] = "auto", threads: int | None = None,
               rerank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` of each query over all shards: ``(ids, scores)`` of shape (Q, k), equal to
        one store holding every row with the same model and probes (see the module docs).
        ``threads``, ``rerank``: as in :meth:`Store.search`, for each shard in turn (with
        ``rerank``, each shard rescores its own ``rerank`` best rows)."""
        k = check_k(k)
        for shard in self.shards:
            shard.check_rerank(rerank, k)
        q = VectorSource(queries, dim=self.dim, what="queries").read_all()
        return search_shards(self.shards, q, k, probes=probes, prune=prune, threads=threads, rerank=rerank)

    def query(self, vector: ArrayLike, k: int = 10, *, probes: Probes = DEFAULT_PROBES,
              prune: bool | Literal["auto"] = "auto", rerank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` of one vector (shape (d,) or (1, d)): ``(ids, scores)`` of shape (k,)."""
        arr = np.asarray(vector) if not isinstance(vector, (str, os.PathLike)) else vector
        if isinstance(arr, np.ndarray) and arr.ndim == 1:
            arr = arr[None, :]
        ids, scores = self.search(arr, k, probes=probes, prune=prune, rerank=rerank)
        if len(ids) != 1:
            raise InvalidInputError(f"query takes one vector, got {len(ids)}; use search() for a batch.")
        return ids[0], scores[0]

    def verify(self, *, repair: bool = False, quick: bool = False, progress: ProgressLike = None) -> VerifyReport:
        """:meth:`Store.verify` of every shard, in one report (each finding names its shard)."""
        report = VerifyReport()
        for path, shard in zip(self.shard_paths, self.shards):
            part = shard.verify(repair=repair, quick=quick, progress=progress)
            for name in ("problems", "orphans", "removed", "notes"):
                getattr(report, name).extend(f"{path.name}: {x}" for x in getattr(part, name))
            report.damaged.extend({**d, "shard": path.name} for d in part.damaged)
            report.checked_segments += part.checked_segments
            report.checked_rows += part.checked_rows
            report.checked_chunks += part.checked_chunks
        return report

    def compact(self, *, progress: ProgressLike = None) -> CompactResult:
        """:meth:`Store.compact` of every shard (each its own commit), summed."""
        self._check_writable()
        parts = [s.compact(progress=progress) for s in self.shards]
        return CompactResult(segments_before=sum(p.segments_before for p in parts),
                             segments_after=sum(p.segments_after for p in parts), rows=sum(p.rows for p in parts),
                             dropped=sum(p.dropped for p in parts), seconds=sum(p.seconds for p in parts))

    def delete(self, ids: ArrayLike) -> DeleteResult:
        """Delete by id. Every id must be in the collection, or nothing is deleted; each
        shard then deletes its own in one commit (a crash between two shards' commits
        leaves the later shards' ids live: delete them again)."""
        self._check_writable()
        id_arr = np.unique(as_id_array(ids))
        if len(id_arr) == 0:
            return DeleteResult(rows=0)
        where = self.shard_of(id_arr)
        present = np.zeros(len(id_arr), dtype=bool)
        for s in np.unique(where).tolist():
            present[where == s] = self.shards[s].contains(id_arr[where == s])
        if not present.all():
            raise IdNotFoundError(f"Cannot delete: {int((~present).sum())} id(s) not in the collection (first: "
                                  f"{int(id_arr[~present][0])}). Nothing was deleted.")
        rows = 0
        for s in np.unique(where).tolist():
            rows += self.shards[s].delete(id_arr[where == s]).rows
        return DeleteResult(rows=rows)

    def _check_writable(self) -> None:
        if self.readonly:
            raise ReadOnlyError(f"The collection {str(self.path)!r} was opened read-only.")

    # -- writes --------------------------------------------------------------------------

    def ingest(self, vectors: ArrayLike, ids: ArrayLike | None = None, *,
               on_conflict: Literal["error", "replace"] = "error", client: Any = None,
               progress: ProgressLike = None) -> CollectionIngestResult:
        """Add ``vectors`` (array or ``.npy``), each row to shard ``id % shards``.

        ``ids`` default to the next free ones (above every shard's). With a Dask ``client``
        the shards ingest in parallel, one task per shard (the file must be visible to the
        workers; an in-memory array is sent in pieces); without, one after the other.
        """
        self._check_writable()
        if on_conflict not in ("error", "replace"):
            raise InvalidArgumentError(f"on_conflict must be 'error' or 'replace', got {on_conflict!r}.")
        src = VectorSource(vectors, dim=self.dim, what="vectors")
        t0 = time.perf_counter()
        with WriterLock(self.path, timeout=self._lock_timeout):
            if ids is None:
                base = max(int(s.info()["internals"]["next_id"]) for s in self.shards)
                id_arr = np.arange(base, base + src.n, dtype=np.uint64)
            else:
                id_arr = load_ids(ids, n=src.n)
            where = self.shard_of(id_arr)
            n = len(self.shards)
            bar = make_progress(progress, total=src.n, desc="ingest (shards)")
            try:
                if client is None:
                    results = []
                    for s in range(n):
                        rows = np.flatnonzero(where == s)
                        results.append(_ingest_rows(self.shards[s], src.array, rows, id_arr[rows], on_conflict))
                        bar.update(len(rows))
                else:
                    results = self._ingest_on(client, src, id_arr, where, on_conflict, bar)
            finally:
                bar.close()
        return CollectionIngestResult(rows=src.n, replaced=sum(r.replaced for rs in results for r in rs),
                                      shards=tuple(results), seconds=time.perf_counter() - t0)

    def _ingest_on(self, client: Any, src: VectorSource, id_arr: np.ndarray, where: np.ndarray,
                   on_conflict: str, bar: Any) -> list[IngestResult]:
        from distributed import as_completed

        futures = {}
        for s, shard_path in enumerate(self.shard_paths):
            rows = np.flatnonzero(where == s)
            if not len(rows):
                continue
            data = src.path if src.path is not None else np.asarray(src.array[rows])
            sel = rows if src.path is not None else None
            fut = client.submit(_ingest_task, str(shard_path), data, sel, id_arr[rows], on_conflict,
                                self._lock_timeout, pure=False, key=f"asteria-ingest-{s}-{secrets.token_hex(4)}")
            futures[fut] = (s, len(rows))
        results: list[tuple[IngestResult, ...]] = [()] * len(self.shard_paths)
        for fut in as_completed(futures):
            s, n_rows = futures[fut]
            results[s] = fut.result()
            bar.update(n_rows)
        # The shards' handles in this process see the new generations on their next read.
        return results


def _ingest_rows(store: Store, data: np.ndarray, rows: np.ndarray, ids: np.ndarray,
                 on_conflict: str) -> tuple[IngestResult, ...]:
    """Ingest ``data[rows]`` with ``ids`` into ``store`` in pieces of ``INGEST_ROWS``."""
    return tuple(store.ingest(np.asarray(data[rows[start:start + INGEST_ROWS]]), ids=ids[start:start + INGEST_ROWS],
                              on_conflict=on_conflict)
                 for start in range(0, len(rows), INGEST_ROWS))


def _ingest_task(shard_path: str, data: Any, rows: np.ndarray | None, ids: np.ndarray, on_conflict: str,
                 lock_timeout: float | None) -> tuple[IngestResult, ...]:
    """One shard's part of a collection ingest, on a Dask worker."""
    arr = VectorSource(data, what="vectors").array
    if rows is None:
        rows = np.arange(len(arr))
    with Store(shard_path, lock_timeout=lock_timeout) as store:
        return _ingest_rows(store, arr, rows, ids, on_conflict)


def search_shards(shards: list[Store], q: np.ndarray, k: int, *, probes: Probes,
                  prune: bool | Literal["auto"] = "auto", threads: int | None = None,
                  rerank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Search every shard (without its own probe-on), merge exactly, then probe on across the
    shards for queries whose probed buckets hold fewer than ``k`` rows in all."""
    if probes == "all":
        return merge_topk([s.search(q, k, probes="all") for s in shards], k)
    ids, scores = merge_topk([s.search(q, k, probes=probes, prune=prune, fill=False, threads=threads, rerank=rerank)
                              for s in shards], k)
    fill_across(shards, q, k, probes, prune, ids, scores, threads=threads, rerank=rerank)
    return ids, scores


def fill_across(shards: list[Store], q: np.ndarray, k: int, probes: Any, prune: Any,
                ids: np.ndarray, scores: np.ndarray, *, threads: int | None = None,
                rerank: int | None = None) -> None:
    """The collection's probe-on (``Store.search``'s ``fill``), in place: queries short of
    ``min(k, total)`` results are searched again on every shard with twice the probes."""
    want = min(k, sum(len(s) for s in shards))
    n_buckets = shards[0].router.n_buckets
    short = np.flatnonzero((ids >= 0).sum(axis=1) < want)
    probes = int(probes)
    while len(short) and probes < n_buckets:
        probes = min(2 * probes, n_buckets)
        more = merge_topk([s.search(q[short], k, probes=probes, prune=prune, fill=False, threads=threads,
                                    rerank=rerank) for s in shards], k)
        ids[short], scores[short] = more
        short = short[(more[0] >= 0).sum(axis=1) < want]


__all__ = [
    "Collection",
    "CollectionIngestResult",
    "create_collection",
    "fill_across",
    "is_collection",
    "open_collection",
    "search_shards",
]