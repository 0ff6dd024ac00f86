"""Reader pins: which catalog generations live readers still use, across processes.

A retrain (and later merges and compactions) retires segment and model directories. A
reader in another process may still be reading the generation that used them, so they
are deleted only once no live reader pins a generation that can see them.

Every open store handle that may read owns one pin file ``readers/<pid>-<token>.pin``,
held under an exclusive ``flock`` for the handle's life. While a read runs, the file
holds the lowest generation any of the handle's in-flight reads may use; when the handle
is idle it holds -1, so a long-lived but idle reader pins nothing. A process that dies
releases its flock: the next collection finds the file lockable, knows its owner is gone
and removes it (dead readers' pins expire by themselves).

File layout, 16 bytes, little-endian: ``int64 generation`` then its bitwise complement
(a torn read, caught by the complement, counts as pinning generation 0, i.e. everything).
The owner writes it through a shared memory map.

Protocol (see ``Store._snapshot``): a read first pins a generation ``p`` it has already
seen (so ``p`` <= the generation its transaction will see), then begins its LMDB read
transaction at generation ``g >= p``. A directory retired by the commit of generation
``G`` stays visible to generations < G only; the writer removes it after that commit,
only when every live pin is >= G. A reader whose pin the writer missed wrote it after
the writer's scan, hence after the commit of G, so its transaction sees >= G and never
needs the retired directory.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import secrets
import struct
import threading
import time
from collections import Counter
from pathlib import Path

from .lock import lock_is_free

READERS_DIR = "readers"
IDLE = -1
_PIN = struct.Struct("<qq")


def _pack(generation: int) -> bytes:
    return _PIN.pack(generation, ~generation)


def _unpack(raw: bytes) -> int:
    if len(raw) != _PIN.size:
        return 0
    gen, check = _PIN.unpack(raw)
    return gen if check == ~gen else 0


class ReaderPin:
    """The pin file of one store handle. Thread-safe; ``pin``/``unpin`` nest."""

    def __init__(self, store_path: str | os.PathLike[str]):
        self.dir = Path(store_path) / READERS_DIR
        self._lock = threading.Lock()
        self._held: Counter[int] = Counter()
        self._written = IDLE
        self._fd: int | None = None
        self._pid = os.getpid()
        self._open()

    def _open(self) -> None:
        self.dir.mkdir(exist_ok=True)
        name = f"{os.getpid()}-{secrets.token_hex(6)}"
        tmp = self.dir / f"{name}.tmp"
        # Locked and written before it gets its .pin name: a collector never sees an
        # unlocked .pin file of a live reader.
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: never contended
            os.pwrite(fd, _pack(IDLE), 0)
            self.path = self.dir / f"{name}.pin"
            os.rename(tmp, self.path)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        # Pins change twice per read: a shared mapping makes that a memory store (no system
        # call, no inode time update); collectors read the file through the page cache.
        self._map = mmap.mmap(fd, _PIN.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._fd, self._written, self._pid = fd, IDLE, os.getpid()

    def _after_fork(self) -> None:
        """In a forked child: leave the parent's file (and its flock) to the parent."""
        if self._fd is not None:
            self._map.close()
            os.close(self._fd)  # the parent's descriptor keeps the flock
        self._held.clear()
        self._open()

    def _write(self) -> None:
        want = min(self._held) if self._held else IDLE
        if want != self._written:
            _PIN.pack_into(self._map, 0, want, ~want)
            self._written = want

    def pin(self, generation: int) -> None:
        with self._lock:
            if self._fd is None:
                raise ValueError("pin file closed")
            if self._pid != os.getpid():
                self._after_fork()
            self._held[generation] += 1
            self._write()

    def unpin(self, generation: int) -> None:
        with self._lock:
            if self._fd is None or self._pid != os.getpid():
                return
            self._held[generation] -= 1
            if self._held[generation] <= 0:
                del self._held[generation]
            self._write()

    def close(self) -> None:
        with self._lock:
            if self._fd is None:
                return
            if self._pid == os.getpid():
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
            self._map.close()
            os.close(self._fd)
            self._fd = None


def oldest_pin(store_path: str | os.PathLike[str]) -> int | None:
    """The lowest generation any live reader pins (None: no reader pins anything).

    Pin files of dead processes (their flock is free) are removed on the way."""
    directory = Path(store_path) / READERS_DIR
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return None
    oldest: int | None = None
    for name in names:
        path = directory / name
        if name.endswith(".tmp"):  # a pin file being born, or left by a killed reader
            _remove_if_stale(path)
            continue
        if not name.endswith(".pin"):
            continue
        try:
            if lock_is_free(path):  # its owner is gone: the pin has expired
                path.unlink(missing_ok=True)
                continue
            gen = _unpack(path.read_bytes()[: _PIN.size])
        except FileNotFoundError:
            continue  # its reader closed meanwhile
        if gen != IDLE:
            oldest = gen if oldest is None else min(oldest, gen)
    return oldest


def _remove_if_stale(path: Path, age_s: float = 600.0) -> None:
    try:
        if time.time() - path.stat().st_mtime > age_s:
            path.unlink()
    except FileNotFoundError:
        pass


__all__ = ["IDLE", "READERS_DIR", "ReaderPin", "oldest_pin"]
