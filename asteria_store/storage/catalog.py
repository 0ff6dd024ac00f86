"""The LMDB catalog: the single source of truth of a store.

One LMDB environment (``catalog.lmdb/``) with five named databases. Byte layout, fixed:

* ``meta``        ascii key -> JSON (UTF-8) value: ``format_version``, ``config``, ``router``
                  ({"dir", "digest"}), ``next_id``, ``next_segment``, ``count`` (live vectors),
                  ``generation`` (bumped by every commit; caches key on it).
* ``buckets``     key = bucket key (u64, big-endian) + segment id (u32, big-endian);
                  value = first_row (u64, little-endian) + n_rows (u64, little-endian).
                  All extents of one bucket are adjacent, so a bucket is one range scan.
* ``ids``         key = external id (u64, big-endian); value = segment (u32 LE) + row (u64 LE).
* ``segments``    key = segment id (u32, big-endian); value = JSON {"rows", "created"}.
* ``tombstones``  key = segment (u32 BE) + row (u64 BE); value = external id (u64 LE).
* ``checksums``   key = segment (u32 BE) + array name (ascii: vectors, ids, lrsq, lrsq_aux,
                  sketch, columns);
                  value = CRC-32C of each chunk file, in chunk order (u32 LE each).
* ``names``       (stores with string ids) key = the string id (UTF-8);
                  value = the internal id it maps to (u64 LE).
* ``names_of``    (stores with string ids) key = internal id (u64 BE); value = its string
                  id (UTF-8). Both maps change in the commit that adds or deletes the row.

Keys are big-endian so that LMDB's byte order is numeric order (range scans by bucket,
ordered iteration by id); values are little-endian like every other on-disk number.

LMDB allows one environment per path per process: :func:`open_env` caches and shares it.
Writes go through :meth:`Catalog.write`, which grows the map when it is full and retries.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import numpy as np

from ..errors import ReadOnlyError

T = TypeVar("T")

#: The catalog's directory inside a store.
CATALOG_DIR = "catalog.lmdb"

DB_NAMES = ("meta", "buckets", "ids", "segments", "tombstones")
#: Added after format 1 was frozen: created by the first writable open of an older store;
#: a read-only open of such a store sees it as empty.
OPTIONAL_DB_NAMES = ("checksums", "names", "names_of")
INITIAL_MAP_SIZE = 64 * 1024 * 1024

_ID_KEY = struct.Struct(">Q")
_LOC_VALUE = struct.Struct("<IQ")
_BUCKET_KEY = struct.Struct(">QI")
_EXTENT_VALUE = struct.Struct("<QQ")
_SEG_KEY = struct.Struct(">I")
_TOMB_KEY = struct.Struct(">IQ")
_U64_LE = struct.Struct("<Q")


def pack_id(i: int) -> bytes:
    return _ID_KEY.pack(i)


def pack_ids(ids: np.ndarray) -> list[bytes]:
    """Big-endian 8-byte keys for an array of ids (vectorised)."""
    raw = np.ascontiguousarray(ids, dtype=">u8").tobytes()
    return [raw[i : i + 8] for i in range(0, len(raw), 8)]


def unpack_loc(value: bytes) -> tuple[int, int]:
    return _LOC_VALUE.unpack(value)


def pack_loc(segment: int, row: int) -> bytes:
    return _LOC_VALUE.pack(segment, row)


def segment_name(segment: int) -> str:
    return f"seg-{segment:08d}"


def retired_name(record: dict[str, Any]) -> str:
    """The directory of a retired record: a segment name, or ``model/<name>``."""
    return segment_name(record["segment"]) if "segment" in record else record["model"]


def retired_dirs(records: list[dict[str, Any]]) -> tuple[set[str], set[str]]:
    """Retired records as (segment directory names, model directories)."""
    return ({retired_name(r) for r in records if "segment" in r},
            {retired_name(r) for r in records if "model" in r})


# --- environment cache ------------------------------------------------------------------

_envs: dict[str, list[Any]] = {}
_envs_lock = threading.Lock()
#: Environments inherited across ``fork``: LMDB forbids using them in the child, and closing
#: them there would clear the parent's reader slots, so the child keeps them, untouched.
_inherited: list[Any] = []


def _key_envs_by_process() -> None:
    """Let a forked child open its own environment next to the inherited one.

    py-lmdb (>= 1.7) refuses to open files it already has open in this process, keyed by
    their (device, inode). After ``fork`` the child inherits the parent's environment
    object, which it must neither use nor close (closing would clear the parent's reader
    slots); LMDB's fcntl locks are not inherited, so the child needs a fresh environment.
    Prefixing the key with the process id keeps the guard within a process and lifts it
    across a fork."""
    try:
        from lmdb import _envid
    except ImportError:  # an older py-lmdb without the guard
        return
    original = _envid.env_keys
    if getattr(original, "_asteria_per_process", False):
        return

    def env_keys(path, subdir):
        return tuple(("pid", os.getpid(), *key) for key in original(path, subdir))

    env_keys._asteria_per_process = True  # type: ignore[attr-defined]
    _envid.env_keys = env_keys


_key_envs_by_process()


def _forget_envs_after_fork() -> None:
    global _envs_lock
    _inherited.extend(entry[0] for entry in _envs.values())
    _envs.clear()
    _envs_lock = threading.Lock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_forget_envs_after_fork)


def open_env(path: str | os.PathLike[str], *, create: bool = False, readonly: bool = False,
             lock: bool = True) -> lmdb.Environment:
    """The process-wide LMDB environment of ``path`` (opened once, reference counted).

    A writable environment is opened where the files allow it, even for a read-only
    handle, so later handles of the same process can share it. ``readonly`` handles fall
    back to a read-only environment on a read-only directory or mount (without LMDB's
    lock file when it cannot be written: safe only when no writer exists); ``lock=False``
    asks for that directly (network filesystems, where LMDB's locks do not work).
    """
    key = os.path.realpath(path)
    with _envs_lock:
        entry = _envs.get(key)
        if entry is not None and not readonly and entry[1]:
            raise ReadOnlyError(
                f"The store catalog {key!r} is open read-only in this process (a read-only "
                "directory, or lock=False); close those handles before opening it for writing."
            )
        if entry is None:
            env, env_readonly = _open_env(key, create=create, readonly=readonly, lock=lock)
            entry = _envs[key] = [env, env_readonly, 0]
        entry[2] += 1
        return entry[0]


def _open_env(key: str, *, create: bool, readonly: bool, lock: bool) -> tuple[lmdb.Environment, bool]:
    options = dict(map_size=INITIAL_MAP_SIZE, max_dbs=len(DB_NAMES) + len(OPTIONAL_DB_NAMES) + 2, subdir=True,
                   readahead=False, max_readers=1024)
    if lock:
        try:
            env = lmdb.open(key, create=create, **options)
        except lmdb.Error:
            if not readonly:
                raise
        else:
            env.set_mapsize(0)  # adopt the map size another process may have grown the file to
            return env, False
        try:
            return lmdb.open(key, readonly=True, **options), True
        except lmdb.Error:
            pass  # the lock file cannot be opened: a read-only directory
    return lmdb.open(key, readonly=True, lock=False, **options), True


def env_is_readonly(path: str | os.PathLike[str]) -> bool:
    entry = _envs.get(os.path.realpath(path))
    return bool(entry and entry[1])


def release_env(path: str | os.PathLike[str]) -> None:
    key = os.path.realpath(path)
    with _envs_lock:
        entry = _envs.get(key)
        if entry is None:
            return
        entry[2] -= 1
        if entry[2] <= 0:
            entry[0].close()
            del _envs[key]


class Catalog:
    """Typed access to one store's LMDB environment."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = False, readonly: bool = False,
                 lock: bool = True):
        self.path = Path(path)
        self._options = dict(readonly=readonly, lock=lock)
        self._closed = False
        self._open(create=create)

    def _open(self, *, create: bool = False) -> None:
        self.env = open_env(self.path, create=create, **self._options)
        self._pid = os.getpid()
        self.readonly_env = env_is_readonly(self.path)
        try:
            self.dbs = {name: self.env.open_db(name.encode(), create=create) for name in DB_NAMES}
            for name in OPTIONAL_DB_NAMES:
                try:
                    self.dbs[name] = self.env.open_db(name.encode(), create=not self.readonly_env)
                except lmdb.NotFoundError:
                    self.dbs[name] = None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._pid == os.getpid():  # a forked child leaves the parent's env alone
                release_env(self.path)

    # -- transactions --------------------------------------------------------------------

    def _begin(self, *, write: bool) -> lmdb.Transaction:
        if self._pid != os.getpid():  # forked: LMDB requires a fresh environment here
            self._open()
        try:
            return self.env.begin(write=write)
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)
            return self.env.begin(write=write)

    def read(self) -> lmdb.Transaction:
        """A read-only snapshot (use as a context manager; keep it short)."""
        return self._begin(write=False)

    def write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``fn(txn)`` in ONE write transaction, committed atomically.

        If the map is full the transaction is aborted, the map doubled, and ``fn`` rerun, so
        ``fn`` must only touch the transaction. Any exception aborts: nothing is written.
        """
        # Reader slots left by killed processes pin old snapshots, so LMDB could never
        # reuse the pages later commits free: clear them first (mdb_reader_check).
        if self._pid != os.getpid():
            self._open()
        if self.readonly_env:
            raise ReadOnlyError(f"The store catalog {str(self.path)!r} is on a read-only directory or "
                                "was opened with lock=False; it cannot be written.")
        self.env.reader_check()
        while True:
            try:
                with self._begin(write=True) as txn:
                    result = fn(txn)
                return result
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)

    def clear_rows(self, txn: lmdb.Transaction) -> None:
        """Empty ``buckets``, ``ids``, ``segments`` and ``tombstones`` (meta stays): the
        first step of a transaction that replaces every segment (a re-bucketing)."""
        for name in ("buckets", "ids", "segments", "tombstones", "checksums"):
            if self.dbs[name] is not None:
                txn.drop(self.dbs[name], delete=False)

    # -- meta ----------------------------------------------------------------------------

    def get_meta(self, txn: lmdb.Transaction, key: str, default: Any = None) -> Any:
        raw = txn.get(key.encode(), db=self.dbs["meta"])
        return default if raw is None else json.loads(raw.decode("utf-8"))

    def put_meta(self, txn: lmdb.Transaction, key: str, value: Any) -> None:
        txn.put(key.encode(), json.dumps(value, sort_keys=True).encode("utf-8"), db=self.dbs["meta"])

    def all_meta(self, txn: lmdb.Transaction) -> dict[str, Any]:
        with txn.cursor(db=self.dbs["meta"]) as cur:
            return {k.decode(): json.loads(v.decode("utf-8")) for k, v in cur}

    # -- segments ------------------------------------------------------------------------

    def segments(self, txn: lmdb.Transaction) -> dict[int, dict[str, Any]]:
        with txn.cursor(db=self.dbs["segments"]) as cur:
            return {_SEG_KEY.unpack(k)[0]: json.loads(v.decode("utf-8")) for k, v in cur}

    def put_segment(self, txn: lmdb.Transaction, segment: int, record: dict[str, Any]) -> None:
        txn.put(_SEG_KEY.pack(segment), json.dumps(record, sort_keys=True).encode(), db=self.dbs["segments"])

    def drop_segment(self, txn: lmdb.Transaction, segment: int, buckets: Iterable[int]) -> None:
        """Remove a segment's record, its extents (in ``buckets``), tombstones and checksums;
        the id map is the caller's (a merge re-maps its live ids)."""
        txn.delete(_SEG_KEY.pack(segment), db=self.dbs["segments"])
        bdb = self.dbs["buckets"]
        for b in buckets:
            txn.delete(_BUCKET_KEY.pack(int(b), segment), db=bdb)
        prefix = _SEG_KEY.pack(segment)
        for name in ("tombstones", "checksums"):
            db = self.dbs.get(name)
            if db is None:
                continue
            with txn.cursor(db=db) as cur:
                if cur.set_range(prefix):
                    while bytes(cur.key()[:4]) == prefix:
                        if not cur.delete():
                            break

    # -- retired directories -------------------------------------------------------------

    def retired(self, txn: lmdb.Transaction) -> list[dict[str, Any]]:
        """Directories no commit shows any more, awaiting collection: ``{"segment": id,
        "at": g}`` or ``{"model": "model/<name>", "at": g}``, ``g`` being the first
        generation that cannot see them (readers of older ones may still use them)."""
        return self.get_meta(txn, "retired") or []

    def retire(self, txn: lmdb.Transaction, generation: int, *, segments: list[int] = (),
               model: str | None = None) -> None:
        """Record directories that stop being visible at ``generation``."""
        records = self.retired(txn)
        records += [{"segment": int(s), "at": generation} for s in segments]
        if model is not None:
            records.append({"model": model, "at": generation})
        self.put_meta(txn, "retired", records)

    def forget_retired(self, txn: lmdb.Transaction, records: list[dict[str, Any]]) -> None:
        """Drop ``records`` (their directories were removed) from the retired list."""
        self.put_meta(txn, "retired", [r for r in self.retired(txn) if r not in records])

    # -- checksums -----------------------------------------------------------------------

    def put_checksums(self, txn: lmdb.Transaction, segment: int, sums: dict[str, np.ndarray]) -> None:
        """Record the CRC-32C of every chunk of every array of ``segment``."""
        for array, crcs in sums.items():
            txn.put(_SEG_KEY.pack(segment) + array.encode(), np.asarray(crcs, dtype="<u4").tobytes(),
                    db=self.dbs["checksums"])

    def checksums(self, txn: lmdb.Transaction, segment: int) -> dict[str, np.ndarray]:
        """``{array: uint32 CRC per chunk}`` of ``segment`` (empty if none were recorded)."""
        db = self.dbs["checksums"]
        out: dict[str, np.ndarray] = {}
        if db is None:
            return out
        prefix = _SEG_KEY.pack(segment)
        with txn.cursor(db=db) as cur:
            if cur.set_range(prefix):
                for k, v in cur:
                    if k[:4] != prefix:
                        break
                    out[bytes(k[4:]).decode()] = np.frombuffer(v, dtype="<u4").copy()
        return out

    # -- buckets -------------------------------------------------------------------------

    def put_extents(self, txn: lmdb.Transaction, segment: int, keys: np.ndarray,
                    starts: np.ndarray, counts: np.ndarray) -> None:
        items = [
            (_BUCKET_KEY.pack(int(k), segment), _EXTENT_VALUE.pack(int(s), int(c)))
            for k, s, c in zip(keys.tolist(), starts.tolist(), counts.tolist())
        ]
        with txn.cursor(db=self.dbs["buckets"]) as cur:
            cur.putmulti(items)

    def extents(self, txn: lmdb.Transaction, bucket: int) -> list[tuple[int, int, int]]:
        """``[(segment, first_row, n_rows), ...]`` of one bucket."""
        prefix = _ID_KEY.pack(bucket)
        out = []
        with txn.cursor(db=self.dbs["buckets"]) as cur:
            if not cur.set_range(prefix):
                return out
            for k, v in cur:
                if k[:8] != prefix:
                    break
                first, n = _EXTENT_VALUE.unpack(v)
                out.append((_BUCKET_KEY.unpack(k)[1], first, n))
        return out

    def renumber_buckets(self, txn: lmdb.Transaction, renumber: np.ndarray, drop: Iterable[int]) -> None:
        """Give every extent of bucket ``b`` the key ``renumber[b]`` (a rising map), and
        remove the extents of the buckets in ``drop`` (their rows moved)."""
        drop = set(int(b) for b in drop)
        bdb = self.dbs["buckets"]
        moved = []
        with txn.cursor(db=bdb) as cur:
            for k, v in cur:
                bucket, seg = _BUCKET_KEY.unpack(k)
                if bucket in drop or renumber[bucket] != bucket:
                    moved.append((bytes(k), bytes(v), bucket, seg))
        for k, _, _, _ in moved:
            txn.delete(k, db=bdb)
        items = [(_BUCKET_KEY.pack(int(renumber[b]), seg), v) for _, v, b, seg in moved if b not in drop]
        with txn.cursor(db=bdb) as cur:
            cur.putmulti(items)

    def iter_extents(self, txn: lmdb.Transaction) -> Iterator[tuple[int, int, int, int]]:
        """Every ``(bucket, segment, first_row, n_rows)`` in bucket order."""
        with txn.cursor(db=self.dbs["buckets"]) as cur:
            for k, v in cur:
                bucket, seg = _BUCKET_KEY.unpack(k)
                first, n = _EXTENT_VALUE.unpack(v)
                yield bucket, seg, first, n

    # -- ids -----------------------------------------------------------------------------

    def put_ids(self, txn: lmdb.Transaction, segment: int, ids: np.ndarray, *, overwrite: bool = False) -> None:
        """Map ``ids[row] -> (segment, row)`` for every row of a new segment (``overwrite``:
        also for ids already mapped, as a merge moves them)."""
        perm = np.argsort(ids, kind="stable")
        keys = pack_ids(ids[perm])
        rows = perm.tolist()
        with txn.cursor(db=self.dbs["ids"]) as cur:
            cur.putmulti(zip(keys, (pack_loc(segment, r) for r in rows)), overwrite=overwrite)

    def existing_ids(self, txn: lmdb.Transaction, ids: np.ndarray) -> np.ndarray:
        """The subset of ``ids`` already in the store."""
        keys = pack_ids(np.sort(ids))
        with txn.cursor(db=self.dbs["ids"]) as cur:
            found = [k for k, _ in cur.getmulti(keys)]
        return np.array([_ID_KEY.unpack(k)[0] for k in found], dtype=np.uint64)

    def free_ids(self, txn: lmdb.Transaction, start: int, n: int, max_id: int) -> np.ndarray | None:
        """``n`` ids not in the store: the first free ones from ``start`` up to ``max_id``,
        then from 0 (ids given explicitly may sit anywhere); None if fewer are free."""
        parts: list[np.ndarray] = []
        need = n
        for lo, hi in ((start, max_id), (0, min(start, max_id + 1) - 1)):
            if need == 0 or lo > hi:
                continue
            with txn.cursor(db=self.dbs["ids"]) as cur:
                positioned = cur.set_range(pack_id(lo))
                pos = lo
                while need and pos <= hi:
                    used = _ID_KEY.unpack(cur.key())[0] if positioned else hi + 1
                    take = min(min(used, hi + 1) - pos, need)
                    if take > 0:
                        parts.append(np.arange(pos, pos + take, dtype=np.uint64))
                        need -= take
                        pos += take
                    if pos == used:
                        pos += 1
                        positioned = cur.next()
        if need:
            return None
        return np.concatenate(parts) if len(parts) != 1 else parts[0]

    def locate(self, txn: lmdb.Transaction, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(found_mask, segments, rows)`` of each id (segments/rows are 0 where missing)."""
        n = len(ids)
        found = np.zeros(n, dtype=bool)
        segs = np.zeros(n, dtype=np.int64)
        rows = np.zeros(n, dtype=np.int64)
        db = self.dbs["ids"]
        for i, key in enumerate(pack_ids(ids)):
            raw = txn.get(key, db=db)
            if raw is not None:
                found[i] = True
                segs[i], rows[i] = unpack_loc(raw)
        return found, segs, rows

    def iter_ids(self, txn: lmdb.Transaction) -> Iterator[tuple[int, int, int]]:
        """Every ``(id, segment, row)`` in id order."""
        with txn.cursor(db=self.dbs["ids"]) as cur:
            for k, v in cur:
                seg, row = unpack_loc(v)
                yield _ID_KEY.unpack(k)[0], seg, row

    def delete_ids(self, txn: lmdb.Transaction, ids: np.ndarray, segs: np.ndarray, rows: np.ndarray) -> None:
        ids_db, tomb_db = self.dbs["ids"], self.dbs["tombstones"]
        for key, i, s, r in zip(pack_ids(ids), ids.tolist(), segs.tolist(), rows.tolist()):
            txn.delete(key, db=ids_db)
            txn.put(_TOMB_KEY.pack(s, r), _U64_LE.pack(i), db=tomb_db)

    # -- string ids ----------------------------------------------------------------------

    def put_names(self, txn: lmdb.Transaction, names: list[str], ids: np.ndarray) -> None:
        """Map each string id of ``names`` to the internal id at the same place of ``ids``."""
        fwd, rev = self.dbs["names"], self.dbs["names_of"]
        for name, i in zip(names, ids.tolist()):
            key = name.encode("utf-8")
            txn.put(key, _U64_LE.pack(i), db=fwd)
            txn.put(pack_id(i), key, db=rev)

    def lookup_names(self, txn: lmdb.Transaction, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(found_mask, internal ids)`` of string ids (ids are 0 where missing)."""
        found = np.zeros(len(names), dtype=bool)
        ids = np.zeros(len(names), dtype=np.uint64)
        db = self.dbs["names"]
        if db is None:
            return found, ids
        for k, name in enumerate(names):
            raw = txn.get(name.encode("utf-8"), db=db)
            if raw is not None:
                found[k] = True
                ids[k] = _U64_LE.unpack(raw)[0]
        return found, ids

    def names_of(self, txn: lmdb.Transaction, ids: Iterable[int]) -> list[str]:
        """The string ids of internal ``ids`` (each must be mapped)."""
        db = self.dbs["names_of"]
        return [bytes(txn.get(pack_id(i), db=db)).decode("utf-8") for i in ids]

    def delete_names(self, txn: lmdb.Transaction, ids: np.ndarray) -> None:
        """Drop the string ids of internal ``ids`` (those that have one)."""
        fwd, rev = self.dbs["names"], self.dbs["names_of"]
        if fwd is None:
            return
        for i in ids.tolist():
            key = pack_id(i)
            name = txn.get(key, db=rev)
            if name is not None:
                txn.delete(bytes(name), db=fwd)
                txn.delete(key, db=rev)

    def count_names(self, txn: lmdb.Transaction) -> int:
        db = self.dbs["names"]
        return 0 if db is None else txn.stat(db)["entries"]

    # -- tombstones ----------------------------------------------------------------------

    def tombstones(self, txn: lmdb.Transaction) -> dict[int, np.ndarray]:
        """Deleted rows per segment, as sorted int64 arrays."""
        out: dict[int, list[int]] = {}
        with txn.cursor(db=self.dbs["tombstones"]) as cur:
            for k, _ in cur:
                seg, row = _TOMB_KEY.unpack(k)
                out.setdefault(seg, []).append(row)
        return {s: np.array(r, dtype=np.int64) for s, r in out.items()}

    def dump(self) -> dict[str, list[tuple[bytes, bytes]]]:
        """Every key/value of every database (for tests and ``verify``)."""
        with self.read() as txn:
            out = {}
            for name, db in self.dbs.items():
                if db is None:
                    continue
                with txn.cursor(db=db) as cur:
                    out[name] = [(bytes(k), bytes(v)) for k, v in cur]
            return out
