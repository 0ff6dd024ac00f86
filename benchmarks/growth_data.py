"""Generate a large "real-like" data set from the wordnet-minilm embeddings, with exact ground truth.

    python benchmarks/growth_data.py --n 10000000 --out /tmp/asteria-bench/growth-10m --seed 0 \\
        --gt-at 1000000,3000000,10000000

Writes, in ``--out``:

* ``base.f16.npy`` (n, 384) float16, unit rows, streamed in blocks through
  ``np.lib.format.open_memmap`` (resident memory stays bounded whatever ``--n``);
* ``queries.f16.npy`` (``--queries``, 384) float16: further draws of the same generator, from
  a separate random stream (none is a base row);
* ``gt_{N}_ids.npy`` (int64) and ``gt_{N}_scores.npy`` (float32), (queries, ``--gt-k``): the
  exact top-``--gt-k`` of the queries among the first N base rows, for each N of ``--gt-at``
  (inner products of the float16 rows as float32, best first, ties by id). Computed exactly
  in float32 in the same pass that writes the base: no approximate prefilter;
* ``meta.json``: the arguments, generator settings, timings and the files' shapes;
* ``wordnet_knn.npy``: the real base's own exact top-``--knn`` neighbours (the generator's
  input), computed once (minutes) and reused by later runs into the same ``--out``.

The generator (docs/growth_data.md says why, with the measured score distributions): each
row is ``normalise(a * v_i + (1 - a) * v_j + sigma * e)`` with ``v_i`` a uniformly drawn
real wordnet-minilm base vector, ``v_j`` one of its ``--knn`` real nearest neighbours
(uniform), ``a ~ U(0, 1)``, and ``e`` Gaussian noise shaped like the real data (its PCA
covariance, scaled to E|e|^2 = 1). Rows are drawn block by block, block b from
``SeedSequence(seed, spawn_key=(0, b))`` (queries from ``spawn_key=(1,)``): the first N rows
of a run do not depend on ``--n``, so one 10M file serves the 1M and 3M checkpoints.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "wordnet-minilm"
BLOCK = 65536  # rows per generator block (fixed: it defines the random streams)
# Chosen by measurement (docs/growth_data.md): the closest to wordnet's own query -> base
# top-1 / top-10 scores and IVF probe recall among the settings tried.
SIGMA, MIX, KNN = 0.6, 1.0, 10


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def real_knn(real: np.ndarray, k: int, cache: Path | None = None, progress: bool = True) -> np.ndarray:
    """Exact top-k neighbours (self excluded) of every real base row, (n, k) int32, cached."""
    if cache is not None and cache.exists():
        got = np.load(cache)
        if got.shape == (len(real), k):
            return got
    import torch
    from tqdm import tqdm

    t = torch.from_numpy(real)
    out = np.empty((len(real), k), dtype=np.int32)
    step = 4096
    for s in tqdm(range(0, len(real), step), desc="wordnet self-kNN", disable=not progress, unit="blk"):
        sc = t[s : s + step] @ t.T
        sc[torch.arange(sc.shape[0]), torch.arange(s, s + sc.shape[0])] = -3.0  # not itself
        out[s : s + step] = torch.topk(sc, k, dim=1).indices.numpy()
    if cache is not None:
        np.save(cache, out)
    return out


class Generator:
    """Rows ``normalise(a v_i + (1 - a) v_j + sigma e)`` (see the module docstring).

    ``sigma``: norm of the noise. Larger: neighbours further apart (lower top-1/top-10
    scores, harder search); 0: every row lies on a segment between two real neighbours.
    """

    def __init__(self, real: np.ndarray, knn: np.ndarray, *, sigma: float, mix: float = 1.0, seed: int = 0):
        self.real, self.knn, self.sigma, self.mix, self.seed = real, knn, float(sigma), float(mix), seed
        centred = real - real.mean(axis=0)
        cov = centred.T @ centred / len(real)
        evals, evecs = np.linalg.eigh(cov.astype(np.float64))
        evals = np.clip(evals, 0, None)
        # e = z @ shape: Gaussian with the data's covariance, scaled to E|e|^2 = 1
        self.shape = (evecs * np.sqrt(evals / evals.sum())).T.astype(np.float32)

    def draw(self, m: int, rng: np.random.Generator) -> np.ndarray:
        i = rng.integers(0, len(self.real), size=m)
        j = self.knn[i, rng.integers(0, self.knn.shape[1], size=m)]
        a = 1 - np.float32(self.mix) * rng.random(m, dtype=np.float32)[:, None]
        x = a * self.real[i] + (1 - a) * self.real[j]
        if self.sigma:
            x += np.float32(self.sigma) * (rng.standard_normal((m, self.shape.shape[0]), dtype=np.float32) @ self.shape)
        return unit(x)

    def block(self, b: int, m: int = BLOCK) -> np.ndarray:
        """Base block ``b`` (rows ``b * BLOCK`` ...), ``m <= BLOCK`` rows of it."""
        full = self.draw(BLOCK, np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(0, b))))
        return full[:m]

    def queries(self, m: int) -> np.ndarray:
        return self.draw(m, np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(1,))))


def load_generator(out: Path, *, knn: int, sigma: float, mix: float, seed: int, progress: bool = True) -> Generator:
    real = unit(np.load(DATA / "base.f16.npy"))
    return Generator(real, real_knn(real, knn, out / "wordnet_knn.npy", progress), sigma=sigma, mix=mix, seed=seed)


class TopK:
    """Running exact top-k of (Q) queries over base blocks seen in row order."""

    def __init__(self, queries: np.ndarray, k: int):
        import torch

        self.torch, self.q, self.k = torch, torch.from_numpy(queries), k
        self.scores = torch.full((len(queries), 0), -np.inf)
        self.ids = torch.zeros((len(queries), 0), dtype=torch.int64)

    def add(self, block: np.ndarray, start: int) -> None:
        torch = self.torch
        s = torch.cat([self.scores, self.q @ torch.from_numpy(block).T], dim=1)
        i = torch.cat([self.ids, torch.arange(start, start + len(block)).expand(len(self.q), -1)], dim=1)
        top = torch.topk(s, min(self.k, s.shape[1]), dim=1)
        self.scores, self.ids = top.values, torch.gather(i, 1, top.indices)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64, scores float32), best first, equal scores by id."""
        ids, scores = self.ids.numpy(), self.scores.numpy()
        order = np.lexsort((ids, -scores), axis=1)
        return np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1)


def generate(a: argparse.Namespace) -> None:
    import torch
    from tqdm import tqdm

    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    gen = load_generator(out, knn=a.knn, sigma=a.sigma, mix=a.mix, seed=a.seed)
    knn_s = time.perf_counter() - t0
    gt_at = sorted({min(int(v), a.n) for v in a.gt_at.split(",")}) if a.gt_at else [a.n]
    # stored as float16; every score below is of the float16 values, as a store sees them
    queries = gen.queries(a.queries).astype(np.float16)
    np.save(out / "queries.f16.npy", queries)
    top = TopK(queries.astype(np.float32), a.gt_k)
    base = np.lib.format.open_memmap(out / "base.f16.npy", mode="w+", dtype=np.float16, shape=(a.n, 384))
    t1, files, todo = time.perf_counter(), [], list(gt_at)
    with tqdm(total=a.n, desc="base + ground truth", unit="row", unit_scale=True) as bar:
        for b in range((a.n + BLOCK - 1) // BLOCK):
            start = b * BLOCK
            block = gen.block(b, min(BLOCK, a.n - start)).astype(np.float16)
            base[start : start + len(block)] = block
            cuts = [n - start for n in todo if start < n <= start + len(block)] or [len(block)]
            lo = 0
            for cut in sorted(set(cuts + [len(block)])):  # checkpoints inside this block
                if cut > lo:
                    top.add(block[lo:cut].astype(np.float32), start + lo)
                if todo and todo[0] == start + cut:
                    files += save_gt(out, todo.pop(0), *top.result())
                lo = cut
            bar.update(len(block))
    base.flush()
    del base
    meta = {**{k: v for k, v in vars(a).items() if k != "func"}, "generator": Generator.__doc__.split("\n")[0],
            "block_rows": BLOCK, "real_knn_seconds": knn_s, "generate_seconds": time.perf_counter() - t1,
            "files": {"base.f16.npy": [a.n, 384], "queries.f16.npy": list(queries.shape),
                      **{f: [a.queries, a.gt_k] for f in files}}}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {out}: base {a.n:,} x 384 float16, {a.queries} queries, ground truth at "
          f"{', '.join(f'{n:,}' for n in gt_at)} in {time.perf_counter() - t0:.0f} s")
    if a.check:
        check(out, gt_at[0])


def save_gt(out: Path, n: int, ids: np.ndarray, scores: np.ndarray) -> list[str]:
    names = [f"gt_{n}_ids.npy", f"gt_{n}_scores.npy"]
    np.save(out / names[0], ids.astype(np.int64))
    np.save(out / names[1], scores.astype(np.float32))
    return names


def check(out: Path, n: int) -> None:
    """The saved top-10 at N equals numpy float32 brute force (asteria_store.testing)."""
    from asteria_store.testing import brute_force_topk

    q = np.load(out / "queries.f16.npy").astype(np.float32)
    base = np.load(out / "base.f16.npy", mmap_mode="r")[:n]
    ids, scores = brute_force_topk(base, q, 10)
    gt_i, gt_s = np.load(out / f"gt_{n}_ids.npy")[:, :10], np.load(out / f"gt_{n}_scores.npy")[:, :10]
    same_ids = float(np.mean([len(np.intersect1d(x, y)) / 10 for x, y in zip(ids, gt_i)]))
    print(f"check at N={n:,}: top-10 id overlap with numpy brute force {same_ids:.6f}, "
          f"max score difference {float(np.abs(scores - gt_s).max()):.2e}")
    if same_ids < 1.0:
        raise SystemExit("ground truth differs from brute force")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, required=True, help="base rows")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--gt-at", default=None, help="comma-separated N: exact ground truth within the first N rows "
                    "(default: --n)")
    ap.add_argument("--gt-k", type=int, default=100)
    ap.add_argument("--sigma", type=float, default=SIGMA, help="noise norm (see docs/growth_data.md)")
    ap.add_argument("--mix", type=float, default=MIX, help="neighbour weight 1 - a ~ U(0, mix)")
    ap.add_argument("--knn", type=int, default=KNN, help="real neighbours each row may mix with")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the matrix products")
    ap.add_argument("--check", action="store_true",
                    help="compare the top-10 at the smallest --gt-at with numpy brute force (keep it small)")
    generate(ap.parse_args())


if __name__ == "__main__":
    main()
