"""Where a batch job's one Dask worker spends its time: py-spy samples the worker process
for 50 s while it searches 200k queries (the bench_batch.py work files must exist).

    python benchmarks/profile_batch_worker.py   # raw samples in /tmp/prof.txt
"""
import os, sys, subprocess, time
from asteria_store.batch.cluster import local_client
from asteria_store import batch
import shutil
def main():
    out = "/tmp/prof_out.zarr"
    shutil.rmtree(out, ignore_errors=True); shutil.rmtree(out + ".partial", ignore_errors=True)
    with local_client(1) as client:
        pid = list(client.run(os.getpid).values())[0]
        p = subprocess.Popen(["py-spy", "record", "-p", str(pid), "-d", "50", "-f", "raw", "-o", "/tmp/prof.txt", "--nonblocking"])
        batch.search("/tmp/asteria-bench/batch/store", "/tmp/asteria-bench/batch/queries-200000-seed0-noise0.4.f16.npy", out, k=10, probes=32, client=client)
        p.wait()
if __name__ == "__main__":
    main()
