"""The writer lock: one writing process at a time per store (``fcntl.flock`` on a file).

Readers never take it: LMDB's MVCC gives them consistent snapshots while a writer works.
Orphan cleanup also takes it, so it can never delete the segment of a live ingest.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import StoreLockedError


def lock_is_free(path: str | os.PathLike[str]) -> bool:
    """Whether no process holds an ``flock`` on ``path`` (a holder that died released it):
    how dead readers' pins and killed ``create``s are told from live ones. Raises
    FileNotFoundError if the file is gone."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # also releases the probe's own lock
    return True


class WriterLock:
    """Exclusive advisory lock on ``<store>/writer.lock``; a context manager."""

    def __init__(self, store_path: str | os.PathLike[str], *, timeout: float | None = 30.0,
                 on_wait: Callable[[], None] | None = None):
        self.path = Path(store_path) / "writer.lock"
        #: Seconds to wait for another writer; None: wait as long as it writes (writers
        #: queue: a dead holder's flock is released, so the wait ends with its process).
        self.timeout = timeout
        #: Called once if the lock is not free within a second (to say why nothing moves).
        self.on_wait = on_wait
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def acquire(self) -> None:
        started = time.monotonic()
        told = False
        while not self.try_acquire():
            waited = time.monotonic() - started
            if self.timeout is not None and waited >= self.timeout:
                raise StoreLockedError(
                    f"Another process is writing to {str(self.path.parent)!r} "
                    f"(waited {self.timeout:g} s for its writer lock). Retry when it is done."
                )
            if not told and waited >= 1.0 and self.on_wait is not None:
                self.on_wait()
                told = True
            time.sleep(0.05 if waited < 1.0 else 0.2)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
