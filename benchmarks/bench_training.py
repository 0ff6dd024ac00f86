"""Re-fit speed and routing quality of ``train()`` on wordnet-minilm (issue 10).

    # one run (a fresh interpreter per run keeps thread settings apart)
    python benchmarks/bench_training.py --threads 1
    python benchmarks/bench_training.py --threads 2 --busy --start warm-grow
    # every run of the grid, each in its own interpreter
    python benchmarks/bench_training.py --grid --label after
    # the code before issue 10, same script
    git worktree add /tmp/issue10-before 17360e4
    PYTHONPATH=/tmp/issue10-before python benchmarks/bench_training.py --grid --label before --starts cold

Each run trains the ECVH router (1,024 buckets) on a 100,000-row sample of the base, as a
store's re-fit does, and reports wall and CPU seconds per stage: ``knn`` (exact neighbours:
held-out truth, and anchors when epochs run), ``kmeans``, ``pca`` (the PCA basis that also
sizes LRSQ), ``holdout`` (the held-out metric, every call) and ``rest`` (epochs, probe
centroids, the sample: everything else). Stages are timed by wrapping the training
module's functions, so the same script times the old and the new code.

``--threads N`` pins torch (and OpenBLAS/OpenMP, through the environment of the run's
interpreter) to N threads; ``--threads 0`` lets ``train()`` choose (``TrainConfig.threads``
None). ``--busy`` keeps one core busy (``python -c 'while 1: pass'``) for the run and
kills it after. ``--start``: ``cold``; ``warm-same`` (init: a 1,024-bucket model trained on
another half of the base) or ``warm-grow`` (init: a 512-bucket model trained on half the
base, as a growth re-fit doubles the buckets); the init model's own training is not timed.

Routing quality, on the 10,000 held-out definitions against the whole base (106,697 rows),
keys from ``router.keys(base)`` and the router's own probe order: recall@10 and the mean
fraction of the base scanned at 8/16/32 probes, and the smallest scan reaching recall 0.90
and 0.95. ``holdout_scan`` is the training sample's own held-out figure (recall 0.90).
Writes JSON lines to ``--out`` and a markdown row per run to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PROBES = (8, 16, 32)
STAGES = ("knn", "kmeans", "pca", "holdout", "rest")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/datasets/wordnet-minilm")
    ap.add_argument("--bits", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads; 0: train() chooses")
    ap.add_argument("--busy", action="store_true", help="keep one core busy during the run")
    ap.add_argument("--start", default="cold", choices=("cold", "warm-same", "warm-grow"))
    ap.add_argument("--epochs", type=int, default=None, help="default: TrainConfig's")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a TrainConfig field for the timed fit (repeatable), e.g. kmeans_iters=5")
    ap.add_argument("--label", default="after")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid", action="store_true", help="run every (threads, busy, start) in its own interpreter")
    ap.add_argument("--grid-threads", default="1,2,0")
    ap.add_argument("--starts", default="cold,warm-same,warm-grow")
    ap.add_argument("--out", default="benchmarks/results/training.jsonl")
    args = ap.parse_args(argv)
    if args.grid:
        return grid(args)
    if args.threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            if os.environ.get(var) != str(args.threads):  # BLAS reads these at import: re-exec
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
                       "OPENBLAS_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
                os.execve(sys.executable, [sys.executable, *sys.argv], env)
    busy = subprocess.Popen([sys.executable, "-c", "while 1: pass"]) if args.busy else None
    try:
        if busy is not None:
            time.sleep(2.0)
        row = run(args)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(table([row]))
    return 0


def grid(args) -> int:
    rows = []
    for start in args.starts.split(","):
        for threads in [int(t) for t in args.grid_threads.split(",")]:
            for busy in (False, True):
                cmd = [sys.executable, __file__, "--data", args.data, "--bits", str(args.bits),
                       "--threads", str(threads), "--start", start, "--label", args.label,
                       "--seed", str(args.seed), "--out", args.out]
                cmd += ["--busy"] if busy else []
                cmd += ["--epochs", str(args.epochs)] if args.epochs is not None else []
                cmd += [a for kv in args.set for a in ("--set", kv)]
                print("$", " ".join(cmd[1:]), file=sys.stderr, flush=True)
                res = subprocess.run(cmd, check=False, capture_output=True, text=True)
                if res.returncode:
                    print(res.stderr, file=sys.stderr)
                    return res.returncode
                with open(args.out) as fh:
                    rows.append(json.loads(fh.readlines()[-1]))
    print(table(rows))
    return 0


class StageTimer:
    """Wall and CPU seconds spent in named module functions (wrapped in place)."""

    def __init__(self):
        self.wall = dict.fromkeys(STAGES, 0.0)
        self.cpu = dict.fromkeys(STAGES, 0.0)
        self.depth = 0

    def wrap(self, owner, name: str, stage: str) -> None:
        inner = getattr(owner, name)

        def timed(*a, **kw):
            if self.depth:  # nested in another timed stage: counted there
                return inner(*a, **kw)
            self.depth += 1
            w, c = time.perf_counter(), time.process_time()
            try:
                return inner(*a, **kw)
            finally:
                self.wall[stage] += time.perf_counter() - w
                self.cpu[stage] += time.process_time() - c
                self.depth -= 1

        setattr(owner, name, timed)


def run(args) -> dict:
    import torch

    import asteria_store
    from asteria_store.model import train as tm

    d = Path(args.data)
    base = np.load(d / "base.f16.npy").astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    queries = np.load(d / "queries_heldout.f16.npy").astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    truth = np.load(d / "gt_heldout_ids.npy")[:, :10].astype(np.int64)
    fields = tm.TrainConfig.__dataclass_fields__
    extra = {} if args.epochs is None else {"epochs": args.epochs}

    init = None
    if args.start != "cold":  # the model a store would hold before this re-fit
        half = np.random.default_rng(args.seed + 1).permutation(len(base))[: len(base) // 2]
        init_bits = args.bits if args.start == "warm-same" else args.bits - 1
        init, _ = tm.train(base[np.sort(half)], tm.TrainConfig(bits=init_bits, device="cpu", seed=args.seed + 1,
                                                                 **extra))
    if args.threads:
        torch.set_num_threads(args.threads)
        if "threads" in fields:
            extra["threads"] = args.threads
    elif "threads" in fields:
        extra["threads"] = None
    settings = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    cfg = tm.TrainConfig(bits=args.bits, device="cpu", seed=args.seed, **extra, **settings)
    timer = StageTimer()
    timer.wrap(tm, "exact_neighbours", "knn")
    timer.wrap(tm, "spherical_kmeans", "kmeans")
    timer.wrap(tm, "holdout_metric", "holdout")
    timer.wrap(torch.linalg, "eigh", "pca")
    lines: list[str] = []
    kwargs = {"init": init} if init is not None else {}
    uptime = os.getloadavg()
    w, c = time.perf_counter(), time.process_time()
    router, history = tm.train(base, cfg, log=lines.append, **kwargs)
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    timer.wall["rest"] = wall - sum(timer.wall.values())
    timer.cpu["rest"] = cpu - sum(timer.cpu.values())

    keys = router.keys(base).astype(np.int64)
    nb = 2**router.bits
    sizes = np.bincount(keys, minlength=nb)
    order = router.probe_order(queries, max(PROBES))
    quality = {}
    for p in PROBES:
        probed = np.zeros((len(queries), nb), dtype=bool)
        np.put_along_axis(probed, order[:, :p], True, axis=1)
        found = np.take_along_axis(probed, keys[truth], axis=1)
        quality[f"recall@10/{p}"] = round(float(found.mean()), 4)
        quality[f"scan/{p}"] = round(float((sizes[order[:, :p]].sum(1) / len(base)).mean()), 5)
    from asteria_store.model.metrics import fraction_for_recall, rows_to_reach

    reach = rows_to_reach(router.probe_scores(queries), keys, truth, nb)
    quality["scan_for_0.90"] = round(fraction_for_recall(reach, len(base), 0.90), 5)
    quality["scan_for_0.95"] = round(fraction_for_recall(reach, len(base), 0.95), 5)
    return {
        "label": args.label, "start": args.start, "threads": args.threads or "auto", "busy": args.busy,
        "bits": router.bits, "epochs": cfg.epochs, "settings": settings, "wall": round(wall, 2), "cpu": round(cpu, 2),
        "stage_wall": {k: round(v, 2) for k, v in timer.wall.items()},
        "stage_cpu": {k: round(v, 2) for k, v in timer.cpu.items()},
        "holdout_scan": router.info.get("holdout_scan"), **quality,
        "threads_used": router.info.get("threads"), "loadavg_at_start": [round(v, 2) for v in uptime],
        "history": history, "log": lines, "torch": torch.__version__,
        "asteria_store": str(Path(asteria_store.__file__).parent), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def table(rows: list[dict]) -> str:
    head = ("| code | start | threads | busy | epochs | wall s | CPU s | "
            + " | ".join(f"{s} wall/CPU" for s in STAGES)
            + " | held-out scan | " + " | ".join(f"R@10 / scan, {p} probes" for p in PROBES) + " |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        stages = " | ".join(f"{r['stage_wall'][s]:.1f} / {r['stage_cpu'][s]:.1f}" for s in STAGES)
        quality = " | ".join(f"{r[f'recall@10/{p}']:.4f} / {r[f'scan/{p}']:.2%}" for p in PROBES)
        lines.append(f"| {r['label']} | {r['start']} | {r['threads']} | {'yes' if r['busy'] else 'no'} | "
                     f"{r['epochs']} | {r['wall']:.1f} | {r['cpu']:.1f} | {stages} | {r['holdout_scan']:.2%} | "
                     f"{quality} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
