"""Encoding speed of the learned model on ONE CPU core: bucket keys and LRSQ codes.

    python benchmarks/bench_encode.py --rows 1000000 --model-dir /tmp/asteria-bench/model

Trains (once, cached in --model-dir) the default learned model on the wordnet-minilm base,
then encodes --rows vectors of dimension 384 (the wordnet base tiled with small seeded
noise, L2-normalised) in blocks of 16,384 rows, as ingest does: bucket keys (rotation,
margins, soft decoding) and LRSQ codes. BLAS and torch are pinned to one thread before
numpy is imported. Appends one JSON line to --out.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--data", default="../shared/datasets/wordnet-minilm")
    ap.add_argument("--model-dir", default="/tmp/asteria-bench/encode-model")
    ap.add_argument("--bits", type=int, default=None, help="default: sized for --rows (~128 per bucket, capped by the sample)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "encode.jsonl"))
    args = ap.parse_args()

    import torch

    from asteria_store.model.persist import load_router, save_router
    from asteria_store.model.train import TrainConfig, train

    base = np.load(Path(args.data) / "base.f16.npy").astype(np.float32)
    model_dir = Path(args.model_dir)
    if not (model_dir / "router.json").exists():
        torch.set_num_threads(os.cpu_count() or 1)  # training is not what is measured here
        t = time.perf_counter()
        router, _ = train(base, TrainConfig(bits=args.bits, expected_size=args.rows, device="cpu"))
        print(f"trained in {time.perf_counter() - t:.1f} s", flush=True)
        save_router(router, model_dir)
    router = load_router(model_dir)
    torch.set_num_threads(1)

    rng = np.random.default_rng(0)
    block = 16384
    t_keys = t_lrsq = 0.0
    done = 0
    while done < args.rows:
        m = min(block, args.rows - done)
        x = base[rng.integers(0, len(base), m)] + rng.standard_normal((m, base.shape[1]), dtype=np.float32) * 0.01
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        t0 = time.perf_counter()
        router.keys(x)
        t1 = time.perf_counter()
        router.lrsq.encode(router.rotate(x))
        t2 = time.perf_counter()
        t_keys += t1 - t0
        t_lrsq += t2 - t1
        done += m
    result = {
        "rows": args.rows, "dim": base.shape[1], "buckets": 2**router.bits, "rank": router.lrsq.rank,
        "keys_s": round(t_keys, 2), "lrsq_s": round(t_lrsq, 2), "total_s": round(t_keys + t_lrsq, 2),
        "keys_per_s": round(args.rows / t_keys), "threads": 1,
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as fh:
        fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
