"""Readers in other processes against a writer that ingests, deletes and retrains.

A small run of ``benchmarks/stress_readers.py`` (which holds the writer, the readers and
the checker; see its docstring): every read must match one committed state of its
generation window. The other tests check that the checker flags wrong reads and retired
directories left on disk (it can fail).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "stress_readers.py"
_spec = importlib.util.spec_from_file_location("stress_readers", _SCRIPT)
stress = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stress)


def test_readers_see_one_committed_state_across_retrains(tmp_path):
    """Two long-lived read-only readers while the writer commits at least three retrains:
    no inconsistent read, nothing left on disk, and every read type ran meanwhile."""
    run = stress.run_stress(tmp_path / "run", readers=2, seconds=3, seed=0, min_retrains=3)
    summary = stress.check_run(run)
    report = stress.format_summary(summary)
    assert summary["inconsistencies"] == 0, report
    assert summary["failures"] == [], report
    assert summary["retrains"] >= 3
    assert all(r["retrains_in_window"] >= 2 for r in summary["readers"]), report
    assert set(summary["reads_during_retrains"]) == set(stress.READS), report


def _history():
    """Generation 1: ids 0..99 ingested; 2: ids 0..9 deleted; 3: a retrain; 4: ids
    100..149 ingested."""
    return stress.load_history([
        {"op": "ingest", "generation": 1, "commits": 1, "first_id": 0, "n": 100, "seed": 5},
        {"op": "delete", "generation": 2, "commits": 1, "ids": list(range(10))},
        {"op": "train", "generation": 3, "commits": 1},
        {"op": "ingest", "generation": 4, "commits": 1, "first_id": 100, "n": 50, "seed": 6},
    ])


def _search(h, g: int, op: str = "exact", *, seed: int = 7) -> dict:
    """The record of a correct search of the state at generation ``g``, window [g, g]."""
    live = stress.state(h, g)[0]
    queries = stress.batch_vectors(seed, stress.QUERIES)
    scores = queries @ h.vectors[live].T
    order = np.argsort(-scores, axis=1)
    ids = np.full((len(queries), stress.K), -1, dtype=np.int64)
    out = np.full((len(queries), stress.K), -np.inf, dtype=np.float32)
    ids[:, : len(live)] = live[order]
    out[:, : len(live)] = np.take_along_axis(scores, order, axis=1)
    count = len(live)
    return {"reader": 0, "op": op, "g0": g, "g1": g, "c0": count, "c1": count, "seed": seed,
            "queries": stress.summarise_search(ids, out)}


def _read(op: str, g0: int, g1: int, h, **fields) -> dict:
    return {"reader": 0, "op": op, "g0": g0, "g1": g1, "c0": len(stress.state(h, g0)[0]),
            "c1": len(stress.state(h, g1)[0]), **fields}


def _error(type_: str, message: str, *, asteria: bool = True) -> dict:
    return {"type": type_, "module": "asteria_store.errors" if asteria else "builtins",
            "asteria": asteria, "message": message}


def test_checker_accepts_right_reads_and_flags_wrong_ones():
    h = _history()
    right = [
        _search(h, 1),
        {**_search(h, 1, "probed"), "g1": 3, "c1": 90},  # state 1 is in the window [1, 3]
        {**_search(h, 4), "g0": 3, "c0": 90},
        _read("get", 1, 1, h, ids=[0, 50], vectors=h.vectors[[0, 50]].tolist()),
        _read("get", 2, 2, h, ids=[0, 50], error=_error("IdNotFoundError", "Id 0 is not in the store.")),
        _read("get", 1, 2, h, ids=[5], error=_error("IdNotFoundError", "Id 5 is not in the store.")),
        _read("len", 1, 4, h, value=90),
        _read("verify", 3, 3, h, ok=True, problems=[]),
    ]
    for rec in right:
        assert stress.check_read(h, rec) == [], rec

    perturbed = _search(h, 4)
    perturbed["queries"][1]["head_scores"][0] += 1e-3
    dropped = _search(h, 1)
    dropped["queries"][0].update(n=99, digest=stress.id_digest(np.arange(1, 100)))
    wrong = {
        "stale search": {**_search(h, 1), "g0": 2, "g1": 3, "c0": 90, "c1": 90},
        "empty search": {**_search(h, 4), "queries": stress.summarise_search(
            np.full((2, stress.K), -1), np.full((2, stress.K), -np.inf, dtype=np.float32))},
        "one id short": dropped,
        "wrong score": perturbed,
        "search raised": _read("exact", 3, 4, h, seed=7, error=_error(
            "CorruptStoreError", "Segment chunk 'x/seg-00000002/vectors/c/4/0' is missing")),
        "raw KeyError": _read("get", 3, 4, h, ids=[50], error=_error("KeyError", "7", asteria=False)),
        "live id not found": _read("get", 1, 1, h, ids=[3],
                                   error=_error("IdNotFoundError", "Id 3 is not in the store.")),
        "dead id returned": _read("get", 2, 4, h, ids=[3], vectors=h.vectors[[3]].tolist()),
        "wrong vectors": _read("get", 4, 4, h, ids=[120], vectors=h.vectors[[121]].tolist()),
        "wrong len": _read("len", 2, 4, h, value=100),
        "verify not ok": _read("verify", 4, 4, h, ok=False, problems=["seg-00000002: chunk is missing"]),
        "wrong info count": {**_read("len", 1, 1, h, value=100), "c1": 90},
        "uncommitted generation": _read("len", 4, 4, h, value=140) | {"g1": 5},
        "info raised": {"reader": 0, "op": "info",
                        "error": _error("FileNotFoundError", "seg-00000003", asteria=False)},
    }
    for name, rec in wrong.items():
        assert stress.check_read(h, rec), f"the checker missed: {name}"


@pytest.mark.parametrize("leftover", [0, 2])
def test_check_run_flags_retired_directories_left_on_disk(tmp_path, leftover):
    """A run whose final disk check finds more seg-* directories than catalog segments fails."""
    journal = tmp_path / "journal.jsonl"
    with open(journal, "w") as fh:
        stress.append_journal(fh, {"op": "ingest", "generation": 1, "commits": 1, "first_id": 0, "n": 10,
                                   "seed": 1})
    disk = {"generation": 1, "count": 10, "verify_ok": True, "verify_problems": [], "segments": 1,
            "segment_dirs": 1 + leftover, "model_dirs": 1, "leftover_dirs": leftover}
    run = {"config": {"journal": str(journal)}, "writer_rc": 0, "reader_rcs": [], "maps_end": [],
           "records": [], "disk": disk, "timings": {}}
    summary = stress.check_run(run)
    assert bool(summary["failures"]) == bool(leftover)
