"""Reading vectors and ids from arrays and ``.npy`` files, validated at the boundary.

A :class:`VectorSource` wraps an in-memory array or a ``.npy`` file opened with
``np.load(mmap_mode="r")``. Ingest reads it block by block and gathers rows in bucket order;
after each block the file's pages are dropped from this process (``madvise(DONTNEED)``),
so the resident memory of an ingest stays bounded whatever the file size. The OS page
cache still keeps the file warm for the second pass.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from tokenize import TokenError
from typing import Union

import numpy as np

from .errors import DimensionMismatchError, InvalidInputError

#: Rows gathered between two page releases in :meth:`VectorSource.take`.
_GATHER_ROWS = 1024

ArrayLike = Union[np.ndarray, "os.PathLike[str]", str]


def _load_npy(path: str | os.PathLike[str], what: str) -> np.ndarray:
    p = Path(path)
    if not p.exists():
        raise InvalidInputError(f"Cannot read {what} file {str(p)!r}: no such file.")
    if p.is_dir():
        raise InvalidInputError(f"Cannot read {what} file {str(p)!r}: it is a directory.")
    if not p.is_file():  # a FIFO, socket or device would block or never end
        raise InvalidInputError(f"Cannot read {what} file {str(p)!r}: not a regular file.")
    try:
        with p.open("rb") as fh:
            magic = fh.read(6)
    except PermissionError:
        raise InvalidInputError(f"Cannot read {what} file {str(p)!r}: permission denied.") from None
    if magic[:4] == b"PK\x03\x04":
        raise InvalidInputError(
            f"Cannot read {what} file {str(p)!r}: expected a .npy array, got an .npz archive."
        )
    if magic != b"\x93NUMPY":
        raise InvalidInputError(
            f"Cannot read {what} file {str(p)!r}: not a .npy file (save arrays with numpy.save)."
        )
    try:
        with np.errstate(all="raise"):  # a huge shape overflows the size computation
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except PermissionError:
        raise InvalidInputError(f"Cannot read {what} file {str(p)!r}: permission denied.") from None
    except (ValueError, OSError, EOFError, OverflowError, FloatingPointError, MemoryError, SyntaxError,
            TokenError) as exc:
        # A damaged or hostile header (a huge or negative shape, unparsable text).
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InvalidInputError(
            f"Cannot read {what} file {str(p)!r}: not a valid .npy file ({reason})."
        ) from None
    return arr


def _check_numeric(arr: np.ndarray, what: str) -> None:
    kind = arr.dtype.kind
    if kind not in "fiu":
        raise InvalidInputError(
            f"Expected {what} with a real numeric dtype (float or int), got dtype {arr.dtype}."
        )


class VectorSource:
    """An ``(n, d)`` block of vectors to ingest or query, from an array or a ``.npy`` path.

    Validation of shape and dtype happens here, on construction; non-finite values are
    caught block by block by :meth:`blocks` (the whole input is never loaded at once).
    """

    def __init__(self, data: ArrayLike, *, dim: int | None = None, what: str = "vectors",
                 dim_hint: str = "Was the store created with --dim {got}?"):
        self.what = what
        self.path: str | None = None
        if isinstance(data, (str, os.PathLike)):
            self.path = os.fspath(data)
            arr = _load_npy(data, what)
        else:
            try:
                arr = np.asarray(data)
            except (ValueError, TypeError) as exc:
                raise InvalidInputError(f"Cannot use {what} as an array: {exc}") from None
        _check_numeric(arr, what)
        if arr.ndim != 2:
            raise InvalidInputError(
                f"Expected {what} as a 2-D array of shape (n, d), got {arr.ndim}-D shape "
                f"{tuple(arr.shape)}. For one vector, pass vec[None, :]."
            )
        if arr.shape[0] == 0:
            raise InvalidInputError(f"Expected at least one row of {what}, got an empty array.")
        if dim is not None and arr.shape[1] != dim:
            raise DimensionMismatchError(
                f"Expected {what} of dimension {dim}, got {arr.shape[1]}. "
                + dim_hint.format(got=arr.shape[1], dim=dim)
            )
        self.array = arr

    @property
    def n(self) -> int:
        return int(self.array.shape[0])

    @property
    def dim(self) -> int:
        return int(self.array.shape[1])

    def _as_float32(self, block: np.ndarray, start: int) -> np.ndarray:
        with np.errstate(over="ignore"):  # out-of-range values become inf, refused below
            out = np.asarray(block, dtype=np.float32)
        if not np.isfinite(out).all():
            where = np.argwhere(~np.isfinite(out))[0]
            bad = start + int(where[0])
            if np.isfinite(np.asarray(block)[tuple(where)]):
                raise InvalidInputError(
                    f"Expected {self.what} within float32 range (|v| <= 3.4e38), got a larger "
                    f"value (first in row {bad}). Rescale those rows and retry."
                )
            raise InvalidInputError(
                f"Expected finite {self.what}, got NaN or inf (first in row {bad}). "
                "Clean or drop those rows and retry."
            )
        return out

    def read(self, start: int, stop: int, *, row_offset: int = 0) -> np.ndarray:
        """Rows ``start:stop`` as float32; raises on NaN/inf, naming the row (numbered from
        ``row_offset``: this source's row 0 is row ``row_offset`` of a bigger input)."""
        return self._as_float32(self.array[start:stop], row_offset + start)

    def read_all(self, block_rows: int = 16384) -> np.ndarray:
        """Every row as one float32 array, converted block by block (the mapped file's pages
        are dropped after each)."""
        if self.n <= block_rows:
            return self.read(0, self.n)
        return np.concatenate([block for _, block in self.blocks(block_rows)])

    def blocks(self, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start_row, float32 block)`` in file order; raises on NaN/inf."""
        for start in range(0, self.n, block_rows):
            yield start, self.read(start, start + block_rows)
            self.release()

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Gather ``rows`` (ascending) as float32; values were validated by :meth:`blocks`.

        Scattered reads from a mapped file: the kernel maps up to 64 KiB around every
        touched row (fault-around), so rows are gathered in small batches with the pages
        dropped after each; resident memory stays ~_GATHER_ROWS * 64 KiB at most.
        """
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        for start in range(0, len(rows), _GATHER_ROWS):
            with np.errstate(over="ignore"):  # out-of-range values become inf: callers check
                out[start : start + _GATHER_ROWS] = self.array[rows[start : start + _GATHER_ROWS]]
            self.release()
        return out

    def _advise(self, flag: str) -> None:
        mm = getattr(self.array, "_mmap", None)
        if isinstance(mm, mmap.mmap) and hasattr(mmap, flag):
            mm.madvise(getattr(mmap, flag))

    def release(self) -> None:
        """Drop the mapped file's pages from this process's resident set (no-op for arrays)."""
        self._advise("MADV_DONTNEED")


def normalise_rows(x: np.ndarray, metric: str, *, what: str, offset: int = 0,
                   out: np.ndarray | None = None) -> np.ndarray:
    """Rows in the form a store keeps them: L2-normalised for ``metric="cosine"`` (an
    all-zero row is refused, named by its row number: ``offset`` + its index in ``x``),
    as given for ``"ip"``, ``[x, |x|^2 / 2]`` for ``"l2"`` (a new array). ``out``: where
    to write normalised rows (float32, ``x`` itself for in place)."""
    if metric == "l2":
        half = 0.5 * np.einsum("ij,ij->i", x.astype(np.float64), x.astype(np.float64))
        return np.concatenate([x.astype(np.float32, copy=False), half.astype(np.float32)[:, None]], axis=1)
    if metric != "cosine":
        return x
    out = np.empty(x.shape, dtype=np.float32) if out is None else out
    # float64: squares of finite float32 values neither overflow nor underflow there. In
    # blocks of rows, so the float64 copies stay a few MiB whatever len(x) is (a training
    # sample of 400,000 rows held 3 GiB of them at once).
    for start in range(0, len(x), _NORMALISE_ROWS):
        x64 = x[start : start + _NORMALISE_ROWS].astype(np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", x64, x64))[:, None]
        if (norms == 0).any():
            bad = offset + start + int(np.argwhere(norms[:, 0] == 0)[0][0])
            raise InvalidInputError(
                f"Expected non-zero {what} for metric 'cosine', got an all-zero vector in row {bad}."
            )
        out[start : start + len(x64)] = x64 / norms
    return out


def query_form(q: np.ndarray, metric: str) -> np.ndarray:
    """Queries in the form scored against stored rows: normalised for ``"cosine"``, as
    given for ``"ip"``, ``[q, -1]`` for ``"l2"`` (so ``<[q, -1], [x, |x|^2/2]>`` ranks
    rows as ``-|q - x|^2`` does)."""
    if metric == "l2":
        return np.concatenate([q.astype(np.float32, copy=False), np.full((len(q), 1), -1.0, np.float32)], axis=1)
    return normalise_rows(q, metric, what="queries")


def l2_distances(q: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Squared distances ``|q|^2 - 2 s`` of an l2 store's scores ``s`` (Q, k) for queries
    ``q`` (Q, d); -inf (no result) becomes +inf. Smallest first where scores were best first."""
    norms = np.einsum("ij,ij->i", q.astype(np.float64), q.astype(np.float64))[:, None]
    out = (norms - 2.0 * scores.astype(np.float64)).astype(np.float32)
    out[np.isneginf(scores)] = np.inf
    return np.maximum(out, 0, out=out, where=np.isfinite(out))


#: Rows normalised per float64 block by :func:`normalise_rows`.
_NORMALISE_ROWS = 4096


def read_array(data: ArrayLike, what: str) -> np.ndarray:
    """An array as given, or loaded from a ``.npy`` path with a clear error if unreadable."""
    if isinstance(data, (str, os.PathLike)):
        return _load_npy(data, what)
    return np.asarray(data)


def load_ids(data: ArrayLike, *, n: int) -> np.ndarray:
    """Read external ids (1-D, non-negative integers, length ``n``) as uint64."""
    arr = read_array(data, "ids")
    if arr.dtype.kind not in "iu":
        raise InvalidInputError(f"Expected integer ids, got dtype {arr.dtype}.")
    if arr.ndim != 1:
        raise InvalidInputError(f"Expected ids as a 1-D array, got shape {tuple(arr.shape)}.")
    if arr.shape[0] != n:
        raise InvalidInputError(f"Expected {n} ids (one per vector), got {arr.shape[0]}.")
    arr = np.asarray(arr)
    if arr.dtype.kind == "i" and arr.size and int(arr.min()) < 0:
        raise InvalidInputError(f"Expected non-negative ids, got {int(arr.min())}.")
    return arr.astype(np.uint64)
