"""Pieces the benchmark scripts share (import it from a script in this folder).

* :func:`pin_threads_from_argv`: set the BLAS/OpenMP thread variables from ``--threads``
  (default 1) before numpy is imported; call it first.
* :func:`time_search`: the warm-up, one timed batch and a loop of timed single queries that
  every speed table reports.
* :func:`join_memory_cap` / :func:`remove_memory_cap`: serve inside a memory cgroup.
* :func:`peak_mib`, :func:`anon_mib`: what a process holds; :class:`AnonPeak` samples the
  anonymous memory's peak (cold page cache: ``asteria_store.testing.pagecache``).
"""

from __future__ import annotations

import os
import sys
import time


def pin_threads_from_argv(default: str = "1") -> str:
    """Export ``--threads N`` (from sys.argv, else ``default``) as OMP/OpenBLAS/MKL thread
    counts, so numpy's BLAS starts with them; returns N."""
    threads = default
    for i, arg in enumerate(sys.argv):
        if arg == "--threads" and i + 1 < len(sys.argv):
            threads = sys.argv[i + 1]
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = threads
    return threads


def time_search(store, queries, probes, *, k: int = 10, single: int = 200, warm: int = 30, explain: bool = False):
    """Search ``queries`` once as a batch (after ``warm`` untimed single queries) and the
    first ``single`` one at a time: ``(batch result, batch seconds, single-query seconds)``."""
    for v in queries[:warm]:
        store.query(v, k, probes=probes)
    t = time.perf_counter()
    out = store.search(queries, k, probes=probes, explain=explain)
    batch_s = time.perf_counter() - t
    lat = []
    for v in queries[:single]:
        t = time.perf_counter()
        store.query(v, k, probes=probes)
        lat.append(time.perf_counter() - t)
    return out, batch_s, lat


def join_memory_cap(name: str, mib: int) -> str:
    """Move this process into a memory cgroup ``name`` limited to ``mib`` MiB, page cache
    included (cgroup v1 ``memory/``, else v2 ``memory.max``). Returns a label for results:
    ``"cap <mib> MiB (cgroup v1|v2)"``, or ``"uncapped: <why>"`` when the group cannot be
    made or joined (not root, no memory controller): the caller runs on and says so."""
    from pathlib import Path

    v1 = Path("/sys/fs/cgroup/memory")
    if v1.is_dir():
        group, limit_file, version = v1 / name, "memory.limit_in_bytes", "v1"
    else:
        group, limit_file, version = Path("/sys/fs/cgroup") / name, "memory.max", "v2"
    try:
        group.mkdir(exist_ok=True)
        (group / limit_file).write_text(str(mib * 2**20))
        (group / "cgroup.procs").write_text(str(os.getpid()))
    except OSError as exc:
        return f"uncapped: cannot join a memory cgroup ({exc.strerror or exc})"
    return f"cap {mib} MiB (cgroup {version})"


def remove_memory_cap(name: str) -> None:
    """Remove the group :func:`join_memory_cap` made (once no process is left in it)."""
    from pathlib import Path

    for root in (Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")):
        try:
            (root / name).rmdir()
            return
        except OSError:
            continue


def proc_counter(field: str, path: str = "/proc/self/status") -> int:
    """A counter of this process: VmHWM/VmRSS/RssAnon in KiB (status) or read_bytes (io);
    -1 where the field is missing."""
    with open(path) as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def peak_mib() -> float:
    """Peak resident memory (VmHWM), mapped file pages included."""
    return proc_counter("VmHWM") / 1024


def anon_mib() -> float:
    """Anonymous resident memory now (RssAnon): the process's own, without mapped files."""
    return proc_counter("RssAnon") / 1024


class AnonPeak:
    """The peak of this process's anonymous memory (RssAnon, MiB) while the ``with`` block
    runs, sampled every ``interval`` seconds by a thread (the kernel keeps no high-water
    mark of anonymous memory alone: VmHWM counts mapped file pages too)."""

    def __init__(self, interval: float = 0.05):
        import threading

        self.interval, self.mib = interval, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.mib = max(self.mib, anon_mib())
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.mib = max(self.mib, anon_mib())
