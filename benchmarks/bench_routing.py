"""Routing quality on real embeddings: recall@10 against the fraction of the base scanned.

    python benchmarks/bench_routing.py --data ../shared/datasets/wordnet-minilm --bits 10

For the same number of buckets (2**bits), every router sends each base vector to one bucket
and ranks all buckets for each query (soft cost / centroid similarity). Probing buckets in
that order, a true neighbour is found once its bucket has been read; the script reports the
recall@10 reached when scanning 1/2/5/10% of the base, the fraction needed for recall 0.90
and 0.95 (one fixed budget for all queries) and bucket occupancy, for:

  (a) sign-random   random orthogonal rotation + sign bits (the baseline router)
  (b) sign-pca-itq  PCA + ITQ rotation + sign bits
  (c) ecvh-noecc    learned ECVH without a code (learned sign hashing, trained)
  (d) ecvh-ecc      learned ECVH with the full Hadamard code (trained; the store's default)
  (e) kmeans        spherical k-means cells of the same count (the IVF reference)

(c) and (d) are each reported twice from ONE trained model: probing by soft cost
(``/softcost``) and by the mean direction of each bucket's training vectors, home bucket
first (the default, ``probe_means=True``).

Training uses the base itself (the store trains on a sample of what it ingests); queries
are the two shipped query sets, so neither set is seen in training. Writes JSON lines to
``--out`` (default benchmarks/results/routing.jsonl), a markdown table to stdout, and with
``--plot`` a recall-vs-scan PNG.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from asteria_store.model.ecvh import ECVHRouter
from asteria_store.model.metrics import fraction_for_recall, occupancy, recall_at_fractions, rows_to_reach
from asteria_store.model.router import SignHasher, sign_soft_cost_scores
from asteria_store.model.train import TrainConfig, itq, spherical_kmeans, train

FRACTIONS = (0.01, 0.02, 0.05, 0.10)


def sign_keys(z: np.ndarray) -> np.ndarray:
    return ((z > 0).astype(np.int64) << np.arange(z.shape[1])).sum(1)


def evaluate(name: str, base_keys, query_sets, n_buckets: int, seconds: float, extra=None) -> dict:
    row = {"router": name, "buckets": n_buckets, "fit_seconds": round(seconds, 2),
           **occupancy(base_keys, n_buckets), **(extra or {})}
    for qname, (scores, truth) in query_sets.items():
        reach = rows_to_reach(scores, base_keys, truth, n_buckets)
        n = len(base_keys)
        row[qname] = {
            **{f"recall@{int(f * 100)}%": round(v, 4) for f, v in recall_at_fractions(reach, n, FRACTIONS).items()},
            "scan_for_0.90": round(fraction_for_recall(reach, n, 0.90), 4),
            "scan_for_0.95": round(fraction_for_recall(reach, n, 0.95), 4),
            "curve": [(round(f, 4), round(recall_at_fractions(reach, n, (f,))[f], 4))
                      for f in np.geomspace(0.002, 0.5, 40)],
        }
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/datasets/wordnet-minilm")
    ap.add_argument("--bits", type=int, default=10)
    ap.add_argument("--queries", type=int, default=2000, help="queries per set (first N)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--routers", default="sign-random,sign-pca-itq,ecvh-noecc,ecvh-ecc,kmeans")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/routing.jsonl")
    ap.add_argument("--plot", default=None, help="PNG path for the recall-vs-scan plot")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    d = Path(args.data)
    base = np.load(d / "base.f16.npy").astype(np.float32)
    sets = {}
    for qname in ("examples", "heldout"):
        q = np.load(d / f"queries_{qname}.f16.npy")[: args.queries].astype(np.float32)
        gt = np.load(d / f"gt_{qname}_ids.npy")[: args.queries, :10].astype(np.int64)
        sets[qname] = (q, gt)
    bits, nb = args.bits, 2**args.bits
    wanted = args.routers.split(",")
    rows = []
    meta = {"data": d.name, "n_base": len(base), "queries": args.queries, "bits": bits,
            "threads": args.threads, "machine": platform.machine(), "torch": torch.__version__,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}

    if "sign-random" in wanted:
        t = time.perf_counter()
        r = SignHasher.random(base.shape[1], bits, seed=args.seed)
        keys = sign_keys(r.margins(base))
        secs = time.perf_counter() - t
        rows.append(evaluate("sign-random", keys, {k: (sign_soft_cost_scores(r.margins(q)), gt)
                                                   for k, (q, gt) in sets.items()}, nb, secs))
    if "sign-pca-itq" in wanted:
        t = time.perf_counter()
        x = torch.from_numpy(base)
        evals, evecs = torch.linalg.eigh((x.T @ x).double() / len(x))
        pca = evecs[:, torch.argsort(evals, descending=True)].float()
        directions = itq(x @ pca, bits, 50, torch.Generator().manual_seed(args.seed))
        w = (pca @ directions[:, : pca.shape[1]].T).numpy()  # (d, bits)
        secs = time.perf_counter() - t
        rows.append(evaluate("sign-pca-itq", sign_keys(base @ w),
                             {k: (sign_soft_cost_scores(q @ w), gt) for k, (q, gt) in sets.items()}, nb, secs))
    for name, ecc in (("ecvh-noecc", False), ("ecvh-ecc", True)):
        if name not in wanted:
            continue
        t = time.perf_counter()
        cfg = TrainConfig(bits=bits, ecc=ecc, epochs=args.epochs, seed=args.seed, device="cpu")
        router, history = train(base, cfg, progress=sys.stderr.isatty(), log=lambda s: print(s, file=sys.stderr))
        secs = time.perf_counter() - t
        keys = router.keys(base).astype(np.int64)
        soft = ECVHRouter.from_saved(router.config(), {k: v for k, v in router.arrays().items()
                                                       if k != "probe_centroids"})
        for label, r in ((f"{name}/softcost", soft), (name, router)):
            scores = {k: (r.probe_scores(q), gt) for k, (q, gt) in sets.items()}
            rows.append(evaluate(label, keys, scores, nb, secs, {"history": history, "rank": router.lrsq.rank}))
    if "kmeans" in wanted:
        t = time.perf_counter()
        c = spherical_kmeans(torch.from_numpy(base), nb, 20, torch.Generator().manual_seed(args.seed)).numpy()
        keys = np.concatenate([(base[s : s + 16384] @ c.T).argmax(1) for s in range(0, len(base), 16384)])
        secs = time.perf_counter() - t
        rows.append(evaluate("kmeans", keys, {k: (q @ c.T, gt) for k, (q, gt) in sets.items()}, nb, secs))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as fh:
        for row in rows:
            fh.write(json.dumps({**meta, **row}) + "\n")
    print(markdown(rows))
    if args.plot:
        plot(rows, args.plot, meta)
    return 0


def markdown(rows: list[dict]) -> str:
    lines = []
    for qname in ("examples", "heldout"):
        lines.append(f"\n{qname} queries: recall@10 vs fraction of base scanned\n")
        lines.append("| router | 1% | 2% | 5% | 10% | scan for 0.90 | scan for 0.95 | max/mean | entropy | empty |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            q = r[qname]
            lines.append(
                f"| {r['router']} | {q['recall@1%']:.3f} | {q['recall@2%']:.3f} | {q['recall@5%']:.3f} | "
                f"{q['recall@10%']:.3f} | {q['scan_for_0.90']:.2%} | {q['scan_for_0.95']:.2%} | "
                f"{r['max_over_mean']:.1f} | {r['entropy']:.3f} | {r['empty']} |"
            )
    return "\n".join(lines)


def plot(rows: list[dict], path: str, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, qname in zip(axes, ("examples", "heldout")):
        for r in rows:
            f, rec = zip(*r[qname]["curve"])
            ax.plot(np.array(f) * 100, rec, label=r["router"], marker=".", ms=3)
        ax.set_xscale("log")
        ax.set_xlabel("% of base scanned")
        ax.set_title(f"{meta['data']}, {qname} queries, {2**meta['bits']} buckets")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("recall@10")
    axes[0].legend(loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
