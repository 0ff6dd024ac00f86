"""What a batch job's worker keeps between tasks: the stores it opened, once per process.

A task never re-opens a store per block: the first task of a process opens it read-only
(memory maps, LMDB environment, routing model) and every later task of that process, in
any of its threads, reuses the handle. A forked or spawned worker process has its own
cache (the key holds the process id).
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

from ..errors import StoreNotFoundError
from ..store import Store
from .collection import Collection

_lock = threading.Lock()
_open: dict[tuple[int, str, bool, str], Any] = {}
#: Handles this process has opened so far (what "opened once per worker" is checked by).
opens = 0


def where() -> str:
    """This process, as a person reads it: the Dask worker's address, or host and pid."""
    try:
        from distributed import get_worker

        return f"worker {get_worker().address} on {socket.gethostname()}"
    except (ImportError, ValueError):
        return f"process {os.getpid()} on {socket.gethostname()}"


def cached_collection(path: str, lock: bool = True) -> Collection:
    """The read-only :class:`Collection` at ``path`` for this process, opened on first use."""
    return _cached(path, lock, Collection)


def cached_store(path: str, lock: bool = True) -> Store:
    """The read-only handle of the store at ``path`` for this process, opened on first use.

    A store this process cannot see is reported with where the process runs: workers on
    other machines need the store on a shared filesystem, at the same path.
    """
    return _cached(path, lock, Store)


def _cached(path: str, lock: bool, cls: type) -> Any:
    key = (os.getpid(), path, bool(lock), cls.__name__)
    store = _open.get(key)
    if store is not None and not _is_closed(store):
        return store
    with _lock:
        store = _open.get(key)
        if store is None or _is_closed(store):
            try:
                store = cls(path, readonly=True, lock=lock)
            except StoreNotFoundError as exc:
                raise StoreNotFoundError(
                    f"{exc} (seen from {where()}: workers on other machines need the store on a "
                    "shared filesystem, at the same path)"
                ) from None
            _open[key] = store
            global opens
            opens += 1
    return store


def _is_closed(owner: Any) -> bool:
    shards = getattr(owner, "shards", None)
    return any(s._closed for s in shards) if shards is not None else owner._closed


def close_cached() -> None:
    """Close every store this process opened for batch tasks (tests; worker teardown)."""
    with _lock:
        for key, store in list(_open.items()):
            if key[0] == os.getpid():
                store.close()
            del _open[key]


__all__ = ["cached_collection", "cached_store", "close_cached", "where"]
