"""Every error asteria-store raises on purpose.

All errors derive from :class:`AsteriaError` and mix in the builtin a caller would expect
(``FileNotFoundError``, ``ValueError``, ``KeyError``...), so ``except ValueError`` keeps
working. Messages are one line: what was expected, what was got, and how to fix it. The
CLI prints them as ``Error: <message>`` and exits non-zero. Raw LMDB, Zarr or numpy errors
are translated at the boundary and never reach a user.
"""

from __future__ import annotations


class AsteriaError(Exception):
    """Base class of every asteria-store error."""


class StoreNotFoundError(AsteriaError, FileNotFoundError):
    """No store exists at the given path."""


class StoreExistsError(AsteriaError, FileExistsError):
    """A store (or a non-empty directory) already exists where one was to be created."""


class UnsupportedFormatError(AsteriaError, ValueError):
    """The store was written by a newer asteria-store (format version too high)."""


class CorruptStoreError(AsteriaError, RuntimeError):
    """The store's catalog or segments are inconsistent; run ``asteria-store verify``."""


class ReadOnlyError(AsteriaError, PermissionError):
    """A write was attempted on a store opened with ``readonly=True``."""


class StoreLockedError(AsteriaError, RuntimeError):
    """Another process holds the store's writer lock."""


class StoreClosedError(AsteriaError, RuntimeError):
    """The store was used after ``close()``."""


class InvalidInputError(AsteriaError, ValueError):
    """Vectors, ids or an input file are not usable (dtype, shape, NaN, unreadable...)."""


class DimensionMismatchError(InvalidInputError):
    """Vectors of the wrong dimension for this store."""


class InvalidArgumentError(AsteriaError, ValueError):
    """An option is out of range (k <= 0, unknown metric, ...)."""


class DuplicateIdError(InvalidInputError):
    """An id is given twice, or is already in the store."""


class IdNotFoundError(AsteriaError, KeyError):
    """An id is not in the store."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it one plain line
        return str(self.args[0]) if self.args else ""


class StorageError(AsteriaError, OSError):
    """The file system failed under the store (an I/O error); the message names the path."""


class DiskFullError(StorageError):
    """No space left on the device (or quota exceeded) while writing; nothing was committed."""


class UpkeepDeferredWarning(UserWarning):
    """An ingest was committed, but the upkeep after it (a re-fit, splits or merges) stopped
    early because the device filled up; it runs again after a later ingest."""


class ModelFileError(AsteriaError, ValueError):
    """A standalone model file is missing, unreadable, or not an asteria-store model."""


class BatchJobError(AsteriaError, RuntimeError):
    """A batch job could not finish (its workers kept dying); finished blocks are kept."""


class StoreChangedError(AsteriaError, RuntimeError):
    """A writer committed to a store while a batch job read it (its results would mix two
    states of the store)."""


__all__ = [
    "AsteriaError",
    "BatchJobError",
    "CorruptStoreError",
    "DimensionMismatchError",
    "DiskFullError",
    "DuplicateIdError",
    "IdNotFoundError",
    "InvalidArgumentError",
    "InvalidInputError",
    "ModelFileError",
    "ReadOnlyError",
    "StorageError",
    "StoreChangedError",
    "StoreClosedError",
    "StoreExistsError",
    "StoreLockedError",
    "StoreNotFoundError",
    "UnsupportedFormatError",
]
