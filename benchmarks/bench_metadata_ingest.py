"""What metadata columns cost an ingest: the same rows with and without 5 columns,
alternating, into stores that share one model file (no training in the timed ingest).

    python benchmarks/bench_metadata_ingest.py --rounds 3 \\
        --attributes /tmp/asteria-bench/wordnet-base/attributes.parquet

Columns: the wordnet attributes bench_filter.py derives (pos, lexfile, length), plus
first_letter (string) and is_long (bool); without ``--attributes``, seeded stand-ins of
the same kinds. Prints one JSON line per ingest and a summary with medians.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import asteria_store

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "wordnet-minilm"


def columns(n: int, attributes: str | None) -> pa.Table:
    if attributes:
        t = pq.read_table(attributes).select(["pos", "lexfile", "length"]).slice(0, n)
    else:
        rng = np.random.default_rng(0)
        t = pa.table({"pos": rng.choice(["noun", "verb", "adj", "adv"], n), "lexfile": rng.choice(
            [f"noun.x{i}" for i in range(45)], n), "length": rng.integers(5, 200, n)})
    texts = t.column("lexfile").to_pylist()
    return t.append_column("first_letter", pa.array([s[0] if s else None for s in texts])) \
        .append_column("is_long", pc.greater(t.column("length"), 80))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--attributes", default=None, help="parquet of pos, lexfile, length per base row")
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default="docs/results/metadata_ingest.jsonl")
    a = ap.parse_args()
    base = np.load(DATA / "base.f16.npy").astype(np.float32)
    meta = columns(len(base), a.attributes)
    work = Path(a.work or tempfile.mkdtemp(prefix="meta-ingest-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model.pt"
    if not model.exists():
        asteria_store.train_model(base, save=model, dim=base.shape[1], metric="cosine", epochs=1)
    rows = []
    with open(a.out, "w") as out:
        for r in range(a.rounds):
            for with_meta in ((False, True) if r % 2 == 0 else (True, False)):
                path = work / f"s-{r}-{int(with_meta)}"
                shutil.rmtree(path, ignore_errors=True)
                with asteria_store.create(path, dim=base.shape[1], model=model) as s:
                    t = time.perf_counter()
                    s.ingest(base, metadata=meta if with_meta else None)
                    seconds = time.perf_counter() - t
                    row = {"round": r, "metadata": with_meta, "rows": len(base), "seconds": round(seconds, 3),
                           "rows_per_s": round(len(base) / seconds), "disk_bytes": s.info()["disk_bytes"]}
                shutil.rmtree(path, ignore_errors=True)
                print(json.dumps(row), flush=True)
                out.write(json.dumps(row) + "\n")
                rows.append(row)
    med = {m: statistics.median(x["seconds"] for x in rows if x["metadata"] == m) for m in (False, True)}
    disk = {m: next(x["disk_bytes"] for x in rows if x["metadata"] == m) for m in (False, True)}
    print(f"median ingest: {med[False]:.2f} s without, {med[True]:.2f} s with 5 columns "
          f"({med[True] / med[False]:.2f}x); disk {disk[False]:,} vs {disk[True]:,} bytes "
          f"(+{100 * (disk[True] / disk[False] - 1):.1f}%)")


if __name__ == "__main__":
    main()
