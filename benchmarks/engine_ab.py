"""Batch QPS and one-query latency of whichever asteria_store is importable: run it once
per version to compare engines on the same store and queries.

    python benchmarks/engine_ab.py --store /tmp/asteria-bench/wordnet-store \\
        --queries ../shared/datasets/wordnet-minilm/queries_heldout.f16.npy \\
        --gt ../shared/datasets/wordnet-minilm/gt_heldout_ids.npy --probes 32

    # an older engine: a worktree of that commit first on the path
    git worktree add /tmp/before 5cb1865
    PYTHONPATH=/tmp/before python benchmarks/engine_ab.py ...

One thread (BLAS, torch and the search's own). Batch: ``--nq`` queries in one
``Store.search`` call, once untimed, then the median of ``--repeat`` calls. One query:
``Store.query`` over the first ``--single`` queries, once untimed, then p50/p99 of a second
pass. Recall@10 of the batch against the exact ids, and the process's anonymous memory at the
end. Prints one JSON line.
"""

from __future__ import annotations

import os

from harness import pin_threads_from_argv

pin_threads_from_argv()  # one thread, before numpy is imported

import argparse
import json
import subprocess
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--queries", required=True)
    ap.add_argument("--gt", required=True)
    ap.add_argument("--probes", type=int, default=32)
    ap.add_argument("--nq", type=int, default=2000)
    ap.add_argument("--single", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--kernel", choices=("f32", "bf16"), default=None,
                    help="the batch path's scoring kernel (default: the store's choice for this CPU)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    import asteria_store
    from asteria_store.testing import recall_at_k

    q = np.load(args.queries)[: args.nq].astype(np.float32)
    gt = np.load(args.gt)[: args.nq, : args.k]
    store = asteria_store.open(args.store, readonly=True)
    opts = {"probes": args.probes}
    if "threads" in store.search.__code__.co_varnames:  # engines before issue 12 had none
        opts["threads"] = 1
    if args.kernel:
        opts["kernel"] = args.kernel
    ids, _ = store.search(q, args.k, **opts)
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        ids, _ = store.search(q, args.k, **opts)
        times.append(time.perf_counter() - t0)
    recall = recall_at_k(ids, gt, args.k)
    lat = []
    for rep in range(2):
        for v in q[: args.single]:
            t0 = time.perf_counter()
            store.query(v, args.k, probes=args.probes)
            if rep:
                lat.append(time.perf_counter() - t0)
    root = os.path.dirname(os.path.dirname(os.path.abspath(asteria_store.__file__)))
    commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, check=False,
                            text=True).stdout.strip()
    print(json.dumps({"engine": commit, "queries": os.path.basename(args.queries), "probes": args.probes,
                      "batch_qps": round(args.nq / float(np.median(times))), "recall@10": round(recall, 4),
                      "p50_ms": round(1e3 * float(np.median(lat)), 3),
                      "p99_ms": round(1e3 * float(np.percentile(lat, 99)), 3),
                      "kernel": args.kernel or store.info()["kernel"], "anon_mib": _anon_mib()}))


def _anon_mib() -> int | None:
    """This process's anonymous resident memory (Linux), MiB."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


if __name__ == "__main__":
    main()
