"""A/B of plain ingest speed between two checkouts: ``--n``-row ingests (rows 9M.. of the
growth data) into a fresh float16 store made from a saved model file (a model-file store
neither re-fits nor splits, so no upkeep runs), alternating the variants each round, each
in its own interpreter importing its worktree (``PYTHONPATH``, run from /tmp).

    git worktree add /work/wtA <old commit>; git worktree add /work/wtB <new commit>
    python -c "import asteria_store; from asteria_store.model.persist import save_model_file; \
        s = asteria_store.open(STORE, readonly=True); save_model_file(s.router, 'tree.pt')"
    python benchmarks/ingest_ab.py --model tree.pt --variants A=/work/wtA,B=/work/wtB --rounds 4
"""
import argparse, json, os, shutil, subprocess, sys, time
CHILD = r'''
import sys, time, numpy as np, shutil
import asteria_store
base = np.load("/tmp/asteria-bench/growth-10m/base.f16.npy", mmap_mode="r")
n = int(sys.argv[2]); x = np.array(base[9_000_000:9_000_000 + n])
path = sys.argv[3]; shutil.rmtree(path, ignore_errors=True)
with asteria_store.create(path, dim=384, dtype="float16", model=sys.argv[1]) as s:
    t = time.perf_counter(); s.ingest(x); dt = time.perf_counter() - t
print(asteria_store.__file__, n, dt, n / dt)
'''
ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True); ap.add_argument("--variants", required=True)
ap.add_argument("--rounds", type=int, default=3); ap.add_argument("--n", type=int, default=100_000)
a = ap.parse_args()
variants = dict(v.split("=") for v in a.variants.split(","))
res = {k: [] for k in variants}
for r in range(a.rounds):
    for name, tree in variants.items():
        env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="2")
        out = subprocess.run([sys.executable, "-c", CHILD, a.model, str(a.n), f"/tmp/prof/store-{name}"],
                             env=env, capture_output=True, text=True, cwd="/tmp")
        line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-500:]
        print(name, line, flush=True)
        res[name].append(float(line.split()[-1]))
import statistics
for k, v in res.items():
    print(k, "median rows/s", round(statistics.median(v)), [round(x) for x in v])
