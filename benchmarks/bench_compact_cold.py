"""compact() of a store that is not in the page cache: seconds and bytes read.

    python benchmarks/bench_compact_cold.py --store /tmp/asteria-bench/stores3m/grown \\
        --work /tmp/asteria-bench/ab-compact --dense-span 4,0,0,4

For each value of ``--dense-span`` (in turn): the store is copied to ``--work``, evicted
from the page cache, opened and compacted, and the copy removed. ``--dense-span`` sets
``storage.segments._DENSE_SPAN``: 0 turns off the span requests of dense gathers (every
page of a merge's reads faults in alone), the default (4) is what the store does.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time

from harness import AnonPeak

from asteria_store.testing.pagecache import evict, read_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--work", required=True, help="where the copy is compacted (removed after)")
    ap.add_argument("--dense-span", default="4,0")
    a = ap.parse_args()
    import asteria_store
    from asteria_store.storage import segments

    for dense in [int(v) for v in a.dense_span.split(",")]:
        segments._DENSE_SPAN = dense
        shutil.rmtree(a.work, ignore_errors=True)
        subprocess.run(["cp", "-r", a.store, a.work], check=True)
        evict(a.work)
        with asteria_store.open(a.work) as s:
            r0, t = read_bytes(), time.perf_counter()
            with AnonPeak() as anon:
                s.compact()
            print(f"dense_span={dense} compact {s.info()['count']:,} rows: {time.perf_counter() - t:.1f} s, "
                  f"read {(read_bytes() - r0) / 2**30:.2f} GiB, anon peak {anon.mib:,.0f} MiB", flush=True)
        shutil.rmtree(a.work)


if __name__ == "__main__":
    main()
