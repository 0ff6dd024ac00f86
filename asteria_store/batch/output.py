"""A batch job's results on disk: written in place block by block, published whole.

While the job runs, everything lives in ``RESULTS.zarr.partial/``::

    job.json          what the job is (store, queries, k, probes, blocks): what --resume checks
    done/<block>      one small JSON file per finished block, written atomically (tmp + rename)
                      after the block's chunks were written and fsynced
    results.zarr/     the Zarr v3 group: ids (Q, k) int64, scores (Q, k) float32, chunked by
                      query block (one chunk file per block), and query_ids (Q,) for a kNN graph

A block's marker exists only once its rows are durable, so a job killed at any moment
(worker, client, machine) resumes by redoing exactly the blocks without a marker; a block
redone twice writes the same bytes. When every block is done the group's attributes get
the job's summary and ``results.zarr`` is renamed to ``RESULTS.zarr``: a path that exists is
a finished job; plain zarr or dask read it (``zarr.open_group(path)["ids"]``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError, StoreExistsError
from ..storage.segments import fsync_dir, fsync_tree, write_atomic

GROUP = "results.zarr"
#: With a job's ``columns``: the results' metadata (query, rank, id, columns), Parquet,
#: inside the group (Zarr readers ignore it).
COLUMNS_FILE = "columns.parquet"
MARKERS = "done"
JOB_FILE = "job.json"


def staging_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def begin(out: Path, manifest: dict[str, Any], *, resume: bool) -> tuple[Path, set[int]]:
    """The staging directory of the job ``manifest`` describes and the blocks already done.

    A fresh job creates it; ``resume`` reopens an unfinished one after checking it is the same
    job. Raises one-line errors before any work: output exists (without ``resume``), an
    unfinished job at the path (without ``resume``), or a different job to resume.
    """
    stage = staging_path(out)
    if out.exists():
        raise StoreExistsError(
            f"{str(out)!r} already exists" + (" and is not this job's finished output" if resume else "")
            + "; choose a new --out path or remove it."
        )
    if stage.exists():
        if not resume:
            raise StoreExistsError(
                f"An unfinished job is at {str(stage)!r}; rerun with --resume to finish it, or remove it."
            )
        try:
            old = json.loads((stage / JOB_FILE).read_text())
        except (OSError, ValueError):
            old = None
        if old is not None:
            diff = [key for key in sorted(set(old) | set(manifest)) if key not in ("created",)
                    and old.get(key) != manifest.get(key)]
            if diff:
                key = diff[0]
                raise InvalidArgumentError(
                    f"Cannot resume {str(stage)!r}: it is a different job ({key} was "
                    f"{json.dumps(old.get(key))}, now {json.dumps(manifest.get(key))}). "
                    "Rerun with the same arguments, or remove it to start over."
                )
            done = {int(p.name) for p in (stage / MARKERS).iterdir() if p.name.isdigit()}
            return stage, done
        shutil.rmtree(stage)  # killed before its job record was written: nothing in it counts
    if not out.parent.is_dir():
        raise InvalidArgumentError(f"Cannot write {str(out)!r}: the directory {str(out.parent)!r} does not exist.")
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.creating")
    tmp.mkdir()
    try:
        _create_group(tmp / GROUP, manifest)
        (tmp / MARKERS).mkdir()
        write_atomic(tmp / JOB_FILE, json.dumps(manifest, indent=1).encode())
        fsync_dir(tmp)
        os.rename(tmp, stage)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stage, set()


def _create_group(path: Path, manifest: dict[str, Any]) -> None:
    import zarr

    n, k, rows = manifest["n_queries"], manifest["k"], manifest["block_rows"]
    group = zarr.open_group(str(path), mode="w-")
    group.create_array("ids", shape=(n, k), chunks=(rows, k), dtype="int64", fill_value=-1)
    group.create_array("scores", shape=(n, k), chunks=(rows, k), dtype="float32", fill_value=float("-inf"))
    if manifest["queries"]["kind"] in ("store", "collection"):
        group.create_array("query_ids", shape=(n,), chunks=(rows,), dtype="int64", fill_value=-1)
    group.attrs["asteria_batch"] = {**manifest, "complete": False}


def write_query_ids(stage: Path, ids: np.ndarray) -> None:
    """The ids of a store's own vectors used as queries, written once at the start."""
    import zarr

    arr = zarr.open_array(str(stage / GROUP / "query_ids"), mode="r+")
    arr[:] = ids.astype(np.int64)
    fsync_tree(stage / GROUP / "query_ids")


def read_query_ids(stage: Path, start: int, stop: int) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_array(str(stage / GROUP / "query_ids"), mode="r")[start:stop])


def write_block(stage: Path, block: int, start: int, ids: np.ndarray, scores: np.ndarray,
                record: dict[str, Any]) -> None:
    """Write one block's rows, make them durable, then mark the block done."""
    import zarr

    stop = start + len(ids)
    for name, values in (("ids", ids), ("scores", scores)):
        zarr.open_array(str(stage / GROUP / name), mode="r+")[start:stop] = values
        chunk_dir = stage / GROUP / name / "c" / str(block)
        if chunk_dir.exists():  # absent when every value equals the fill value
            fsync_tree(chunk_dir)
    write_atomic(stage / MARKERS / str(block), json.dumps(record).encode())


def markers(stage: Path) -> list[dict[str, Any]]:
    out = []
    for p in (stage / MARKERS).iterdir():
        if p.name.isdigit():
            out.append(json.loads(p.read_text()))
    return out


def publish(out: Path, stage: Path, summary: dict[str, Any]) -> None:
    """Record the summary in the group's attributes and rename the group to ``out``."""
    import zarr

    group = zarr.open_group(str(stage / GROUP), mode="r+")
    group.attrs["asteria_batch"] = {**group.attrs["asteria_batch"], **summary, "complete": True}
    fsync_dir(stage / GROUP / "zarr.json")
    fsync_dir(stage / GROUP)
    os.rename(stage / GROUP, out)
    fsync_dir(out.parent)
    shutil.rmtree(stage, ignore_errors=True)


__all__ = ["COLUMNS_FILE", "begin", "markers", "publish", "read_query_ids", "staging_path", "write_block", "write_query_ids"]
