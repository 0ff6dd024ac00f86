"""The :class:`Store` (create, open, and the facade over the read and write sides).

A store is a directory::

    mystore/
      catalog.lmdb/     LMDB catalog, the single source of truth (see storage/catalog.py)
      model/<name>/     the router (JSON + little-endian .npy, see model/persist.py)
      segments.zarr/    Zarr v3 group, one immutable sub-group per segment (storage/segments.py)
      writer.lock       advisory lock held by the one writing process
      readers/          one pin file per open handle (storage/pins.py)

Reads (reads.py) run in ONE LMDB read transaction each, with their generation pinned.
Writes (the write/ package) build their data, fsync it, and publish it in ONE LMDB write
transaction: a crash at any point leaves either the old state or the new one; the only
debris is an orphan directory, removed by the next writable open or ``verify(repair=True)``.
Directories a commit replaces (a retrain's, re-fit's or merge's old segments and model)
are retired and collected once no reader can still need them.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Literal

import lmdb
import numpy as np

from .backup import BackupResult
from .backup import backup as backup_store
from .config import BASE_FORMAT_VERSION, FORMAT_VERSION, Metric, StorageDtype, StoreConfig
from .errors import (
    AsteriaError,
    CorruptStoreError,
    DimensionMismatchError,
    InvalidArgumentError,
    InvalidInputError,
    ReadOnlyError,
    StoreClosedError,
    StoreExistsError,
    StoreNotFoundError,
    UnsupportedFormatError,
    UpkeepDeferredWarning,
)
from .io import ArrayLike
from .model.persist import load_model_file, load_router, save_router
from .model.router import Router, SignHasher, bits_for_size
from .progress import ProgressLike
from .query.engine import DEFAULT_PROBES, Probes, SearchStats, View
from .reads import SEGMENTS_DIR, ReadSide
from .results import (
    CompactResult,
    DeleteResult,
    IngestResult,
    TrainResult,
    VerifyReport,
)
from .storage import segments as seglib
from .storage.catalog import CATALOG_DIR, Catalog
from .storage.lock import WriterLock, lock_is_free
from .storage.pins import READERS_DIR, ReaderPin
from .translate import CATALOG_ERRORS, boundary, catalog_error
from .verify import damage_message, verify_snapshot
from .write import MIN_TRAIN_ROWS, MODEL_DIR, OnConflict, WriteSide


#: Held (flock) inside a ``.NAME.creating-*`` directory while ``create`` builds it.
_CREATING_LOCK = ".creating.lock"

RouterChoice = Literal["learned", "sign"]


# --- create / open ------------------------------------------------------------------------


def create(
    path: str | os.PathLike[str],
    *,
    dim: int,
    metric: Metric = "cosine",
    dtype: StorageDtype = "float32",
    router: RouterChoice = "learned",
    model: str | os.PathLike[str] | None = None,
    bits: int | None = None,
    expected_size: int | None = None,
    seed: int = 0,
    chunk_rows: int = 0,
) -> Store:
    """Create an empty store at ``path`` and return it open for writing.

    Args:
        dim: vector dimension.
        metric: ``"cosine"`` (vectors normalised), ``"ip"`` (raw inner product) or
            ``"l2"`` (squared Euclidean distance: scores are distances, smallest first).
        dtype: storage dtype of full vectors (``"float16"`` halves disk and bytes read).
        router: ``"learned"`` (default): the ECVH model (BOR + ECVH + LRSQ), trained on a
            sample of the first ingest of at least ``MIN_TRAIN_ROWS`` vectors (until then
            the baseline router serves). ``"sign"``: the baseline random-rotation sign
            hasher, never trained (the ablation baseline; routes 5-10x worse on real data).
        model: a model file from ``asteria-store train-model`` (or
            :func:`~asteria_store.model.persist.save_model_file`): the store uses it from
            the start and never trains at ingest.
        bits: bucket bits (2**bits buckets), kept as the store grows. More bits: smaller
            buckets, fewer rows read per probe, more probes needed for the same recall.
            Default: sized to the data the store holds (~256 rows per bucket for the sign
            router, ~128 for the learned one), and re-sized as it grows (write/upkeep.py).
        expected_size: how many vectors the store is expected to hold: sizes the sign
            router's first buckets, and the first training's. Default: size to the data.
        seed: seed of the router's random rotation and of training.
        chunk_rows: rows per Zarr chunk (0: ~16 MiB of vectors per chunk).

    The store is built in a temporary sibling directory and renamed into place, so a crash
    during ``create`` leaves no half-made store.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise StoreExistsError(
            f"Cannot create a store at {str(target)!r}: it is a file. A store is a directory: choose a new path."
        )
    if target.exists() and any(target.iterdir()):
        raise StoreExistsError(
            f"Cannot create a store at {str(target)!r}: it already exists. "
            "Open it instead, or choose a new path."
        )
    config = StoreConfig(dim=dim, metric=metric, dtype=dtype, chunk_rows=chunk_rows)
    if router not in ("learned", "sign"):
        raise InvalidArgumentError(f"router must be 'learned' or 'sign', got {router!r}.")
    if expected_size is not None and (isinstance(expected_size, bool) or not isinstance(expected_size, int)
                                      or expected_size < 1):
        raise InvalidArgumentError(f"expected_size must be a positive integer, got {expected_size!r}.")
    requested_bits = bits
    if bits is None:  # a learned store's baseline serves fewer than MIN_TRAIN_ROWS vectors
        size = MIN_TRAIN_ROWS if router == "learned" else (expected_size or 1)
        bits = bits_for_size(size)
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 62:
        raise InvalidArgumentError(f"bits must be an integer in [1, 62], got {bits!r}.")
    if router == "learned" and requested_bits is not None and requested_bits > 20:
        raise InvalidArgumentError(f"bits must be at most 20 for the learned router, got {bits}.")
    pending = None
    if model is not None and metric == "l2":
        raise InvalidArgumentError("An l2 store trains its own model; create it without --model.")
    if model is not None:
        routing = load_model_file(model)
        if routing.dim != dim:
            raise DimensionMismatchError(
                f"Expected a model of dimension {dim}, got one of dimension {routing.dim} "
                f"from {os.fspath(model)!r}. Was it trained with --dim {routing.dim}?"
            )
    else:
        routing = SignHasher.random(config.stored_dim, bits, seed=seed)
        if router == "learned":  # the baseline serves until the first big enough ingest
            pending = {"bits": requested_bits, "expected_size": expected_size, "seed": seed}

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_creations(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.creating-", dir=target.parent))
    os.chmod(tmp, seglib.dir_mode())  # mkdtemp's 0700 would hide the store from other users
    creating = os.open(tmp / _CREATING_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(creating, fcntl.LOCK_EX)  # held while this create runs (see _remove_stale_creations)
    try:
        model_name = f"{routing.kind}-0"
        digest = save_router(routing, tmp / MODEL_DIR / model_name)
        seglib.create_root(tmp / SEGMENTS_DIR)
        catalog = Catalog(tmp / CATALOG_DIR, create=True)
        try:
            def init(txn):
                catalog.put_meta(txn, "format_version", BASE_FORMAT_VERSION)
                catalog.put_meta(txn, "config", config.to_dict())
                catalog.put_meta(txn, "router", {"dir": f"{MODEL_DIR}/{model_name}", "digest": digest})
                catalog.put_meta(txn, "pending_training", pending)
                # The index grows with the data (write/upkeep.py), unless it came from a model file.
                catalog.put_meta(txn, "growth", {"grow": model is None, "bits": requested_bits, "seed": seed,
                                                 "fitted_rows": expected_size or 0})
                catalog.put_meta(txn, "next_id", 0)
                catalog.put_meta(txn, "next_segment", 1)
                catalog.put_meta(txn, "count", 0)
                catalog.put_meta(txn, "generation", 0)
                catalog.put_meta(txn, "created", time.time())

            catalog.write(init)
            catalog.env.sync(True)
        finally:
            catalog.close()
        (tmp / READERS_DIR).mkdir()
        (tmp / _CREATING_LOCK).unlink()
        seglib.publish_dir(tmp, target)  # onto nothing, or an empty directory (checked above)
    except (OSError, lmdb.Error) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise catalog_error(target, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(creating)
    return Store(target)


def open(path: str | os.PathLike[str], *, readonly: bool = False, lock: bool = True,
         lock_timeout: float | None = None) -> Store:
    """Open an existing store. ``readonly=True`` refuses every write.

    Writers queue: a write waits for another process's writer lock as long as it is held
    (``lock_timeout``: give up after that many seconds with ``StoreLockedError``).

    A read-only open also works on a read-only directory or mount. ``lock=False`` (only
    with ``readonly=True``) opens the catalog without LMDB's lock file, for network
    filesystems where file locks do not work: safe only while no process writes to the
    store, and such a reader registers no pins (see storage/pins.py), so a writer's
    retrain could remove files it is reading.
    """
    return Store(path, readonly=readonly, lock=lock, lock_timeout=lock_timeout)


def _reopen(path: str, readonly: bool, lock: bool, lock_timeout: float | None = None) -> Store:
    return Store(path, readonly=readonly, lock=lock, lock_timeout=lock_timeout)


class Store:
    """A persistent vector store. Use as a context manager, or call :meth:`close`.

    A thin facade: reads go to the read side (reads.py: snapshots and search), writes to
    the write side (write/: ingest, upsert, delete, train, compact and the index's
    upkeep). Every read sees ONE catalog generation from start to end: it runs in one LMDB
    read transaction, and the files of that generation stay on disk until it ends,
    whatever writers commit meanwhile (reader pins). A store pickles as what reopens it
    (path and options), and a handle inherited by a forked child reopens its catalog there
    on first use.
    """

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False, lock: bool = True,
                 lock_timeout: float | None = None):
        self.path = Path(path)
        self.readonly = readonly
        self._lock_option = lock
        self._lock_timeout = lock_timeout
        self._closed = True  # until fully open
        if not lock and not readonly:
            raise InvalidArgumentError("lock=False needs readonly=True: a writer must take LMDB's locks.")
        if lock_timeout is not None and (isinstance(lock_timeout, bool) or not isinstance(lock_timeout, (int, float))
                                         or lock_timeout < 0):
            raise InvalidArgumentError(f"lock_timeout must be None or a number of seconds >= 0, got {lock_timeout!r}.")
        cat_dir = self.path / CATALOG_DIR
        if not (cat_dir / "data.mdb").is_file():
            if self.path.exists() and not self.path.is_dir():
                raise StoreNotFoundError(
                    f"No asteria-store at {str(self.path)!r}: it is a file, and a store is a directory."
                )
            if self.path.exists():
                raise StoreNotFoundError(
                    f"No asteria-store at {str(self.path)!r}: the directory has no catalog. "
                    "Create one with `asteria-store create`."
                )
            raise StoreNotFoundError(
                f"No store at {str(self.path)!r}. Create one with "
                f"`asteria-store create {self.path} --dim D`."
            )
        try:
            catalog = Catalog(cat_dir, readonly=readonly, lock=lock)
        except lmdb.Error as exc:
            raise catalog_error(self.path, exc) from None
        try:  # a damaged catalog or model: close, and say so in one line
            with catalog.read() as txn:
                meta = catalog.all_meta(txn)
            version = meta.get("format_version")
            if not isinstance(version, int) or "config" not in meta:
                raise CorruptStoreError(f"The catalog of {str(self.path)!r} has no valid format record.")
            if version > FORMAT_VERSION:
                raise UnsupportedFormatError(
                    f"The store at {str(self.path)!r} has format version {version}; this "
                    f"asteria-store reads versions up to {FORMAT_VERSION}. Upgrade asteria-store."
                )
            self.config = StoreConfig.from_dict(meta["config"])
            router_rec = meta["router"]
            router = load_router(self.path / router_rec["dir"], digest=router_rec["digest"])
            pin = _open_pin(self.path, catalog, readonly)
        except BaseException as exc:
            catalog.close()
            if isinstance(exc, (*CATALOG_ERRORS, OSError)) and not isinstance(exc, AsteriaError):
                raise catalog_error(self.path, exc) from None
            raise
        self._reads = ReadSide(self.path, self.config, catalog, router, router_rec, pin)
        self._writes = WriteSide(self._reads, lock_timeout=lock_timeout)
        self._closed = False
        self._orphans_removed_at_open: list[str] = []
        if not readonly:
            self._remove_orphans_if_idle()

    def __reduce__(self):
        self._check_open()
        return (_reopen, (str(self.path), self.readonly, self._lock_option, self._lock_timeout))

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._reads.close()
            self._reads.catalog.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self)} vectors"
        return f"<asteria_store.Store {str(self.path)!r} dim={self.config.dim} {state}>"

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"The store {str(self.path)!r} is closed.")

    def _check_writable(self) -> None:
        self._check_open()
        if self.readonly:
            raise ReadOnlyError(f"The store {str(self.path)!r} was opened read-only.")

    # Internals that tests and verify.py look at.
    @property
    def _catalog(self) -> Catalog:
        return self._reads.catalog

    @property
    def _router(self) -> Router:
        return self._reads.router

    @property
    def _pin(self) -> ReaderPin | None:
        return self._reads.pin

    @property
    def _segments_root(self) -> Path:
        return self._reads.segments_root

    def _current_view(self) -> View:
        self._check_open()
        return self._reads.current_view()

    def _orphan_models(self) -> list[str]:
        return self._writes.garbage.orphan_models()

    def _retired(self) -> tuple[set[str], set[str]]:
        return self._writes.garbage.retired()

    # -- state ---------------------------------------------------------------------------

    @boundary
    def __len__(self) -> int:
        self._check_open()
        with self._reads.snapshot() as snap:
            return snap.view.count

    @property
    @boundary
    def generation(self) -> int:
        """The catalog generation now (every commit raises it by one)."""
        self._check_open()
        with self._reads.snapshot() as snap:
            return snap.view.generation

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    @boundary
    def id_kind(self) -> str:
        """The kind of ids the store holds: ``"int"`` or ``"string"``, fixed by its first
        ingest (an empty store says ``"int"`` and still takes either)."""
        self._check_open()
        return self._reads.id_kind()

    @property
    @boundary
    def router(self) -> Router:
        """The routing model now (follows retraining by this or another process)."""
        self._check_open()
        with self._reads.snapshot():
            return self._reads.router

    @boundary
    def info(self) -> dict[str, Any]:
        """A short JSON-able summary: path, dim, metric, dtype, count, deleted rows,
        segments, buckets, router kind, kernel, generation, disk usage.

        What only upkeep, tests and tools look at is under ``info()["internals"]``: chunk
        rows, rows stored, extents, next automatic id, the router's configuration and
        digest, growth state (``fitted_rows``, ``grows``), retired directories, and upkeep
        so far (``maintenance``: re-fits and merges)."""
        self._check_open()
        return self._reads.info()

    # -- writes --------------------------------------------------------------------------

    @boundary
    def ingest(
        self,
        vectors: ArrayLike,
        ids: ArrayLike | None = None,
        *,
        metadata=None,
        on_conflict: OnConflict = "error",
        progress: ProgressLike = None,
    ) -> IngestResult:
        """Add vectors (an (n, d) array or a ``.npy`` path) as ONE new immutable segment.

        ``ids``: uint64-compatible external ids (array or ``.npy`` path), unique within the
        batch; auto-assigned (consecutive from the store's counter) when omitted.
        ``metadata``: one row per vector (a pyarrow Table, a pandas DataFrame, a dict of
        equal-length columns, or a ``.parquet`` path) of ints, floats, bools, strings,
        timestamps or lists of strings, nulls allowed. A column new to the store is null
        in the rows before it; a column whose type clashes with the store's is refused
        before anything is written. :meth:`fetch` reads them back, and ``where=`` of
        :meth:`search` filters on them.
        ``on_conflict``: what an id already in the store means: ``"error"`` (default:
        nothing is written) or ``"replace"`` (its vector is replaced, in the same commit:
        an upsert). A ``.npy`` input is streamed in blocks: resident memory stays bounded
        whatever its size. Nothing becomes visible until the final commit; on any error the
        store is left exactly as it was.

        Then the index looks after itself (write/upkeep.py): a learned store trains once it holds
        enough vectors, re-fits its model as it outgrows it, splits full buckets, and merges
        segments (tiered) so that the extents per bucket stay few. Each of these is its own
        atomic commit; another writer waits for them (readers never do). If the device
        fills up during them, the ingest stays committed, the upkeep stops where it is
        (``result.upkeep_deferred`` says why, with an :class:`UpkeepDeferredWarning`) and
        resumes after a later ingest.
        """
        self._check_writable()
        result = self._writes.ingest(vectors, ids, on_conflict=on_conflict, progress=progress, metadata=metadata)
        if result.upkeep_deferred:
            warnings.warn(f"The ingest was committed; upkeep was deferred: {result.upkeep_deferred}",
                          UpkeepDeferredWarning, stacklevel=3)
        return result

    @boundary
    def upsert(self, vectors: ArrayLike, ids: ArrayLike, *, metadata=None,
               progress: ProgressLike = None) -> IngestResult:
        """Insert or replace: ``ingest(vectors, ids, metadata=, on_conflict="replace")`` (ids
        required). The old rows of replaced ids, metadata included, are deleted in the same
        commit that adds the new ones."""
        self._check_writable()
        if ids is None:
            raise InvalidArgumentError("upsert needs ids: the ids whose vectors to insert or replace.")
        return self._writes.ingest(vectors, ids, on_conflict="replace", progress=progress, metadata=metadata)

    @boundary
    def delete(self, ids: ArrayLike) -> DeleteResult:
        """Delete vectors by id (tombstones; space is reclaimed by merges and :meth:`compact`).

        All ids must exist; otherwise nothing is deleted.
        """
        self._check_writable()
        return self._writes.delete(ids)

    @boundary
    def compact(self, *, progress: ProgressLike = None) -> CompactResult:
        """Merge every segment into one and drop deleted rows, in ONE commit.

        Their space comes back once no reader pins the old segments (at once when none
        does). Needs disk for one more copy of the live rows. Readers are never blocked;
        another writer waits until it is done.
        """
        self._check_writable()
        return self._writes.compact(progress=progress)

    @boundary
    def train(
        self,
        sample: ArrayLike | None = None,
        *,
        bits: int | None = None,
        ecc: bool = True,
        epochs: int | None = None,
        batch_size: int = 1024,
        rank: int | None = None,
        seed: int = 0,
        device: Literal["auto", "cpu", "cuda"] = "auto",
        progress: ProgressLike = None,
    ) -> TrainResult:
        """(Re)train the store's learned model and re-bucket every stored vector with it.

        ``sample``: training vectors (array or ``.npy`` path; at most TRAIN_SAMPLE_ROWS of
        them, sampled uniformly, are used); ``None``: a sample of the stored vectors.
        The other arguments are :class:`~asteria_store.model.train.TrainConfig`'s
        (``epochs=None``: its default). Stored rows are rewritten, in the new bucket order,
        into ONE new segment; the new model, the new segment and the retirement of the old
        ones are published in ONE transaction, so readers see the old store until the
        switch and the new one after it. Deleted rows are dropped on the way (this also
        compacts). Needs disk for one more copy. ``bits`` given here stays the store's
        bucket count as it grows.
        """
        self._check_writable()
        settings = dict(bits=bits, ecc=ecc, epochs=epochs, batch_size=batch_size, rank=rank,
                        seed=seed, device=device)
        return self._writes.train(sample, settings, progress=progress)

    # -- reads ---------------------------------------------------------------------------

    @boundary
    def ids(self) -> np.ndarray:
        """Every live id in the store: ascending uint64, or (string ids) sorted str."""
        self._check_open()
        return self._reads.ids()

    @boundary
    def get(self, ids: ArrayLike) -> np.ndarray:
        """The stored vectors of ``ids`` (as float32, normalised if metric is cosine)."""
        self._check_open()
        return self._reads.get(ids)

    @boundary
    def search(
        self,
        queries: ArrayLike,
        k: int = 10,
        *,
        probes: Probes = DEFAULT_PROBES,
        candidates: int | None = None,
        prune: bool | Literal["auto"] = "auto",
        explain: bool = False,
        fill: bool = True,
        threads: int | None = None,
        kernel: str | None = None,
        device: str | None = None,
        rerank: int | None = None,
        where: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, SearchStats]:
        """Top-``k`` neighbours of each query: ``(ids, scores)``, both of shape (Q, k).

        ``ids`` are int64 (-1 where fewer than k results exist, with score -inf); scores
        are exact (cosine similarity or inner product), best first; equal scores are
        ordered by id. The batch is searched bucket by bucket: every probed bucket is read
        once and scored against all the queries probing it in one matrix product, with
        the same results as searching each query alone.

        Args:
            probes: buckets visited per query, in the router's probe order. More probes:
                higher recall, more latency and bytes read. ``"all"`` is exact brute force.
                A query whose probed buckets hold fewer than ``k`` live rows (while the
                store holds at least ``k``) probes on, doubling, until it has ``k``.
            candidates: stop probing once this many rows are gathered (caps latency on
                large buckets at some cost in recall); ``None``: no cap.
            prune: with the learned router, read a probed row's LRSQ codes first and skip
                its full vector when its certified upper bound cannot reach the top k
                (lossless: same results). ``True``: for every probed bucket (fewest bytes
                read, ~4x fewer: what matters when the store is not in the page cache);
                ``False``: never (least CPU when it is cached); ``"auto"``: for a single
                query, and in a batch for buckets that at most ``PRUNE_GROUP_MAX`` of its
                queries probe (a bucket many queries share is read whole once, as their
                survivors cover most of it). Trade-offs measured in docs/benchmarks.md.
            explain: also return a :class:`~asteria_store.query.engine.SearchStats`
                (buckets probed, rows scanned, bytes read per query); for ``probes="all"``
                buckets are reported as -1 (no routing).
            fill: probe on (doubling) for queries whose probed buckets hold fewer than
                ``k`` live rows, as described under ``probes``. ``False``: return what the
                probed buckets hold (-1 beyond it); a sharded collection fills across its
                shards instead, so that it returns what one store holding everything would.
            threads: threads a batch runs on (default: every core this process may use);
                buckets are split between them. Results do not depend on it.
            kernel: ``"f32"`` or ``"bf16"`` (bfloat16 products, then exact rescoring of
                the rows that can reach the top k: same results); default ``info()["kernel"]``:
                bf16 where the CPU has AMX bfloat16 tiles, else f32.
            device: a torch device such as ``"cuda"``: the probed buckets are streamed
                there in large groups and scored on it (same routing; results equal the
                CPU's up to float rounding; no LRSQ pruning). ``None`` or ``"cpu"``: here;
                ``probes="all"`` always runs here.
            rerank: approximate search for a store larger than RAM: score every probed row
                from its sketch (d/8 bytes a row instead of its ~d bytes of LRSQ codes) and
                rescore only the ``rerank`` best exactly from their vectors. Fewer bytes read
                per query (sketches stay in the page cache, the vectors of ``rerank`` rows
                are read), recall a little below the same probes without it: more
                ``rerank``, closer. Needs a model with a sketch (the default since model
                format 3); ``prune`` and ``kernel`` do not apply. ``None``: certified search.
            where: a SQL predicate over the metadata columns (``"lang = 'en' AND year >=
                2020 AND tag IN ('a', 'b')"``; DuckDB's SQL, null counts as false): only
                matching rows are returned, k of them whenever k live rows match. When few
                rows match they are all scored exactly; otherwise the probes rise with
                1/selectivity (query/filter.py). ``explain`` shows the plan. The matching
                rows of the last few predicates are kept per handle.
        """
        self._check_open()
        return self._reads.search(queries, k, probes=probes, candidates=candidates, prune=prune,
                                  explain=explain, fill=bool(fill), threads=threads, kernel=kernel,
                                  device=device, rerank=rerank, where=where)

    @boundary
    def search_table(
        self,
        queries: ArrayLike,
        k: int = 10,
        *,
        columns: list[str] | None = None,
        where: str | None = None,
        probes: Probes = DEFAULT_PROBES,
        rerank: int | None = None,
        threads: int | None = None,
    ):
        """:meth:`search` as one pyarrow Table of the results found: ``query`` (row of
        ``queries``), ``rank`` (0 = best), ``id``, ``score``, then the metadata
        ``columns`` asked (None: all) of each result, read in the same snapshot as the
        search. ``.to_pandas()`` or ``polars.from_arrow`` convert it."""
        self._check_open()
        return self._reads.search(queries, k, probes=probes, candidates=None, prune="auto", explain=False,
                                  threads=threads, rerank=rerank, where=where, table=True,
                                  table_columns=columns)

    def export(self, *, columns: list[str] | None = None, vectors: bool = False, batch_rows: int = 65536):
        """Every live row as a stream of pyarrow RecordBatches (``id``, the metadata
        ``columns`` asked, None: all, and ``vector`` with ``vectors=True``), read from ONE
        snapshot, which stays pinned (its files kept) until the iteration ends. Memory
        stays at about one batch. ``pyarrow.Table.from_batches`` or a
        ``pyarrow.parquet.ParquetWriter`` take them (the CLI's ``export``)."""
        self._check_open()
        return self._reads.export(columns, bool(vectors), batch_rows)

    @boundary
    def contains(self, ids: ArrayLike) -> np.ndarray:
        """Which of the (integer) ``ids`` are in the store: a bool mask, one snapshot."""
        self._check_open()
        return self._reads.contains(ids)

    @boundary
    def check_columns(self, columns: list[str] | None) -> list[str]:
        """The metadata columns ``columns`` names (None: all), or the one-line error that
        :meth:`fetch` gives for them (jobs check their options before any work)."""
        self._check_open()
        return self._reads.check_columns(columns)

    @boundary
    def results_table(self, ids: np.ndarray, scores: np.ndarray, *, columns: list[str] | None = None,
                      first_query: int = 0):
        """Results found earlier (``(ids, scores)`` of shape (Q, k), a batch job's) as
        :meth:`search_table` gives them, with their metadata ``columns`` read now;
        ``query`` counts from ``first_query``. For stores of integer ids."""
        self._check_open()
        return self._reads.results_table(ids, scores, columns, first_query)

    @boundary
    def backup(self, dest: str | os.PathLike[str], *, progress: ProgressLike = None) -> BackupResult:
        """Copy the store, as of one snapshot, to ``dest`` (a new path), while writers go
        on: LMDB's copy of that snapshot plus its model and segments (backup.py). ``dest``
        appears whole or not at all, and opens and verifies as a store of its own."""
        self._check_open()
        return backup_store(self._reads, dest, progress=progress)

    @boundary
    def fetch(self, ids: ArrayLike, *, columns: list[str] | None = None, vectors: bool = False):
        """The rows of ``ids`` as a pyarrow Table, in the order given: ``id``, the metadata
        ``columns`` asked (None: all; a column a row never got is null) and, with
        ``vectors=True``, ``vector`` (float32, as :meth:`get` returns them). Every id must
        be in the store."""
        self._check_open()
        return self._reads.fetch(ids, columns, bool(vectors))

    def check_rerank(self, rerank: int | None, k: int) -> None:
        """Raise the one-line error :meth:`search` gives for ``rerank`` with ``k``, if any
        (jobs check their options before any work)."""
        self._check_open()
        self._reads.check_rerank(rerank, k)

    def query(
        self,
        vector: ArrayLike,
        k: int = 10,
        *,
        probes: Probes = DEFAULT_PROBES,
        candidates: int | None = None,
        prune: bool | Literal["auto"] = "auto",
        explain: bool = False,
        rerank: int | None = None,
        where: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, dict]:
        """Top-``k`` of one vector (shape (d,) or (1, d)): ``(ids, scores)`` of shape (k,);
        with ``explain=True`` also a dict: buckets probed, rows scanned, bytes read (and
        a filter's plan). ``rerank`` and ``where``: as for :meth:`search`."""
        arr = np.asarray(vector) if not isinstance(vector, (str, os.PathLike)) else vector
        if isinstance(arr, np.ndarray) and arr.ndim == 1:
            arr = arr[None, :]
        out = self.search(arr, k, probes=probes, candidates=candidates, prune=prune, explain=explain,
                          rerank=rerank, where=where)
        if len(out[0]) != 1:
            raise InvalidInputError(f"query takes one vector, got {len(out[0])}; use search() for a batch.")
        if explain:
            return out[0][0], out[1][0], out[2].rows()[0]
        return out[0][0], out[1][0]

    # -- maintenance ---------------------------------------------------------------------

    def _remove_orphans_if_idle(self) -> None:
        lock = WriterLock(self.path)
        if not lock.try_acquire():
            return  # a writer is at work; its segment is not an orphan
        try:
            for name in self._writes.garbage.orphans():
                seglib.remove_segment(self._segments_root, name)
                self._orphans_removed_at_open.append(name)
            self._writes.garbage.remove_orphan_models()  # debris of uncommitted trainings: not worth a report
            self._writes.garbage.collect()
            _remove_stale_creations(self.path)
        finally:
            lock.release()

    @boundary
    def verify(self, *, repair: bool = False, quick: bool = False, progress: ProgressLike = None) -> VerifyReport:
        """Check the store end to end, in one snapshot; ``repair=True`` removes orphans.

        Checks: the model digest; every published segment's arrays (chunk files present and
        full-size) and the CRC-32C of every chunk against the one recorded when it was
        written (``quick=True`` skips this, the only part that reads all the data); its ids
        against the catalog's id map; its bucket extents (contiguous, covering every row,
        matching the router's keys on a sample); and the live count. Orphan segments
        (interrupted ingests) are reported, not errors.

        Damaged chunks are reported with the live ids they hold (``report.damaged``), never
        deleted. Reads of them raise :class:`CorruptStoreError` from then on: for every
        reader when this handle can write (the damage is recorded in the catalog), else
        for this handle (run it writable, e.g. ``verify --repair``, to record it).
        """
        self._check_open()
        if repair:
            self._check_writable()
        report = VerifyReport()
        lock = self._writes.lock(progress)
        if repair:
            lock.acquire()  # deleting orphans: no writer may be at work
        try:
            with self._reads.snapshot() as snap:
                verify_snapshot(self, snap.txn, report, quick, progress)
            if report.damaged:
                self._flag_damage(report.damaged, lock_held=repair)
            if repair:
                for name in report.orphans:
                    seglib.remove_segment(self._segments_root, name)
                    report.removed.append(name)
                self._writes.garbage.remove_orphan_models()
                self._writes.garbage.collect()
                # Orphans this handle already removed when it opened the store.
                report.orphans = self._orphans_removed_at_open + report.orphans
                report.removed = self._orphans_removed_at_open + report.removed
                self._orphans_removed_at_open = []
        finally:
            lock.release()
        return report

    def _flag_damage(self, damaged: list[dict], *, lock_held: bool) -> None:
        """Make reads of damaged chunks raise: in the catalog when this handle can write
        (every reader, every process), else in this handle."""
        for d in damaged:
            self._reads.local_damage.setdefault(d["segment"], {})[(d["array"], d["chunk"])] = \
                damage_message(d["segment"], d["array"], d["chunk"])
        self._reads.view = None
        if self.readonly or self._catalog.readonly_env:
            return
        self._writes.record_damage(damaged, lock_held=lock_held)


def _open_pin(path: Path, catalog: Catalog, readonly: bool) -> ReaderPin | None:
    """A handle's reader pin file; None where pins cannot be written (a read-only
    directory or mount, where no writer can retire anything either)."""
    if catalog.readonly_env:
        return None
    try:
        return ReaderPin(path)
    except OSError:
        if readonly:
            return None
        raise


def _remove_stale_creations(path: Path) -> None:
    """Remove ``.NAME.creating-*`` directories of ``create`` calls that were killed (their
    flock on ``.creating.lock`` is free; one with no lock file, after an hour)."""
    for tmp in path.parent.glob(f".{path.name}.creating-*"):
        lock_file = tmp / _CREATING_LOCK
        try:
            stale = lock_is_free(lock_file) if lock_file.exists() else time.time() - tmp.stat().st_mtime > 3600
        except FileNotFoundError:
            continue  # its create finished (renamed) or failed (removed) meanwhile
        if stale:
            shutil.rmtree(tmp, ignore_errors=True)



__all__ = ["CompactResult", "DeleteResult", "IngestResult", "Store", "TrainResult", "VerifyReport", "create", "open"]
