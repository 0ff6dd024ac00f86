"""Power cuts under a random workload: the store on the power-cut filesystem
(asteria_store/testing/powercut.py), cut just before its syncs and after acknowledged
operations; every crash image is opened and checked.

    python benchmarks/powerloss.py --ops 60 --every 2 --seed 0 --out docs/results/powerloss.jsonl
    python benchmarks/powerloss.py --ops 30 --router tree --out docs/results/powerloss_tree.jsonl

Workload (public API, seeded): ingests (explicit ids, metadata column "n"), upserts,
deletes, compactions, retrains, on a learned store that trains, re-fits and merges as it
grows; ``--router tree`` sizes it as the crasher's tree store (~32-row buckets), so ingests
split buckets. Before each operation the filesystem is told to write a crash image before every
``--every``-th sync: such an image may hold the state before the operation or after it,
nothing else. After each operation one more image is cut: it must hold the operation.
Each image must open, verify, hold exactly an allowed state's ids, vectors and
metadata, and an exact search must return exactly those ids. Prints a summary (cuts,
what they lost, violations) and writes one JSON line per image.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

import asteria_store
from asteria_store.testing import clustered_vectors
from asteria_store.testing.powercut import check_image, mount

DIM = 16


def normalised(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", type=int, default=60)
    ap.add_argument("--every", type=int, default=2, help="cut before every N-th sync")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default="docs/results/powerloss.jsonl")
    ap.add_argument("--router", choices=["learned", "tree"], default="learned")
    a = ap.parse_args()
    if a.router == "tree":
        from crasher import small_tree_sizing  # benchmarks/crasher.py: this script's folder

        small_tree_sizing()
    rng = np.random.default_rng(a.seed)
    work = Path(a.work or tempfile.mkdtemp(prefix="powerloss-"))
    shutil.rmtree(work, ignore_errors=True)
    (work / "mnt").mkdir(parents=True)
    pool = clustered_vectors(20000, DIM, clusters=40, seed=a.seed)
    state: dict[int, tuple] = {}
    next_id, images, kinds, splits = 0, [], Counter(), 0
    started = time.perf_counter()
    with mount(work / "mnt") as fs:
        store = asteria_store.create(work / "mnt" / "store", dim=DIM, chunk_rows=256)
        for i in range(a.ops):
            if not state or next_id < 1500:
                op = "ingest"
            else:
                op = str(rng.choice(["ingest", "ingest", "upsert", "delete", "compact", "train"], p=[.3, .2, .2, .15, .1, .05]))
            before = dict(state)
            fs.cut_before_syncs(work / f"op-{i:03d}", every=a.every, seed=a.seed * 1000 + i)
            if op == "ingest":
                n = int(rng.integers(50, 600))
                ids = np.arange(next_id, next_id + n)
                x = pool[rng.integers(0, len(pool), n)] * rng.uniform(0.9, 1.1)
                splits += bool(store.ingest(x, ids=ids, metadata={"n": ids * 7}).split_rows)
                next_id += n
                state.update({int(k): (v, int(k) * 7) for k, v in zip(ids, normalised(x))})
            elif op == "upsert":
                ids = rng.choice(sorted(state), size=min(30, len(state)), replace=False)
                x = pool[rng.integers(0, len(pool), len(ids))]
                store.upsert(x, ids=ids, metadata={"n": ids * 11})
                state.update({int(k): (v, int(k) * 11) for k, v in zip(ids, normalised(x))})
            elif op == "delete":
                ids = rng.choice(sorted(state), size=min(40, len(state) - 1), replace=False)
                store.delete(ids)
                for k in ids.tolist():
                    del state[k]
            elif op == "compact":
                store.compact()
            else:
                store.train(epochs=1, seed=i)
            during = fs.cut_before_syncs(None)
            for line in during:
                image, synced, counts = line.split(" ", 2)
                images.append((image, op, "before a sync of " + synced, [before, dict(state)], json.loads(counts)))
            after = work / f"after-{i:03d}"
            counts = fs.cut(after, a.seed * 1000 + i)
            images.append((str(after), op, "after it returned", [dict(state)], counts))
            kinds[op] += 1
            print(f"op {i} {op}: {len(state)} live, {len(during)} cuts before its syncs", flush=True)
        store.close()
    violations, lost = 0, Counter()
    with open(a.out, "w") as out:
        for path, op, when, allowed, counts in images:
            problems = check_image(Path(path) / "store", allowed)
            violations += bool(problems)
            lost["cuts that dropped file writes"] += counts["writes_dropped"] > 0
            lost["cuts that tore a write"] += counts["writes_torn"] > 0
            lost["cuts that undid directory entries"] += counts["entries_undone"] > 0
            lost["cuts that lost nothing"] += not (counts["writes_dropped"] or counts["entries_undone"])
            where = when.split(" of ")[-1].split("/")[2] if " of " in when else "after"
            lost[f"cut at: {where}"] += 1
            out.write(json.dumps({"image": Path(path).name, "op": op, "when": when, "lost": counts,
                                  "problems": problems}) + "\n")
            if problems:
                print("VIOLATION", path, op, when, problems, flush=True)
    print(json.dumps({"router": a.router, "splits": splits, "ops": dict(kinds), "cuts": len(images), "before_syncs": sum(1 for i in images if "sync" in i[2]),
                      "after_ops": sum(1 for i in images if "after" in i[2]), "violations": violations,
                      "losses": dict(lost), "seconds": round(time.perf_counter() - started, 1)}))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
