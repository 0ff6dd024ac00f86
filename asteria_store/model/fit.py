"""Fitting a model to data, outside the torch code: the training sample (seeded, validated,
normalised), validated training settings, and :func:`train_model`, which trains a
standalone model file. ``Store.ingest`` and ``Store.train`` use the same pieces.

torch is imported only when a model is actually trained.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..config import Metric
from ..errors import InvalidArgumentError, InvalidInputError
from ..io import ArrayLike, VectorSource, normalise_rows
from ..progress import ProgressLike
from .router import Router

#: Training uses a uniform sample of at most this many vectors.
TRAIN_SAMPLE_ROWS = 100_000

#: The training sample caps the bucket count: 2**bits <= training rows / MIN_POINTS_PER_CELL.
MIN_POINTS_PER_CELL = 32


def choose_bits(n: int, bucket_rows: int) -> int:
    """Bits for ~``bucket_rows`` rows per bucket over ``n`` rows, in [1, 20]."""
    return int(np.clip(round(math.log2(max(n, 2) / bucket_rows)), 1, 20))


def holdout_rows(sample_rows: int, holdout: int = 1000) -> int:
    """How many of a training sample's rows are held out (the rest train)."""
    return min(holdout, max(1, sample_rows // 10))


def model_bits(expected: int, sample_rows: int, *, bits: int | None = None, bucket_rows: int = 128,
               holdout: int = 1000) -> int:
    """The bits of a FLAT model trained on ``sample_rows`` rows for a store of ``expected``:
    ``bits`` or ~``bucket_rows`` rows per bucket, capped so that k-means has at least
    MIN_POINTS_PER_CELL training rows per bucket (:func:`plan_buckets` without a tree)."""
    return plan_buckets(expected, sample_rows, bits=bits, bucket_rows=bucket_rows, holdout=holdout,
                        flat_max_bits=64).bits


#: A flat ECVH model decodes every vector against all 2**bits buckets (d x 2**bits
#: multiply-adds per vector, for ingest and for every query): past this many bits the
#: store routes with a tree of coarse cells and their children (model/tree.py).
FLAT_MAX_BITS = 11

#: Mean rows per bucket a tree aims at: one bucket is one read and one product per query,
#: so smaller buckets cost more per row, bigger ones scan more rows per probe.
TREE_BUCKET_ROWS = 512

#: Training rows a tree wants per bucket, at least TREE_MIN_ROWS per bucket, and the most
#: rows it trains on (float32 in memory: 600 MB at d = 384).
TREE_ROWS_PER_BUCKET = 32
TREE_MIN_ROWS = 8
TREE_SAMPLE_ROWS = 400_000


@dataclass(frozen=True)
class BucketPlan:
    """How a model for a store is sized: ``buckets`` in all; a flat model has
    ``2**bits`` buckets, a tree ``2**bits`` coarse cells whose children add up to
    ``buckets``."""

    buckets: int
    bits: int
    tree: bool


def plan_buckets(expected: int, sample_rows: int | None = None, *, bits: int | None = None,
                 bucket_rows: int = 128, holdout: int = 1000, flat_max_bits: int | None = None) -> BucketPlan:
    """THE sizing rule of learned models, for a store of ``expected`` rows and a training
    sample of ``sample_rows`` (None: as many as :func:`sample_rows_for` asks).

    Up to ``2**flat_max_bits`` buckets a flat model, ~``bucket_rows`` rows per bucket
    (or ``2**bits``), capped so that k-means has MIN_POINTS_PER_CELL training rows per
    bucket. Beyond, the bucket count stays at ``2**flat_max_bits`` until buckets reach
    TREE_BUCKET_ROWS rows, then grows with the data as a tree (~TREE_BUCKET_ROWS rows per
    bucket, or ``2**bits``), capped at TREE_MIN_ROWS training rows per bucket, with
    ~sqrt(2 x buckets) coarse cells (what minimises cells + 2 x children per cell, the
    cost of assigning a vector). ``flat_max_bits`` None: FLAT_MAX_BITS."""
    flat_max_bits = FLAT_MAX_BITS if flat_max_bits is None else flat_max_bits
    if sample_rows is None:
        sample_rows = sample_rows_for(expected, bits=bits, bucket_rows=bucket_rows, flat_max_bits=flat_max_bits)
    n_train = sample_rows - holdout_rows(sample_rows, holdout)
    wanted = bits or choose_bits(expected, bucket_rows)
    flat_cap = int(math.log2(max(n_train // MIN_POINTS_PER_CELL, 2)))
    if wanted <= flat_max_bits:
        return _flat(min(wanted, flat_cap))
    buckets = 2**bits if bits else round(expected / TREE_BUCKET_ROWS)
    buckets = min(buckets, n_train // TREE_MIN_ROWS)
    if buckets <= 2**flat_max_bits:
        return _flat(min(flat_max_bits, flat_cap))
    cell_bits = min(int(round(math.log2(math.sqrt(2 * buckets)))), int(math.log2(buckets)) - 1)
    return BucketPlan(buckets=int(buckets), bits=max(1, cell_bits), tree=True)


def _flat(bits: int) -> BucketPlan:
    bits = max(1, bits)
    return BucketPlan(buckets=2**bits, bits=bits, tree=False)


def sample_rows_for(expected: int, *, bits: int | None = None, bucket_rows: int = 128,
                    flat_max_bits: int | None = None) -> int:
    """Training rows a model for ``expected`` rows wants: TRAIN_SAMPLE_ROWS for a flat
    model, TREE_ROWS_PER_BUCKET per bucket for a tree (at most TREE_SAMPLE_ROWS)."""
    plan = plan_buckets(expected, 2**62, bits=bits, bucket_rows=bucket_rows, flat_max_bits=flat_max_bits)
    if not plan.tree:
        return TRAIN_SAMPLE_ROWS
    return int(min(TREE_SAMPLE_ROWS, max(TRAIN_SAMPLE_ROWS, TREE_ROWS_PER_BUCKET * plan.buckets)))


def train_model(
    vectors: ArrayLike,
    *,
    save: str | os.PathLike[str] | None = None,
    dim: int | None = None,
    metric: Metric = "cosine",
    bits: int | None = None,
    expected_size: int | None = None,
    ecc: bool = True,
    epochs: int | None = None,
    batch_size: int = 1024,
    rank: int | None = None,
    seed: int = 0,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    progress: ProgressLike = None,
) -> tuple[Router, list[dict]]:
    """Train a standalone learned model on ``vectors`` (array or ``.npy`` path), without a
    store; ``save`` writes it as a model file that ``create(path, model=...)`` uses.

    ``dim`` checks the vectors' dimension; ``metric`` must be the future store's (cosine
    normalises the sample). ``expected_size`` (default: the number of vectors) sizes the
    buckets when ``bits`` is None. ``epochs`` None: ``TrainConfig``'s default. Returns the
    router and the per-epoch history.
    """
    if metric not in ("cosine", "ip"):
        raise InvalidArgumentError(f"metric must be 'cosine' or 'ip' for a model file, got {metric!r} (an l2 store "
                                   "trains its own model).")
    source = VectorSource(vectors, dim=dim, what="training vectors",
                          dim_hint="Pass vectors of dimension {dim}, or --dim {got} for these.")
    cfg = train_config(bits=bits, ecc=ecc, epochs=epochs, batch_size=batch_size, rank=rank, seed=seed,
                        device=device, expected_size=expected_size or source.n)
    x = check_sample_size(training_sample(source, TRAIN_SAMPLE_ROWS, seed, metric))
    from .train import train  # torch: imported only to train

    router, history = train(x, cfg, progress=progress)
    if save is not None:
        from .persist import save_model_file

        save_model_file(router, save)
    return router, history


def train_config(*, bits, ecc, epochs, batch_size, rank, seed, device, expected_size, l2: bool = False):
    """A validated :class:`~asteria_store.model.train.TrainConfig` (one-line errors).

    ``epochs`` None means ``TrainConfig``'s default; 0 keeps the k-means start untrained.
    """
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 20):
        raise InvalidArgumentError(f"bits must be an integer in [1, 20], got {bits!r}.")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0):
        raise InvalidArgumentError(f"epochs must be a non-negative integer or None, got {epochs!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 32 or rank % 32):
        raise InvalidArgumentError(f"rank must be a positive multiple of 32, got {rank!r}.")
    if device not in ("auto", "cpu", "cuda"):
        raise InvalidArgumentError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}.")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise InvalidArgumentError("device 'cuda' was asked for, but torch sees no CUDA device. Use 'auto'.")
    from .train import TrainConfig

    optional = {} if epochs is None else {"epochs": epochs}
    return TrainConfig(bits=bits, ecc=bool(ecc), batch_size=batch_size, rank=rank, seed=seed, device=device,
                       expected_size=expected_size, l2=l2, **optional)


def sample_indices(n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.arange(n) if n <= size else np.sort(rng.choice(n, size, replace=False))


def training_sample(source: VectorSource, size: int, seed: int, metric: str) -> np.ndarray:
    """A seeded uniform sample of at most ``size`` rows of ``source``, validated and
    normalised for ``metric`` (rows are checked again, with row numbers, when hashed)."""
    rows = sample_indices(source.n, size, seed)
    x = source.take(rows)
    if not np.isfinite(x).all():
        bad = int(rows[np.argwhere(~np.isfinite(x))[0][0]])
        raise InvalidInputError(f"Expected finite {source.what}, got NaN or inf (first in row {bad}). "
                                "Clean or drop those rows and retry.")
    try:
        return normalise_rows(x, metric, what=source.what, out=x)  # x is ours: in place
    except InvalidInputError:  # name the row of the input, not of the sample
        bad = int(rows[np.flatnonzero(~x.any(axis=1))[0]])
        raise InvalidInputError(
            f"Expected non-zero {source.what} for metric 'cosine', got an all-zero vector in row {bad}."
        ) from None


#: Fewest vectors a model is trained on (a held-out tenth must still hold neighbours).
MIN_SAMPLE_ROWS = 100


def check_sample_size(x: np.ndarray) -> np.ndarray:
    if len(x) < MIN_SAMPLE_ROWS:
        raise InvalidInputError(
            f"Expected at least {MIN_SAMPLE_ROWS} training vectors, got {len(x)}. Pass a bigger "
            "sample (or ingest more first)."
        )
    return x


__all__ = ["FLAT_MAX_BITS", "MIN_SAMPLE_ROWS", "TRAIN_SAMPLE_ROWS", "BucketPlan", "plan_buckets", "sample_rows_for", "check_sample_size", "sample_indices", "train_config",
           "train_model", "training_sample"]
