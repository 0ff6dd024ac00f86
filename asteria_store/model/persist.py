"""Saving and loading routers: a store's model directory (JSON + little-endian .npy, no
pickle, sha256 digest) and standalone model files (torch files of plain data).

Lives apart from router.py so that it can import every router kind at the top: router.py
(the sign baseline and the shared probing helpers) and ecvh.py (the learned router) no
longer import each other.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from tokenize import TokenError

import numpy as np

from ..errors import CorruptStoreError, ModelFileError, UnsupportedFormatError
from .ecvh import ECVHRouter
from .tree import TreeRouter
from .router import BASE_MODEL_FORMAT, MODEL_FORMAT_VERSION, Router, SignHasher


def router_kinds() -> dict[str, type]:
    """Every router class by its ``kind``."""
    return {SignHasher.kind: SignHasher, ECVHRouter.kind: ECVHRouter, TreeRouter.kind: TreeRouter}


def save_router(router: Router, directory: str | os.PathLike[str]) -> str:
    """Write ``router`` to ``directory`` (created) and fsync it; returns its sha256 digest."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    desc = {"format_version": BASE_MODEL_FORMAT, **router.config()}
    files = {"router.json": json.dumps(desc, sort_keys=True).encode("utf-8")}
    for name, arr in router.arrays().items():
        arr = np.ascontiguousarray(arr)
        arr = arr.astype(arr.dtype.newbyteorder("<"))
        path = d / f"{name}.npy"
        np.save(path, arr, allow_pickle=False)
        files[f"{name}.npy"] = path.read_bytes()
    (d / "router.json").write_bytes(files["router.json"])
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode())
        digest.update(files[name])
        with open(d / name, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return digest.hexdigest()


def load_router(directory: str | os.PathLike[str], *, digest: str | None = None) -> Router:
    """Load a router saved by :func:`save_router`, checking its digest when given."""
    d = Path(directory)
    try:
        raw = (d / "router.json").read_bytes()
        desc = json.loads(raw)
    except (OSError, ValueError) as exc:
        raise CorruptStoreError(f"Cannot read the store's model in {str(d)!r}: {exc}") from None
    if not isinstance(desc, dict):
        raise CorruptStoreError(f"The store's model description in {str(d)!r} is damaged; run `asteria-store verify`.")
    if desc.get("format_version", 0) > MODEL_FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"The store's model has format version {desc['format_version']}, this asteria-store "
            f"reads up to {MODEL_FORMAT_VERSION}. Upgrade asteria-store."
        )
    kind = desc.get("kind")
    kinds = router_kinds()
    if kind not in kinds:
        raise UnsupportedFormatError(f"Unknown router kind {kind!r} in {str(d)!r}.")
    files = {"router.json": raw}
    arrays = {}
    for path in sorted(d.glob("*.npy")):
        try:
            files[path.name] = path.read_bytes()
            arrays[path.stem] = np.load(io.BytesIO(files[path.name]), allow_pickle=False)
        except (OSError, ValueError, EOFError, OverflowError, MemoryError, SyntaxError, TokenError) as exc:
            raise CorruptStoreError(
                f"Cannot read the store's model file {str(path)!r} ({type(exc).__name__}); it is damaged: "
                "run `asteria-store verify`."
            ) from None
    if digest is not None:
        h = hashlib.sha256()
        for name in sorted(files):
            h.update(name.encode())
            h.update(files[name])
        if h.hexdigest() != digest:
            raise CorruptStoreError(
                f"The store's model in {str(d)!r} does not match the catalog's digest; "
                "it was modified or partially written."
            )
    try:
        return kinds[kind].from_saved(desc, arrays)
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptStoreError(f"The model in {str(d)!r} is incomplete or inconsistent: {exc!r}") from None


# --- standalone model files ----------------------------------------------------------------

MODEL_FILE_MAGIC = "asteria-store model"


def save_model_file(router: Router, path: str | os.PathLike[str]) -> None:
    """Write ``router`` as one standalone file (``asteria-store train-model --save-model``).

    A torch file holding only plain data (a JSON description and named tensors), readable
    with ``torch.load(weights_only=True)``: no pickled objects. Written to a temporary
    sibling and renamed, so a crash leaves the old file or the new one.
    """
    import torch

    desc = {"magic": MODEL_FILE_MAGIC, "format_version": BASE_MODEL_FORMAT, **router.config()}
    payload = {
        "router_json": json.dumps(desc, sort_keys=True),
        "arrays": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in router.arrays().items()},
    }
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    torch.save(payload, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, target)


def load_model_file(path: str | os.PathLike[str]) -> Router:
    """Read a file written by :func:`save_model_file` (refuses anything else, one line)."""
    import pickle

    import torch

    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"No model file at {str(p)!r}. Train one with `asteria-store train-model`.")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
        desc = json.loads(payload["router_json"])
        arrays = {k: v.numpy() for k, v in payload["arrays"].items()}
    except (OSError, RuntimeError, ValueError, KeyError, TypeError, AttributeError,
            pickle.UnpicklingError, EOFError) as exc:
        raise ModelFileError(
            f"{str(p)!r} is not an asteria-store model file ({type(exc).__name__}). "
            "Train one with `asteria-store train-model`."
        ) from None
    if not isinstance(desc, dict) or desc.get("magic") != MODEL_FILE_MAGIC:
        raise ModelFileError(f"{str(p)!r} is not an asteria-store model file.")
    if desc.get("format_version", 0) > MODEL_FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"The model file {str(p)!r} has format version {desc['format_version']}, this "
            f"asteria-store reads up to {MODEL_FORMAT_VERSION}. Upgrade asteria-store."
        )
    kinds = router_kinds()
    if desc.get("kind") not in kinds:
        raise ModelFileError(f"Unknown router kind {desc.get('kind')!r} in {str(p)!r}.")
    try:
        return kinds[desc["kind"]].from_saved(desc, arrays)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFileError(f"The model file {str(p)!r} is incomplete or inconsistent: {exc!r}") from None
