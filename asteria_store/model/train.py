"""Training the ECVH model (torch) on a sample of the data.

Steps, all seeded:

1. Sample up to ``sample_size`` vectors; hold out ``holdout`` of them as queries; exact
   k nearest neighbours of every training and held-out point within the sample.
2. Rotation: the PCA basis of the sample (energy first, so LRSQ's leading coordinates hold
   most of it), zero-padded to D = 2**ceil(log2 d), followed by a learnable butterfly (BOR)
   starting at the identity.
3. Vantages: with a code (``ecc=True``), spherical k-means centroids of the rotated sample
   folded into m vantage directions through the code (``V = -H_J^T C / 2**k``), so training
   starts exactly at k-means routing; without a code, PCA + ITQ sign directions.
4. Adam on (BOR angles, vantages, offsets) with three losses, printed per epoch:
   * ``pair``: neighbours agree. With a code: ``-log sum_u p_x(u) p_y(u)`` (softmax of the
     codeword correlations at ``temperature``), the probability that x and its neighbour y
     share a bucket. Without: sign agreement ``1 - tanh(z_x) tanh(z_y)`` for neighbours,
     and ``(tanh z_x tanh z_y)**2`` for random non-neighbour pairs.
   * ``balance``: buckets stay even. With a code: ``KL(mean p || uniform)``; without:
     each bit ~50/50 and bits decorrelated.
   * ``quant``: LRSQ error of the rotated vectors (energy outside the rank + blockwise
     8-bit error), the only loss that shapes the rotation itself.
5. After each epoch, the held-out routing metric (fraction of the sample scanned to find
   ``target_recall`` of the held-out points' true neighbours, probing by soft cost) decides
   early stopping; the best epoch's parameters are kept.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..progress import ProgressLike, make_progress
from .bor import ButterflyRotation, next_pow2
from .codes import HadamardCode, fwht
from .ecvh import ECVHRouter
from .lrsq import LRSQ
from .metrics import fraction_for_recall, occupancy, rows_to_reach


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; every field has a measured default (docs/model.md).

    Attributes:
        bits: k, message bits: 2**k buckets. None: from ``expected_size`` and
            ``bucket_rows``. More bits: smaller buckets, less scanned per probe, more probes.
        expected_size: vectors the store will hold (sizes the buckets when bits is None).
        bucket_rows: target mean rows per bucket when bits is None.
        ecc: True: ECVH with a Hadamard code (routing as good as k-means and better after
            training); False: plain learned sign hashing (cheaper to train, routes worse).
        code_length: m, vantages/code length with ecc. None: 2**bits (the full code, most
            expressive). Smaller: cheaper margins, constrained buckets.
        rank: LRSQ rank. None: smallest multiple of ``block`` keeping ``energy`` of the
            sample's energy. Higher: tighter bounds (more pruning), more bytes per vector.
        block: LRSQ block size (coordinates sharing one 8-bit affine map).
        energy: energy fraction kept by the automatic rank.
        epochs, batch_size, lr, temperature: optimisation.
        balance_weight, quant_weight: loss weights (pair loss has weight 1).
        neighbours: exact neighbours per anchor used by the pair loss.
        anchors: training points whose exact neighbours are computed (the pair loss's
            population; exact kNN costs anchors x sample x d).
        sample_size: at most this many vectors are used (a uniform sample).
        holdout: held-out points for early stopping.
        patience: epochs without improvement before stopping.
        target_recall: recall at which the held-out scan fraction is measured.
        kmeans_iters: k-means iterations for the initial centroids.
        probe_means: probe buckets by the mean direction of their training vectors (True,
            measured better) instead of by soft cost.
        seed: every random choice.
        device: "auto" (CUDA when available), "cpu" or "cuda".
    """

    bits: int | None = None
    expected_size: int | None = None
    bucket_rows: int = 128
    ecc: bool = True
    code_length: int | None = None
    rank: int | None = None
    block: int = 32
    energy: float = 0.97
    epochs: int = 5
    batch_size: int = 1024
    lr: float = 1e-3
    rotation_lr_scale: float = 0.1
    temperature: float = 0.05
    balance_weight: float = 5.0
    quant_weight: float = 1.0
    neighbours: int = 10
    anchors: int = 20_000
    sample_size: int = 100_000
    holdout: int = 1000
    patience: int = 2
    target_recall: float = 0.9
    kmeans_iters: int = 20
    probe_means: bool = True
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: The training sample caps the bucket count: 2**bits <= sample / MIN_POINTS_PER_CELL.
MIN_POINTS_PER_CELL = 32


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def choose_bits(n: int, bucket_rows: int) -> int:
    return int(np.clip(round(math.log2(max(n, 2) / bucket_rows)), 1, 20))


# --- building blocks ---------------------------------------------------------------------


def exact_neighbours(x: torch.Tensor, queries: torch.Tensor, k: int, *, exclude_self: bool,
                     block: int | None = None) -> torch.Tensor:
    """Indices (Q, k) of the exact top-k inner products of ``queries`` within ``x``.

    Scores are computed ``block`` queries at a time: by default as many as keep one block's
    score matrix near 64 MiB, so memory stays bounded whatever the sample size.
    """
    block = block or max(1, min(4096, (16 << 20) // max(len(x), 1)))
    out = []
    for start in range(0, len(queries), block):
        s = queries[start : start + block] @ x.T
        if exclude_self:
            idx = torch.arange(start, start + len(s), device=x.device)
            s[torch.arange(len(s), device=x.device), idx] = -float("inf")
        out.append(s.topk(k, dim=1).indices)
    return torch.cat(out)


def spherical_kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Unit centroids (k, D) by Lloyd's algorithm on the sphere (k-means++-free, seeded)."""
    init = torch.randperm(len(x), generator=generator)[:k].to(x.device)
    c = x[init].clone()
    for _ in range(iters):
        assign = torch.cat([(x[s : s + 16384] @ c.T).argmax(1) for s in range(0, len(x), 16384)])
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        empty = counts == 0
        if empty.any():  # re-seed empty cells with random points
            pick = torch.randint(len(x), (int(empty.sum()),), generator=generator).to(x.device)
            sums[empty] = x[pick]
        c = sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return c


def bisection_order(c: np.ndarray) -> np.ndarray:
    """A permutation of centroids so that keys sharing a prefix are geometric neighbours:
    recursive halving along each group's principal direction (the key's top bit first)."""

    def split(idx: np.ndarray) -> list[np.ndarray]:
        if len(idx) <= 1:
            return [idx]
        sub = c[idx] - c[idx].mean(axis=0)
        direction = np.linalg.svd(sub, full_matrices=False)[2][0]
        order = idx[np.argsort(sub @ direction, kind="stable")]
        half = len(order) // 2
        return split(order[:half]) + split(order[half:])

    return np.concatenate(split(np.arange(len(c))))


def itq(y: torch.Tensor, bits: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """PCA + ITQ directions (bits, D): top principal axes rotated to minimise sign error."""
    v = y[:, :bits]  # PCA coordinates already (the rotation starts with the PCA basis)
    r = torch.linalg.qr(torch.randn(bits, bits, generator=generator).to(y))[0]
    for _ in range(iters):
        b = torch.sign(v @ r)
        u, _, wt = torch.linalg.svd(v.T @ b)
        r = u @ wt
    directions = torch.zeros(bits, y.shape[1], dtype=y.dtype, device=y.device)
    directions[:, :bits] = r.T
    return directions


# --- the trainable model -----------------------------------------------------------------


class ECVHModel(torch.nn.Module):
    def __init__(self, pca: torch.Tensor, vantages: torch.Tensor, offsets: torch.Tensor,
                 bits: int, code: HadamardCode | None, rank: int, block: int, seed: int):
        super().__init__()
        d, size = pca.shape
        self.register_buffer("pca", pca)  # (d, D)
        self.bor = ButterflyRotation(size, seed=seed)
        self.bits, self.code, self.rank, self.block = bits, code, rank, block
        if code is not None:
            # With a code, the trained tensor is the bucket centroids C (2**k x D); the
            # vantages are their image through the code, V = -H_J C / 2**k (exact for the
            # full code, least squares for a punctured one). Adam is not rotation invariant:
            # it steps per centroid coordinate, as k-means refinement would.
            full = torch.from_numpy(fwht(np.eye(2**bits, dtype=np.float32))).to(pca)
            self.register_buffer("h_j", full[torch.from_numpy(code.positions)])  # (m, 2**k)
            self.register_buffer("code_matrix", -self.h_j)  # corr = z @ code_matrix
            self.weights = torch.nn.Parameter(vantages.clone())  # the centroids
            # Full code in natural order: H_J^T H_J = 2**k I, so the correlations are
            # y @ C^T + offsets @ code_matrix: one (n x D x 2**k) product instead of two.
            self.full_code = np.array_equal(code.positions, np.arange(2**bits))
        else:
            self.weights = torch.nn.Parameter(vantages.clone())  # the sign directions
        self.offsets = torch.nn.Parameter(offsets.clone())

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return self.bor(x @ self.pca)

    @property
    def vantages(self) -> torch.Tensor:
        if self.code is None:
            return self.weights
        return -(self.h_j @ self.weights) / 2**self.bits

    def margins(self, y: torch.Tensor) -> torch.Tensor:
        return y @ self.vantages.T + self.offsets

    def code_logits(self, y: torch.Tensor) -> torch.Tensor:
        """Codeword correlations (n, 2**k) of rotated vectors y: ``margins(y) @ code_matrix``."""
        if self.full_code:
            return y @ self.weights.T + self.offsets @ self.code_matrix
        return self.margins(y) @ self.code_matrix

    def quant_loss(self, y: torch.Tensor) -> torch.Tensor:
        """Energy outside the rank + expected blockwise 8-bit error (uniform rounding)."""
        tail = (y[:, self.rank :] ** 2).sum(1)
        head = y[:, : self.rank].reshape(len(y), -1, self.block)
        span = head.max(2).values - head.min(2).values
        rounding = (span / 255.0) ** 2 / 12.0 * self.block
        return (tail + rounding.sum(1)).mean()

    def export(self, lrsq: LRSQ, info: dict) -> ECVHRouter:
        with torch.no_grad():
            rotation = (self.pca @ self.bor.matrix()).cpu().numpy()
            return ECVHRouter(rotation, self.vantages.detach().cpu().numpy(),
                              self.offsets.detach().cpu().numpy(), bits=self.bits,
                              ecc=self.code is not None,
                              positions=None if self.code is None else self.code.positions,
                              lrsq=lrsq, info=info)


def _pair_loss_ecc(cx, cy, tau):
    lx = F.log_softmax(cx / tau, dim=1)
    ly = F.log_softmax(cy / tau, dim=1)
    pair = -torch.logsumexp(lx + ly, dim=1).mean()
    mean_p = lx.exp().mean(0)
    balance = (mean_p * torch.log(mean_p * mean_p.numel() + 1e-12)).sum()
    return pair, balance


def _pair_loss_sign(zx, zy, zr, tau):
    tx, ty, tr = torch.tanh(zx / tau), torch.tanh(zy / tau), torch.tanh(zr / tau)
    pair = (1 - (tx * ty).mean(1)).mean() + ((tx * tr).mean(1) ** 2).mean()
    centred = tx - tx.mean(0)
    cov = centred.T @ centred / len(tx)
    off = cov - torch.diag(torch.diag(cov))
    balance = (tx.mean(0) ** 2).mean() + (off**2).sum() / max(1, tx.shape[1] * (tx.shape[1] - 1))
    return pair, balance


def holdout_metric(router: ECVHRouter, train: np.ndarray, queries: np.ndarray, truth: np.ndarray,
                   target: float) -> tuple[float, dict]:
    """Fraction of ``train`` scanned to reach ``target`` recall for the held-out queries."""
    keys = router.keys(train).astype(np.int64)
    nb = 2**router.bits
    reach = rows_to_reach(router.probe_scores(queries), keys, truth, nb)
    return fraction_for_recall(reach, len(train), target), occupancy(keys, nb)


def train(
    vectors: np.ndarray,
    config: TrainConfig = TrainConfig(),
    *,
    progress: ProgressLike = None,
    log=None,
) -> tuple[ECVHRouter, list[dict]]:
    """Train an ECVH router on ``vectors`` (n, d), L2-normalised float32.

    Returns the router (LRSQ included) and the per-epoch history (loss components and
    held-out metric). ``log`` (a callable taking one line) receives the per-epoch lines;
    with ``progress=True`` they go to stderr.
    """
    if log is None:
        log = (lambda line: print(line, file=sys.stderr)) if progress is True else (lambda line: None)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    started = time.perf_counter()

    x_all = np.asarray(vectors, dtype=np.float32)
    n_total, d = x_all.shape
    if n_total > config.sample_size:
        x_all = x_all[np.sort(rng.choice(n_total, config.sample_size, replace=False))]
    n_hold = min(config.holdout, max(1, len(x_all) // 10))
    perm = rng.permutation(len(x_all))
    hold_np, train_np = x_all[perm[:n_hold]], x_all[perm[n_hold:]]
    n = len(train_np)
    bits = config.bits or choose_bits(config.expected_size or n_total, config.bucket_rows)
    # k-means needs points to place its cells: at least MIN_POINTS_PER_CELL per bucket.
    bits = max(1, min(bits, int(math.log2(max(n // MIN_POINTS_PER_CELL, 2)))))
    size = next_pow2(d)

    x = torch.from_numpy(train_np).to(device)
    hold = torch.from_numpy(hold_np).to(device)
    kk = min(config.neighbours, n - 1)
    anchors = torch.from_numpy(np.sort(rng.choice(n, min(n, config.anchors), replace=False))).to(device)
    nbrs = exact_neighbours(x, x[anchors], kk + 1, exclude_self=False)[:, 1:]  # drop self
    pair_a = anchors.repeat_interleave(kk)  # every (anchor, neighbour) pair, once per epoch
    pair_b = nbrs.reshape(-1)
    n_pairs = len(pair_a)
    truth = exact_neighbours(x, hold, min(10, n), exclude_self=False).cpu().numpy()

    # PCA basis (uncentred second moment: scores are inner products), energy first.
    evals, evecs = torch.linalg.eigh((x.T @ x).double() / n)
    order = torch.argsort(evals, descending=True)
    pca = torch.zeros(d, size, dtype=torch.float32, device=device)
    pca[:, :d] = evecs[:, order].float()
    energy = (evals[order] / evals.sum()).cumsum(0).cpu().numpy()
    block = min(config.block, size)  # tiny dimensions: one block
    rank = config.rank or int(min(d, block * math.ceil((np.searchsorted(energy, config.energy) + 1) / block)))
    rank = min(max(block, rank - rank % block), size)
    lrsq = LRSQ(rank=rank, block=block)
    y0 = x @ pca

    if config.ecc:
        code = HadamardCode.punctured(bits, config.code_length or 2**bits, seed=config.seed)
        cents = spherical_kmeans(y0, 2**bits, config.kmeans_iters, gen)
        cents = cents[torch.from_numpy(bisection_order(cents.cpu().numpy())).to(device)]
        vantages = cents  # ECVHModel maps centroids to vantages through the code
        offsets = torch.zeros(code.m, device=device)
    else:
        code = None
        vantages = itq(y0, bits, 50, gen)
        offsets = torch.zeros(bits, device=device)
    model = ECVHModel(pca, vantages, offsets, bits, code, rank, block, config.seed).to(device)
    opt = torch.optim.Adam([
        {"params": [model.weights, model.offsets], "lr": config.lr},
        {"params": model.bor.parameters(), "lr": config.lr * config.rotation_lr_scale},
    ])
    info = {"bits": bits, "ecc": config.ecc, "rank": rank, "trained_on": n, "config": config.to_dict()}

    def snapshot() -> ECVHRouter:
        return model.export(lrsq, info)

    best_router = snapshot()
    best_metric, occ = holdout_metric(best_router, train_np, hold_np, truth, config.target_recall)
    history = [{"epoch": 0, "holdout_scan": best_metric, **occ}]
    log(f"epoch 0 (init {'k-means' if config.ecc else 'PCA+ITQ'}): held-out scan for recall "
        f"{config.target_recall:.2f} = {best_metric:.2%}, max/mean bucket {occ['max_over_mean']:.1f}")
    stale = 0
    for epoch in range(1, config.epochs + 1):
        order_t = torch.randperm(n_pairs, generator=gen).to(device)
        sums = {"pair": 0.0, "balance": 0.0, "quant": 0.0}
        steps = 0
        bar = make_progress(progress, total=n_pairs, desc=f"epoch {epoch}/{config.epochs}", unit="pair")
        try:
            for start in range(0, n_pairs, config.batch_size):
                idx = order_t[start : start + config.batch_size]
                xb, yb = x[pair_a[idx]], x[pair_b[idx]]
                ry = model.rotate(torch.cat([xb, yb]))
                if config.ecc:
                    c = model.code_logits(ry)
                    pair, balance = _pair_loss_ecc(c[: len(idx)], c[len(idx) :], config.temperature)
                else:
                    zx, zy = model.margins(ry[: len(idx)]), model.margins(ry[len(idx) :])
                    rnd = x[torch.randint(n, (len(idx),), generator=gen).to(device)]
                    pair, balance = _pair_loss_sign(zx, zy, model.margins(model.rotate(rnd)), config.temperature)
                quant = model.quant_loss(ry[: len(idx)])
                loss = pair + config.balance_weight * balance + config.quant_weight * quant
                opt.zero_grad()
                loss.backward()
                opt.step()
                sums["pair"] += pair.item()
                sums["balance"] += balance.item()
                sums["quant"] += quant.item()
                steps += 1
                bar.update(len(idx))
        finally:
            bar.close()
        router = snapshot()
        metric, occ = holdout_metric(router, train_np, hold_np, truth, config.target_recall)
        row = {"epoch": epoch, **{k: v / steps for k, v in sums.items()}, "holdout_scan": metric, **occ}
        history.append(row)
        log(f"epoch {epoch}: pair {row['pair']:.4f}  balance {row['balance']:.4f}  quant {row['quant']:.5f}  "
            f"held-out scan {metric:.2%}  max/mean bucket {occ['max_over_mean']:.1f}")
        if metric < best_metric - 1e-6:
            best_metric, best_router, stale = metric, router, 0
        else:
            stale += 1
            if stale >= config.patience:
                log(f"early stop: no held-out improvement for {stale} epoch(s)")
                break
    # Probe order: the mean direction of each bucket's training vectors (fitted to the final
    # partition, like a last Lloyd step) beats the soft-cost order (docs/model.md).
    if config.probe_means:
        best_router = best_router.with_probe_centroids(train_np)
        metric, occ = holdout_metric(best_router, train_np, hold_np, truth, config.target_recall)
        history.append({"epoch": "probe-means", "holdout_scan": metric, **occ})
        log(f"probe by bucket means: held-out scan {metric:.2%} (soft-cost order: {best_metric:.2%})")
        best_metric = metric
    best_router.info["train_seconds"] = round(time.perf_counter() - started, 2)
    best_router.info["holdout_scan"] = best_metric
    return best_router, history
