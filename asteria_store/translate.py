"""Raw errors to asteria errors, at the public boundary (errors.py promises no raw error
reaches a user): a damaged catalog or model, a full disk, a read-only file system."""

from __future__ import annotations

import errno
import functools
import json
import struct
import tokenize
from pathlib import Path

import lmdb

from .errors import (
    AsteriaError,
    CorruptStoreError,
    DiskFullError,
    ReadOnlyError,
    StorageError,
)

#: Raw errors a damaged catalog or model can raise; translated to CorruptStoreError.
CATALOG_ERRORS = (lmdb.Error, struct.error, json.JSONDecodeError, UnicodeDecodeError, KeyError,
                   tokenize.TokenError)


def catalog_error(path: Path, exc: BaseException, *, writing: str | None = None) -> AsteriaError:
    """The one-line asteria error for a raw error from the catalog or the file system;
    ``writing`` says what a write was doing when the disk filled (the default: the OS's
    reason, or the catalog commit)."""
    full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or \
        (isinstance(exc, lmdb.Error) and ("No space left" in str(exc) or "Disk quota" in str(exc)))
    if full:
        if writing is None:
            writing = f"({exc.strerror})" if isinstance(exc, OSError) else "while committing to the catalog"
        return DiskFullError(f"No space left on the device of {str(path)!r} {writing}. "
                             "Free some space and retry; the store is unchanged.")
    if isinstance(exc, lmdb.ReadonlyError) or (isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EACCES)) \
            or (isinstance(exc, lmdb.Error) and ("Read-only file system" in str(exc) or "Permission denied" in str(exc))):
        return ReadOnlyError(f"The store {str(path)!r} cannot be written here ({_reason(exc)}); "
                             "open it with readonly=True (CLI commands that only read do).")
    if isinstance(exc, OSError):
        return StorageError(f"I/O error in the store {str(path)!r}: {_reason(exc)}.")
    return CorruptStoreError(f"The catalog of {str(path)!r} is damaged ({type(exc).__name__}: "
                             f"{_reason(exc)}); run `asteria-store verify {path}`.")


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def boundary(method):
    """Public methods raise asteria errors only: raw LMDB, struct, JSON and OS errors from
    a damaged catalog or a failing disk are translated here (one line, with the fix)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except AsteriaError:
            raise
        except (*CATALOG_ERRORS, OSError) as exc:
            raise catalog_error(self.path, exc) from None

    return wrapper


__all__ = ["CATALOG_ERRORS", "boundary", "catalog_error"]
