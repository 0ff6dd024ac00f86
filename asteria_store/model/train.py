"""Training the ECVH model (torch) on a sample of the data.

Steps, all seeded:

1. Sample up to ``sample_size`` vectors; hold out ``holdout`` of them as queries and find
   their exact 10 nearest neighbours within the sample (the held-out metric's truth).
2. Rotation: the PCA basis of the sample (energy first, so LRSQ's leading coordinates hold
   most of it), zero-padded to D = 2**ceil(log2 d), followed by a learnable butterfly (BOR)
   starting at the identity.
3. Vantages: with a code (``ecc=True``), spherical k-means centroids of the sample folded
   into m vantage directions through the code (``V = -H_J^T C / 2**k``), so the model
   routes exactly as k-means does; without a code, PCA + ITQ sign directions. A warm start
   (``init=``, the model being replaced) seeds k-means with the old buckets' directions,
   split in two per extra bit, and runs ``warm_iters`` Lloyd steps instead of
   ``kmeans_iters``.
4. Only when ``epochs > 0`` (default 0: on wordnet-minilm no epoch beat the k-means start,
   docs/model.md): exact neighbours of ``anchors`` training points, then Adam on
   (vantages, offsets, and the BOR angles where they can pay: punctured codes or sign bits)
   with three losses, logged per epoch:
   * ``pair``: neighbours agree. With a code: ``-log sum_u p_x(u) p_y(u)`` (softmax of the
     codeword correlations at ``temperature``), the probability that x and its neighbour y
     share a bucket. Without: sign agreement ``1 - tanh(z_x) tanh(z_y)`` for neighbours,
     and ``(tanh z_x tanh z_y)**2`` for random non-neighbour pairs.
   * ``balance``: buckets stay even. With a code: ``KL(mean p || uniform)``; without:
     each bit ~50/50 and bits decorrelated.
   * ``quant``: LRSQ error of the rotated vectors (energy outside the rank + blockwise
     8-bit error), the only loss that shapes the rotation itself.
   After each epoch the held-out metric (fraction of the sample scanned to find
   ``target_recall`` of the held-out points' true neighbours, probing by soft cost) decides
   early stopping; the best epoch's parameters are kept.
5. Probe centroids: the mean direction of each bucket's sample vectors.

Speed (docs/benchmarks.md, "Re-fit speed"): the CPU cost is k-means, one
(sample x 2**k x d) float32 product per Lloyd step, so the step count is the knob. Torch
runs on :func:`training_threads` threads (one per core not busy with other work), and the
caller's thread count is restored afterwards.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..progress import ProgressLike, make_progress
from .bor import ButterflyRotation, next_pow2
from .codes import HadamardCode, fwht
from .ecvh import ECVHRouter
from .tree import TreeRouter
from .fit import MIN_POINTS_PER_CELL, choose_bits, holdout_rows, model_bits, plan_buckets  # noqa: F401 (re-exported)
from .lrsq import LRSQ
from .sketch import TRAIN_ROWS as SKETCH_TRAIN_ROWS
from .sketch import Sketch
from .metrics import fraction_for_recall, occupancy, rows_to_reach


@dataclass(frozen=True)
class TrainConfig:
    """Training settings; every field has a measured default (docs/model.md).

    Attributes:
        bits: k, message bits: 2**k buckets. None: from ``expected_size`` and
            ``bucket_rows``. More bits: smaller buckets, less scanned per probe, more probes.
        expected_size: vectors the store will hold (sizes the buckets when bits is None).
        bucket_rows: target mean rows per bucket when bits is None.
        ecc: True: ECVH with a Hadamard code (routes as k-means does); False: plain learned
            sign hashing (routes worse; needs epochs to learn anything beyond PCA + ITQ).
        code_length: m, vantages/code length with ecc. None: 2**bits (the full code, most
            expressive). Smaller: cheaper margins, constrained buckets.
        rank: LRSQ rank. None: every input dimension when ``energy`` is 1 (the default),
            else the smallest multiple of ``block`` keeping ``energy`` of the sample's
            energy. Higher: tighter bounds (more pruning), more bytes per vector.
        block: LRSQ block size (coordinates sharing one 8-bit affine map). None (default):
            one block, the whole rank. A row's estimate is then one dot product of its codes
            with the query, which a compiled loop vectorises; blocks of 32 need a per-block
            scale inside it and ran ~4x slower per row, for bounds of about the same width
            at the same bytes (docs/model.md).
        energy: energy fraction kept by the automatic rank.
        epochs: Adam epochs after the k-means start. 0 (default): none, the k-means routing
            is kept (measured: no epoch improved it on wordnet-minilm, and 5 epochs cost
            ~100 s of CPU per 100,000-row fit). More: a chance to improve routing, minutes
            of CPU; the held-out metric keeps the best epoch, k-means included.
        batch_size, lr, temperature: optimisation.
        rotation_lr_scale: the BOR angles' learning rate relative to ``lr``.
        train_rotation: learn the BOR angles. None: only where they can change routing
            (punctured codes, sign bits); with the full code the centroids absorb any
            rotation, so the angles are left at the identity (faster epochs).
        balance_weight, quant_weight: loss weights (pair loss has weight 1).
        neighbours: exact neighbours per anchor used by the pair loss.
        anchors: training points whose exact neighbours are computed when epochs run (the
            pair loss's population; exact kNN costs anchors x sample x d).
        sample_size: at most this many vectors are used (a uniform sample).
        holdout: held-out points for the held-out metric and early stopping.
        patience: epochs without improvement before stopping.
        target_recall: recall at which the held-out scan fraction is measured.
        kmeans_iters: Lloyd steps of a cold start. More: slightly better cells, each step
            costs one sample x 2**k x d product (~1 s for 100,000 x 1,024 x 384 on a core).
        warm_iters: Lloyd steps after a warm start (``init=``), on top of splitting the old
            cells when bits grow.
        tree_refine: a tree's Lloyd steps over its own assignment after the per-cell
            k-means (each one pass of the sample through the tree).
        probe_means: probe buckets by the mean direction of their training vectors (True,
            measured better) instead of by soft cost.
        sketch: give every row a product-quantization sketch as well (model/sketch.py:
            d/8 bytes a row, 1/8 of its LRSQ codes), for search that reads it instead of the
            codes (``rerank=``: fewer bytes read per query, approximate). Costs k-means of
            the sample per subspace at training (seconds) and ~10 us a row at ingest. It is
            residual: it codes each row minus its bucket's centre (a flat model's probe
            centroid, a tree's node centroid); without ``probe_means`` a flat model's
            sketch codes the rows themselves.
        flat_max_bits: the most bits a flat model gets; a store that needs more buckets
            is routed by a tree (model/tree.py, sizing in ``fit.plan_buckets``). Lower: a
            tree sooner (cheaper assignment, slightly coarser routing). None:
            ``fit.FLAT_MAX_BITS``.
        threads: torch threads while training. None: :func:`training_threads` (one per
            core not busy with other work, at most the caller's torch setting).
        seed: every random choice.
        device: "auto" (CUDA when available), "cpu" or "cuda".
    """

    bits: int | None = None
    expected_size: int | None = None
    bucket_rows: int = 128
    ecc: bool = True
    code_length: int | None = None
    rank: int | None = None
    block: int | None = None
    energy: float = 1.0
    epochs: int = 0
    batch_size: int = 1024
    lr: float = 1e-3
    rotation_lr_scale: float = 0.1
    train_rotation: bool | None = None
    temperature: float = 0.05
    balance_weight: float = 5.0
    quant_weight: float = 1.0
    neighbours: int = 10
    anchors: int = 20_000
    sample_size: int = 100_000
    holdout: int = 1000
    patience: int = 2
    target_recall: float = 0.9
    kmeans_iters: int = 10
    warm_iters: int = 4
    tree_refine: int = 3
    probe_means: bool = True
    sketch: bool = True
    flat_max_bits: int | None = None
    threads: int | None = None
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: The rows are an l2 store's ``[x, |x|^2 / 2]``: rows used as queries (held-out rows,
    #: anchors) are scored in the query form ``[x, -1]`` (io.query_form), so their exact
    #: neighbours are the Euclidean ones.
    l2: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def busy_cores(samples: int = 5, interval: float = 0.01) -> int:
    """Cores kept busy by other work right now: the median count of runnable tasks in
    ``/proc/loadavg`` over a few samples, less this thread (the 1-minute load average,
    which lags and counts this process's own past work, where /proc is missing)."""
    try:
        counts = []
        for i in range(samples):
            with open("/proc/loadavg") as fh:
                counts.append(int(fh.read().split()[3].split("/")[0]))
            if i + 1 < samples:
                time.sleep(interval)
        return max(0, int(statistics.median(counts)) - 1)
    except (OSError, ValueError, IndexError):
        return int(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0


def training_threads(requested: int | None = None) -> int:
    """Torch threads for a fit: ``requested``, else one per usable core not busy with
    other work (at least 1, at most the caller's ``torch.get_num_threads()``).

    A thread sharing a core with a busy process slows every parallel step to that core's
    share, so a machine with one core busy runs the fit on the others (measured in
    docs/benchmarks.md, "Re-fit speed").
    """
    if requested is not None:
        return max(1, int(requested))
    return max(1, min(torch.get_num_threads(), usable_cores() - busy_cores()))


# --- building blocks ---------------------------------------------------------------------


def as_queries(rows):
    """An l2 store's stored rows ``[x, |x|^2 / 2]`` (numpy or torch) in query form ``[x, -1]``."""
    out = rows.copy() if isinstance(rows, np.ndarray) else rows.clone()
    out[:, -1] = -1.0
    return out


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


def assign(x: torch.Tensor, c: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """Index of the highest inner product with a row of ``c`` for each row of ``x``."""
    ct = c.T.contiguous()
    return torch.cat([(x[s : s + chunk] @ ct).argmax(1) for s in range(0, len(x), chunk)])


def spherical_kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator,
                     init: torch.Tensor | None = None, bar=None) -> torch.Tensor:
    """Unit centroids (k, D) by Lloyd's algorithm on the sphere: ``iters`` steps from
    ``init``, else from k random rows of ``x`` (seeded). ``init`` may have k / 2**j rows
    (a model with fewer buckets): each cell is first split in two j times."""
    if init is None:
        pick = torch.randperm(len(x), generator=generator)[:k].to(x.device)
        c = x[pick].clone()
    else:
        c = init.to(x).clone()
        while len(c) < k:  # a warm start with fewer buckets: split every cell
            c = split_cells(x, c, generator)
            if bar is not None:
                bar.update(1)
        if len(c) != k:
            raise ValueError(f"init must have k / 2**j rows, got {len(init)} for k = {k}")
    for _ in range(iters):
        c = lloyd_step(x, c, generator)
        if bar is not None:
            bar.update(1)
    return c


def lloyd_step(x: torch.Tensor, c: torch.Tensor, generator: torch.Generator,
               labels: torch.Tensor | None = None) -> torch.Tensor:
    """One Lloyd step: assign rows to centroids (unless ``labels`` are given), then each
    centroid becomes its cell's mean direction; empty cells re-seed at random rows."""
    k = len(c)
    labels = assign(x, c) if labels is None else labels
    sums = torch.zeros_like(c).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=k)
    empty = counts == 0
    if empty.any():
        pick = torch.randint(len(x), (int(empty.sum()),), generator=generator).to(x.device)
        sums[empty] = x[pick]
    return sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-12)


def split_cells(x: torch.Tensor, c: torch.Tensor, generator: torch.Generator, iters: int = 4) -> torch.Tensor:
    """Twice as many centroids (2k, D): each cell of ``c`` split in two by a 2-means of its
    own rows (children start at two of its rows), so a warm start can grow the bucket
    count. Costs ``iters`` passes of 2 x d per row, not a k-column product."""
    k = len(c)
    labels = assign(x, c)
    # two random members per cell: sort rows by (cell, random key), take each cell's first two
    counts = torch.bincount(labels, minlength=k)
    order = torch.argsort(labels * 2.0 + torch.rand(len(x), generator=generator).to(x.device), stable=True)
    first = torch.cumsum(counts, 0) - counts
    a = order[first.clamp(max=len(x) - 1)]
    b = order[(first + 1).clamp(max=len(x) - 1)]
    small = counts < 2  # fewer than two rows: the old centroid and a random row
    rand = torch.randint(len(x), (k,), generator=generator).to(x.device)
    c0 = torch.where(small[:, None], c, x[a])
    c1 = torch.where(small[:, None], x[rand], x[b])
    for _ in range(iters):
        diff = c1 - c0
        side = torch.cat([(x[s : s + 16384] * diff[labels[s : s + 16384]]).sum(1) > 0
                          for s in range(0, len(x), 16384)]).long()  # 1: nearer child 1
        child = labels * 2 + side
        both = torch.cat([c0, c1], dim=1).reshape(2 * k, -1)  # rows 2u, 2u+1: cell u's children
        new = lloyd_step(x, both, generator, labels=child).reshape(k, 2, -1)
        c0, c1 = new[:, 0], new[:, 1]
    return torch.stack([c0, c1], dim=1).reshape(2 * k, -1)


def bisection_order(c: np.ndarray) -> np.ndarray:
    """A permutation of centroids so that keys sharing a prefix are geometric neighbours:
    recursive halving along each group's principal direction (the key's top bit first).
    In torch, so its ~2**k small SVDs run on the training's threads (NumPy's BLAS would
    start its own, one per core, busy or not)."""
    ct = torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32))

    def split(idx: torch.Tensor) -> list[torch.Tensor]:
        if len(idx) <= 1:
            return [idx]
        sub = ct[idx] - ct[idx].mean(0)
        direction = torch.linalg.svd(sub, full_matrices=False)[2][0]
        order = idx[torch.argsort(sub @ direction, stable=True)]
        half = len(order) // 2
        return split(order[:half]) + split(order[half:])

    return torch.cat(split(torch.arange(len(c)))).numpy()


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
        size = pca.shape[1]
        self.register_buffer("pca", pca)  # (d, D)
        self.bor = ButterflyRotation(size, seed=seed)
        self.bits, self.code, self.rank, self.block = bits, code, rank, block
        self.full_code = False
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

    def rotation(self) -> torch.Tensor:
        """The whole rotation (d, D), PCA then BOR, as one dense matrix: applying it is one
        matmul (the butterfly's small per-layer ops cost ~10x more per training step)."""
        return self.pca @ self.bor.matrix()

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.rotation()

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

    @torch.no_grad()
    def keys(self, x: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
        """Bucket of each row of ``x`` (n, d), as the exported router's ``keys`` gives it
        (up to float rounding), computed in torch: one (n x d x 2**k) product."""
        rot = self.rotation()
        if self.code is None:
            w = rot @ self.weights.T
            bits = torch.cat([x[s : s + chunk] @ w + self.offsets > 0 for s in range(0, len(x), chunk)])
            return (bits.long() << torch.arange(self.bits, device=x.device)).sum(1)
        if self.full_code:  # fold the rotation into the centroids
            w, bias = rot @ self.weights.T, self.offsets @ self.code_matrix
            return torch.cat([(x[s : s + chunk] @ w + bias).argmax(1) for s in range(0, len(x), chunk)])
        w = rot @ self.vantages.T
        return torch.cat([((x[s : s + chunk] @ w + self.offsets) @ self.code_matrix).argmax(1)
                          for s in range(0, len(x), chunk)])

    def quant_loss(self, y: torch.Tensor) -> torch.Tensor:
        """Energy outside the rank + expected blockwise 8-bit error (uniform rounding)."""
        tail = (y[:, self.rank :] ** 2).sum(1)
        head = y[:, : self.rank].reshape(len(y), -1, self.block)
        span = head.max(2).values - head.min(2).values
        rounding = (span / 255.0) ** 2 / 12.0 * self.block
        return (tail + rounding.sum(1)).mean()

    def export(self, lrsq: LRSQ, info: dict, probe_centroids: np.ndarray | None = None) -> ECVHRouter:
        with torch.no_grad():
            return ECVHRouter(self.rotation().cpu().numpy(), self.vantages.detach().cpu().numpy(),
                              self.offsets.detach().cpu().numpy(), bits=self.bits,
                              ecc=self.code is not None,
                              positions=None if self.code is None else self.code.positions,
                              lrsq=lrsq, info=info, probe_centroids=probe_centroids)

    @torch.no_grad()
    def probe_means(self, x: torch.Tensor, keys: torch.Tensor) -> np.ndarray:
        """Probe centroids (2**k, d): the mean direction of each bucket's rows of ``x``
        (``keys``: their buckets); a bucket ``x`` leaves empty keeps the code's centroid
        direction (full code), else zero."""
        nb = 2**self.bits
        sums = torch.zeros(nb, x.shape[1], dtype=torch.float64, device=x.device).index_add_(0, keys, x.double())
        empty = torch.bincount(keys, minlength=nb) == 0
        if empty.any() and self.full_code:
            sums[empty] = (self.weights @ self.rotation().T).double()[empty]
        return (sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-12)).float().cpu().numpy()


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


def holdout_metric(router: ECVHRouter, model: ECVHModel, x: torch.Tensor, queries: np.ndarray,
                   truth: np.ndarray, target: float, keys: torch.Tensor | None = None
                   ) -> tuple[float, dict, torch.Tensor]:
    """Fraction of the sample ``x`` scanned to reach ``target`` recall for the held-out
    queries, probing in ``router``'s order; with the occupancy and the sample's keys
    (``keys``: already known, e.g. for a new probe order of the same partition)."""
    keys = model.keys(x) if keys is None else keys
    keys_np = keys.cpu().numpy()
    nb = 2**router.bits
    reach = rows_to_reach(router.probe_scores(queries), keys_np, truth, nb)
    return fraction_for_recall(reach, len(keys_np), target), occupancy(keys_np, nb), keys


def warm_directions(init: Any, dim: int, bits: int) -> tuple[np.ndarray | None, str]:
    """The old model's bucket directions (2**init.bits, dim) to seed k-means from, or None
    with the reason a warm start is not possible."""
    if not isinstance(init, ECVHRouter):
        return None, f"init is a {type(init).__name__}, not an ECVH router"
    if init.dim != dim:
        return None, f"init has dimension {init.dim}, the vectors {dim}"
    if init.bits > bits:
        return None, f"init has {init.bits} bits, more than the {bits} wanted"
    try:
        how = "probe centroids" if init.probe_centroids is not None else "code centroids"
        return init.cell_directions(), how
    except ValueError:
        return None, "init has neither probe centroids nor a full code"


def train(
    vectors: np.ndarray,
    config: TrainConfig = TrainConfig(),
    *,
    progress: ProgressLike = None,
    log=None,
    init: ECVHRouter | None = None,
) -> tuple[ECVHRouter, list[dict]]:
    """Train an ECVH router on ``vectors`` (n, d), L2-normalised float32.

    Returns the router (LRSQ included) and the history (the k-means start's held-out
    metric, then per epoch the loss components and held-out metric). ``log`` (a callable
    taking one line) receives the per-step lines; with ``progress=True`` they go to stderr.

    ``init``: the model being replaced (a re-fit as the store grows), or None. An ECVH
    router of the same dimension and at most ``bits`` bits seeds k-means with its buckets'
    directions (each cell split in two per extra bit) and runs ``config.warm_iters`` Lloyd
    steps instead of ``config.kmeans_iters``; anything else starts cold (logged).
    """
    if log is None:
        log = (lambda line: print(line, file=sys.stderr)) if progress is True else (lambda line: None)
    threads = training_threads(config.threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        plan = plan_buckets(config.expected_size or len(vectors), len(vectors), bits=config.bits,
                            bucket_rows=config.bucket_rows, holdout=config.holdout,
                            flat_max_bits=config.flat_max_bits)
        if config.ecc and plan.tree:
            return _train_tree(vectors, config, plan, progress, log, init, threads)
        return _train(vectors, config, progress, log, init, threads)
    finally:
        torch.set_num_threads(previous)


def _train_tree(vectors, config: TrainConfig, plan, progress, log, init, threads: int
                ) -> tuple[TreeRouter, list[dict]]:
    """A tree of ``plan.buckets`` buckets: a flat ECVH model of ``2**plan.bits`` coarse
    cells (trained as :func:`_train` trains one, on at most ``sample_size`` rows), then
    each cell's rows of the whole sample split into children by spherical k-means, their
    number proportional to the cell's rows; then ``tree_refine`` Lloyd steps over the tree's
    own assignment (a vector may land in a child of its second-best cell)."""
    started = time.perf_counter()
    coarse_init = init.coarse if isinstance(init, TreeRouter) else init
    coarse, history = _train(vectors, replace(config, bits=plan.bits, expected_size=None, sketch=False), progress,
                             log, coarse_init, threads)
    x_np = np.asarray(vectors, dtype=np.float32)
    gen = torch.Generator().manual_seed(config.seed + 1)
    cells = coarse.keys(x_np).astype(np.int64)
    counts = np.bincount(cells, minlength=2**plan.bits)
    want = np.maximum(1, np.round(plan.buckets * counts / len(x_np))).astype(np.int64)
    want = np.minimum(want, np.maximum(counts, 1))
    order = np.argsort(cells, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    x = torch.from_numpy(x_np)
    parts = []
    bar = make_progress(progress, total=len(counts), desc="tree cells", unit="cell")
    try:
        for c in range(len(counts)):
            rows = torch.from_numpy(order[starts[c] : starts[c + 1]])
            if counts[c] == 0:  # no sample row: one child, the cell's own direction
                parts.append(torch.from_numpy(coarse.cell_directions()[c : c + 1]))
            else:
                parts.append(spherical_kmeans(x[rows], int(want[c]), config.kmeans_iters, gen))
            bar.update(1)
    finally:
        bar.close()
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])])
    children = torch.cat(parts).numpy()
    info = {"buckets": int(offsets[-1]), "cells": len(counts), "trained_on": len(x_np), "threads": threads,
            "coarse": coarse.info, "config": config.to_dict()}
    router = TreeRouter(coarse, children, offsets, info=info)
    for _ in range(config.tree_refine):
        router = router.refined(x_np)
    if config.sketch and router.lrsq is not None:
        router = _with_residual_sketch(router, x_np, config.seed)
    occ = occupancy(router.keys(x_np).astype(np.int64), router.n_buckets)
    router.info.update(occupancy=occ, train_seconds=round(time.perf_counter() - started, 2))
    history.append({"epoch": "tree", "buckets": router.n_buckets, **occ})
    log(f"tree: {router.n_cells} cells, {router.n_buckets} buckets, max/mean bucket "
        f"{occ['max_over_mean']:.1f} on the sample")
    return router, history


def _sketch_for(x: np.ndarray, keys: np.ndarray, rotate, centers: np.ndarray | None, seed: int) -> Sketch:
    """A sketch (model/sketch.py) trained on (at most ``sketch.TRAIN_ROWS`` of) rows ``x``
    of buckets ``keys``, rotated by ``rotate``: residual where the router has bucket
    centres (``centers``, one per bucket), else of the rows themselves."""
    rng = np.random.default_rng(seed)
    if len(x) > SKETCH_TRAIN_ROWS:
        pick = np.sort(rng.choice(len(x), SKETCH_TRAIN_ROWS, replace=False))
        x, keys = x[pick], keys[pick]
    d = x.shape[1]
    own = None if centers is None else rotate(centers[np.asarray(keys, dtype=np.int64)])[:, :d]
    return Sketch.train(rotate(x)[:, :d], centers=own, seed=seed)


def _with_sketch(router: ECVHRouter, x: np.ndarray, keys: np.ndarray, seed: int) -> ECVHRouter:
    """A flat model with a sketch of its training rows ``x`` (their buckets ``keys``):
    residual against its probe centroids where it has them."""
    sketch = _sketch_for(x, keys, router.rotate, router.probe_centroids, seed)
    return router.with_lrsq(replace(router.lrsq, sketch=sketch))


def _with_residual_sketch(tree: TreeRouter, x: np.ndarray, seed: int) -> TreeRouter:
    """``tree`` with a residual sketch of rows ``x``: each coded against its node's
    centroid. The sketch belongs to the coarse model's quantizer, the centres to the tree."""
    nodes = tree.node_of(tree.keys(x).astype(np.int64))
    sketch = _sketch_for(x, nodes, tree.rotate, tree.children, seed)
    coarse = tree.coarse.with_lrsq(replace(tree.coarse.lrsq, sketch=sketch))
    return TreeRouter(coarse, tree.children, tree.offsets, assign_cells=tree.assign_cells, info=tree.info)


def _train(vectors, config: TrainConfig, progress, log, init, threads: int) -> tuple[ECVHRouter, list[dict]]:
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    started = time.perf_counter()

    x_all = np.asarray(vectors, dtype=np.float32)
    n_total, d = x_all.shape
    if n_total > config.sample_size:
        x_all = x_all[np.sort(rng.choice(n_total, config.sample_size, replace=False))]
    n_hold = holdout_rows(len(x_all), config.holdout)
    perm = rng.permutation(len(x_all))
    hold_np, train_np = x_all[perm[:n_hold]], x_all[perm[n_hold:]]
    n = len(train_np)
    bits = model_bits(config.expected_size or n_total, len(x_all), bits=config.bits,
                      bucket_rows=config.bucket_rows, holdout=config.holdout)
    size = next_pow2(d)

    x = torch.from_numpy(train_np).to(device)
    if config.l2:
        hold_np = as_queries(hold_np)
    hold = torch.from_numpy(hold_np).to(device)
    truth = exact_neighbours(x, hold, min(10, n), exclude_self=False).cpu().numpy()

    # PCA basis (uncentred second moment: scores are inner products), energy first.
    evals, evecs = torch.linalg.eigh((x.T @ x).double() / n)
    order = torch.argsort(evals, descending=True)
    pca = torch.zeros(d, size, dtype=torch.float32, device=device)
    pca[:, :d] = evecs[:, order].float()
    energy = (evals[order] / evals.sum()).cumsum(0).cpu().numpy()
    if config.block is None:  # one block: the rank
        rank = min(config.rank or (d if config.energy >= 1 else int(np.searchsorted(energy, config.energy)) + 1),
                   size)
        block = rank
    else:
        block = min(config.block, size)  # tiny dimensions: one block
        rank = config.rank or int(min(d, block * math.ceil((np.searchsorted(energy, config.energy) + 1) / block)))
        rank = min(max(block, rank - rank % block), size)
    lrsq = LRSQ(rank=rank, block=block)  # the sketch is trained last, against the final buckets

    warm = None
    if config.ecc:
        code = HadamardCode.punctured(bits, config.code_length or 2**bits, seed=config.seed)
        seeds, how = (None, "no init") if init is None else warm_directions(init, d, bits)
        if init is not None:
            log(f"warm start from the previous model's {how} ({init.bits} -> {bits} bits)" if seeds is not None
                else f"cold start: {how}")
        iters = config.kmeans_iters if seeds is None else config.warm_iters
        splits = 0 if seeds is None else bits - init.bits
        warm = None if seeds is None else {"from_bits": init.bits, "splits": splits, "iters": iters}
        bar = make_progress(progress, total=iters + splits, desc="k-means", unit="step")
        try:
            # The rotation is orthogonal: k-means of x, then rotate the centroids (d < D).
            cents = spherical_kmeans(x, 2**bits, iters, gen, bar=bar,
                                     init=None if seeds is None else torch.from_numpy(seeds))
        finally:
            bar.close()
        cents = cents[torch.from_numpy(bisection_order(cents.cpu().numpy())).to(device)]
        vantages = cents @ pca  # ECVHModel maps centroids to vantages through the code
        offsets = torch.zeros(code.m, device=device)
    else:
        code = None
        vantages = itq(x @ pca, bits, 50, gen)
        offsets = torch.zeros(bits, device=device)
    model = ECVHModel(pca, vantages, offsets, bits, code, rank, block, config.seed).to(device)
    info = {"bits": bits, "ecc": config.ecc, "rank": rank, "trained_on": n, "threads": threads,
            "warm_start": warm, "config": config.to_dict()}

    best_router = model.export(lrsq, info)
    best_metric, occ, best_keys = holdout_metric(best_router, model, x, hold_np, truth, config.target_recall)
    history = [{"epoch": 0, "holdout_scan": best_metric, **occ}]
    start_name = ("warm k-means" if warm else "k-means") if config.ecc else "PCA+ITQ"
    log(f"epoch 0 (init {start_name}): held-out scan for recall "
        f"{config.target_recall:.2f} = {best_metric:.2%}, max/mean bucket {occ['max_over_mean']:.1f}")
    if config.epochs > 0:
        best_state, best_router, best_metric, best_keys = _epochs(
            model, x, hold_np, truth, lrsq, info, history, config, gen, rng, progress, log,
            (best_router, best_metric, best_keys))
        model.load_state_dict(best_state)
    # Probe order: the mean direction of each bucket's training vectors (fitted to the final
    # partition, like a last Lloyd step) beats the soft-cost order (docs/model.md).
    if config.probe_means:
        best_router = model.export(lrsq, info, probe_centroids=model.probe_means(x, best_keys))
        metric, occ, _ = holdout_metric(best_router, model, x, hold_np, truth, config.target_recall,
                                        keys=best_keys)
        history.append({"epoch": "probe-means", "holdout_scan": metric, **occ})
        log(f"probe by bucket means: held-out scan {metric:.2%} (soft-cost order: {best_metric:.2%})")
        best_metric = metric
    if config.sketch:
        best_router = _with_sketch(best_router, train_np, best_keys.cpu().numpy(), config.seed)
    best_router.info["train_seconds"] = round(time.perf_counter() - started, 2)
    best_router.info["holdout_scan"] = best_metric
    return best_router, history


def _epochs(model: ECVHModel, x, hold_np, truth, lrsq, info, history, config: TrainConfig, gen, rng,
            progress, log, best):
    """Adam epochs over (anchor, exact neighbour) pairs; returns the best epoch's (or the
    start's) parameters, router, held-out metric and sample keys."""
    best_router, best_metric, best_keys = best
    device, n = x.device, len(x)
    kk = min(config.neighbours, n - 1)
    anchors = torch.from_numpy(np.sort(rng.choice(n, min(n, config.anchors), replace=False))).to(device)
    nbrs = exact_neighbours(x, as_queries(x[anchors]) if config.l2 else x[anchors], kk + 1,
                            exclude_self=False)[:, 1:]  # drop self
    pair_a = anchors.repeat_interleave(kk)  # every (anchor, neighbour) pair, once per epoch
    pair_b = nbrs.reshape(-1)
    n_pairs = len(pair_a)
    # The BOR angles only matter where the centroids cannot absorb a rotation.
    learn_rotation = config.train_rotation
    if learn_rotation is None:
        learn_rotation = model.code is None or not model.full_code
    model.bor.angles.requires_grad_(learn_rotation)
    groups = [{"params": [model.weights, model.offsets], "lr": config.lr}]
    if learn_rotation:
        groups.append({"params": model.bor.parameters(), "lr": config.lr * config.rotation_lr_scale})
    opt = torch.optim.Adam(groups)
    fixed = None if learn_rotation else model.rotate(x).detach()  # rotated once for all epochs
    best_state, stale = {k: v.detach().clone() for k, v in model.state_dict().items()}, 0
    for epoch in range(1, config.epochs + 1):
        order_t = torch.randperm(n_pairs, generator=gen).to(device)
        sums = {"pair": 0.0, "balance": 0.0, "quant": 0.0}
        steps = 0
        bar = make_progress(progress, total=n_pairs, desc=f"epoch {epoch}/{config.epochs}", unit="pair")
        try:
            for start in range(0, n_pairs, config.batch_size):
                idx = order_t[start : start + config.batch_size]
                rows = torch.cat([pair_a[idx], pair_b[idx]])
                rot = None if fixed is not None else model.rotation()  # one dense matrix per step
                ry = fixed[rows] if fixed is not None else x[rows] @ rot
                if model.code is not None:
                    c = model.code_logits(ry)
                    pair, balance = _pair_loss_ecc(c[: len(idx)], c[len(idx) :], config.temperature)
                else:
                    rnd = torch.randint(n, (len(idx),), generator=gen).to(device)
                    ryr = fixed[rnd] if fixed is not None else x[rnd] @ rot
                    pair, balance = _pair_loss_sign(model.margins(ry[: len(idx)]), model.margins(ry[len(idx) :]),
                                                    model.margins(ryr), config.temperature)
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
        router = model.export(lrsq, info)
        metric, occ, keys = holdout_metric(router, model, x, hold_np, truth, config.target_recall)
        row = {"epoch": epoch, **{k: v / steps for k, v in sums.items()}, "holdout_scan": metric, **occ}
        history.append(row)
        log(f"epoch {epoch}: pair {row['pair']:.4f}  balance {row['balance']:.4f}  quant {row['quant']:.5f}  "
            f"held-out scan {metric:.2%}  max/mean bucket {occ['max_over_mean']:.1f}")
        if metric < best_metric - 1e-6:
            best_metric, best_router, best_keys, stale = metric, router, keys, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= config.patience:
                log(f"early stop: no held-out improvement for {stale} epoch(s)")
                break
    return best_state, best_router, best_metric, best_keys
