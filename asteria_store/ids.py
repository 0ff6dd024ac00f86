"""A store's ids: unsigned integers, or strings mapped to internal integer ids.

A store holds ids of one kind, fixed by its first ingest (``meta["id_kind"]``: ``"int"``
or ``"string"``; a store written before the key existed holds ints once it holds
anything). Internally every row has an integer id, so segments, extents, tombstones,
merges and every search work alike. A string store maps each string id to an internal
id in the catalog (``names`` and ``names_of``), in the same commit that adds or deletes
the row; an upsert keeps a string's internal id. Results come back in the store's kind:
int64 arrays (-1: no result) or object arrays of str (None: no result).
"""

from __future__ import annotations

import os
from typing import Any, Literal

import lmdb
import numpy as np

from .errors import IdNotFoundError, InvalidInputError
from .io import ArrayLike, read_array
from .storage.catalog import Catalog

IdKind = Literal["int", "string"]


def id_kind(cat: Catalog, txn: lmdb.Transaction) -> IdKind | None:
    """The kind of ids the store holds; None while it has never held any."""
    kind = cat.get_meta(txn, "id_kind")
    if kind is not None:
        return kind
    return "int" if int(cat.get_meta(txn, "next_id")) > 0 else None


def given_ids(ids: Any) -> Any:
    """Ids as given, a ``.npy`` path loaded (of integers, or of strings: dtype ``<U``)."""
    if isinstance(ids, (str, os.PathLike)):
        return read_array(ids, "ids")
    return ids


def is_string_ids(ids: Any) -> bool:
    """Whether ``ids`` are given as strings (a list or array of str)."""
    if isinstance(ids, (str, bytes)):
        return True
    if isinstance(ids, np.ndarray):
        return ids.dtype.kind in "US" or (ids.dtype.kind == "O" and ids.size > 0 and isinstance(ids.flat[0], str))
    if isinstance(ids, (list, tuple)):
        return len(ids) > 0 and isinstance(ids[0], str)
    return type(ids).__module__.startswith("pyarrow") and "string" in str(getattr(ids, "type", ""))


def load_names(ids: Any, *, n: int | None = None, unique: bool = True) -> list[str]:
    """String ids as a list: each a non-empty str, ``n`` of them if given, and unique
    (``unique=False``: repeats allowed)."""
    if isinstance(ids, (str, bytes)):
        raise InvalidInputError(f"Expected a list of string ids, got one {type(ids).__name__}: {ids!r}.")
    names = ids.to_pylist() if hasattr(ids, "to_pylist") else list(np.asarray(ids, dtype=object).reshape(-1)) \
        if isinstance(ids, np.ndarray) else list(ids)
    for name in names:
        if not isinstance(name, str) or not name:
            raise InvalidInputError(f"Expected string ids (non-empty str), got {name!r}.")
    if n is not None and len(names) != n:
        raise InvalidInputError(f"Expected {n} ids (one per vector), got {len(names)}.")
    if unique and len(set(names)) != len(names):
        seen = set()
        dup = next(x for x in names if x in seen or seen.add(x))
        raise InvalidInputError(f"Expected unique ids, got id {dup!r} more than once in this batch.")
    return [str(x) for x in names]


def as_id_array(ids: ArrayLike) -> np.ndarray:
    """Integer ids as uint64 (non-negative, 1-D)."""
    arr = np.atleast_1d(read_array(ids, "ids"))
    if arr.ndim == 1 and arr.size == 0:  # ``[]`` reads as float64: no ids, whatever its dtype
        return np.empty(0, dtype=np.uint64)
    if arr.dtype.kind not in "iu" or arr.ndim != 1:
        raise InvalidInputError(f"Expected a 1-D array of integer ids, got {arr.dtype} of shape {arr.shape}.")
    if arr.dtype.kind == "i" and arr.size and int(arr.min()) < 0:
        raise InvalidInputError(f"Expected non-negative ids, got {int(arr.min())}.")
    return arr.astype(np.uint64)


def check_kind(kind: IdKind | None, strings: bool) -> None:
    """Refuse ids of the other kind than the store holds."""
    if kind == "int" and strings:
        raise InvalidInputError("This store holds integer ids; got string ids. A store holds ids of one kind: "
                                "create another store for string ids.")
    if kind == "string" and not strings:
        raise InvalidInputError("This store holds string ids; pass ids as a list of strings.")


def to_internal(cat: Catalog, txn: lmdb.Transaction, ids: Any, *, missing: str = "raise") -> np.ndarray:
    """Ids as given (of the store's kind) as internal uint64 ids. An unknown string id
    raises :class:`IdNotFoundError` (``missing="raise"``) or maps to ``2**64 - 1``, which
    no row has (``missing="keep"``: the caller reports what it lacks)."""
    ids = given_ids(ids)
    if isinstance(ids, (list, tuple, np.ndarray)) and len(ids) == 0:
        return np.empty(0, dtype=np.uint64)
    strings = is_string_ids(ids)
    check_kind(id_kind(cat, txn), strings)
    if not strings:
        return as_id_array(ids)
    names = load_names(ids)
    found, internal = cat.lookup_names(txn, names)
    if not found.all():
        if missing == "raise":
            raise IdNotFoundError(f"Id {names[int(np.flatnonzero(~found)[0])]!r} is not in the store.")
        internal[~found] = np.iinfo(np.uint64).max
    return internal


def to_external(cat: Catalog, txn: lmdb.Transaction, ids: np.ndarray) -> np.ndarray:
    """Internal ids (any shape; -1: no result) in the store's kind: themselves for an int
    store, else an object array of str (None for -1)."""
    if id_kind(cat, txn) != "string":
        return ids
    out = np.full(ids.shape, None, dtype=object)
    real = ids >= 0
    out[real] = cat.names_of(txn, ids[real].tolist())
    return out


__all__ = ["IdKind", "as_id_array", "check_kind", "given_ids", "id_kind", "is_string_ids", "load_names", "to_external",
           "to_internal"]
