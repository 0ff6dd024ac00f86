"""The randomized SIGKILL crasher (benchmarks/crasher.py), short: 6 kill-and-check cycles.

One learned store, a fixed seed and timed kills at most 1 s after the child is ready, so
the module takes ~30-45 s on a loaded 2-core machine (a child's start-up, torch import
included, is most of a cycle). Every invariant the crasher checks must hold after every
kill, and the checker itself must notice a store that does not hold the journal's state.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "crasher.py"
_spec = importlib.util.spec_from_file_location("crasher", _SCRIPT)
crasher = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = crasher  # its dataclasses look their module up there
_spec.loader.exec_module(crasher)

CYCLES = 6
#: Its kill plan holds in-op kills aimed at ingests and after-done kills that let the
#: auto-training finish (which kind a kill lands in still depends on timing).
SEED = 6


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """The summary of a short crasher run, and its directory (store and journal, kept)."""
    workdir = tmp_path_factory.mktemp("crasher")
    summary = crasher.run(CYCLES, SEED, "learned", workdir / "cycles.jsonl", max_delay=1.0,
                          workdir=workdir, progress=False)
    return summary, workdir


def test_short_run_keeps_every_invariant(short_run):
    summary, workdir = short_run
    assert summary.violations == []
    assert summary.cycles == CYCLES
    assert len((workdir / "cycles.jsonl").read_text().splitlines()) == CYCLES
    # At least one kill landed inside a store.ingest call (plain or auto-training).
    assert summary.landed["ingest"] + summary.landed["auto-train"] >= 1, summary.table()


@pytest.mark.parametrize("damage", ["drop an id", "change a vector"])
def test_checker_reports_a_wrong_expected_state(short_run, damage):
    _, workdir = short_run
    journal = crasher.Journal(workdir / crasher.JOURNAL)
    journal.advance()
    wrong = journal.expected.copy()
    assert wrong.vectors, "the run left no live id to damage"
    victim = min(wrong.vectors)
    if damage == "drop an id":
        del wrong.vectors[victim]
    else:
        wrong.vectors[victim] = -wrong.vectors[victim]
    queries = np.random.default_rng(0).standard_normal((crasher.QUERIES, crasher.DIM)).astype(np.float32)
    assert crasher.check_store(workdir / crasher.STORE_DIR, [journal.expected], queries).violations == []
    check = crasher.check_store(workdir / crasher.STORE_DIR, [wrong], queries)
    assert check.violations
    assert check.match is None if damage == "drop an id" else check.match == 0
