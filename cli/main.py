"""The ``asteria-store`` command line: one thin click command per verb.

Each command opens the store (read-only when it only reads), calls one library function
and formats the result: text for people, ``--json`` for machines. Results go to stdout,
progress bars to stderr. Every :class:`~asteria_store.AsteriaError` ends as one line
``Error: <message>`` on stderr with exit code 1 (see :class:`AsteriaGroup`); click's own
usage errors exit with 2.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, get_args

import click
import numpy as np

import asteria_store
from asteria_store import AsteriaError, Store, batch
from asteria_store.batch.cluster import local_client
from asteria_store.config import Metric, StorageDtype
from asteria_store.demo import run_demo
from asteria_store.progress import make_progress
from asteria_store.query.engine import Probes

from .batch_commands import create_collection, search_batch
from .options import (
    ProbesType,
    dtype_option,
    json_option,
    library_default,
    metric_option,
    no_lock_option,
    npy_argument,
    path_type,
    quiet_option,
    store_path,
    training_options,
)


class AsteriaGroup(click.Group):
    """A command group that reports library errors as ``Error: <message>``, exit code 1.

    The library's errors are one-line messages meant for users, so they are shown as they
    are, without a traceback; so are OS errors (permission denied, disk full). Anything
    else is a bug and keeps its traceback.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AsteriaError as exc:
            message = " ".join(str(exc).split("\n")) or type(exc).__name__
            raise click.ClickException(message) from None
        except OSError as exc:  # the filesystem refused (permissions, disk full, ...)
            where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
            raise click.ClickException(f"{exc.strerror or exc}{where}") from None


@click.group(cls=AsteriaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(asteria_store.__version__, prog_name="asteria-store")
def cli() -> None:
    """A persistent, disk-backed vector store with a learned routing index.

    \b
    Example:
        asteria-store create mystore --dim 384
        asteria-store ingest mystore vectors.npy
        asteria-store query mystore queries.npy -k 10
    """


@cli.command()
@store_path
@click.option("--dim", type=int, required=True, help="Vector dimension.")
@metric_option(asteria_store.create)
@dtype_option(asteria_store.create)
@click.option("--router", type=click.Choice(["learned", "sign"]),
              default=library_default(asteria_store.create, "router"), show_default=True,
              help="learned: the ECVH model, trained once the store holds >= 1,000 vectors; "
                   "sign: the untrained random-rotation baseline.")
@click.option("--model", type=path_type(), default=None, metavar="MODEL.pt",
              help="Use a model file from `asteria-store train-model` (no training at ingest).")
@click.option("--bits", type=int, default=None, metavar="N",
              help="Router bucket bits (2**N buckets), kept as the store grows. More bits: smaller "
                   "buckets, fewer rows read per probe, more probes for the same recall. [default: sized "
                   "to the data, growing with it]")
@click.option("--expected-size", type=int, metavar="N", default=None,
              help="How many vectors the store is expected to hold: sizes a sign store's first "
                   "buckets and the first training's. [default: size to the data]")
@click.option("--seed", type=int, metavar="N", default=library_default(asteria_store.create, "seed"),
              show_default=True, help="Seed of the router's random rotation.")
def create(path: Path, dim: int, metric: Metric, dtype: StorageDtype, router: str, model: Path | None,
           bits: int | None, expected_size: int, seed: int) -> None:
    """Create an empty store at PATH.

    \b
    Example:
        asteria-store create mystore --dim 384 --metric cosine --expected-size 100000
        asteria-store create mystore --dim 768 --model model.pt
    """
    with asteria_store.create(path, dim=dim, metric=metric, dtype=dtype, router=router, model=model,
                              bits=bits, expected_size=expected_size, seed=seed) as store:
        routing = store.router.config()
        pending = store.info()["pending_training"]
    what = ("the learned model trains once it holds >= 1,000 vectors" if pending
            else f"{2 ** routing['bits']:,} buckets ({routing['kind']} router)")
    click.echo(f"Created store {str(path)!r}: dim {dim}, metric {metric}, dtype {dtype}, {what}.")


@cli.command()
@store_path
@npy_argument("vectors", "FILE.npy")
@click.option("--ids", type=path_type(), metavar="IDS.npy",
              help="External ids, one per vector (1-D integer .npy). Default: consecutive ids.")
@click.option("--on-conflict", type=click.Choice(["error", "replace"]),
              default=library_default(Store.ingest, "on_conflict"), show_default=True,
              help="An id already in the store: fail and write nothing (error), or replace its "
                   "vector in the same commit (replace: an upsert).")
@click.option("--workers", type=int, metavar="N", default=0, show_default=True,
              help="A collection only: ingest its shards in parallel on N local Dask workers (0: one "
                   "shard after another, in this process).")
@click.option("--metadata", type=path_type(), metavar="FILE.parquet", default=None,
              help="Metadata columns, one row per vector (ints, floats, bools, strings, timestamps, "
                   "lists of strings); `query --where` filters on them.")
@quiet_option
def ingest(path: Path, vectors: Path, ids: Path | None, on_conflict: str, workers: int, metadata: Path | None,
           quiet: bool) -> None:
    """Add vectors from a .npy file as one new segment.

    FILE.npy holds an (n, d) numeric array; it is streamed, not loaded whole. Progress bars
    go to stderr. The index then looks after itself: it trains, re-fits as the store grows,
    and merges segments. Another process writing to the store makes this one wait.

    \b
    Example:
        asteria-store ingest mystore vectors.npy --ids ids.npy --on-conflict replace
        asteria-store ingest mystore vectors.npy --metadata docs.parquet
        asteria-store ingest mycollection vectors.npy --workers 4
    """
    if batch.is_collection(path):
        if metadata is not None:
            raise click.UsageError("--metadata is for stores; collections do not hold metadata columns yet.")
        _ingest_collection(path, vectors, ids, on_conflict, workers, quiet)
        return
    if workers:
        raise click.UsageError("--workers is for collections; a store ingests in one process.")
    with asteria_store.open(path) as store:
        with warnings.catch_warnings():  # said below, in one line
            warnings.simplefilter("ignore", asteria_store.UpkeepDeferredWarning)
            result = store.ingest(vectors, ids=ids, metadata=metadata, on_conflict=on_conflict, progress=not quiet)
        router = store.router
        if result.trained:
            rank = f", LRSQ rank {router.lrsq.rank}" if router.lrsq is not None else ""
            click.echo(f"{'Re-fitted' if result.refitted else 'Trained'} the store's model on a sample of its "
                       f"vectors in {result.train_seconds:.1f} s: {router.n_buckets:,} buckets{rank}.")
        elif result.refitted:
            click.echo(f"Re-sized the index to {router.n_buckets:,} buckets as the store grew.")
        if result.split_rows:
            click.echo(f"Split full buckets: {result.split_rows:,} rows moved, {router.n_buckets:,} buckets now.")
        if result.merged_segments:
            click.echo(f"Merged {result.merged_segments} segments into fewer ({result.upkeep_seconds:.1f} s).")
        if result.upkeep_deferred:
            click.echo(f"Warning: the vectors were added; upkeep was deferred: {result.upkeep_deferred}", err=True)
    replaced = f", replacing {result.replaced:,}" if result.replaced else ""
    click.echo(f"Added {result.rows:,} vectors{replaced} as segment {result.segment} in {result.seconds:.2f} s "
               f"({result.rows / result.seconds:,.0f} vectors/s).")


def _ingest_collection(path: Path, vectors: Path, ids: Path | None, on_conflict: str, workers: int,
                       quiet: bool) -> None:
    if workers < 0:
        raise click.UsageError("--workers must be >= 0.")
    with asteria_store.open_collection(path) as coll:
        if workers:
            with local_client(workers) as client:
                result = coll.ingest(vectors, ids=ids, on_conflict=on_conflict, client=client, progress=not quiet)
        else:
            result = coll.ingest(vectors, ids=ids, on_conflict=on_conflict, progress=not quiet)
    per_shard = ", ".join(f"{rows:,}" for rows in result.shard_rows)
    replaced = f", replacing {result.replaced:,}" if result.replaced else ""
    click.echo(f"Added {result.rows:,} vectors{replaced} to {len(result.shards)} shards ({per_shard}) in "
               f"{result.seconds:.2f} s.")


@cli.command()
@store_path
@quiet_option
def compact(path: Path, quiet: bool) -> None:
    """Merge every segment into one and drop deleted rows.

    Their disk space comes back once no reader still reads the old segments. Readers are
    never blocked; another process writing to the store waits until this is done.

    \b
    Example:
        asteria-store compact mystore
    """
    with _open_any(path) as store:
        result = store.compact(progress=not quiet)
    click.echo(f"Compacted {result.segments_before} segment(s) into {result.segments_after}: {result.rows:,} "
               f"vectors kept, {result.dropped:,} deleted rows dropped, in {result.seconds:.1f} s.")


@cli.command()
@store_path
@npy_argument("queries", "QUERIES.npy")
@click.option("-k", "k", type=int, metavar="K", default=library_default(Store.search, "k"), show_default=True,
              help="Neighbours per query.")
@click.option("--probes", type=ProbesType(), metavar="N|all", default=library_default(Store.search, "probes"),
              show_default=True,
              help="Buckets visited per query. More: higher recall, more latency and bytes "
                   "read. 'all': exact brute force.")
@click.option("--candidates", type=int, default=None, metavar="N",
              help="Stop probing once N rows are gathered: caps latency at some cost in "
                   "recall. [default: no cap]")
@click.option("--prune/--no-prune", default=None,
              help="LRSQ bound pruning (lossless) on every probed bucket: fewest bytes read / "
                   "on none: least CPU when the store is in the page cache. [default: "
                   "single queries, and buckets shared by few queries of a batch]")
@click.option("--rerank", type=int, default=None, metavar="R",
              help="Approximate search for a store larger than RAM: score probed rows from "
                   "their sketches (d/8 bytes a row) and rescore the R best exactly. Fewer "
                   "bytes read, recall a little lower. [default: certified search]")
@click.option("--where", default=None, metavar="SQL",
              help="Only rows whose metadata match this SQL predicate, e.g. \"lang = 'en' AND "
                   "year >= 2020\".")
@click.option("--columns", default=None, metavar="A,B",
              help="Also print these metadata columns of each result.")
@click.option("--explain", is_flag=True,
              help="Also report, per query, buckets probed, rows scanned and bytes read (and a "
                   "filter's plan).")
@json_option
@no_lock_option
def query(path: Path, queries: Path, k: int, probes: Probes, candidates: int | None,
          prune: bool | None, rerank: int | None, where: str | None, columns: str | None, explain: bool,
          as_json: bool, no_lock: bool) -> None:
    """Find the k nearest neighbours of each query.

    QUERIES.npy holds a (q, d) array. Prints one line per query: its row number, then
    `id (score)` best first. With --json, one object per line:
    {"query": row, "ids": [...], "scores": [...]}.

    \b
    Example:
        asteria-store query mystore queries.npy -k 5 --probes 64
        asteria-store query mystore queries.npy --probes all --json
        asteria-store query mystore queries.npy --explain
        asteria-store query mystore queries.npy --probes 16 --rerank 50
        asteria-store query mystore queries.npy --where "lang = 'en'" --columns title,year
    """
    names = [c.strip() for c in columns.split(",") if c.strip()] if columns else None
    collection = batch.is_collection(path)
    if collection and (where or names or explain or candidates is not None):
        raise click.UsageError("--where, --columns, --explain and --candidates are for stores; a collection "
                               "takes -k, --probes, --prune and --rerank.")
    with _open_any(path, readonly=True, lock=not no_lock) as store:
        if collection:
            out = store.search(queries, k, probes=probes, prune="auto" if prune is None else prune, rerank=rerank)
        else:
            if prune is None:
                prune = _one_shot_prune(store, queries, probes, rerank)
            out = store.search(queries, k, probes=probes, candidates=candidates, prune=prune, explain=explain,
                               rerank=rerank, where=where)
        ids, scores = out[0], out[1]
        present = ids != None if ids.dtype == object else ids >= 0  # noqa: E711 (None or -1: no result)
        found_ids = ids[present]
        meta = store.fetch(found_ids, columns=names).to_pylist() if names else None
    stats = out[2].rows() if explain else None
    at = 0
    for row, (row_ids, row_scores, found) in enumerate(zip(ids, scores, present)):
        hit_ids, hit_scores = row_ids[found].tolist(), row_scores[found].tolist()
        rows = meta[at : at + len(hit_ids)] if meta is not None else None
        at += len(hit_ids)
        if as_json:
            record = {"query": row, "ids": hit_ids, "scores": hit_scores}
            if rows is not None:
                record["columns"] = {c: [r[c] for r in rows] for c in names}
            if stats is not None:
                record["explain"] = stats[row]
            click.echo(json.dumps(record, default=str))
        else:
            if rows is not None:
                hits = ", ".join(f"{i} ({s:.4f}; " + ", ".join(f"{c}={r[c]}" for c in names) + ")"
                                 for i, s, r in zip(hit_ids, hit_scores, rows))
            else:
                hits = ", ".join(f"{i} ({s:.4f})" for i, s in zip(hit_ids, hit_scores))
            click.echo(f"{row}: {hits or '(no results)'}")
            if stats is not None:
                st = stats[row]
                click.echo(f"   buckets {st['buckets']}, scanned {st['scanned']:,} rows, "
                           f"read {_human_bytes(st['bytes_read'])}")
                if "filter" in st:
                    f = st["filter"]
                    click.echo(f"   filter: {f['matching']:,} rows match ({100 * f['selectivity']:.2f}%), plan "
                               f"{f['plan']}" + (f", {f['probes']} probes" if f["probes"] else ""))


@cli.command()
@store_path
@click.option("--verbose", "-v", is_flag=True, help="Every field, internals included, one per line.")
@json_option
@no_lock_option
def info(path: Path, verbose: bool, as_json: bool, no_lock: bool) -> None:
    """Show a store's configuration, counts and disk usage.

    The text is a short summary; --verbose lists every field, and --json adds the internals
    (extents, the router's configuration and digest, growth state, upkeep so far).

    \b
    Example:
        asteria-store info mystore
        asteria-store info mystore --verbose
        asteria-store info mystore --json
    """
    with _open_any(path, readonly=True, lock=not no_lock) as store:
        summary = store.info()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    if verbose or summary.get("kind") == "collection":
        for key, value in _flatten(summary):
            if key == "disk_bytes":
                value = f"{value} ({_human_bytes(value)})"
            click.echo(f"{key}: {value}")
        return
    s = summary
    click.echo(f"store: {s['path']} (format {s['format_version']})")
    click.echo(f"vectors: {s['count']:,}" + (f" (+{s['deleted']:,} deleted, dropped by compact)" if s["deleted"] else ""))
    click.echo(f"dim: {s['dim']}, metric {s['metric']}, stored as {s['dtype']}")
    click.echo(f"ids: {s['ids']}")
    columns = ", ".join(f"{k} ({v})" for k, v in s["columns"].items())
    click.echo(f"columns: {columns or 'none'}")
    pending = ", trains at its first ingest of >= 1,000 vectors" if s["pending_training"] else ""
    click.echo(f"index: {s['router']}, {s['buckets']:,} buckets{pending}")
    click.echo(f"segments: {s['segments']} (generation {s['generation']})")
    click.echo(f"disk: {_human_bytes(s['disk_bytes'])}")


@cli.command()
@store_path
@click.option("--repair", is_flag=True,
              help="Remove orphan segments left by interrupted ingests, and record damaged chunks "
                   "so that every reader refuses them (opens the store for writing; never deletes data).")
@click.option("--quick", is_flag=True,
              help="Skip the checksums of the data (the only part that reads every chunk).")
@quiet_option
@no_lock_option
def verify(path: Path, repair: bool, quick: bool, quiet: bool, no_lock: bool) -> None:
    """Check a store end to end; exit code 1 if it is damaged.

    Recomputes the checksum of every chunk (vectors, ids, LRSQ codes) and lists the ids of
    the rows in damaged ones. Orphan segments of interrupted ingests are harmless: they
    are listed, not counted as damage. The store is opened read-only unless --repair is given.

    \b
    Example:
        asteria-store verify mystore
        asteria-store verify mystore --quick
        asteria-store verify mystore --repair
    """
    with _open_any(path, readonly=not repair, lock=not no_lock) as store:
        report = store.verify(repair=repair, quick=quick, progress=not quiet)
    click.echo(f"Checked {report.checked_segments} segment(s), {report.checked_rows:,} row(s), "
               f"{report.checked_chunks:,} chunk checksum(s).")
    for problem in report.problems:
        click.echo(f"problem: {problem}")
    for note in report.notes:
        click.echo(f"note: {note}")
    for orphan in report.orphans:
        note = "removed" if orphan in report.removed else "harmless; remove with --repair"
        click.echo(f"orphan: {orphan} ({note})")
    if report.damaged and not repair:
        click.echo("Run `asteria-store verify --repair` to make every reader refuse the damaged rows.")
    if not report.ok:
        raise click.ClickException(f"The store {str(path)!r} has {len(report.problems)} problem(s).")
    click.echo("OK")


@cli.command()
@store_path
@click.argument("dest", type=path_type(), metavar="DEST")
@quiet_option
@no_lock_option
def backup(path: Path, dest: Path, quiet: bool, no_lock: bool) -> None:
    """Copy a store, as of one moment, to DEST (a new path) while writers go on.

    The copy holds one snapshot: the catalog as of then, its model and its segments. DEST
    appears whole or not at all; it opens and verifies as a store of its own.

    \b
    Example:
        asteria-store backup mystore /backups/mystore-2026-12-04
    """
    with asteria_store.open(path, readonly=True, lock=not no_lock) as store:
        result = store.backup(dest, progress=not quiet)
    click.echo(f"Backed up {result.rows:,} vectors ({result.segments} segments, generation {result.generation}, "
               f"{_human_bytes(result.bytes)}) to {result.path!r} in {result.seconds:.1f} s.")


@cli.command()
@store_path
@click.argument("out", type=path_type(), metavar="OUT.parquet")
@click.option("--columns", default=None, metavar="A,B", help="Metadata columns to write. [default: all]")
@click.option("--vectors", is_flag=True, help="Also write each row's vector (a fixed-size list of float32).")
@quiet_option
@no_lock_option
def export(path: Path, out: Path, columns: str | None, vectors: bool, quiet: bool, no_lock: bool) -> None:
    """Write every live row (id, metadata columns, vectors if asked) to a Parquet file.

    Rows are read from one snapshot of the store, in batches: memory stays bounded, and
    writers may go on meanwhile. The file is written under a temporary name and renamed
    when complete.

    \b
    Example:
        asteria-store export mystore rows.parquet --columns title,year --vectors
    """
    import pyarrow.parquet as pq

    names = [c.strip() for c in columns.split(",") if c.strip()] if columns else None
    if out.suffix.lower() != ".parquet":
        raise click.UsageError(f"OUT must be a .parquet file, got {str(out)!r}.")
    tmp = out.with_name(f".{out.name}.tmp")
    with asteria_store.open(path, readonly=True, lock=not no_lock) as store:
        total, rows = len(store), 0
        batches = store.export(columns=names, vectors=vectors)
        bar = make_progress(not quiet, total=total, desc="exporting")
        try:
            writer = None
            for b in batches:
                if writer is None:
                    writer = pq.ParquetWriter(tmp, b.schema)
                writer.write_batch(b)
                rows += b.num_rows
                bar.update(b.num_rows)
            if writer is None:  # an empty store: its columns, no rows
                first = store.fetch([], columns=names, vectors=vectors)
                writer = pq.ParquetWriter(tmp, first.schema)
            writer.close()
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            bar.close()
    os.replace(tmp, out)
    click.echo(f"Exported {rows:,} rows to {str(out)!r}.")


@cli.command()
@store_path
@click.option("--ids", type=path_type(), required=True, metavar="FILE.npy",
              help="Ids to delete (1-D integer .npy). All must exist, or nothing is deleted.")
def delete(path: Path, ids: Path) -> None:
    """Delete vectors by id.

    FILE.npy holds a 1-D integer array of ids. All must be in the store, or nothing is
    deleted.

    \b
    Example:
        asteria-store delete mystore --ids stale_ids.npy
    """
    with _open_any(path) as store:
        result = store.delete(ids)
    click.echo(f"Deleted {result.rows:,} vectors.")


@cli.command()
@store_path
@npy_argument("sample", "SAMPLE.npy")
@training_options
@quiet_option
def train(path: Path, sample: Path, epochs: int, batch_size: int, bits: int | None, rank: int | None,
          ecc: bool, seed: int, device: str, quiet: bool) -> None:
    """Train the store's learned model on SAMPLE.npy and re-bucket the store with it.

    Loss components are printed per epoch (stderr) with a progress bar. Stored vectors are
    rewritten in the new bucket order and swapped in with one transaction: queries see the
    old store until then. At most 100,000 vectors of SAMPLE.npy are used.

    \b
    Example:
        asteria-store train mystore sample.npy --epochs 5 --bits 10
    """
    with asteria_store.open(path) as store:
        result = store.train(sample, epochs=epochs, batch_size=batch_size, bits=bits, rank=rank, ecc=ecc,
                             seed=seed, device=device, progress=not quiet)
    click.echo(f"Trained on {result.rows_trained_on:,} vectors ({result.buckets:,} buckets), re-bucketed "
               f"{result.rows_rebucketed:,} stored vectors in {result.seconds:.1f} s.")


@cli.command("train-model")
@click.option("--train-embeddings", type=path_type(), required=True, metavar="TRAIN.npy",
              help="Training vectors, (n, d) .npy (at most 100,000 are sampled).")
@click.option("--dim", type=int, default=None, help="Expected dimension (checked).")
@click.option("--metric", type=click.Choice(get_args(Metric)),
              default=library_default(asteria_store.train_model, "metric"), show_default=True,
              help="The metric of the stores that will use the model.")
@click.option("--save-model", type=path_type(), required=True, metavar="MODEL.pt", help="Where to write the model file.")
@training_options
@quiet_option
def train_model(train_embeddings: Path, dim: int | None, metric: Metric, save_model: Path, epochs: int,
                batch_size: int, bits: int | None, rank: int | None, ecc: bool, seed: int, device: str,
                quiet: bool) -> None:
    """Train a standalone model file, for `asteria-store create PATH --model MODEL.pt`.

    \b
    Example:
        asteria-store train-model --train-embeddings train.npy --dim 768 --epochs 5 \\
            --batch-size 1024 --save-model model.pt
    """
    router, history = asteria_store.train_model(
        train_embeddings, save=save_model, dim=dim, metric=metric, bits=bits, ecc=ecc, epochs=epochs,
        batch_size=batch_size, rank=rank, seed=seed, device=device, progress=not quiet)
    scan = router.info.get("holdout_scan")
    click.echo(f"Saved model {str(save_model)!r}: dim {router.dim}, {2 ** router.bits:,} buckets, "
               f"LRSQ rank {router.lrsq.rank}; held-out scan for recall 0.90: {scan:.2%} "
               f"after {sum(isinstance(h['epoch'], int) and h['epoch'] > 0 for h in history)} epoch(s).")


@cli.command()
@click.option("--n", type=int, default=library_default(run_demo, "n"), show_default=True,
              help="Vectors to ingest.")
@click.option("--dim", type=int, default=library_default(run_demo, "dim"), show_default=True,
              help="Their dimension.")
@click.option("--queries", type=int, default=library_default(run_demo, "queries"),
              show_default=True, help="Held-out queries.")
@click.option("--k", "k", type=int, default=library_default(run_demo, "k"), show_default=True,
              help="Neighbours per query (recall@k).")
@click.option("--keep", type=path_type(), default=None, metavar="PATH",
              help="Create the store at PATH and keep it. [default: a temporary directory]")
@quiet_option
def demo(n: int, dim: int, queries: int, k: int, keep: Path | None, quiet: bool) -> None:
    """Build a demo store and report its recall and speed.

    Generates seeded clustered vectors plus held-out queries, ingests them, and measures
    recall@k against brute force, batch QPS and per-query latency, for the default probe
    budget and for --probes all (exact).

    \b
    Example:
        asteria-store demo
        asteria-store demo --n 100000 --dim 128 --keep demostore
    """
    run_demo(n=n, dim=dim, queries=queries, k=k, keep=keep, progress=not quiet, print_fn=click.echo)


#: Vectors a one-shot ``query`` may read whole rather than load the compiled path (~1 s).
_ONE_SHOT_BYTES = 16 << 20


def _one_shot_prune(store, queries: Path, probes: Probes, rerank: int | None) -> bool | str:
    """``prune`` for one CLI process: where the queries' probed rows hold few bytes, score
    them whole in numpy (``False``) instead of loading the compiled pruning path, which
    costs more than such a search. Pruning is lossless: the results are the same."""
    if rerank is not None or probes == "all" or not Path(queries).is_file():  # a FIFO is refused by the search
        return "auto"
    try:
        n = np.load(queries, mmap_mode="r").shape[0]
    except (OSError, ValueError, IndexError):
        return "auto"  # the search says what is wrong with the file
    buckets = store.router.n_buckets
    rows = n * min(int(probes), buckets) * len(store) / max(1, buckets)
    return False if rows * 4 * store.dim <= _ONE_SHOT_BYTES else "auto"


def _open_any(path: Path, **options):
    """A store, or a collection where ``path`` holds one (the verbs both take)."""
    opener = asteria_store.open_collection if batch.is_collection(path) else asteria_store.open
    return opener(path, **options)


def _flatten(mapping: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``{"a": {"b": 1}}`` -> ``[("a.b", 1)]``."""
    out: list[tuple[str, Any]] = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.extend(_flatten(value, f"{prefix}{key}."))
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _human_bytes(n: int) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    size, i = float(n), 0
    while size >= 1024 and i < len(units) - 1:
        size, i = size / 1024, i + 1
    return f"{size:.1f} {units[i]}"


cli.add_command(search_batch)
cli.add_command(create_collection)

__all__ = ["AsteriaGroup", "cli"]
