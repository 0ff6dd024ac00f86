"""Offline batch search: millions of queries against a store or a sharded collection, as
query blocks on a ``dask.distributed`` cluster (a local one by default), results in Zarr.

    from asteria_store import batch
    res = batch.search("mystore", "queries.npy", "results.zarr", k=10, workers=2)
    ids = zarr.open_group("results.zarr")["ids"]          # (Q, k) int64

Stages, run for each block of ``block_rows`` queries:

1. read the block's queries (each task reads its own rows; nothing passes through the client);
2. search it on the task's worker with the batch engine (``Store.search``): the store is
   opened read-only once per worker process (:mod:`.workers`), never per block;
   a collection fans the block out to one task per shard and merges their top-k exactly;
3. write the block's rows to the output and mark it done (:mod:`.output`).

``workers=0`` runs the same stages in this process, one block after another, with no Dask:
the baseline the Dask overhead is measured against (docs/benchmarks.md "Batch jobs").
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from .. import errors
from ..errors import (
    AsteriaError,
    BatchJobError,
    InvalidArgumentError,
    StoreChangedError,
    StoreLockedError,
)
from ..progress import ProgressLike, make_progress
from ..query.engine import DEFAULT_PROBES, Probes
from ..reads import check_k, check_k_fits
from ..storage.lock import lock_is_free
from ..storage.segments import fsync_dir, write_atomic
from ..store import Store
from . import output
from .cluster import local_client
from .collection import Collection, fill_across, is_collection
from .sources import QuerySource, query_source
from .topk import drop_self, merge_topk
from .workers import cached_store, close_cached, where

#: Queries per block: large enough that the batch engine shares each probed bucket among
#: many queries, small enough that a lost block costs little to redo.
DEFAULT_BLOCK_ROWS = 16384


@dataclass(frozen=True)
class BatchResult:
    """What a batch job did. ``blocks_skipped``: done by an earlier run (``resume``)."""

    out: str
    queries: int
    k: int
    blocks: int
    blocks_run: int
    blocks_skipped: int
    seconds: float
    workers: int
    threads_per_worker: int

    @property
    def queries_per_second(self) -> float:
        run = self.queries * self.blocks_run / max(self.blocks, 1)
        return run / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class _Job:
    """Everything a task needs, small enough to send with each one."""

    kind: Literal["store", "collection"]
    shards: tuple[str, ...]  # shard store paths (the store itself for a plain store)
    generation: tuple[int, ...]
    lock: bool
    allow_writer: bool
    stage: str
    source: QuerySource
    k: int
    probes: Any
    prune: Any
    rerank: int | None
    exclude_self: bool
    block_rows: int
    n_queries: int
    #: Metadata columns to write beside the results (output.COLUMNS_FILE), None: none.
    columns: tuple[str, ...] | None = None

    def bounds(self, block: int) -> tuple[int, int]:
        start = block * self.block_rows
        return start, min(start + self.block_rows, self.n_queries)

    @property
    def k_search(self) -> int:
        return self.k + 1 if self.exclude_self else self.k


def search(
    target: str | os.PathLike[str] | Store | Collection,
    queries: Any,
    out: str | os.PathLike[str],
    *,
    k: int = 10,
    probes: Probes = DEFAULT_PROBES,
    prune: bool | Literal["auto"] = "auto",
    rerank: int | None = None,
    exclude_self: bool = False,
    columns: list[str] | None = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    workers: int | None = None,
    threads_per_worker: int = 1,
    processes: bool = True,
    scheduler: str | None = None,
    client: Any = None,
    resume: bool = False,
    allow_writer: bool = False,
    lock: bool = True,
    progress: ProgressLike = None,
) -> BatchResult:
    """Search every query of ``queries`` against ``target`` and write ``(ids, scores)`` to the
    Zarr group ``out``. Returns a :class:`BatchResult`.

    Args:
        target: a store or collection (path, or an open handle: only its path is used).
        queries: a ``.npy`` path, a Zarr array path, a store or collection path (its own
            vectors: the kNN graph; ``exclude_self`` drops each vector's own id), or an array.
        k, probes, prune, rerank: as for :meth:`Store.search`; results equal
            ``Store.search`` of each block.
        columns: metadata columns of a store to write beside the results, in
            ``<out>/columns.parquet``: one row per result (query, rank, id, then these
            columns), read from the generation the job searched once every block is done.
        block_rows: queries per task (and per output chunk).
        workers: local worker processes (default: one per core); ``0``: no Dask, this
            process only. Ignored with ``scheduler`` or ``client``.
        threads_per_worker: threads per local worker (each searches its own block).
        processes: local workers as processes (default) or threads of this process.
        scheduler: a Dask scheduler address (``tcp://host:8786``); client: a ``distributed.Client``.
        resume: finish an unfinished job at ``out`` (only the blocks not done yet).
        allow_writer: run even while a writer holds the store's lock (results may then mix
            two states of the store: a commit during the job fails it unless this is set).
        lock: ``False`` opens the store without LMDB's lock files (network filesystems; safe
            only while nobody writes).
    """
    t0 = time.perf_counter()
    plan = _plan(target, queries, Path(out), k=k, probes=probes, prune=prune, rerank=rerank,
                 exclude_self=exclude_self, block_rows=block_rows, resume=resume, allow_writer=allow_writer,
                 lock=lock, columns=columns)
    job, todo, n_blocks, array, _ = plan
    out_path = Path(out)
    if job is None:  # resume of a finished job
        return BatchResult(str(out_path), plan.n_queries, k, n_blocks, 0, n_blocks, 0.0, 0, 0)
    stage = Path(job.stage)
    done_rows = job.n_queries - sum(_rows(job, b) for b in todo)
    bar = make_progress(progress, total=job.n_queries, desc="search-batch", unit="q")
    if done_rows:
        bar.update(done_rows)
    n_workers, n_threads = 0, 1
    try:
        if todo:
            if client is None and scheduler is None and workers == 0:
                for b in todo:
                    _run_block(job, b, _array_block(array, job, b))
                    bar.update(_rows(job, b))
            else:
                with _client(client, scheduler, workers, threads_per_worker, processes) as cl:
                    n_workers, n_threads = _check_workers(cl, job)
                    _run_on(cl, job, todo, array, bar)
        _finish(job, out_path, stage, n_blocks, time.perf_counter() - t0)
    finally:
        bar.close()
        if client is None and scheduler is None:  # our own workers (or none) are gone now
            close_cached()
    return BatchResult(str(out_path), job.n_queries, job.k, n_blocks, len(todo), n_blocks - len(todo),
                       time.perf_counter() - t0, n_workers, n_threads)


class _Plan(NamedTuple):
    job: _Job | None  # None: ``resume`` of a finished job, nothing to do
    todo: list[int]
    n_blocks: int
    array: np.ndarray | None  # in-memory queries, sent to the tasks block by block
    n_queries: int


def _rows(job: _Job, block: int) -> int:
    start, stop = job.bounds(block)
    return stop - start


def _plan(target: Any, queries: Any, out: Path, *, k: int, probes: Any, prune: Any, rerank: Any,
          exclude_self: bool, block_rows: int, resume: bool, allow_writer: bool, lock: bool,
          columns: list[str] | None = None):
    """Check everything that can be checked before any work, and set up the output."""
    k = check_k(k)
    if probes != "all" and (isinstance(probes, bool) or not isinstance(probes, (int, np.integer)) or probes < 1):
        raise InvalidArgumentError(f"probes must be a positive integer or 'all', got {probes!r}.")
    if prune not in (True, False, "auto"):
        raise InvalidArgumentError(f"prune must be True, False or 'auto', got {prune!r}.")
    if isinstance(block_rows, bool) or not isinstance(block_rows, (int, np.integer)) or block_rows < 1:
        raise InvalidArgumentError(f"block_rows must be a positive integer, got {block_rows!r}.")
    path = Path(target.path if isinstance(target, (Store, Collection)) else target).resolve()
    kind: Literal["store", "collection"] = "collection" if is_collection(path) else "store"
    owner = Collection(path, readonly=True, lock=lock) if kind == "collection" else Store(path, readonly=True, lock=lock)
    try:
        return _plan_with(owner, path, kind, queries, out, k=k, probes=probes, prune=prune, rerank=rerank,
                          exclude_self=exclude_self, block_rows=block_rows, resume=resume,
                          allow_writer=allow_writer, lock=lock, columns=columns)
    finally:
        owner.close()


def _plan_with(owner: Store | Collection, path: Path, kind: Literal["store", "collection"], queries: Any, out: Path,
               *, k: int, probes: Any, prune: Any, rerank: Any, exclude_self: bool, block_rows: int,
               resume: bool, allow_writer: bool, lock: bool, columns: list[str] | None):
    shards = tuple(str(p) for p in owner.shard_paths) if kind == "collection" else (str(path),)
    if not allow_writer:
        for shard in shards:
            lock_file = Path(shard) / "writer.lock"
            if lock_file.exists() and not lock_is_free(lock_file):
                raise StoreLockedError(
                    f"A writer holds the lock of {shard!r}: a batch job would read a store that "
                    "changes under it. Wait for the writer, or pass --allow-writer."
                )
    dim = owner.dim
    source, given = query_source(queries, dim=dim, lock=lock)
    array = None if source.has_ids else given
    if exclude_self and not source.has_ids:
        raise InvalidArgumentError("exclude_self needs queries that are a store's own vectors (a store or "
                                   "collection path as QUERIES).")
    k_search = k + 1 if exclude_self else k
    if columns is not None:
        if kind == "collection":
            raise InvalidArgumentError("columns are for stores: collections hold no metadata columns.")
        columns = owner.check_columns(columns)
    for shard in owner.shards if kind == "collection" else (owner,):
        shard.check_rerank(rerank, k_search)
        if shard.id_kind == "string":
            raise InvalidArgumentError(f"Batch jobs write integer ids, and {str(shard.path)!r} holds string ids; "
                                       "search it with Store.search or search_table instead.")
    check_k_fits(k_search, min(block_rows, source.n), len(owner))
    if k_search > len(owner):
        raise InvalidArgumentError(f"k={k} is more than the {len(owner):,} vectors in {str(path)!r}"
                                   + (" (less the query's own)" if exclude_self else "") + ".")
    generation = owner.generation
    generation = tuple(generation) if isinstance(generation, tuple) else (int(generation),)
    manifest = {
        "version": 1, "target": str(path), "kind": kind, "generation": list(generation),
        "queries": source.fingerprint, "n_queries": source.n, "k": k,
        "probes": probes if probes == "all" else int(probes), "prune": prune,
        "rerank": None if rerank is None else int(rerank), "exclude_self": bool(exclude_self),
        "columns": columns,
        "block_rows": int(block_rows), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if allow_writer:  # the store may change between runs: resume only checks the rest
        manifest["generation"] = None
    n_blocks = -(-source.n // int(block_rows))
    if resume and out.exists() and _finished(out, manifest):
        stale = output.staging_path(out)
        if stale.exists() and not (stale / output.GROUP).exists():  # killed between publish steps
            shutil.rmtree(stale, ignore_errors=True)
        return _Plan(None, [], n_blocks, None, source.n)
    stage, done = output.begin(out, manifest, resume=resume)
    if source.has_ids and not done and not (stage / output.MARKERS / "ids").exists():
        output.write_query_ids(stage, given)
        write_atomic(stage / output.MARKERS / "ids", b"")
    job = _Job(kind, shards, generation, lock, allow_writer, str(stage), source, k, probes, prune,
               manifest["rerank"], bool(exclude_self), int(block_rows), source.n,
               None if columns is None else tuple(columns))
    todo = [b for b in range(n_blocks) if b not in done]
    return _Plan(job, todo, n_blocks, array, source.n)


def _finished(out: Path, manifest: dict) -> bool:
    import zarr

    try:
        attrs = zarr.open_group(str(out), mode="r").attrs.get("asteria_batch")
    except (OSError, ValueError, KeyError, TypeError):  # not a Zarr group: the caller reports "exists"
        return False
    if not isinstance(attrs, dict) or not attrs.get("complete"):
        return False
    return all(attrs.get(key) == manifest.get(key) for key in ("target", "queries", "k", "probes", "rerank",
                                                                "exclude_self", "block_rows", "columns"))


def _array_block(array: np.ndarray | None, job: _Job, block: int) -> np.ndarray | None:
    """The block's rows of in-memory queries (None for queries the tasks read themselves)."""
    if array is None:
        return None
    start, stop = job.bounds(block)
    return np.asarray(array[start:stop])


def _read_queries(job: _Job, block: int, given: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    start, stop = job.bounds(block)
    qids = output.read_query_ids(Path(job.stage), start, stop) if job.source.has_ids else None
    return job.source.read(start, stop, query_ids=qids, block=given), qids


def _check_generation(job: _Job, shard: int, store: Store) -> None:
    if not job.allow_writer and store.generation != job.generation[shard]:
        raise StoreChangedError(
            f"{store.path!s} changed while the batch job read it (generation {job.generation[shard]} -> "
            f"{store.generation}): its results would mix two states of the store. Start a new job, "
            "or pass --allow-writer."
        )


def _search_shard(job: _Job, shard: int, block: int, given: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """One shard's (or the store's) top-k of one block; a collection's shards do not fill."""
    store = cached_store(job.shards[shard], job.lock)
    q, _ = _read_queries(job, block, given)
    _check_generation(job, shard, store)
    # one thread: a worker's parallelism is its Dask threads, one block each
    out = store.search(q, job.k_search, probes=job.probes, prune=job.prune, fill=job.kind == "store", threads=1,
                       rerank=job.rerank)
    _check_generation(job, shard, store)
    return out[0], out[1]


def _finish_block(job: _Job, block: int, parts: list[tuple[np.ndarray, np.ndarray]], given: np.ndarray | None,
                  started: float) -> dict[str, Any]:
    """Merge the block's parts (a collection: across shards, then probe on), drop own ids,
    write it and mark it done."""
    ids, scores = merge_topk(parts, job.k_search)
    qids = None
    if job.kind == "collection" or job.exclude_self:
        q, qids = _read_queries(job, block, given)
    if job.kind == "collection" and job.probes != "all":
        shards = [cached_store(p, job.lock) for p in job.shards]
        fill_across(shards, q, job.k_search, job.probes, job.prune, ids, scores, threads=1, rerank=job.rerank)
    if job.exclude_self:
        ids, scores = drop_self(ids, scores, qids, job.k)
    start, stop = job.bounds(block)
    record = {"block": block, "start": start, "stop": stop, "seconds": round(time.perf_counter() - started, 4),
              "by": where()}
    output.write_block(Path(job.stage), block, start, ids, scores, record)
    return record


def _run_block(job: _Job, block: int, given: np.ndarray | None) -> dict[str, Any]:
    """All of one block in one task: every shard's search, the merge and the write."""
    started = time.perf_counter()
    parts = [_search_shard(job, s, block, given) for s in range(len(job.shards))]
    return _finish_block(job, block, parts, given, started)


def _shard_task(job: _Job, shard: int, block: int, given: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, float]:
    started = time.perf_counter()
    ids, scores = _search_shard(job, shard, block, given)
    return ids, scores, time.perf_counter() - started


def _merge_task(job: _Job, block: int, given: np.ndarray | None, *parts) -> dict[str, Any]:
    """A collection's block: merge its shards' parts and write it. The marker's seconds are
    the shards' search seconds plus the merge's."""
    searched = sum(p[2] for p in parts)
    return _finish_block(job, block, [p[:2] for p in parts], given, time.perf_counter() - searched)


def _run_on(client: Any, job: _Job, todo: list[int], array: np.ndarray | None, bar: Any) -> None:
    """Submit the blocks and wait, updating ``bar`` as blocks finish. A store: one task per
    block. A collection: one task per (block, shard), then one merge task per block."""
    from distributed import KilledWorker, as_completed

    token = secrets.token_hex(4)
    finals = {}
    for b in todo:
        given = _array_block(array, job, b)
        if job.kind == "store" or len(job.shards) == 1:
            fut = client.submit(_run_block, job, b, given, key=f"asteria-block-{token}-{b}", pure=False)
        else:
            parts = [client.submit(_shard_task, job, s, b, given, key=f"asteria-shard-{token}-{b}-{s}", pure=False)
                     for s in range(len(job.shards))]
            fut = client.submit(_merge_task, job, b, given, *parts,
                                key=f"asteria-merge-{token}-{b}", pure=False)
        finals[fut] = b
    try:
        for fut in as_completed(finals):
            try:
                fut.result()  # raises the task's error (one line for the library's own errors)
            except KilledWorker:
                raise BatchJobError(
                    f"Block {finals[fut]} killed every worker that ran it (out of memory?); the finished "
                    f"blocks are kept in {job.stage!r}: rerun with --resume (smaller --block-rows, more memory)."
                ) from None
            bar.update(_rows(job, finals[fut]))
    except BaseException:
        client.cancel(list(finals))
        raise


@contextlib.contextmanager
def _client(client: Any, scheduler: str | None, workers: int | None, threads_per_worker: int, processes: bool):
    if client is not None:
        yield client
        return
    if scheduler is not None:
        from distributed import Client

        with Client(scheduler) as cl:
            yield cl
        return
    with local_client(workers, threads_per_worker, processes) as cl:
        yield cl


def _visible(job: _Job) -> tuple[str, str] | None:
    """On a worker: None if every shard opens there (and is unchanged), else the error's
    class name and one-line message."""
    try:
        for s, p in enumerate(job.shards):
            _check_generation(job, s, cached_store(p, job.lock))
    except AsteriaError as exc:  # reported to the client, which raises it before any work
        return type(exc).__name__, str(exc)
    return None


def _check_workers(client: Any, job: _Job) -> tuple[int, int]:
    """Fail before any work if a worker cannot open the store (or it changed)."""
    answers = client.run(_visible, job)
    if not answers:
        raise InvalidArgumentError("The Dask cluster has no workers.")
    for problem in answers.values():
        if problem:
            name, message = problem
            cls = getattr(errors, name, None)
            raise (cls if isinstance(cls, type) and issubclass(cls, AsteriaError) else AsteriaError)(message)
    info = client.scheduler_info()["workers"].values()
    return len(answers), max((w.get("nthreads", 1) for w in info), default=1)


def _finish(job: _Job, out: Path, stage: Path, n_blocks: int, seconds: float) -> None:
    records = output.markers(stage)
    missing = sorted(set(range(n_blocks)) - {r["block"] for r in records})
    if missing:  # cannot happen unless a marker was removed by hand meanwhile
        raise StoreChangedError(f"Blocks {missing[:5]} of {str(stage)!r} are not done; rerun with --resume.")
    if job.columns is not None:
        _write_columns(job, stage, n_blocks)
    output.publish(out, stage, {"seconds": round(seconds, 3), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                          time.gmtime())})


def _write_columns(job: _Job, stage: Path, n_blocks: int) -> None:
    """Write the asked metadata of every result beside the results, block by block, from
    the generation the job searched (a commit since fails the job unless allow_writer)."""
    import pyarrow.parquet as pq
    import zarr

    group = zarr.open_group(str(stage / output.GROUP), mode="r")
    store = cached_store(job.shards[0], job.lock)
    _check_generation(job, 0, store)
    path = stage / output.GROUP / output.COLUMNS_FILE
    writer = None
    try:
        for block in range(n_blocks):
            start, stop = job.bounds(block)
            table = store.results_table(np.asarray(group["ids"][start:stop]), np.asarray(group["scores"][start:stop]),
                                        columns=list(job.columns), first_query=start)
            if writer is None:
                writer = pq.ParquetWriter(str(path), table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    fsync_dir(path)  # a file: fsynced alone (publish fsyncs the group's directory)
    _check_generation(job, 0, store)


__all__ = ["DEFAULT_BLOCK_ROWS", "BatchResult", "search"]
