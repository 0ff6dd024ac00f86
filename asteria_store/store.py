"""The :class:`Store`: create, open, ingest, query, get, delete, verify.

A store is a directory::

    mystore/
      catalog.lmdb/     LMDB catalog, the single source of truth (see storage/catalog.py)
      model/<name>/     the router (JSON + little-endian .npy, see model/persist.py)
      segments.zarr/    Zarr v3 group, one immutable sub-group per segment (storage/segments.py)
      writer.lock       advisory lock held by the one writing process
      readers/          one pin file per open handle (storage/pins.py)

Every write builds its data, fsyncs it, and publishes it in ONE LMDB write transaction.
A crash at any point leaves either the old state or the new one; the only debris is an
orphan segment directory, removed by the next writable open or by ``verify(repair=True)``.

Every read runs in ONE LMDB read transaction (a snapshot) with its generation pinned, so
directories that a commit retires (a retrain's old segments and model) are collected only
once no reader can still need them (``Catalog.retire``, ``_collect_garbage``).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Literal, NamedTuple

import lmdb
import numpy as np

from .config import FORMAT_VERSION, Metric, StorageDtype, StoreConfig
from .errors import (
    AsteriaError,
    CorruptStoreError,
    DimensionMismatchError,
    DiskFullError,
    DuplicateIdError,
    IdNotFoundError,
    InvalidArgumentError,
    InvalidInputError,
    ReadOnlyError,
    StoreClosedError,
    StoreExistsError,
    StoreNotFoundError,
    UnsupportedFormatError,
)
from .io import ArrayLike, VectorSource, load_ids, normalise_rows, read_array
from .model.fit import (
    TRAIN_SAMPLE_ROWS,
    check_sample_size,
    sample_indices,
    train_config,
    training_sample,
)
from .model.persist import load_model_file, load_router, save_router
from .model.router import Router, SignHasher, bits_for_size
from .progress import ProgressLike, make_progress
from .query.engine import (
    DEFAULT_PROBES,
    Probes,
    SearchStats,
    View,
    search_batch,
    search_exact,
)
from .results import DeleteResult, IngestResult, TrainResult, VerifyReport
from .storage import segments as seglib
from .storage.catalog import Catalog, retired_dirs, retired_name, segment_name
from .storage.lock import WriterLock, lock_is_free
from .storage.pins import READERS_DIR, ReaderPin, oldest_pin
from .translate import CATALOG_ERRORS, boundary, catalog_error
from .verify import damage_from_meta, damage_message, quarantined, verify_snapshot

CATALOG_DIR = "catalog.lmdb"
SEGMENTS_DIR = "segments.zarr"
MODEL_DIR = "model"

#: Held (flock) inside a ``.NAME.creating-*`` directory while ``create`` builds it.
_CREATING_LOCK = ".creating.lock"

#: Largest external id: ids are returned as int64, with -1 marking "no result".
MAX_ID = 2**63 - 1

#: A learned store trains once it holds at least MIN_TRAIN_ROWS vectors (at the first
#: ingest that big, or the ingest that brings it there), on a uniform sample of at most
#: TRAIN_SAMPLE_ROWS (model/fit.py) of them.
MIN_TRAIN_ROWS = 1_000

RouterChoice = Literal["learned", "sign"]

#: Rows hashed per block in ingest's first pass, and rows written per window in the second.
_HASH_BLOCK_ROWS = 16384
_WRITE_WINDOW_BYTES = 16 * 1024 * 1024


class _Snapshot(NamedTuple):
    txn: lmdb.Transaction
    view: View


def _no_lookup(bucket: int) -> list[tuple[int, int, int]]:
    raise RuntimeError("a cached View is only searched through a snapshot")


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
    expected_size: int = 1_000_000,
    seed: int = 0,
    chunk_rows: int = 0,
) -> Store:
    """Create an empty store at ``path`` and return it open for writing.

    Args:
        dim: vector dimension.
        metric: ``"cosine"`` (vectors normalised) or ``"ip"`` (raw inner product).
        dtype: storage dtype of full vectors (``"float16"`` halves disk and bytes read).
        router: ``"learned"`` (default): the ECVH model (BOR + ECVH + LRSQ), trained on a
            sample of the first ingest of at least ``MIN_TRAIN_ROWS`` vectors (until then
            the baseline router serves). ``"sign"``: the baseline random-rotation sign
            hasher, never trained (the ablation baseline; routes 5-10x worse on real data).
        model: a model file from ``asteria-store train-model`` (or
            :func:`~asteria_store.model.persist.save_model_file`): the store uses it from
            the start and never trains at ingest.
        bits: bucket bits (2**bits buckets). More bits: smaller buckets, fewer rows read per
            probe, more probes needed for the same recall. Default: from ``expected_size``
            (~256 rows per bucket for the sign router, ~128 for the learned one).
        expected_size: how many vectors the store is expected to hold (sizes the buckets).
        seed: seed of the router's random rotation and of training.
        chunk_rows: rows per Zarr chunk (0: ~16 MiB of vectors per chunk).

    The store is built in a temporary sibling directory and renamed into place, so a crash
    during ``create`` leaves no half-made store.
    """
    target = Path(path)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise StoreExistsError(
            f"Cannot create a store at {str(target)!r}: it already exists. "
            "Open it instead, or choose a new path."
        )
    config = StoreConfig(dim=dim, metric=metric, dtype=dtype, chunk_rows=chunk_rows)
    if router not in ("learned", "sign"):
        raise InvalidArgumentError(f"router must be 'learned' or 'sign', got {router!r}.")
    requested_bits = bits
    if bits is None:
        bits = bits_for_size(expected_size)
    if not isinstance(bits, int) or not 1 <= bits <= 62:
        raise InvalidArgumentError(f"bits must be an integer in [1, 62], got {bits!r}.")
    if router == "learned" and requested_bits is not None and requested_bits > 20:
        raise InvalidArgumentError(f"bits must be at most 20 for the learned router, got {bits}.")
    pending = None
    if model is not None:
        routing = load_model_file(model)
        if routing.dim != dim:
            raise DimensionMismatchError(
                f"Expected a model of dimension {dim}, got one of dimension {routing.dim} "
                f"from {os.fspath(model)!r}. Was it trained with --dim {routing.dim}?"
            )
    else:
        routing = SignHasher.random(dim, bits, seed=seed)
        if router == "learned":  # the baseline serves until the first big enough ingest
            pending = {"bits": requested_bits, "expected_size": expected_size, "seed": seed}

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_creations(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.creating-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide the store from other users
    creating = os.open(tmp / _CREATING_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(creating, fcntl.LOCK_EX)  # held while this create runs (see _remove_stale_creations)
    try:
        model_name = f"{routing.kind}-0"
        digest = save_router(routing, tmp / MODEL_DIR / model_name)
        seglib.create_root(tmp / SEGMENTS_DIR)
        catalog = Catalog(tmp / CATALOG_DIR, create=True)
        try:
            def init(txn):
                catalog.put_meta(txn, "format_version", FORMAT_VERSION)
                catalog.put_meta(txn, "config", config.to_dict())
                catalog.put_meta(txn, "router", {"dir": f"{MODEL_DIR}/{model_name}", "digest": digest})
                catalog.put_meta(txn, "pending_training", pending)
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
        seglib.fsync_tree(tmp)
        if target.exists():
            target.rmdir()  # empty directory (checked above)
        os.rename(tmp, target)
        seglib.fsync_dir(target.parent)
    except (OSError, lmdb.Error) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise catalog_error(target, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(creating)
    return Store(target)


def open(path: str | os.PathLike[str], *, readonly: bool = False, lock: bool = True) -> Store:  # noqa: A001
    """Open an existing store. ``readonly=True`` refuses every write.

    A read-only open also works on a read-only directory or mount. ``lock=False`` (only
    with ``readonly=True``) opens the catalog without LMDB's lock file, for network
    filesystems where file locks do not work: safe only while no process writes to the
    store, and such a reader registers no pins (see storage/pins.py), so a writer's
    retrain could remove files it is reading.
    """
    return Store(path, readonly=readonly, lock=lock)


def _reopen(path: str, readonly: bool, lock: bool) -> Store:
    return Store(path, readonly=readonly, lock=lock)


class Store:
    """A persistent vector store. Use as a context manager, or call :meth:`close`.

    Every read (search, query, get, info, verify) sees ONE catalog generation from start
    to end: it runs in one LMDB read transaction, and the files of that generation stay
    on disk until it ends, whatever writers commit meanwhile (reader pins). A store
    pickles as what reopens it (path and options), and a handle inherited by a forked
    child reopens its catalog there on first use.
    """

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False, lock: bool = True):
        self.path = Path(path)
        self.readonly = readonly
        self._lock_option = lock
        self._closed = True  # until fully open
        if not lock and not readonly:
            raise InvalidArgumentError("lock=False needs readonly=True: a writer must take LMDB's locks.")
        cat_dir = self.path / CATALOG_DIR
        if not (cat_dir / "data.mdb").is_file():
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
            self._catalog = Catalog(cat_dir, readonly=readonly, lock=lock)
        except lmdb.Error as exc:
            raise catalog_error(self.path, exc) from None
        try:  # a damaged catalog or model: close, and say so in one line
            with self._catalog.read() as txn:
                meta = self._catalog.all_meta(txn)
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
            self._router: Router = load_router(self.path / router_rec["dir"], digest=router_rec["digest"])
            self._router_digest = router_rec["digest"]
            self._pin = self._open_pin()
        except BaseException as exc:
            self._catalog.close()
            if isinstance(exc, (*CATALOG_ERRORS, OSError)) and not isinstance(exc, AsteriaError):
                raise catalog_error(self.path, exc) from None
            raise
        self._closed = False
        self._readers: dict[int, seglib.SegmentReader] = {}
        self._view: View | None = None
        #: A generation this handle has seen: a lower bound of any it will read next.
        self._seen_generation = 0
        #: Chunks this handle's own ``verify`` found damaged (a read-only handle cannot
        #: record them in the catalog): ``{segment: {(array, chunk): message}}``.
        self._local_damage: dict[int, dict[tuple[str, int], str]] = {}
        self._orphans_removed_at_open: list[str] = []
        if not readonly:
            self._remove_orphans_if_idle()

    def _open_pin(self) -> ReaderPin | None:
        """This handle's reader pin file; None where pins cannot be written (a read-only
        directory or mount, where no writer can retire anything either)."""
        if self._catalog.readonly_env:
            return None
        try:
            return ReaderPin(self.path)
        except OSError:
            if self.readonly:
                return None
            raise

    def __reduce__(self):
        self._check_open()
        return (_reopen, (str(self.path), self.readonly, self._lock_option))

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for r in self._readers.values():
                r.close()
            self._readers.clear()
            self._view = None
            if self._pin is not None:
                self._pin.close()
            self._catalog.close()

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

    @property
    def _segments_root(self) -> Path:
        return self.path / SEGMENTS_DIR

    # -- state ---------------------------------------------------------------------------

    @boundary
    def __len__(self) -> int:
        with self._snapshot() as snap:
            return snap.view.count

    @property
    @boundary
    def generation(self) -> int:
        """The catalog generation now (every commit raises it by one)."""
        with self._snapshot() as snap:
            return snap.view.generation

    @property
    def dim(self) -> int:
        return self.config.dim

    @property
    @boundary
    def router(self) -> Router:
        """The routing model now (follows retraining by this or another process)."""
        with self._snapshot():
            return self._router

    @boundary
    def info(self) -> dict[str, Any]:
        """A JSON-able summary: configuration, counts, router, disk usage."""
        with self._snapshot() as snap:
            cat, txn = self._catalog, snap.txn
            meta = cat.all_meta(txn)
            segs = cat.segments(txn)
            n_buckets = sum(1 for _ in cat.iter_extents(txn))
            router = self._router
            digest = self._router_digest
        disk = 0
        for root, _dirs, files in os.walk(self.path):  # skips directories removed meanwhile
            for name in files:
                try:
                    disk += os.stat(os.path.join(root, name)).st_size
                except FileNotFoundError:  # removed by a writer's collection meanwhile
                    pass
        return {
            "path": str(self.path),
            "format_version": meta["format_version"],
            **self.config.to_dict(),
            "count": meta["count"],
            "segments": len(segs),
            "rows_stored": sum(s["rows"] for s in segs.values()),
            "deleted": sum(s["rows"] for s in segs.values()) - meta["count"],
            "router": {**router.config(), "digest": digest[:16]},
            # True while a learned store waits for its first big enough ingest to train.
            "pending_training": meta.get("pending_training") is not None,
            "extents": n_buckets,
            "generation": meta["generation"],
            # Segment and model directories retired by a commit, kept while readers pin them.
            "retired": len(meta.get("retired") or []),
            "disk_bytes": disk,
        }

    @contextmanager
    def _snapshot(self) -> Iterator[_Snapshot]:
        """One consistent read: an LMDB read transaction and the :class:`View` of its
        generation, whose files stay on disk until the ``with`` block ends (pinned)."""
        self._check_open()
        floor = self._seen_generation  # <= the generation the transaction below sees
        if self._pin is not None:
            self._pin.pin(floor)
        try:
            with self._catalog.read() as txn:
                view = self._view_at(txn)
                yield _Snapshot(txn, view.bound(partial(self._catalog.extents, txn)))
        finally:
            if self._pin is not None:
                self._pin.unpin(floor)

    def _view_at(self, txn) -> View:
        """The state as of ``txn``, reusing cached extents while the generation is unchanged.
        Building a new one drops the memory maps of segments it no longer has."""
        cat = self._catalog
        generation = int(cat.get_meta(txn, "generation"))
        self._seen_generation = max(self._seen_generation, generation)
        view = self._view
        if view is not None and view.generation == generation:
            return view
        count = int(cat.get_meta(txn, "count"))
        segs = cat.segments(txn)
        deleted = cat.tombstones(txn)
        router_rec = cat.get_meta(txn, "router")
        damage = damage_from_meta(cat.get_meta(txn, "damaged") or {})
        if router_rec["digest"] != self._router_digest:  # (re)trained since we loaded it
            self._router = load_router(self.path / router_rec["dir"], digest=router_rec["digest"])
            self._router_digest = router_rec["digest"]
        readers = {}
        for seg, rec in segs.items():
            r = self._readers.get(seg)
            if r is None:
                r = seglib.SegmentReader(
                    self._segments_root, segment_name(seg), n=rec["rows"], dim=self.config.dim,
                    dtype=self.config.dtype, chunk_rows=rec.get("chunk_rows", self.config.chunk_rows),
                    lrsq=rec.get("lrsq"),
                )
                self._readers[seg] = r
            r.quarantine(quarantined(seg, r, {**damage.get(seg, {}), **self._local_damage.get(seg, {})},
                                           deleted.get(seg)))
            readers[seg] = r
        for seg in [s for s in self._readers if s not in segs]:  # retired since the last view
            self._readers.pop(seg).close()
        view = View(generation=generation, count=count, segments=readers, deleted=deleted,
                    lookup_extents=_no_lookup, router_digest=self._router_digest)
        self._view = view
        return view

    def _current_view(self) -> View:
        """The state now, for a writer holding the writer lock (no other process commits
        meanwhile, so the view stays current): extents are read in short transactions."""
        with self._snapshot() as snap:
            view = snap.view
        cat = self._catalog

        def lookup(bucket: int) -> list[tuple[int, int, int]]:
            with cat.read() as t:
                return cat.extents(t, bucket)

        return view.bound(lookup)

    # -- writes --------------------------------------------------------------------------

    @boundary
    def ingest(
        self,
        vectors: ArrayLike,
        ids: ArrayLike | None = None,
        *,
        progress: ProgressLike = None,
    ) -> IngestResult:
        """Add vectors (an (n, d) array or a ``.npy`` path) as ONE new immutable segment.

        ``ids``: uint64-compatible external ids (array or ``.npy`` path), unique and not yet
        in the store; auto-assigned (consecutive from the store's counter) when omitted.
        A ``.npy`` input is streamed in blocks: resident memory stays bounded (~100s of MB)
        whatever its size. Nothing becomes visible until the final commit; on any error the
        store is left exactly as it was.
        """
        self._check_writable()
        started = time.perf_counter()
        source = VectorSource(vectors, dim=self.config.dim, what="vectors")
        n = source.n
        with WriterLock(self.path):
            self._current_view()  # the router as of now (another process may have trained)
            with self._catalog.read() as txn:
                next_id = int(self._catalog.get_meta(txn, "next_id"))
                seg = int(self._catalog.get_meta(txn, "next_segment"))
                pending = self._catalog.get_meta(txn, "pending_training")
                empty = not self._catalog.segments(txn)
                if ids is None:
                    id_arr = self._catalog.free_ids(txn, next_id, n, MAX_ID)
                    if id_arr is None:
                        raise InvalidInputError(f"Cannot assign {n} automatic ids: fewer are free below 2**63. "
                                                "Pass explicit ids.")
                else:
                    id_arr = load_ids(ids, n=n)
                    if int(id_arr.max()) > MAX_ID:
                        raise InvalidInputError(f"Expected ids below 2**63, got {int(id_arr.max())}.")
                    self._check_new_ids(txn, id_arr)
            self._check_disk_space(n)
            # Automatic ids continue after the largest id given so far, while that fits.
            next_id = max(next_id, int(id_arr.max()) + 1) if int(id_arr.max()) < MAX_ID else next_id

            router, model_rec, train_s = self._router, None, 0.0
            published = False
            try:
                if pending is not None and empty and n >= MIN_TRAIN_ROWS:
                    t0 = time.perf_counter()
                    router = self._train_router(self._sample_rows(source, TRAIN_SAMPLE_ROWS, pending["seed"]),
                                                pending, expected=max(n, pending["expected_size"]),
                                                progress=progress)
                    model_rec = self._save_model(router)
                    train_s = time.perf_counter() - t0
                written = self._write_bucketed(
                    seg, source, id_arr, router, (model_rec or {"digest": self._router_digest})["digest"],
                    progress)
                self._publish_segment(seg, written, next_id=next_id, model=model_rec)
                published = True
            except OSError as exc:
                raise self._write_error(exc, n) from None
            finally:
                if not published:
                    self._discard_unpublished(seg, model_rec)
            self._collect_garbage()
        trained = model_rec is not None
        if pending is not None and not trained and not empty and len(self) >= MIN_TRAIN_ROWS:
            # Earlier small batches went to the baseline router: now that the store holds
            # enough, train on a sample of it and re-bucket it (a second atomic commit).
            result = self._train(None, bits=pending["bits"], ecc=True, epochs=5, batch_size=1024,
                                 rank=None, seed=pending["seed"], device="auto", progress=progress,
                                 only_if_pending=True)
            if result is not None:  # (None: another process trained it meanwhile)
                trained, train_s = True, result.seconds
        return IngestResult(rows=n, segment=seg, ids=id_arr, seconds=time.perf_counter() - started,
                            trained=trained, train_seconds=train_s)

    # -- training ------------------------------------------------------------------------

    @boundary
    def train(
        self,
        sample: ArrayLike | None = None,
        *,
        bits: int | None = None,
        ecc: bool = True,
        epochs: int = 5,
        batch_size: int = 1024,
        rank: int | None = None,
        seed: int = 0,
        device: Literal["auto", "cpu", "cuda"] = "auto",
        progress: ProgressLike = None,
    ) -> TrainResult:
        """(Re)train the store's learned model and re-bucket every stored vector with it.

        ``sample``: training vectors (array or ``.npy`` path; at most TRAIN_SAMPLE_ROWS of
        them, sampled uniformly, are used); ``None``: a sample of the stored vectors.
        The other arguments are :class:`~asteria_store.model.train.TrainConfig`'s. Stored
        rows are rewritten, in the new bucket order, into ONE new segment; the new model,
        the new segment and the retirement of the old ones are published in ONE transaction,
        so readers see the old store until the switch and the new one after it. Deleted
        rows are dropped on the way (this also compacts). Needs disk for one more copy.
        """
        result = self._train(sample, bits=bits, ecc=ecc, epochs=epochs, batch_size=batch_size, rank=rank,
                             seed=seed, device=device, progress=progress, only_if_pending=False)
        assert result is not None
        return result

    def _train(self, sample: ArrayLike | None, *, bits, ecc, epochs, batch_size, rank, seed, device,
               progress: ProgressLike, only_if_pending: bool) -> TrainResult | None:
        self._check_writable()
        started = time.perf_counter()
        settings = dict(bits=bits, ecc=ecc, epochs=epochs, batch_size=batch_size, rank=rank,
                        seed=seed, device=device)
        train_config(**settings, expected_size=1)  # validate before any work
        src = VectorSource(sample, dim=self.config.dim, what="training vectors") if sample is not None else None
        with WriterLock(self.path):
            view = self._current_view()
            if only_if_pending:
                with self._catalog.read() as txn:
                    if self._catalog.get_meta(txn, "pending_training") is None:
                        return None
            stored = _StoredRows(view)
            x = self._sample_rows(src if src is not None else stored, TRAIN_SAMPLE_ROWS, seed)
            from .model.train import train  # torch: imported only to train

            cfg = train_config(**settings, expected_size=max(stored.n, len(x)))
            router, history = train(check_sample_size(x), cfg, progress=progress)
            with self._catalog.read() as txn:
                seg = int(self._catalog.get_meta(txn, "next_segment"))
            model_rec, published = None, False
            try:
                self._check_disk_space(stored.n)
                model_rec = self._save_model(router)
                written = self._write_bucketed(seg, stored, stored.ids(), router, model_rec["digest"],
                                               progress) if stored.n else None
                self._publish_retrained(seg, model_rec, view, written)
                published = True
            except OSError as exc:
                raise self._write_error(exc, stored.n) from None
            finally:
                if not published:
                    self._discard_unpublished(seg, model_rec)
            # The old segments and model are retired, not deleted: readers may still be
            # reading them. They go once no reader pins a generation that sees them.
            self._collect_garbage()
        return TrainResult(rows_trained_on=len(x), rows_rebucketed=stored.n, buckets=2**router.bits,
                           history=history, seconds=time.perf_counter() - started)

    def _publish_retrained(self, seg: int, model: dict, view: View, written: _Written | None) -> None:
        """Swap in a new model and (when the store holds rows) the one segment re-bucketed
        by it, retiring every old segment and the old model, in ONE transaction."""

        def publish(txn):
            cat = self._catalog
            if int(cat.get_meta(txn, "generation")) != view.generation:
                raise CorruptStoreError("The catalog changed during training despite the writer lock.")
            generation = view.generation + 1
            old_model = cat.get_meta(txn, "router")["dir"]
            cat.clear_rows(txn)
            if written is not None:
                self._put_segment(txn, seg, written)
                cat.put_meta(txn, "next_segment", seg + 1)
            cat.put_meta(txn, "router", model)
            cat.put_meta(txn, "pending_training", None)
            cat.put_meta(txn, "damaged", None)  # every damaged chunk was in a retired segment
            cat.retire(txn, generation, segments=list(view.segments), model=old_model)
            cat.put_meta(txn, "generation", generation)

        self._commit(publish)

    def _put_segment(self, txn, seg: int, written: _Written) -> None:
        """Record a written segment: its record, bucket extents, id map and checksums."""
        cat = self._catalog
        n = len(written.ids)
        bounds = np.flatnonzero(np.diff(written.keys)) + 1
        starts = np.concatenate([[0], bounds]).astype(np.int64)
        counts = np.diff(np.concatenate([starts, [n]])).astype(np.int64)
        cat.put_segment(txn, seg, _segment_record(n, written.chunk_rows, written.lrsq))
        cat.put_extents(txn, seg, written.keys[starts], starts, counts)
        cat.put_ids(txn, seg, written.ids)
        cat.put_checksums(txn, seg, written.checksums)

    def _sample_rows(self, source: VectorSource | _StoredRows, size: int, seed: int) -> np.ndarray:
        """A seeded uniform sample of at most ``size`` rows, in stored form."""
        if isinstance(source, _StoredRows):
            return source.take(sample_indices(source.n, size, seed))
        return self._as_stored(training_sample(source, size, seed, self.config.metric))

    def _train_router(self, sample: np.ndarray, settings: dict, *, expected: int,
                      progress: ProgressLike) -> Router:
        from .model.train import train  # torch: imported only to train

        cfg = train_config(bits=settings.get("bits"), ecc=True, epochs=5, batch_size=1024, rank=None,
                            seed=settings.get("seed", 0), device="auto", expected_size=expected)
        router, _ = train(sample, cfg, progress=progress)
        return router

    def _save_model(self, router: Router) -> dict[str, str]:
        """Write ``router`` under model/<kind>-g<generation it will be published at>
        (fsynced; the caller holds the writer lock); the catalog record to publish."""
        with self._catalog.read() as txn:
            generation = int(self._catalog.get_meta(txn, "generation"))
            live = self._catalog.get_meta(txn, "router")["dir"]
        name = f"{router.kind}-g{generation + 1}"
        model_dir = self.path / MODEL_DIR / name
        if f"{MODEL_DIR}/{name}" == live:
            raise CorruptStoreError(f"The live model {live!r} was published at a later generation than the catalog's.")
        if model_dir.exists():  # debris of an interrupted attempt at this same generation
            shutil.rmtree(model_dir)
        digest = save_router(router, model_dir)
        seglib.fsync_dir(model_dir.parent)
        return {"dir": f"{MODEL_DIR}/{name}", "digest": digest}

    def _write_bucketed(self, seg: int, rows, ids: np.ndarray, router: Router, digest: str,
                        progress: ProgressLike) -> _Written:
        """Hash ``rows`` with ``router``, sort them by bucket and write them as segment
        ``seg`` (not yet published): what publishing the segment needs."""
        keys = self._hash_rows(rows, progress, router)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        del keys
        seg_ids = ids[order]
        # Small segments get small chunks: Zarr pads the edge chunk to full size.
        chunk_rows = min(self.config.chunk_rows, max(256, 1 << (len(ids) - 1).bit_length()))
        lrsq, sums = self._write_segment(seg, rows, order, seg_ids, chunk_rows, progress, router, digest)
        return _Written(sorted_keys, seg_ids, chunk_rows, lrsq, sums)

    def _check_disk_space(self, n: int) -> None:
        """Refuse up front a write that cannot fit on the device (the segment and its codes)."""
        need = self._segment_bytes(n)
        free = shutil.disk_usage(self.path).free
        if need > free:
            raise DiskFullError(
                f"Not enough space on the device of {str(self.path)!r}: writing {n:,} rows needs about "
                f"{_mib(need)}, {_mib(free)} are free. Free some space and retry; the store is unchanged."
            )

    def _segment_bytes(self, n: int) -> int:
        row = self.config.dim * np.dtype(self.config.dtype).itemsize + 8
        quantizer = getattr(self._router, "lrsq", None)
        if quantizer is not None:
            row += quantizer.rank + 2 * quantizer.aux_width
        return n * row

    def _write_error(self, exc: OSError, n: int) -> AsteriaError:
        """A failed write (nothing was published) as an asteria error naming what it needed."""
        return catalog_error(self.path, exc, writing=(
            f"while writing {n:,} rows (about {_mib(self._segment_bytes(n))} needed, "
            f"{_mib(shutil.disk_usage(self.path).free)} free after cleanup)"))

    def _discard_unpublished(self, seg: int, model: dict | None = None) -> None:
        """Remove the directory of segment ``seg`` unless the catalog has published it, and
        the directory of the newly saved ``model`` record, if any, with it."""
        with self._catalog.read() as txn:
            if seg in self._catalog.segments(txn):
                return
        if (self._segments_root / segment_name(seg)).exists():
            seglib.remove_segment(self._segments_root, segment_name(seg))
        if model is not None:
            shutil.rmtree(self.path / model["dir"], ignore_errors=True)

    def _hash_rows(self, source: VectorSource | _StoredRows, progress: ProgressLike, router: Router) -> np.ndarray:
        """Pass 1: validate every row (finite, non-zero for cosine) and compute its bucket key."""
        keys = np.empty(source.n, dtype=np.uint64)
        bar = make_progress(progress, total=source.n, desc="hashing")
        try:
            for start, block in source.blocks(_HASH_BLOCK_ROWS):
                x = block
                if not isinstance(source, _StoredRows):  # stored rows are in stored form
                    x = normalise_rows(block, self.config.metric, what="vectors", offset=start)
                    x = self._as_stored(x, offset=start)
                keys[start : start + len(block)] = router.keys(x)
                bar.update(len(block))
        finally:
            bar.close()
        return keys

    def _as_stored(self, x: np.ndarray, *, offset: int = 0) -> np.ndarray:
        """``x`` as the segment will hold it (float16 storage rounds), so keys computed from
        it are the keys of the stored rows; refuses values the storage dtype cannot hold."""
        if self.config.dtype != "float16":
            return x
        too_big = np.abs(x) > np.finfo(np.float16).max
        if too_big.any():
            bad = offset + int(np.argwhere(too_big)[0][0])
            raise InvalidInputError(
                f"Expected values within float16 range (|v| <= 65504) for a float16 store, got "
                f"a larger one in row {bad}. Rescale the vectors or use a float32 store."
            )
        return x.astype(np.float16).astype(np.float32)

    def _write_segment(self, seg: int, source: VectorSource | _StoredRows, order: np.ndarray,
                       seg_ids: np.ndarray, chunk_rows: int, progress: ProgressLike,
                       router: Router, model_digest: str) -> tuple[dict | None, dict[str, np.ndarray]]:
        """Pass 2: write rows in bucket order (``order``), chunk-aligned windows, then fsync.

        With a learned router, every row's LRSQ codes (of its stored form) are written too.
        Returns the segment record's ``lrsq`` entry (None without) and the chunk checksums."""
        n, dim = source.n, self.config.dim
        window = max(chunk_rows, (_WRITE_WINDOW_BYTES // (dim * 4)) // chunk_rows * chunk_rows)
        quantizer = getattr(router, "lrsq", None)
        lrsq = None if quantizer is None else {"rank": quantizer.rank, "aux": quantizer.aux_width,
                                               "block": quantizer.block, "model": model_digest}
        writer = seglib.SegmentWriter(self._segments_root, segment_name(seg), n=n, dim=dim,
                                      dtype=self.config.dtype, chunk_rows=chunk_rows,
                                      lrsq_widths=None if lrsq is None else (lrsq["rank"], lrsq["aux"]))
        bar = make_progress(progress, total=n, desc="writing")
        try:
            for start in range(0, n, window):
                rows = order[start : start + window]
                inv = np.argsort(rows, kind="stable")
                block = np.empty((len(rows), dim), dtype=np.float32)
                block[inv] = source.take(rows[inv])  # ascending reads, then back to key order
                if not isinstance(source, _StoredRows):
                    block = normalise_rows(block, self.config.metric, what="vectors")
                codes = None
                if quantizer is not None:  # bounds must hold for the rows as stored
                    codes = quantizer.encode(router.rotate(self._as_stored(block)))
                writer.write(start, block, seg_ids[start : start + len(rows)], codes)
                bar.update(len(rows))
            sums = writer.finish()
        finally:
            bar.close()
        return lrsq, sums

    def _publish_segment(self, seg: int, written: _Written, *, next_id: int, model: dict | None = None) -> None:
        """Make a written segment visible: extents, ids, checksums, counters in ONE
        transaction (with ``model``, the model trained for it goes live too, retiring the old)."""

        def publish(txn):
            cat = self._catalog
            if cat.get_meta(txn, "next_segment") != seg:
                raise CorruptStoreError("The catalog changed during ingest despite the writer lock.")
            generation = int(cat.get_meta(txn, "generation")) + 1
            self._put_segment(txn, seg, written)
            cat.put_meta(txn, "next_segment", seg + 1)
            cat.put_meta(txn, "next_id", next_id)
            cat.put_meta(txn, "count", int(cat.get_meta(txn, "count")) + len(written.ids))
            if model is not None:  # the model trained for this segment goes live with it
                cat.retire(txn, generation, model=cat.get_meta(txn, "router")["dir"])
                cat.put_meta(txn, "router", model)
                cat.put_meta(txn, "pending_training", None)
            cat.put_meta(txn, "generation", generation)

        self._commit(publish)

    def _collect_garbage(self) -> list[str]:
        """Remove retired segment and model directories no live reader can still need
        (every pin at or past the generation that retired them); returns what went."""
        if self.readonly or self._catalog.readonly_env:
            return []
        with self._catalog.read() as txn:
            retired = self._catalog.retired(txn)
        if not retired:
            return []
        floor = oldest_pin(self.path)
        done = [r for r in retired if floor is None or r["at"] <= floor]
        for r in done:
            target = self._segments_root / retired_name(r) if "segment" in r else self.path / retired_name(r)
            if target.exists():
                shutil.rmtree(target)
        if done:
            seglib.fsync_dir(self._segments_root)
            self._catalog.write(lambda txn: self._catalog.forget_retired(txn, done))
        return [retired_name(r) for r in done]

    def _commit(self, fn) -> None:
        """Publish ``fn``'s changes in one durable transaction."""
        self._catalog.write(fn)
        self._catalog.env.sync(True)
        self._view = None

    def _check_new_ids(self, txn, ids: np.ndarray) -> None:
        uniq, counts = np.unique(ids, return_counts=True)
        if len(uniq) != len(ids):
            dup = int(uniq[counts > 1][0])
            raise DuplicateIdError(
                f"Expected unique ids, got id {dup} more than once in this batch."
            )
        existing = self._catalog.existing_ids(txn, uniq)
        if len(existing):
            raise DuplicateIdError(
                f"Expected new ids, got {len(existing)} already in the store (first: "
                f"{int(existing[0])}). Delete them first or choose other ids."
            )

    @boundary
    def delete(self, ids: ArrayLike) -> DeleteResult:
        """Delete vectors by id (tombstones; space is reclaimed by a later compaction).

        All ids must exist; otherwise nothing is deleted.
        """
        self._check_writable()
        id_arr = np.unique(_as_id_array(ids))
        with WriterLock(self.path):
            with self._catalog.read() as txn:
                found, segs, rows = self._catalog.locate(txn, id_arr)
            if not found.all():
                missing = id_arr[~found]
                raise IdNotFoundError(
                    f"Cannot delete: {len(missing)} id(s) not in the store (first: {int(missing[0])}). "
                    "Nothing was deleted."
                )

            def publish(txn):
                cat = self._catalog
                cat.delete_ids(txn, id_arr, segs, rows)
                cat.put_meta(txn, "count", int(cat.get_meta(txn, "count")) - len(id_arr))
                cat.put_meta(txn, "generation", int(cat.get_meta(txn, "generation")) + 1)

            self._commit(publish)
        return DeleteResult(rows=len(id_arr))

    # -- reads ---------------------------------------------------------------------------

    @boundary
    def get(self, ids: ArrayLike) -> np.ndarray:
        """The stored vectors of ``ids`` (as float32, normalised if metric is cosine)."""
        self._check_open()
        id_arr = _as_id_array(ids)
        with self._snapshot() as snap:
            found, segs, rows = self._catalog.locate(snap.txn, id_arr)
            if not found.all():
                raise IdNotFoundError(f"Id {int(id_arr[~found][0])} is not in the store.")
            out = np.empty((len(id_arr), self.config.dim), dtype=np.float32)
            for seg in np.unique(segs).tolist():
                sel = segs == seg
                out[sel] = snap.view.segments[seg].take_vectors(rows[sel])
        return out

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
        """
        self._check_open()
        k = _check_k(k)
        q = VectorSource(queries, dim=self.config.dim, what="queries")
        qs = np.concatenate([b for _, b in q.blocks(_HASH_BLOCK_ROWS)]) if q.n > _HASH_BLOCK_ROWS \
            else next(q.blocks(_HASH_BLOCK_ROWS))[1]
        qs = np.ascontiguousarray(normalise_rows(qs, self.config.metric, what="queries"))
        if probes != "all":
            if isinstance(probes, bool) or not isinstance(probes, (int, np.integer)) or probes < 1:
                raise InvalidArgumentError(f"probes must be a positive integer or 'all', got {probes!r}.")
            if candidates is not None and (not isinstance(candidates, (int, np.integer)) or candidates < 1):
                raise InvalidArgumentError(f"candidates must be a positive integer or None, got {candidates!r}.")
            if prune not in (True, False, "auto"):
                raise InvalidArgumentError(f"prune must be True, False or 'auto', got {prune!r}.")
        with self._snapshot() as snap:
            view = snap.view
            _check_k_fits(k, len(qs), view.count)
            if probes != "all":
                out = search_batch(view, self._router, qs, k, int(probes), candidates, explain=bool(explain),
                                   prune=prune)
                if candidates is None:
                    self._probe_on(view, qs, k, int(probes), out, prune)
                return out
            ids, scores = search_exact(view, qs, k)
            if not explain:
                return ids, scores
            row_bytes = self.config.dim * np.dtype(self.config.dtype).itemsize + 8
            stored = sum(r.n for r in view.segments.values())
            nq = len(qs)
            return ids, scores, SearchStats(np.full(nq, -1), np.full(nq, view.count),
                                            np.full(nq, stored * row_bytes), stored * row_bytes)

    def _probe_on(self, view: View, qs: np.ndarray, k: int, probes: int, out: tuple, prune) -> None:
        """Queries whose probed buckets held fewer than ``k`` live rows, while the store holds
        at least ``k``, are searched again with twice the probes until they fill (or every
        bucket is probed); their rows of ``out`` are replaced in place. A query's result is
        then exactly the search at the probe count that filled it."""
        want = min(k, view.count)
        n_buckets = 2 ** int(self._router.bits)
        ids, scores = out[0], out[1]
        stats = out[2] if len(out) == 3 else None
        short = np.flatnonzero((ids >= 0).sum(axis=1) < want)
        while len(short) and probes < n_buckets:
            probes = min(2 * probes, n_buckets)
            more = search_batch(view, self._router, qs[short], k, probes, None, explain=stats is not None,
                                prune=prune)
            ids[short], scores[short] = more[0], more[1]
            if stats is not None:
                for name in ("buckets", "scanned", "bytes_read", "pruned"):
                    mine, theirs = getattr(stats, name), getattr(more[2], name)
                    if mine is not None and theirs is not None:
                        mine[short] = theirs
                stats.batch_bytes += more[2].batch_bytes
            short = short[(more[0] >= 0).sum(axis=1) < want]

    def query(
        self,
        vector: ArrayLike,
        k: int = 10,
        *,
        probes: Probes = DEFAULT_PROBES,
        candidates: int | None = None,
        prune: bool | Literal["auto"] = "auto",
        explain: bool = False,
    ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, dict]:
        """Top-``k`` of one vector (shape (d,) or (1, d)): ``(ids, scores)`` of shape (k,);
        with ``explain=True`` also a dict: buckets probed, rows scanned, bytes read."""
        arr = np.asarray(vector) if not isinstance(vector, (str, os.PathLike)) else vector
        if isinstance(arr, np.ndarray) and arr.ndim == 1:
            arr = arr[None, :]
        out = self.search(arr, k, probes=probes, candidates=candidates, prune=prune, explain=explain)
        if len(out[0]) != 1:
            raise InvalidInputError(f"query takes one vector, got {len(out[0])}; use search() for a batch.")
        if explain:
            return out[0][0], out[1][0], out[2].rows()[0]
        return out[0][0], out[1][0]

    # -- maintenance ---------------------------------------------------------------------

    def _retired(self) -> tuple[set[str], set[str]]:
        """Names of retired segment dirs and model dirs (kept while readers pin them)."""
        with self._catalog.read() as txn:
            return retired_dirs(self._catalog.retired(txn))

    def _orphans(self) -> list[str]:
        with self._catalog.read() as txn:
            live = {segment_name(s) for s in self._catalog.segments(txn)}
            retired = retired_dirs(self._catalog.retired(txn))[0]
        return [d for d in seglib.list_segment_dirs(self._segments_root) if d not in live | retired]

    def _orphan_models(self) -> list[str]:
        """Model directories no catalog record points at (one trained by an ingest or
        ``train`` that did not commit), as ``model/<name>``; retired ones are not orphans."""
        with self._catalog.read() as txn:
            keep = {self._catalog.get_meta(txn, "router")["dir"]} | retired_dirs(self._catalog.retired(txn))[1]
        root = self.path / MODEL_DIR
        return sorted(f"{MODEL_DIR}/{p.name}" for p in root.iterdir() if p.is_dir() and f"{MODEL_DIR}/{p.name}" not in keep)

    def _remove_orphan_models(self) -> list[str]:
        removed = self._orphan_models()
        for rel in removed:
            shutil.rmtree(self.path / rel, ignore_errors=True)
        return removed

    def _remove_orphans_if_idle(self) -> None:
        lock = WriterLock(self.path)
        if not lock.try_acquire():
            return  # a writer is at work; its segment is not an orphan
        try:
            for name in self._orphans():
                seglib.remove_segment(self._segments_root, name)
                self._orphans_removed_at_open.append(name)
            self._remove_orphan_models()  # debris of uncommitted trainings: not worth a report
            self._collect_garbage()
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
        lock = WriterLock(self.path)
        if repair:
            lock.acquire()  # deleting orphans: no writer may be at work
        try:
            with self._snapshot() as snap:
                verify_snapshot(self, snap.txn, report, quick, progress)
            if report.damaged:
                self._flag_damage(report.damaged, lock_held=repair)
            if repair:
                for name in report.orphans:
                    seglib.remove_segment(self._segments_root, name)
                    report.removed.append(name)
                self._remove_orphan_models()
                self._collect_garbage()
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
            self._local_damage.setdefault(d["segment"], {})[(d["array"], d["chunk"])] = \
                damage_message(d["segment"], d["array"], d["chunk"])
        self._view = None
        if self.readonly or self._catalog.readonly_env:
            return
        lock = WriterLock(self.path)
        if not lock_held:
            lock.acquire()
        try:
            def record(txn):
                cat = self._catalog
                live = cat.segments(txn)
                raw = cat.get_meta(txn, "damaged") or {}
                for d in damaged:
                    if d["segment"] in live:  # (a retrain meanwhile rewrote it: nothing to flag)
                        chunks = raw.setdefault(str(d["segment"]), {}).setdefault(d["array"], [])
                        if d["chunk"] not in chunks:
                            chunks.append(d["chunk"])
                cat.put_meta(txn, "damaged", raw)
                cat.put_meta(txn, "generation", int(cat.get_meta(txn, "generation")) + 1)

            self._commit(record)
        finally:
            if not lock_held:
                lock.release()

class _Written(NamedTuple):
    """A segment written but not yet published."""

    keys: np.ndarray  # bucket key of each row, sorted
    ids: np.ndarray  # id of each row, in segment order
    chunk_rows: int
    lrsq: dict | None  # the segment record's LRSQ entry
    checksums: dict[str, np.ndarray]  # CRC-32C per chunk, per array


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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _segment_record(n: int, chunk_rows: int, lrsq: dict | None) -> dict:
    record = {"rows": n, "chunk_rows": chunk_rows, "created": time.time()}
    if lrsq is not None:  # {"rank", "aux", "block", "model": digest of the encoding model}
        record["lrsq"] = lrsq
    return record


class _StoredRows:
    """The live rows of a view's segments as one ``(n, d)`` source (re-bucketing input):
    ``blocks`` in storage order and ``take`` of ascending row numbers, like VectorSource."""

    def __init__(self, view: View):
        self.parts = []
        for seg, reader in sorted(view.segments.items()):
            mask = view.live_mask(seg, 0, reader.n)
            self.parts.append((reader, np.arange(reader.n) if mask is None else np.flatnonzero(mask)))
        self.offsets = np.cumsum([0] + [len(rows) for _, rows in self.parts])
        self.n = int(self.offsets[-1])
        self.dim = self.parts[0][0].dim if self.parts else 0

    def take(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        for p in np.unique(part).tolist():
            sel = part == p
            reader, live = self.parts[p]
            out[sel] = reader.take_vectors(live[rows[sel] - self.offsets[p]])
        return out

    def blocks(self, block_rows: int):
        for p, (reader, live) in enumerate(self.parts):
            for start in range(0, len(live), block_rows):
                rows = live[start : start + block_rows]
                block = np.asarray(reader.vectors(int(rows[0]), int(rows[-1]) + 1), dtype=np.float32)
                yield int(self.offsets[p]) + start, block[rows - rows[0]]

    def ids(self) -> np.ndarray:
        return np.concatenate([np.asarray(r.ids(0, r.n))[live] for r, live in self.parts]) \
            if self.parts else np.empty(0, dtype=np.uint64)


def _as_id_array(ids: ArrayLike) -> np.ndarray:
    arr = np.atleast_1d(read_array(ids, "ids"))
    if arr.dtype.kind not in "iu" or arr.ndim != 1:
        raise InvalidInputError(f"Expected a 1-D array of integer ids, got {arr.dtype} of shape {arr.shape}.")
    if arr.dtype.kind == "i" and arr.size and int(arr.min()) < 0:
        raise InvalidInputError(f"Expected non-negative ids, got {int(arr.min())}.")
    return arr.astype(np.uint64)


#: ``k`` may exceed the live count (results are padded with -1) up to this many.
_K_PAD_MAX = 65536
#: Largest result arrays one search may allocate (ids and scores, 12 bytes per cell).
_RESULT_BYTES_MAX = 8 << 30


def _check_k_fits(k: int, n_queries: int, count: int) -> None:
    """Refuse a ``k`` that asks for far more results than the store can return."""
    if k > max(count, _K_PAD_MAX):
        raise InvalidArgumentError(
            f"k={k:,} is more than the {count:,} vectors in the store can fill; at most "
            f"{max(count, _K_PAD_MAX):,} is allowed (results beyond the live count are -1)."
        )
    if n_queries * k * 12 > _RESULT_BYTES_MAX:
        raise InvalidArgumentError(
            f"{n_queries:,} queries x k={k:,} need {_mib(n_queries * k * 12)} of results; search "
            "in smaller batches of queries or with a smaller k."
        )


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidArgumentError(f"k must be a positive integer, got {k!r}.")
    return int(k)


__all__ = ["DeleteResult", "IngestResult", "Store", "TrainResult", "VerifyReport", "create", "open"]
