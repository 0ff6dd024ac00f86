"""Write a generated clustered data set for the scale benchmarks: base and held-out queries.

    python benchmarks/make_clustered.py --n 1000000 --dim 384 --queries 10000 \\
        --out /tmp/asteria-bench/clustered-1m

``asteria_store.testing.clustered_vectors`` (seeded): unit vectors around ``--clusters``
random unit centres with Gaussian offsets of norm ``--spread`` (0.6: members of a cluster
have cosine ~0.73 to each other, ~0 to other clusters). Queries are further draws from the
same clusters, none in the base. Writes ``base.npy`` (n, dim) and ``queries.npy`` float32;
the exact ground truth is left to the benchmark (``compare.py`` without ``--gt``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from asteria_store.testing import clustered_vectors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--spread", type=float, default=0.6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = clustered_vectors(args.n + args.queries, args.dim, clusters=args.clusters, spread=args.spread,
                             seed=args.seed)
    np.save(out / "base.npy", data[: args.n])
    np.save(out / "queries.npy", data[args.n :])
    print(f"wrote {out / 'base.npy'} {data[: args.n].shape} and {out / 'queries.npy'} {data[args.n :].shape}")


if __name__ == "__main__":
    main()
