"""``backup``: a consistent copy of a live store, made while writers go on.

The copy is ONE snapshot: a read transaction pinned like any read (storage/pins.py), so
the files it names stay on disk while they are copied. LMDB copies its environment as of
that transaction (``mdb_env_copy`` with the transaction, compacted); the live model's
directory and the snapshot's segment directories are copied file by file (published
files never change). The copy forgets what the source had retired (those directories are
not copied), is built under a temporary name beside ``dest``, fsynced, and renamed into
place: ``dest`` appears whole or not at all. It opens and verifies as a store of its own.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidArgumentError, StoreExistsError
from .progress import ProgressLike, make_progress
from .reads import SEGMENTS_DIR, ReadSide
from .storage import segments as seglib
from .storage.catalog import CATALOG_DIR, Catalog, segment_name
from .storage.pins import READERS_DIR


@dataclass(frozen=True)
class BackupResult:
    """What a backup copied."""

    path: str
    generation: int  # the catalog generation the copy holds
    rows: int  # live vectors
    segments: int
    bytes: int  # bytes of segment and model files copied
    seconds: float


def backup(reads: ReadSide, dest: str | os.PathLike[str], *, progress: ProgressLike = None) -> BackupResult:
    """Copy the store of ``reads`` to ``dest`` (a path that does not exist yet)."""
    started = time.perf_counter()
    dest = Path(dest).absolute()
    if dest.exists():
        raise StoreExistsError(f"Cannot back up to {str(dest)!r}: it already exists. Choose a new path.")
    if not dest.parent.is_dir():
        raise InvalidArgumentError(f"Cannot back up to {str(dest)!r}: its directory does not exist.")
    if dest == reads.path or reads.path in dest.parents:
        raise InvalidArgumentError(f"Cannot back up {str(reads.path)!r} into itself.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.backup-", dir=dest.parent))
    try:
        with reads.snapshot() as snap:
            cat = reads.catalog
            (tmp / CATALOG_DIR).mkdir()
            cat.env.copy(str(tmp / CATALOG_DIR), compact=True, txn=snap.txn)
            router_dir = cat.get_meta(snap.txn, "router")["dir"]
            count = int(cat.get_meta(snap.txn, "count"))
            names = [segment_name(seg) for seg in sorted(snap.view.segments)]
            sources = [reads.path / router_dir] + [reads.segments_root / n for n in names]
            total = sum(f.stat().st_size for src in sources for f in src.rglob("*") if f.is_file())
            bar = make_progress(progress, total=total, desc="copying", unit="B")
            try:
                copied = _copy(reads.path / router_dir, tmp / router_dir, bar)
                seglib.create_root(tmp / SEGMENTS_DIR)
                for n in names:
                    copied += _copy(reads.segments_root / n, tmp / SEGMENTS_DIR / n, bar)
            finally:
                bar.close()
            generation = snap.view.generation
        copy = Catalog(tmp / CATALOG_DIR)
        try:  # the source's retired directories were not copied: nothing to collect
            copy.write(lambda txn: copy.put_meta(txn, "retired", []))
            copy.env.sync(True)
        finally:
            copy.close()
        (tmp / READERS_DIR).mkdir()
        os.chmod(tmp, seglib.dir_mode())  # mkdtemp's 0700 would hide the copy from other users
        seglib.publish_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BackupResult(str(dest), generation, count, len(names), copied, time.perf_counter() - started)


def _copy(src: Path, dst: Path, bar) -> int:
    """Copy the directory ``src`` to ``dst`` file by file; the bytes copied."""
    n = 0
    for f in sorted(src.rglob("*")):
        target = dst / f.relative_to(src)
        if f.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
        size = f.stat().st_size
        n += size
        bar.update(size)
    return n


__all__ = ["BackupResult", "backup"]
