"""The local Dask cluster a job starts when it is given none.

Two of Dask's defaults are changed, both measured (docs/benchmarks.md "Batch jobs"):

- ``MALLOC_TRIM_THRESHOLD_=65536``, which Dask's nanny exports to its workers so that they
  hand freed memory back to the OS early, is not set (one already in this process's
  environment is inherited as usual): every block allocates and frees
  large temporary arrays, and with the low threshold each block faulted its memory in
  afresh; blocks ran 35-60% slower on a worker than in one process. Worker memory is
  bounded by the block size instead.
- no dashboard (its HTTP server listens on a free port, not on 8787, so that two jobs, or a
  job and a notebook's cluster, do not collide).

Dask's other worker settings stay: ``OMP_NUM_THREADS=1`` (and MKL/OpenBLAS), so each
worker thread searches its block on one core. The nanny writes those variables into this
process's environment too; they are restored when the cluster closes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

from ..errors import InvalidArgumentError


@contextlib.contextmanager
def _environ_restored() -> Iterator[None]:
    before = dict(os.environ)
    try:
        yield
    finally:
        for key in [k for k in os.environ if k not in before]:
            del os.environ[key]
        os.environ.update(before)


@contextlib.contextmanager
def local_client(workers: int | None, threads_per_worker: int = 1, processes: bool = True) -> Iterator[Any]:
    """A ``distributed.Client`` on a new ``LocalCluster`` of ``workers`` (default: one per
    core) x ``threads_per_worker``, closed on exit."""
    import dask
    from distributed import Client, LocalCluster

    n = (os.cpu_count() or 1) if workers is None else workers
    for name, value in (("workers", n), ("threads_per_worker", threads_per_worker)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}.")
    config = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
    with _environ_restored(), dask.config.set(config), \
            LocalCluster(n_workers=n, threads_per_worker=threads_per_worker, processes=processes,
                         dashboard_address=":0", scheduler_kwargs={"dashboard": False},
                         silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        yield client


__all__ = ["local_client"]
