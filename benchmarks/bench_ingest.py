"""Streaming-ingest benchmark: ingest rate and peak resident memory of a big .npy file.

    python benchmarks/bench_ingest.py --rows 2000000 --dim 384 --workdir /tmp/asteria-bench [--router sign]

Generates (once, cached in --workdir) a clustered float32 .npy file of rows x dim, then
ingests it into a fresh store in a child process and reports that child's peak RSS
(``VmHWM``), the wall time and the ingest rate. The child is separate so the figure is
the ingest's own memory, not the generator's. One JSON line per run is appended to
``--out`` (default benchmarks/results/ingest.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, sys, time
import asteria_store

def peak_rss_kib():
    # VmHWM is this process image's own high-water mark (ru_maxrss would inherit the
    # parent's peak across fork+exec).
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

path, npy, rows, dim, router = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
rss0 = peak_rss_kib()
t0 = time.perf_counter()
with asteria_store.create(path, dim=dim, expected_size=rows, router=router) as store:
    res = store.ingest(npy, progress=True)
    t1 = time.perf_counter()
    report = store.verify()
rss = peak_rss_kib()
print(json.dumps({"rows": res.rows, "ingest_s": t1 - t0, "peak_rss_mib": rss / 1024, "router": router,
                  "trained": res.trained, "train_s": res.train_seconds,
                  "rss_after_import_mib": rss0 / 1024, "verify_ok": report.ok}))
"""


def make_file(path: Path, rows: int, dim: int, *, clusters: int = 1000, seed: int = 0) -> None:
    """A clustered float32 .npy of rows x dim, written block by block (bounded memory)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    tmp = path.with_suffix(".partial.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, dim))
    for start in range(0, rows, 65536):
        m = min(65536, rows - start)
        x = centres[rng.integers(0, clusters, m)]
        x = x + rng.standard_normal((m, dim)).astype(np.float32) * np.float32(0.6 / np.sqrt(dim))
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    del out
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--workdir", default="/tmp/asteria-bench")
    ap.add_argument("--router", choices=["learned", "sign"], default="learned",
                    help="learned: the ingest trains the model on a 100k sample first")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ingest.jsonl"))
    args = ap.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    npy = work / f"clustered_{args.rows}x{args.dim}.npy"
    if not npy.exists():
        t = time.perf_counter()
        make_file(npy, args.rows, args.dim)
        print(f"generated {npy} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    store = work / "ingest-store"
    shutil.rmtree(store, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(store), str(npy), str(args.rows), str(args.dim), args.router],
                          check=True, stdout=subprocess.PIPE, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result.update(
        dim=args.dim,
        file_gib=npy.stat().st_size / 2**30,
        vectors_per_s=result["rows"] / result["ingest_s"],
        store_gib=sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 2**30,
        machine=f"{platform.machine()} {os.cpu_count()} cores",
        date=time.strftime("%Y-%m-%d"),
    )
    print(json.dumps(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as fh:
        fh.write(json.dumps(result) + "\n")
    shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main()
