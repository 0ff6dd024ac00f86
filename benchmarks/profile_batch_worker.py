"""Where a batch job's one Dask worker spends its time: py-spy samples the worker process
for 50 s while it searches 200k queries (the work files of bench_batch.py must exist).

    python benchmarks/profile_batch_worker.py   # raw samples in /tmp/prof.txt, summary printed
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter

from asteria_store import batch
from asteria_store.batch.cluster import local_client

WORK = "/tmp/asteria-bench/batch"
QUERIES = f"{WORK}/queries-200000-seed0-noise0.4.f16.npy"
OUT = "/tmp/prof_out.zarr"
RAW = "/tmp/prof.txt"


def summarise(raw: str) -> None:
    """Share of the worker's samples by stage of the block task."""
    total, by = 0, Counter()
    with open(raw) as fh:
        lines = fh.read().splitlines()
    for line in lines:
        stack, n = line.rsplit(" ", 1)
        frames = stack.split(";")
        total += int(n)
        if any("_run_block" in f for f in frames):
            stage = next((name for key, name in (("search_batch", "search"), ("write_block", "write results"),
                                                 ("_read_queries", "read queries")) if any(key in f for f in frames)),
                         "other, in the block task")
        else:
            stage = "outside the task: " + frames[0][:60]
        by[stage] += int(n)
    for stage, n in by.most_common(8):
        print(f"{n / total:6.1%}  {stage}")


def main() -> None:
    for path in (OUT, OUT + ".partial"):
        shutil.rmtree(path, ignore_errors=True)
    with local_client(1) as client:
        pid = next(iter(client.run(os.getpid).values()))
        spy = subprocess.Popen(["py-spy", "record", "-p", str(pid), "-d", "50", "-f", "raw", "-o", RAW,
                                "--nonblocking"])
        batch.search(f"{WORK}/store", QUERIES, OUT, k=10, probes=32, client=client)
        spy.wait()
    summarise(RAW)


if __name__ == "__main__":
    main()
