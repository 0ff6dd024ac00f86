"""Smoke speed test on generated clustered data: ingest (with training), batch and
one-query search, recall@10 against brute force.

    python benchmarks/synthetic_speed.py --n 200000 --dim 128 --queries 1000

Seeded clustered vectors (``asteria_store.testing.clustered_vectors``, 1,000 centres) and
held-out queries drawn from the same clusters; a fresh learned store in a temporary
directory; BLAS and torch on one thread. Prints one JSON line per probe budget and a
markdown table; appends the JSON lines to --out.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--probes", default="8,16,32,64")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "synthetic.jsonl"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    import asteria_store
    from asteria_store.testing import brute_force_topk, clustered_vectors, recall_at_k

    data = clustered_vectors(args.n + args.queries, args.dim, clusters=1000, seed=args.seed)
    base, queries = data[: args.n], data[args.n :]
    truth, _ = brute_force_topk(base, queries, 10)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, \
            asteria_store.create(Path(tmp) / "store", dim=args.dim, expected_size=args.n, seed=args.seed) as store:
        t = time.perf_counter()
        res = store.ingest(base)
        ingest_s = time.perf_counter() - t
        meta = {"n": args.n, "dim": args.dim, "buckets": 2 ** store.router.bits, "ingest_s": round(ingest_s, 2),
                "train_s": round(res.train_seconds, 2), "threads": 1,
                "machine": f"{platform.machine()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
        for probes in [int(p) for p in args.probes.split(",")]:
            store.search(queries[:20], 10, probes=probes)
            t = time.perf_counter()
            ids, _ = store.search(queries, 10, probes=probes)
            batch_s = time.perf_counter() - t
            lat = []
            for v in queries[:200]:
                t0 = time.perf_counter()
                store.query(v, 10, probes=probes)
                lat.append(time.perf_counter() - t0)
            lat = np.array(lat) * 1000
            rows.append({**meta, "probes": probes, "batch_qps": round(len(queries) / batch_s),
                         "p50_ms": round(float(np.percentile(lat, 50)), 3),
                         "p99_ms": round(float(np.percentile(lat, 99)), 3),
                         "recall@10": round(recall_at_k(ids, truth, 10), 4)})
    for r in rows:
        print(json.dumps(r))
    print(f"\n{args.n:,} x {args.dim} clustered, {meta['buckets']} buckets; ingest {meta['ingest_s']} s "
          f"(training {meta['train_s']} s)\n")
    print("| probes | batch QPS | p50 ms | p99 ms | recall@10 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['probes']} | {r['batch_qps']:,} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['recall@10']:.3f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
