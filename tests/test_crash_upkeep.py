"""Crash safety of the index's upkeep: a writer SIGKILLed at every publish point of a
compaction, a tiered merge, an upsert, a growth re-fit and a routing tree's local split leaves the old state or the new
one, never a mix, and nothing committed is lost.

The parent builds a store (three segments, some rows deleted) and records every live
vector. A child reopens it, patches one internal step to SIGKILL itself, and runs the
operation. The parent then checks, read-only and then writable, that the store verifies,
holds exactly the old content (or, past the commit, the new one), and that the debris an
interrupted write leaves (an unpublished segment or model directory) is removed.
"""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest

import torch

import asteria_store
from asteria_store.model import fit
from asteria_store.testing import clustered_vectors

DIM = 16
N = 1_500  # three segments of 500

CHILD = """
import sys
from pathlib import Path

import numpy as np

import asteria_store
import asteria_store.write.upkeep as upkeep_mod
from asteria_store.storage import catalog, segments
from asteria_store.testing.faults import kill_on_call
from asteria_store.write.commit import Commits
from asteria_store.write.pipeline import SegmentPipeline

path, data, op, point = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
if op == "split":  # the parent's small tree sizing; splits, never a re-fit
    from asteria_store.model import fit
    fit.FLAT_MAX_BITS, fit.TREE_BUCKET_ROWS = int(sys.argv[5]), int(sys.argv[6])
    upkeep_mod.TREE_REFIT_FACTOR = 10**9
if op == "merge":  # small tiers, so that the fourth segment of b's size merges
    upkeep_mod.MERGE_MIN_ROWS = 64
else:  # no merge gets in the way of the operation under test
    upkeep_mod.MERGE_FACTOR = 10**9
store = asteria_store.open(path)
# The n-th call of each step that belongs to the operation under test (an ingest that
# triggers a merge or a re-fit first publishes its own segment: call 1).
nth = 2 if op in ("merge", "refit", "split") else 1
steps = {
    "written": (segments.SegmentWriter, "finish", nth, True),
    "committing": {"compact": (catalog.Catalog, "drop_segment", 1, False),
                   "merge": (catalog.Catalog, "drop_segment", 1, False),
                   "upsert": (catalog.Catalog, "delete_ids", 1, False),
                   "refit": (catalog.Catalog, "clear_rows", 1, False),
                   "split": (catalog.Catalog, "renumber_buckets", 1, False)}[op],
    "committed": (Commits, "commit", nth, True),
    "model-saved": (SegmentPipeline, "save_model", 1, True),
}
owner, name, n, after = steps[point]
kill_on_call(owner, name, n, after=after)
if op == "compact":
    store.compact()
elif op == "upsert":
    store.upsert(np.load(data / "b.npy"), np.load(data / "b_ids.npy"))
else:  # merge, refit, split: an ingest whose upkeep merges / re-fits / splits
    store.ingest(np.load(data / "b.npy"), ids=np.load(data / "b_ids.npy"))
print("done", flush=True)
"""

# (operation, kill point) -> is the operation's own commit durable?
CASES = {
    ("compact", "written"): False,
    ("compact", "committing"): False,
    ("compact", "committed"): True,
    ("merge", "written"): False,
    ("merge", "committing"): False,
    ("merge", "committed"): True,
    ("upsert", "written"): False,
    ("upsert", "committing"): False,
    ("upsert", "committed"): True,
    ("refit", "model-saved"): False,
    ("refit", "written"): False,
    ("refit", "committing"): False,
    ("refit", "committed"): True,
    ("split", "model-saved"): False,
    ("split", "written"): False,
    ("split", "committing"): False,
    ("split", "committed"): True,
}

#: (FLAT_MAX_BITS, TREE_BUCKET_ROWS) of the split cases: a tree of ~32-row buckets.
SMALL_TREE = (3, 32)


def build(tmp_path: Path, op: str, monkeypatch) -> tuple[Path, Path, dict[int, np.ndarray], dict[int, np.ndarray], dict]:
    """The store before the operation, its content, and the content the operation makes."""
    path, data = tmp_path / "store", tmp_path / "data"
    data.mkdir()
    x = clustered_vectors(N, DIM, clusters=20, seed=1)
    ids = np.arange(N, dtype=np.uint64) * 7 + 3
    bits = None if op == "refit" else 4  # pinned bits: no re-fit gets in the way
    if op == "split":  # a learned tree, trained on the first ingest
        torch.set_num_threads(1)
        monkeypatch.setattr(fit, "FLAT_MAX_BITS", SMALL_TREE[0])
        monkeypatch.setattr(fit, "TREE_BUCKET_ROWS", SMALL_TREE[1])
    kind = {"router": "learned"} if op == "split" else {"router": "sign", "bits": bits}
    with asteria_store.create(path, dim=DIM, chunk_rows=64, **kind) as store:
        for part in np.array_split(np.arange(N), 1 if op == "split" else 3):
            store.ingest(x[part], ids=ids[part])
        store.delete(ids[::10])
        live = np.setdiff1d(ids, ids[::10])
        old = dict(zip(live.tolist(), store.get(live)))
        info = store.info()
    # merge: a fourth segment of the same tier as the three; refit: 5x the store's rows
    n_b = {"merge": 450, "upsert": 300, "refit": 6_000, "split": 1_500, "compact": 0}[op]
    b = clustered_vectors(max(n_b, 1), DIM, clusters=20, seed=2)[:n_b]
    b_ids = np.arange(n_b, dtype=np.uint64) + 10**6
    if op == "upsert":
        b_ids[:150] = live[:150]  # half replace stored ids, half are new
    np.save(data / "b.npy", b)
    np.save(data / "b_ids.npy", b_ids)
    unit = b / np.linalg.norm(b, axis=1, keepdims=True) if n_b else b
    new = {**old, **dict(zip(b_ids.tolist(), unit))}
    return path, data, old, new, info


def assert_holds(store: asteria_store.Store, content: dict[int, np.ndarray], *, exact: bool) -> None:
    ids = np.array(sorted(content), dtype=np.uint64)
    assert len(store) == len(ids)
    got = store.get(ids)
    want = np.stack([content[i] for i in ids.tolist()])
    if exact:
        np.testing.assert_array_equal(got, want)
    else:  # vectors normalised by the store
        np.testing.assert_allclose(got, want, atol=1e-6)
    found, _ = store.search(want[:3], k=len(ids), probes="all")
    for row in found:
        np.testing.assert_array_equal(np.sort(row[row >= 0]), ids.astype(np.int64))


@pytest.mark.parametrize(("op", "point"), list(CASES))
def test_kill_during_upkeep_leaves_old_or_new_state(tmp_path, python_child, monkeypatch, op, point) -> None:
    path, data, old, new, before = build(tmp_path, op, monkeypatch)
    proc = python_child(CHILD, path, data, op, point, *SMALL_TREE)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, out, err)
    assert "done" not in out
    committed = CASES[(op, point)]
    # merge and refit run after the ingest of b committed: the content is b's either way.
    content = new if (committed or op in ("merge", "refit", "split")) else old

    with asteria_store.open(path, readonly=True) as store:
        report = store.verify()
        assert report.ok, report.problems
        assert_holds(store, content, exact=op in ("compact",))
        info = store.info()
        if op == "compact":
            assert info["segments"] == (1 if committed else 3)
        if op == "merge":
            assert info["segments"] == (1 if committed else 4)
        if op == "refit":
            refits = before["internals"]["maintenance"].get("refits", 0)
            assert info["internals"]["maintenance"].get("refits", 0) == refits + committed
            assert (info["internals"]["router"]["bits"] > before["internals"]["router"]["bits"]) == committed
        if op == "split":
            splits = before["internals"]["maintenance"].get("splits", 0)
            assert info["internals"]["maintenance"].get("splits", 0) == splits + committed
            assert (info["buckets"] > before["buckets"]) == committed
            assert info["internals"]["router"]["kind"] == "tree"

    with asteria_store.open(path) as store:  # a writable open removes the debris
        report = store.verify(repair=True)
        assert report.ok, report.problems
        assert store.verify().orphans == []
        assert store._orphan_models() == []
        assert_holds(store, content, exact=op in ("compact",))
        # and the store goes on working: one more write, then everything is still there
        store.ingest(clustered_vectors(5, DIM, clusters=20, seed=3), ids=np.arange(5) + 5 * 10**6)
        assert len(store) == len(content) + 5
        live_dirs = {f"seg-{s:08d}" for s in store._current_view().segments}
        on_disk = {p.name for p in (path / "segments.zarr").iterdir() if p.is_dir()}
        assert on_disk == live_dirs
