"""What a cold query reads, file by file: evict a store from the page cache, open it, and
for each of the first ``--queries`` queries report the bytes this process read from storage
(``/proc/self/io``) and how many bytes of each kind of store file became resident
(``fincore``, util-linux) during that query.

    python benchmarks/cold_reads_by_file.py --store /tmp/asteria-bench/stores3m/grown \\
        --queries /tmp/asteria-bench/growth-3m/queries.f16.npy --probes 8

Files are grouped as ``model``, ``catalog.lmdb``, and ``seg/<array>`` (all segments). One
query runs before the eviction so that libraries and the compiled query path are loaded.
Prints one JSON line per query.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import numpy as np

from asteria_store.testing.pagecache import evict, read_bytes


def resident(store: Path) -> dict[str, int]:
    files = [str(p) for p in store.rglob("*") if p.is_file()]
    out = subprocess.run(["fincore", "-b", "-n", "-o", "RES,FILE", *files], capture_output=True, text=True,
                         check=True).stdout
    total: dict[str, int] = {}
    for line in out.splitlines():
        res, name = line.split(None, 1)
        parts = Path(name).relative_to(store).parts
        key = f"seg/{parts[2]}" if parts[0] == "segments.zarr" and len(parts) > 2 else parts[0]
        total[key] = total.get(key, 0) + int(res)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--queries", required=True)
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--n", type=int, default=6, help="cold queries")
    a = ap.parse_args()
    import asteria_store

    store = Path(a.store)
    q = np.load(a.queries).astype(np.float32)
    with asteria_store.open(store, readonly=True) as s:
        s.query(q[0], 10, probes=a.probes)
    evict(store)
    r0 = read_bytes()
    s = asteria_store.open(store, readonly=True)
    print(json.dumps({"phase": "open", "kib_read": (read_bytes() - r0) // 1024}))
    for i in range(1, a.n + 1):
        before, r0 = resident(store), read_bytes()
        _, _, stats = s.query(q[i], 10, probes=a.probes, explain=True)
        after = resident(store)
        print(json.dumps({"query": i, "kib_read": (read_bytes() - r0) // 1024,
                          "kib_searchstats": stats["bytes_read"] // 1024,
                          "kib_resident_by_file": {k: (after[k] - before.get(k, 0)) // 1024 for k in after
                                                   if after[k] != before.get(k, 0)}}))
    s.close()


if __name__ == "__main__":
    main()
