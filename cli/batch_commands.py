"""``search-batch`` and ``create-collection``: offline jobs on Dask and sharded collections."""

from __future__ import annotations

import json
from pathlib import Path

import click

import asteria_store
from asteria_store import batch
from asteria_store.config import Metric, StorageDtype
from asteria_store.query.engine import Probes

from .options import (
    ProbesType,
    dtype_option,
    json_option,
    library_default,
    metric_option,
    no_lock_option,
    path_type,
    quiet_option,
    store_path,
)


@click.command("search-batch")
@click.argument("target", type=path_type(), metavar="STORE")
@click.argument("queries", type=path_type(), metavar="QUERIES")
@click.option("--out", type=path_type(), required=True, metavar="RESULTS.zarr",
              help="Zarr group to write (ids and scores, (Q, k)); it appears when the job is complete.")
@click.option("-k", "k", type=int, metavar="K", default=library_default(batch.search, "k"), show_default=True,
              help="Neighbours per query.")
@click.option("--probes", type=ProbesType(), metavar="N|all", default=library_default(batch.search, "probes"),
              show_default=True, help="Buckets visited per query ('all': exact).")
@click.option("--prune/--no-prune", default=None,
              help="LRSQ bound pruning on every probed bucket / on none. [default: as `query`]")
@click.option("--rerank", type=int, default=None, metavar="R",
              help="Approximate search for a store larger than RAM, as `query --rerank`: score probed "
                   "rows from their sketches and rescore the R best exactly. [default: certified search]")
@click.option("--columns", default=None, metavar="A,B",
              help="A store's metadata columns to write beside the results, in OUT/columns.parquet "
                   "(query, rank, id, then these).")
@click.option("--block-rows", type=int, metavar="N", default=library_default(batch.search, "block_rows"),
              show_default=True, help="Queries per task and per output chunk.")
@click.option("--workers", type=int, metavar="N", default=None,
              help="Local Dask worker processes; 0: no Dask, this process only. [default: one per core]")
@click.option("--threads-per-worker", type=int, metavar="N",
              default=library_default(batch.search, "threads_per_worker"), show_default=True,
              help="Threads per local worker, each searching its own block.")
@click.option("--scheduler", metavar="ADDRESS", default=None,
              help="Run on this Dask scheduler (tcp://host:8786) instead of a local cluster; the "
                   "store, the queries and --out must be at the same paths on every worker.")
@click.option("--resume", is_flag=True,
              help="Finish an unfinished job at --out: only the blocks not done yet are searched.")
@click.option("--exclude-self", is_flag=True,
              help="QUERIES is a store or collection (a kNN graph): leave out each vector's own id.")
@click.option("--allow-writer", is_flag=True,
              help="Run even while a writer holds the store's lock (a commit during the job fails it).")
@no_lock_option
@quiet_option
@json_option
def search_batch(target: Path, queries: Path, out: Path, k: int, probes: Probes, prune: bool | None,
                 rerank: int | None, columns: str | None, block_rows: int, workers: int | None, threads_per_worker: int, scheduler: str | None,
                 resume: bool, exclude_self: bool, allow_writer: bool, no_lock: bool, quiet: bool,
                 as_json: bool) -> None:
    """Search every query in QUERIES against STORE on Dask; write the results to --out.

    STORE is a store or a collection. QUERIES is a .npy file (memory-mapped), a Zarr array,
    or a store or collection (its own vectors, for a kNN graph; the output then also has
    `query_ids`). The work is split into blocks of queries, searched by local worker
    processes (or the cluster at --scheduler). Each finished block is durable: after a
    crash or a kill, --resume redoes only the missing ones. Read the results with zarr or
    dask: zarr.open_group("RESULTS.zarr")["ids"].

    \b
    Example:
        asteria-store search-batch mystore queries.npy --out results.zarr -k 10 --workers 2
        asteria-store search-batch mystore queries.npy --out results.zarr --resume
        asteria-store search-batch mystore queries.npy --out results.zarr --columns title,year
        asteria-store search-batch mystore mystore --out knn.zarr -k 15 --exclude-self
        asteria-store search-batch coll q.npy --out r.zarr --scheduler tcp://10.0.0.5:8786
    """
    if scheduler is not None and workers is not None:
        raise click.UsageError("--workers and --scheduler exclude each other: the scheduler's cluster has its workers.")
    result = batch.search(target, queries, out, k=k, probes=probes, prune="auto" if prune is None else prune,
                          rerank=rerank, block_rows=block_rows,
                          columns=[c.strip() for c in columns.split(",") if c.strip()] if columns else None, workers=workers, threads_per_worker=threads_per_worker,
                          scheduler=scheduler, resume=resume, exclude_self=exclude_self,
                          allow_writer=allow_writer, lock=not no_lock, progress=not quiet)
    if as_json:
        record = {name: getattr(result, name) for name in result.__dataclass_fields__}
        click.echo(json.dumps({**record, "queries_per_second": result.queries_per_second}))
        return
    if result.blocks_run == 0:
        click.echo(f"{str(out)!r} is already complete: {result.queries:,} queries, nothing to do.")
        return
    skipped = f" ({result.blocks_skipped} done before, skipped)" if result.blocks_skipped else ""
    on = f"{result.workers} worker(s) x {result.threads_per_worker} thread(s)" if result.workers else "this process"
    click.echo(f"Searched {result.blocks_run} of {result.blocks} blocks{skipped} on {on} in {result.seconds:.1f} s "
               f"({result.queries_per_second:,.0f} queries/s). Results: {str(out)!r}.")


@click.command("create-collection")
@store_path
@click.option("--shards", type=int, required=True, metavar="N", help="Number of shard stores.")
@click.option("--dim", type=int, required=True, help="Vector dimension.")
@click.option("--model", type=path_type(), default=None, metavar="MODEL.pt",
              help="The routing model every shard shares (from `asteria-store train-model`).")
@click.option("--train", "train", type=path_type(), default=None, metavar="SAMPLE.npy",
              help="Train the shared model on these vectors instead.")
@metric_option(asteria_store.create_collection)
@dtype_option(asteria_store.create_collection)
@click.option("--bits", type=int, default=None, metavar="N",
              help="With --train: 2**N buckets. [default: sized to --expected-size]")
@click.option("--expected-size", type=int, default=None, metavar="N",
              help="With --train: how many vectors the whole collection will hold (sizes the buckets).")
@quiet_option
def create_collection(path: Path, shards: int, dim: int, model: Path | None, train: Path | None, metric: Metric,
                      dtype: StorageDtype, bits: int | None, expected_size: int | None, quiet: bool) -> None:
    """Create a sharded collection at PATH: SHARDS stores sharing one routing model.

    Id i lives in shard i % SHARDS. `ingest` and `info` take the collection's path like a
    store's; `search-batch` searches all shards and merges their results exactly.

    \b
    Example:
        asteria-store train-model --train-embeddings sample.npy --dim 384 --save-model model.pt
        asteria-store create-collection coll --shards 4 --dim 384 --model model.pt
        asteria-store ingest coll vectors.npy --workers 4
    """
    with asteria_store.create_collection(path, shards=shards, dim=dim, model=model, train=train, metric=metric,
                                         dtype=dtype, bits=bits, expected_size=expected_size,
                                         progress=not quiet) as coll:
        buckets = coll.info()["buckets"]
    click.echo(f"Created collection {str(path)!r}: {shards} shards, dim {dim}, metric {metric}, {buckets:,} buckets.")
