"""The first query of a new filter against the next one, on a store bench_filter.py built
(the filtered runs there are warm: a handle keeps its last few filters' matching rows).

    python benchmarks/bench_filter_first_query.py /tmp/asteria-bench/filter2/asteria-meta

One fresh process per run: its first filter also pays DuckDB's import. Prints JSON lines.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

import asteria_store

FILTERS = ["pos = 'noun' AND length > 40", "lexfile = 'noun.artifact'", "lexfile = 'verb.social'",
           "pos = 'verb' AND length > 105"]
QUERIES = Path(__file__).resolve().parents[2] / "shared/datasets/wordnet-minilm/queries_heldout.f16.npy"


def main() -> None:
    s = asteria_store.open(sys.argv[1], readonly=True)
    q = np.load(QUERIES)[:50].astype(np.float32)
    s.query(q[0], 10, probes=32)  # the compiled path loaded: what is left is the filter's
    for sql in FILTERS:
        t = time.perf_counter()
        s.query(q[1], 10, where=sql, probes=32)
        first = time.perf_counter() - t
        t = time.perf_counter()
        s.query(q[2], 10, where=sql, probes=32)
        second = time.perf_counter() - t
        print(json.dumps({"filter": sql, "first_query_ms": round(first * 1000, 2),
                          "next_query_ms": round(second * 1000, 2)}))
    lat = []
    for v in q:
        t = time.perf_counter()
        s.query(v, 10, probes=32)
        lat.append(time.perf_counter() - t)
    print(json.dumps({"unfiltered_p50_ms_probes32": round(float(np.median(lat)) * 1000, 3)}))


if __name__ == "__main__":
    main()
