"""Fixtures shared by the test modules."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

import asteria_store
from asteria_store.storage.catalog import Catalog
from asteria_store.testing import clustered_vectors


def _disk_snapshot(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Everything a store holds: every key/value of every LMDB database, every file and
    directory under ``segments.zarr/`` and ``model/`` (relative path -> sha256; None for a
    directory, so an empty leftover directory shows too), and the names at the top level
    and in ``catalog.lmdb/`` (so a stray temporary file shows too).
    """
    root = Path(path)
    catalog = Catalog(root / "catalog.lmdb")  # shares the process's env if one is open
    try:
        dump = catalog.dump()
    finally:
        catalog.close()
    files: dict[str, str | None] = {}
    for top in ("segments.zarr", "model"):
        for p in sorted((root / top).rglob("*")):
            rel = p.relative_to(root).as_posix()
            files[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
    names = sorted(p.name for p in root.iterdir()) + sorted(
        f"catalog.lmdb/{p.name}" for p in (root / "catalog.lmdb").iterdir()
    )
    return {"catalog": dump, "files": files, "names": names}


@pytest.fixture
def disk_snapshot() -> Callable[[str | os.PathLike[str]], dict[str, Any]]:
    """``disk_snapshot(store_path)``: a comparable picture of a store's catalog and files."""
    return _disk_snapshot


@pytest.fixture
def python_child() -> Iterator[Callable[..., subprocess.Popen]]:
    """``python_child(script, *args)``: run ``script`` (dedented) in a fresh interpreter,
    with ``sys.argv[1:] == args`` and text pipes for stdout/stderr. Children still running
    at teardown are killed.
    """
    children: list[subprocess.Popen] = []

    def start(script: str, *args: object) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(script), *(str(a) for a in args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        children.append(proc)
        return proc

    yield start
    for proc in children:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


# --- stores and seeded datasets -------------------------------------------------------------

DATA_DIR = Path(__file__).parent / "data"


class Dataset(NamedTuple):
    """Base vectors and queries (read-only float32 arrays)."""

    base: np.ndarray
    queries: np.ndarray


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.float32)
    a.flags.writeable = False  # session-scoped: no test may change it for the others
    return a


@pytest.fixture
def tmp_store(tmp_path: Path) -> Iterator[asteria_store.Store]:
    """An empty store (dim 32, cosine, float32, default router), closed at teardown."""
    store = asteria_store.create(tmp_path / "store", dim=32)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture(scope="session")
def small_learned_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained learned store built once per session: 1,200 clustered rows of dim 16
    (12 clusters, seed 0) in one segment, chunks of 256 rows. Use ``small_learned``."""
    path = tmp_path_factory.mktemp("small-learned") / "store"
    with asteria_store.create(path, dim=16, chunk_rows=256) as store:
        store.ingest(clustered_vectors(1200, 16, clusters=12, seed=0))  # trains the model
    return path


@pytest.fixture
def small_learned(small_learned_template: Path, tmp_path: Path) -> Path:
    """A fresh copy of ``small_learned_template`` (the path of a closed store)."""
    path = tmp_path / "store"
    shutil.copytree(small_learned_template, path)
    return path


@pytest.fixture(scope="session")
def clustered() -> Dataset:
    """2000 base vectors and 100 queries, dim 32, 20 clusters, seed 0 (one draw, split)."""
    x = clustered_vectors(2100, 32, clusters=20, seed=0)
    return Dataset(_frozen(x[:2000]), _frozen(x[2000:]))


@pytest.fixture(scope="session")
def wordnet() -> Dataset:
    """The real-embedding slice: 3000 WordNet definitions and 200 example sentences,
    all-MiniLM-L6-v2 (384-d), stored as float16, loaded as float32."""
    return Dataset(
        _frozen(np.load(DATA_DIR / "wordnet_base_3000.f16.npy")),
        _frozen(np.load(DATA_DIR / "wordnet_queries_200.f16.npy")),
    )


@pytest.fixture(scope="module", params=["learned", "sign"])
def routed_store(request, wordnet: Dataset, tmp_path_factory: pytest.TempPathFactory):
    """The wordnet slice in two segments with some deletes, under each router (learned:
    the bits 2,000 training rows allow, so the second ingest re-fits nothing)."""
    path = tmp_path_factory.mktemp(request.param) / "store"
    s = asteria_store.create(path, dim=384, router=request.param, bits=5 if request.param == "learned" else 6)
    s.ingest(wordnet.base[:2000])
    s.ingest(wordnet.base[2000:])
    s.delete(np.arange(0, 3000, 37))
    yield s
    s.close()


def normalise(x: np.ndarray) -> np.ndarray:
    """What a store does to vectors and queries under metric "cosine" (float32 rows of
    unit length)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def run(*args: object):
    """The CLI run in-process (click's CliRunner) with ``args`` as strings: its Result."""
    from asteria_store_cli.main import cli
    from click.testing import CliRunner

    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_same_up_to_rounding(ids, scores, ref_i, ref_s, atol=1e-6) -> None:
    """Equal results, except that rows whose exact scores differ by float32 rounding only
    (a product of another shape sums in another order) may trade places."""
    np.testing.assert_allclose(scores, ref_s, rtol=0, atol=atol)
    for r in np.flatnonzero((ids != ref_i).any(axis=1)):
        differ = ids[r] != ref_i[r]
        assert np.abs(scores[r, differ] - ref_s[r, differ]).max() <= atol
        kth = ref_s[r, -1]
        clear = ref_s[r] > kth + atol  # far above the k-th: must be found by both
        assert set(ref_i[r, clear]) <= set(ids[r]), r
        near = np.abs(ref_s[r, differ] - kth) <= atol
        swapped = np.abs(np.diff(ref_s[r])) <= atol
        assert near.all() or swapped.any(), r


@pytest.fixture(scope="module")
def tree_data() -> np.ndarray:
    """Clustered vectors a routing tree of ~500 buckets is trained on (test_tree, test_split)."""
    return clustered_vectors(4000, 32, clusters=40, seed=3)


@pytest.fixture(scope="module")
def tree(tree_data):
    """A routing tree (model/tree.py) trained on ``tree_data``, one thread."""
    import torch

    from asteria_store.model.train import TrainConfig, train

    torch.set_num_threads(1)
    router, history = train(tree_data, TrainConfig(bits=9, flat_max_bits=4, threads=1, seed=0))
    assert history[-1]["epoch"] == "tree"
    return router
