"""Recall of a tree store against the coarse cells its probes expand (``tree.MIN_PROBE_CELLS``).

    python benchmarks/bench_probe_cells.py /tmp/asteria-bench/s3m/oneshot-3000000 \\
        --data /tmp/asteria-bench/growth-10m --n 3000000 --cells 8,16,32 --probes 8,12

For each setting: recall@10 of the ``gt_{n}`` queries when every probed row is rescored
exactly (``rerank`` larger than any probe's rows: what certified search finds), the
cells expanded, and the wall time of the batch (warm-up included in the first). One
JSON line per setting. The store must be routed by a tree.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--data", required=True, help="folder written by growth_data.py (queries, gt_{n}_ids.npy)")
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--cells", default="8,16,32", help="MIN_PROBE_CELLS values to try")
    ap.add_argument("--probes", default="8,12")
    a = ap.parse_args()

    import asteria_store
    from asteria_store.model import tree as treemod

    queries = np.load(Path(a.data) / "queries.f16.npy").astype(np.float32)
    truth = np.load(Path(a.data) / f"gt_{a.n}_ids.npy")[:, :10]
    with asteria_store.open(a.store, readonly=True) as store:
        router = store.router
        if router.kind != "tree":
            raise SystemExit(f"{a.store} is routed by a {router.kind} model, not a tree")
        for cells in (int(c) for c in a.cells.split(",")):
            treemod.MIN_PROBE_CELLS = cells
            for probes in (int(p) for p in a.probes.split(",")):
                t = time.perf_counter()
                ids, _ = store.search(queries, 10, probes=probes, rerank=1_000_000)
                seconds = time.perf_counter() - t
                recall = float(np.mean([len(set(i) & set(g)) / 10 for i, g in zip(ids, truth)]))
                print(json.dumps({"n": a.n, "coarse_cells": router.n_cells, "leaves": router.n_buckets,
                                  "min_probe_cells": cells, "probes": probes,
                                  "cells_expanded": router.cells_for(probes), "recall@10": round(recall, 4),
                                  "seconds": round(seconds, 2)}), flush=True)


if __name__ == "__main__":
    main()
