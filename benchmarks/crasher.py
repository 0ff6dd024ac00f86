"""Randomized SIGKILL crasher: a writer killed at any moment never breaks the store.

    python benchmarks/crasher.py --cycles 200 --seed 0 --out /tmp/crash.jsonl [--router sign|tree]

``--router tree`` is a learned store sized as a big one is, scaled down (SMALL_TREE: a
routing tree of ~32-row buckets from its first training), so that ingests split buckets
locally (write/upkeep.py) and the kills land in splits too.

A run creates one store (dim 16, cosine, ``chunk_rows=64``) in a temporary directory and
keeps it across cycles, so state accumulates and later cycles retrain bigger stores. Each
cycle starts a child interpreter that opens the store and runs a random workload until the
parent SIGKILLs it: ingests of 1-300 rows (now and then 1,000-1,500), half with explicit
ids (which may reuse deleted ones), half with auto ids; deletes of random live ids (a big
share of the store once it holds more than CAP_ROWS); ``train(epochs=1)`` now and then
(learned stores only: training would turn a sign store into a learned one); and, while a
learned store waits for its first training, the ingest that brings it to 1,000 rows and
trains it (auto-train). The child appends every op to an fsynced journal twice: an
``intent`` line before calling the library and a ``done`` line (the ids it assigned) once
the call returns. Vectors are not journaled: they derive from the op's seed.

The parent kills the child ``timed`` (uniformly 0.05 s to --max-delay after it is ready),
``in-op`` (after the intent line of its n-th op of a drawn kind, at a uniform point of the
median duration of that kind's ops so far: reaches short ops, which timed kills rarely hit,
and the commit of a training longer than --max-delay) or ``after-done`` (just after its
n-th done line). It then checks every invariant, read-only and then through a writable
open:

- the store opens and ``verify()`` is ok (orphan segments allowed; after a writable open,
  with no reader left, only the catalog's segment directories and the live model's remain);
- the live ids (every row of an exact search) are the journal's state after every done op,
  or, when the last op has an intent but no done line, that state with the op applied (a
  kill after the commit, before the done line); ``len(store)`` agrees;
- ``get`` returns every live id's recomputed stored vector; deleted ids are not found;
- exact search (``probes="all"``) returns exactly the live ids with their exact scores; a
  default search returns only live ids, with their exact scores;
- an auto-id ingest got the ids that follow the store's counter, and an ingest trained
  exactly when the auto-training rule says it must.

The parent then journals which state the store was in (a ``resolved`` line), so the next
child starts from it. One JSON line per cycle goes to --out; a summary table is printed at
the end. A violation stops the run (the state after it is unknown), keeps the run's
directory for post-mortem, and makes the exit code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

import asteria_store
from asteria_store import IdNotFoundError
from asteria_store.testing import clustered_vectors
from asteria_store.write import MIN_TRAIN_ROWS

DIM = 16
CHUNK_ROWS = 64
#: Above this many live ids the child deletes 20-50% of them.
CAP_ROWS = 5_000
#: Explicit retraining only on stores with at least this many live ids (a training sample
#: needs 100 rows).
TRAIN_MIN_LIVE = 200
MIN_DELAY = 0.05
READY_TIMEOUT = 300.0
#: An after-done kill's guard against a hung child (no op takes nearly this long).
CUE_TIMEOUT = 300.0
#: Score tolerance: the store scores in float32, the checker in float64.
SCORE_ATOL = 1e-5
VECTOR_ATOL = 1e-6
#: Queries per check (an exact search of k = every live id costs ~0.1 s per query at 5k rows).
QUERIES = 2
KINDS = ("ingest", "auto-train", "delete", "train", "idle")

STORE_DIR = "store"
JOURNAL = "journal.jsonl"
CHILD_PLAN = "child.json"
CHILD_STDERR = "child.stderr"


# --- vectors and journal (child and parent) -------------------------------------------------


def op_vectors(seed: int, n: int) -> np.ndarray:
    """The raw vectors of an ingest op, derived from its seed: clustered, with random norms
    (0.5-2) so that the store's cosine normalisation matters."""
    x = clustered_vectors(n, DIM, clusters=8, seed=seed)
    norms = np.random.default_rng([seed, 1]).uniform(0.5, 2.0, size=(n, 1))
    return (x * norms).astype(np.float32)


def stored_form(x: np.ndarray) -> np.ndarray:
    """What a cosine store holds for ``x``: rows L2-normalised (in float64, then float32)."""
    x64 = x.astype(np.float64)
    return (x64 / np.linalg.norm(x64, axis=1, keepdims=True)).astype(np.float32)


def append_record(fd: int, record: dict) -> None:
    """Append one JSON line to the journal (one write) and fsync it."""
    os.write(fd, (json.dumps(record) + "\n").encode())
    os.fsync(fd)


def read_new_records(path: Path, offset: int) -> tuple[list[dict], int]:
    """The complete JSON lines of ``path`` from byte ``offset`` on, and the offset after
    them. A torn last line (a kill inside its write) is cut off the file, so that the next
    writer's lines start on a line of their own."""
    with path.open("rb+") as fh:
        fh.seek(offset)
        data = fh.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            fh.truncate(offset + end)
    return [json.loads(line) for line in data[:end].splitlines()], offset + end


# --- the child ------------------------------------------------------------------------------


def draw_op(rng: np.random.Generator, seq: int, live: np.ndarray, next_id: int, *,
            learned: bool, pending: bool, has_segments: bool) -> dict:
    """The intent record of the child's next op, drawn from the store's state as the child
    knows it (live ids, the auto-id counter, whether a learned store still has to train)."""
    n_live = len(live)
    r = rng.random()
    if n_live > CAP_ROWS or (n_live and r < 0.35):
        size = int(n_live * rng.uniform(0.2, 0.5)) if n_live > CAP_ROWS else int(rng.integers(1, min(n_live, 100) + 1))
        ids = np.sort(rng.choice(live, size, replace=False))
        return {"seq": seq, "event": "intent", "op": "delete", "kind": "delete", "ids": ids.tolist()}
    if learned and not pending and n_live >= TRAIN_MIN_LIVE and r < 0.45:
        return {"seq": seq, "event": "intent", "op": "train", "kind": "train", "seed": int(rng.integers(2**31))}
    big = rng.random() < (0.5 if pending and not has_segments else 0.08)
    n = int(rng.integers(MIN_TRAIN_ROWS, 1501)) if big else int(rng.integers(1, 301))
    ids = None
    if rng.random() < 0.5:  # explicit ids: any not live below a bound near the counter
        pool = np.setdiff1d(np.arange(next_id + 4 * n + 100, dtype=np.int64), live)
        ids = rng.choice(pool, n, replace=False).tolist()
    # The auto-training rule: a learned store that has not trained yet trains at the ingest
    # that brings it to MIN_TRAIN_ROWS live vectors (on the batch itself when it is the
    # store's first, else on the store, re-bucketing it in a second commit).
    trains = pending and n_live + n >= MIN_TRAIN_ROWS
    return {"seq": seq, "event": "intent", "op": "ingest", "kind": "auto-train" if trains else "ingest",
            "n": n, "seed": int(rng.integers(2**31)), "ids": ids}


def perform(store: asteria_store.Store, intent: dict) -> dict:
    """Run one op on the store; its done record (with the new model's digest, for an op
    that trained or split buckets)."""
    done = {"seq": intent["seq"], "event": "done", "op": intent["op"], "kind": intent["kind"]}
    if intent["op"] == "ingest":
        ids = None if intent["ids"] is None else np.asarray(intent["ids"], dtype=np.uint64)
        n = intent["n"]  # metadata columns travel with their rows through every rewrite
        result = store.ingest(op_vectors(intent["seed"], n), ids=ids,
                              metadata={"op_seed": np.full(n, intent["seed"]), "op_row": np.arange(n)})
        # trained: the first training, or a growth re-fit (refitted); either changes the
        # model, and so does a split
        done.update(ids=result.ids.tolist(), trained=result.trained, refitted=result.refitted,
                    split_rows=result.split_rows)
    elif intent["op"] == "delete":
        store.delete(np.asarray(intent["ids"], dtype=np.uint64))
    else:
        store.train(epochs=1, seed=intent["seed"])
    if intent["op"] == "train" or done.get("trained") or done.get("refitted") or done.get("split_rows"):
        done["router"] = store.info()["internals"]["router"]["digest"]
    return done


#: (FLAT_MAX_BITS, TREE_BUCKET_ROWS) of ``--router tree``.
SMALL_TREE = (3, 32)


def small_tree_sizing() -> None:
    """Size learned models as a big store's, scaled down to SMALL_TREE."""
    from asteria_store.model import fit

    fit.FLAT_MAX_BITS, fit.TREE_BUCKET_ROWS = SMALL_TREE


def child_main(workdir: Path) -> None:
    """The child: open the store and run journaled random ops until killed. Prints
    ``ready``, then ``intent <seq> <kind>`` and ``done <seq> <kind>`` once each journal
    line is on disk (the parent's cues for in-op and after-done kills)."""
    import torch

    torch.set_num_threads(1)
    plan = json.loads((workdir / CHILD_PLAN).read_text())
    if plan["router"] == "tree":
        small_tree_sizing()
    rng = np.random.default_rng(plan["seed"])
    live = np.asarray(plan["live"], dtype=np.int64)
    next_id, seq = plan["next_id"], plan["next_seq"]
    learned = plan["router"] in ("learned", "tree")
    store = asteria_store.open(workdir / STORE_DIR)
    info = store.info()
    pending, has_segments = info["pending_training"], info["segments"] > 0
    fd = os.open(workdir / JOURNAL, os.O_WRONLY | os.O_APPEND)
    print("ready", flush=True)
    while True:
        intent = draw_op(rng, seq, live, next_id, learned=learned, pending=pending, has_segments=has_segments)
        append_record(fd, intent)
        print("intent", seq, intent["kind"], flush=True)
        done = perform(store, intent)
        append_record(fd, done)
        print("done", seq, intent["kind"], flush=True)
        if intent["op"] == "ingest":
            live = np.concatenate([live, np.asarray(done["ids"], dtype=np.int64)])
            next_id = max(next_id, max(done["ids"]) + 1)
            pending = pending and not (done["trained"] and not done.get("refitted"))
            has_segments = True
        elif intent["op"] == "delete":
            live = np.setdiff1d(live, intent["ids"])
        seq += 1


# --- the parent's model of the store --------------------------------------------------------


@dataclass
class Expected:
    """What the store must hold: each live id's stored vector, the auto-id counter, and the
    ids deleted since (and not ingested again), latest deletion last."""

    vectors: dict[int, np.ndarray] = field(default_factory=dict)
    next_id: int = 0
    gone: dict[int, None] = field(default_factory=dict)
    #: Each live id's metadata: the (seed, row) of the ingest op that wrote it.
    meta: dict[int, tuple[int, int]] = field(default_factory=dict)

    def copy(self) -> Expected:
        return Expected(dict(self.vectors), self.next_id, dict(self.gone), dict(self.meta))

    def ids_of(self, intent: dict) -> list[int]:
        """The ids an ingest or delete touches; an auto-id ingest's follow the counter."""
        if intent["op"] == "ingest" and intent["ids"] is None:
            return list(range(self.next_id, self.next_id + intent["n"]))
        return list(intent["ids"])

    def apply(self, intent: dict, ids: list[int]) -> None:
        """The state after the op (a train changes no id and no vector)."""
        if intent["op"] == "ingest":
            for row, (i, v) in enumerate(zip(ids, stored_form(op_vectors(intent["seed"], intent["n"])))):
                self.vectors[i] = v.copy()
                self.meta[i] = (intent["seed"], row)
                self.gone.pop(i, None)
            self.next_id = max(self.next_id, max(ids) + 1)
        elif intent["op"] == "delete":
            for i in ids:
                del self.vectors[i]
                self.meta.pop(i, None)
                self.gone[i] = None


class Journal:
    """The parent's reading of the journal: the state after every finished op, the op in
    flight (intent, no done or resolved line) when the child was killed, and the digest of
    the model last known live (the parent sets it after each check; done lines of ops that
    trained update it)."""

    def __init__(self, path: Path, router: str = ""):
        self.path = path
        self.offset = 0
        self.next_seq = 0
        self.expected = Expected()
        self.in_flight: dict | None = None
        self.router = router

    def advance(self) -> tuple[list[dict], list[str]]:
        """Read the lines the last child wrote; returns them and any broken promise of the
        library they show (wrong auto ids, a training the rule did not call for)."""
        records, self.offset = read_new_records(self.path, self.offset)
        problems = []
        for record in records:
            if record["event"] == "intent":
                if self.in_flight is not None:
                    raise RuntimeError(f"journal: op {record['seq']} starts while {self.in_flight['seq']} is open")
                self.in_flight = record
                self.next_seq = record["seq"] + 1
            else:
                problems += self._finish(record)
        return records, problems

    def _finish(self, record: dict) -> list[str]:
        intent, self.in_flight = self.in_flight, None
        if intent is None or intent["seq"] != record["seq"]:
            raise RuntimeError(f"journal: {record['event']} line of op {record['seq']} without its intent")
        problems = []
        self.router = record.get("router", self.router)
        if record["event"] == "done" and intent["op"] == "ingest":
            want = self.expected.ids_of(intent)
            if record["ids"] != want:
                problems.append(f"op {intent['seq']}: ingest returned ids {record['ids'][:5]}... "
                                f"instead of {want[:5]}...")
            first_training = record["trained"] and not record.get("refitted", False)
            if first_training != (intent["kind"] == "auto-train"):
                problems.append(f"op {intent['seq']}: ingest of {intent['n']} rows trained={record['trained']}, "
                                f"against the auto-training rule")
        if intent["op"] != "train" and (record["event"] == "done" or record["applied"]):
            self.expected.apply(intent, record.get("ids") or self.expected.ids_of(intent))
        return problems

    def candidates(self) -> list[Expected]:
        """The states the store may hold: after every finished op; with an ingest or delete
        in flight, also that state with it applied."""
        if self.in_flight is None or self.in_flight["op"] == "train":
            return [self.expected]
        applied = self.expected.copy()
        applied.apply(self.in_flight, self.expected.ids_of(self.in_flight))
        return [self.expected, applied]

    def resolve(self, applied: bool | None) -> None:
        """Journal whether the op in flight took effect (None for a train: no difference)."""
        intent = self.in_flight
        record = {"seq": intent["seq"], "event": "resolved", "op": intent["op"], "kind": intent["kind"],
                  "applied": applied, "ids": self.expected.ids_of(intent) if applied else None}
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            append_record(fd, record)
        finally:
            os.close(fd)
        self.advance()


# --- checks ---------------------------------------------------------------------------------


def exact_live_ids(store: asteria_store.Store, queries: np.ndarray, k: int) -> tuple[set[int], list[str]]:
    """The live ids as an exact search sees them (every query must return the same set)."""
    ids, _ = store.search(queries, k=k, probes="all")
    rows = [set(row[row >= 0].tolist()) for row in ids]
    problems = [] if all(r == rows[0] for r in rows) else ["exact search returns different id sets per query"]
    return rows[0], problems


def describe_difference(live: set[int], expected: Expected) -> str:
    missing = sorted(set(expected.vectors) - live)
    extra = sorted(live - set(expected.vectors))
    return (f"live ids match no journal state: {len(missing)} missing (first {missing[:5]}), "
            f"{len(extra)} unexpected (first {extra[:5]}) against the state after every done op")


def check_scores(where: str, ids: np.ndarray, scores: np.ndarray, expected: Expected, qn: np.ndarray) -> list[str]:
    """Every returned id is live, once per query, with its exact score, best first."""
    problems = []
    for q, row, s in zip(qn, ids, scores):
        found = row[row >= 0]
        s = s[: len(found)]
        dead = set(found.tolist()) - expected.vectors.keys()
        if (row[len(found):] >= 0).any() or len(set(found.tolist())) != len(found):
            problems.append(f"{where}: ids not packed best-first or repeated")
        elif dead:
            problems.append(f"{where}: returns ids that are not live: {sorted(dead)[:5]}")
        elif len(found):
            error = np.abs(s - np.stack([expected.vectors[i] for i in found.tolist()]).astype(np.float64) @ q)
            if error.max() > SCORE_ATOL or (np.diff(s) > SCORE_ATOL).any():
                problems.append(f"{where}: scores differ from the stored vectors' (max error "
                                f"{error.max():.2e}) or are not best-first")
        if problems:
            break
    return problems


def check_contents(store: asteria_store.Store, expected: Expected, queries: np.ndarray, where: str) -> list[str]:
    """``store`` holds exactly ``expected``: count, vectors, deleted ids, both searches."""
    problems = []
    if len(store) != len(expected.vectors):
        problems.append(f"{where}: len(store) is {len(store)}, expected {len(expected.vectors)}")
    ids = sorted(expected.vectors)
    if ids:
        got = store.get(np.asarray(ids, dtype=np.uint64))
        error = np.abs(got - np.stack([expected.vectors[i] for i in ids])).max(axis=1)
        if (error > VECTOR_ATOL).any():
            bad = np.flatnonzero(error > VECTOR_ATOL)
            problems.append(f"{where}: get returns wrong vectors for {len(bad)} ids (first {ids[bad[0]]}, "
                            f"max error {error.max():.2e})")
        meta = store.fetch(np.asarray(ids, dtype=np.uint64), columns=["op_seed", "op_row"])
        got_meta = list(zip(meta.column("op_seed").to_pylist(), meta.column("op_row").to_pylist()))
        wrong = [i for i, m in zip(ids, got_meta) if m != expected.meta[i]]
        if wrong:
            problems.append(f"{where}: fetch returns wrong metadata for {len(wrong)} ids (first {wrong[0]})")
    for i in list(expected.gone)[-16:]:  # the latest deletions
        try:
            store.get([i])
            problems.append(f"{where}: deleted id {i} is still found by get")
        except IdNotFoundError:
            pass
    qn = stored_form(queries).astype(np.float64)
    k = len(expected.vectors) + 8
    found, scores = store.search(queries, k=k, probes="all")
    if any(set(row[row >= 0].tolist()) != set(ids) for row in found):
        problems.append(f"{where}: exact search does not return exactly the live ids")
    problems += check_scores(f"{where} exact search", found, scores, expected, qn)
    found, scores = store.search(queries, k=10)
    problems += check_scores(f"{where} default search", found, scores, expected, qn)
    return problems


@dataclass
class CheckResult:
    """What :func:`check_store` found: the index of the candidate state the store holds
    (None: none), the violations (empty: every invariant holds), the orphan segments a
    read-only verify reported (debris of the kill) and the live model's digest."""

    match: int | None = None
    violations: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    router: str = ""


def check_store(path: Path, candidates: list[Expected], queries: np.ndarray) -> CheckResult:
    """Check every invariant of a store whose writer was killed, read-only, then through a
    writable open (which removes the orphans: no writer is at work)."""
    result = CheckResult()
    violations = result.violations
    try:
        with asteria_store.open(path, readonly=True) as store:
            report = store.verify()
            violations += [f"read-only verify: {p}" for p in report.problems]
            result.orphans = report.orphans
            result.router = store.info()["internals"]["router"]["digest"]
            k = max(len(store), *(len(c.vectors) for c in candidates)) + 8
            live, problems = exact_live_ids(store, queries, k)
            violations += problems
            result.match = next((i for i, c in enumerate(candidates) if set(c.vectors) == live), None)
            if result.match is None:
                violations.append(describe_difference(live, candidates[0]))
            else:
                violations += check_contents(store, candidates[result.match], queries, "read-only")
        with asteria_store.open(path) as store:
            report = store.verify()
            violations += [f"writable verify: {p}" for p in report.problems]
            if report.orphans:
                violations.append(f"orphan segments survive a writable open: {report.orphans}")
            # No debris either: an orphan, or a retired directory no reader pins any more.
            models = sorted(p.name for p in (path / "model").iterdir())
            if len(models) != 1:
                violations.append(f"model directories after a writable open: {models} (expected only the live one)")
            segments = sorted(p.name for p in (path / "segments.zarr").glob("seg-*"))
            if len(segments) != store.info()["segments"]:
                violations.append(f"segment directories after a writable open: {segments}, "
                                  f"{store.info()['segments']} in the catalog")
            if result.match is not None:
                violations += check_contents(store, candidates[result.match], queries, "writable")
    except Exception as exc:  # noqa: BLE001 - any error of the library is a violation to report
        violations.append(f"{type(exc).__name__}: {exc}")
    return result


# --- the parent -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Kill:
    """When the parent kills a child. ``timed``: ``delay`` s after it is ready. ``in-op``:
    after the intent line of its ``nth`` op of kind ``target``, at ``point`` (0-1) of a
    typical op of that kind. ``after-done``: on its ``nth`` done line. The cue-driven modes
    kill at ``fallback`` s if the cue never comes."""

    mode: str
    delay: float = 0.0
    nth: int = 0
    target: str = ""
    point: float = 0.0
    fallback: float = 0.0


def draw_kill(rng: np.random.Generator, max_delay: float, learned: bool) -> Kill:
    """60% timed, 25% in-op, 15% after-done. An after-done kill waits for its cue as long
    as it takes: these cycles let trainings longer than --max-delay finish (a learned store
    whose auto-training keeps being killed retrains at every ingest until one does)."""
    r = rng.random()
    if r < 0.6:
        return Kill("timed", delay=float(rng.uniform(MIN_DELAY, max_delay)))
    if r < 0.85:
        targets = ["ingest", "ingest", "delete", "train"] if learned else ["ingest", "ingest", "delete"]
        return Kill("in-op", nth=int(rng.integers(1, 4)), target=str(rng.choice(targets)),
                    point=float(rng.random()), fallback=3 * max_delay)
    return Kill("after-done", nth=int(rng.integers(1, 6)), fallback=CUE_TIMEOUT)


class OpTimes:
    """How long the ops of each kind took (intent to done line, as the parent saw them), so
    that an in-op kill lands at a uniform point of a typical op, its commit included."""

    def __init__(self, default: float):
        self.default = default
        self.seconds: dict[str, list[float]] = {}

    def observe(self, lines: list[tuple[float, list[str]]]) -> None:
        started = {}
        for t, line in lines:
            if line[0] == "intent":
                started[line[1]] = t
            elif line[0] == "done" and line[1] in started:
                self.seconds.setdefault(line[2], []).append(t - started[line[1]])

    def typical(self, kind: str) -> float:
        """The median of the last 50 ops of ``kind`` (``default`` before one finished)."""
        recent = self.seconds.get(kind, [])[-50:]
        return float(np.median(recent)) if recent else self.default


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put((time.monotonic(), line.split()))
    lines.put(None)


def _is_cue(line: list[str], kill: Kill) -> bool:
    """Whether a child's stdout line is one a cue-driven kill counts."""
    if kill.mode == "after-done":
        return line[0] == "done"
    # in-op: "intent <seq> <kind>"; an auto-train is an ingest too
    return line[0] == "intent" and (line[2] == kill.target or (kill.target, line[2]) == ("ingest", "auto-train"))


def _wait_for_kill_point(lines: queue.Queue, kill: Kill, op_times: OpTimes, seen: list) -> None:
    """Return when ``kill`` says the child must die (or when it exited by itself); the
    lines read on the way are appended to ``seen``."""
    timed = kill.mode == "timed"
    deadline = time.monotonic() + (kill.delay if timed else kill.fallback)
    cues = 0
    while (left := deadline - time.monotonic()) > 0:
        try:
            item = lines.get(timeout=left)
        except queue.Empty:
            return
        if item is None:
            return
        seen.append(item)
        line = item[1]
        if not timed and _is_cue(line, kill):
            cues += 1
            if cues == kill.nth:
                if kill.mode == "in-op":
                    time.sleep(kill.point * op_times.typical(line[2]))
                return


def run_child(workdir: Path, kill: Kill, op_times: OpTimes) -> tuple[bool, int, str]:
    """Start a child on the store and SIGKILL it as ``kill`` says (the ops it finished
    update ``op_times``). Returns whether it got ready, its exit code (-SIGKILL unless it
    died by itself) and the tail of its stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    with (workdir / CHILD_STDERR).open("w") as err:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child-of", str(workdir)],
                                stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    pump = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
    pump.start()
    seen: list[tuple[float, list[str]]] = []
    try:
        try:
            first = lines.get(timeout=READY_TIMEOUT)
        except queue.Empty:
            first = None
        ready = first is not None and first[1] == ["ready"]
        if ready:
            _wait_for_kill_point(lines, kill, op_times, seen)
    finally:
        proc.kill()
        proc.wait()
    pump.join()
    proc.stdout.close()
    while not lines.empty():
        item = lines.get()
        if item is not None:
            seen.append(item)
    op_times.observe(seen)
    return ready, proc.returncode, (workdir / CHILD_STDERR).read_text()[-2000:]


@dataclass
class Summary:
    """What a run did: kills by the kind of op in flight, and how many of those ops had
    made their last commit (ingest, delete: the ids; train, auto-train: the new model),
    ops completed, cycles that left orphan debris, and violations (target: none)."""

    router: str
    seed: int
    cycles: int = 0
    modes: Counter = field(default_factory=Counter)
    landed: Counter = field(default_factory=Counter)
    committed: Counter = field(default_factory=Counter)
    completed: Counter = field(default_factory=Counter)
    orphan_cycles: int = 0
    live: int = 0
    router_kind: str = ""
    #: Completed ingests whose upkeep split buckets (a kill may land in a split too).
    split_ingests: int = 0
    violations: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def table(self) -> str:
        rows = [f"crasher: {self.cycles} cycles, router {self.router} (now {self.router_kind}), seed {self.seed}, "
                f"{self.seconds:.0f} s",
                "kill mode     cycles", *(f"{m:<12} {self.modes[m]:>7}" for m in ("timed", "in-op", "after-done")),
                "killed in     kills  committed before the kill  ops completed"]
        for kind in KINDS:
            committed, done = ("-", "-") if kind == "idle" else (self.committed[kind], self.completed[kind])
            rows.append(f"{kind:<12} {self.landed[kind]:>6}  {committed:>25}  {done:>13}")
        rows += [f"completed ingests that split buckets: {self.split_ingests}",
                 f"cycles that left orphan segments (removed by the writable open): {self.orphan_cycles}",
                 f"final store: {self.live} live ids",
                 f"violations: {len(self.violations)}", *(f"  {v}" for v in self.violations)]
        return "\n".join(rows)


def run(cycles: int, seed: int, router: str, out: Path, *, max_delay: float = 3.0,
        workdir: Path | None = None, progress: bool = True) -> Summary:
    """Run ``cycles`` kill-and-check cycles on one new store; stop at the first violation.

    ``workdir``: where the store and journal live (kept); default a temporary directory,
    removed unless a violation was found."""
    rng = np.random.default_rng(seed)
    own_dir = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="asteria-crasher-")) if own_dir else Path(workdir)
    store_path = workdir / STORE_DIR
    if router == "tree":
        small_tree_sizing()
    with asteria_store.create(store_path, dim=DIM, chunk_rows=CHUNK_ROWS,
                              router="learned" if router == "tree" else router,
                              expected_size=CAP_ROWS, seed=seed) as store:
        model = store.info()["internals"]["router"]["digest"]
    (workdir / JOURNAL).touch()
    journal = Journal(workdir / JOURNAL, router=model)
    summary = Summary(router=router, seed=seed)
    op_times = OpTimes(default=max_delay)
    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as out_fh, tqdm(range(cycles), desc=f"crasher {router}", disable=not progress) as bar:
        for cycle in bar:
            t0 = time.perf_counter()
            kill = draw_kill(rng, max_delay, router != "sign")
            (workdir / CHILD_PLAN).write_text(json.dumps({
                "seed": int(rng.integers(2**31)), "router": router, "next_seq": journal.next_seq,
                "next_id": journal.expected.next_id, "live": sorted(journal.expected.vectors)}))
            ready, returncode, stderr = run_child(workdir, kill, op_times)
            records, violations = journal.advance()
            if not ready or returncode != -signal.SIGKILL:
                violations.append(f"the child {'exited by itself' if ready else 'never got ready'} "
                                  f"(exit code {returncode}): {stderr.strip()[-600:]}")
            in_flight = journal.in_flight
            landed = in_flight["kind"] if in_flight else "idle"
            queries = rng.standard_normal((QUERIES, DIM)).astype(np.float32)
            check = check_store(store_path, journal.candidates(), queries)
            violations += check.violations
            # Had the op in flight committed? Its ids (ingest, delete, auto-train's ingest
            # commit), and for train and auto-train the switch to the new model.
            ids_applied = retrained = None
            if in_flight is not None and check.match is not None:
                ids_applied = check.match == 1 if in_flight["op"] != "train" else None
                retrained = check.router != journal.router if landed in ("train", "auto-train") else None
                journal.resolve(ids_applied)
            journal.router = check.router
            summary.cycles += 1
            summary.modes[kill.mode] += 1
            summary.landed[landed] += 1
            summary.committed[landed] += bool(retrained if landed in ("train", "auto-train") else ids_applied)
            summary.completed.update(r["kind"] for r in records if r["event"] == "done")
            summary.split_ingests += sum(bool(r.get("split_rows")) for r in records)
            summary.orphan_cycles += bool(check.orphans)
            summary.live = len(journal.expected.vectors)
            summary.violations += [f"cycle {cycle}: {v}" for v in violations]
            out_fh.write(json.dumps({
                "cycle": cycle, "router": router, "kill": asdict(kill), "killed_in": landed,
                "ids_applied": ids_applied, "retrained": retrained,
                "ops_done": sum(r["event"] == "done" for r in records), "live": summary.live,
                "orphans": check.orphans, "violations": violations,
                "seconds": round(time.perf_counter() - t0, 3)}) + "\n")
            out_fh.flush()
            bar.set_postfix(live=summary.live, violations=len(summary.violations))
            if violations:
                break
    with asteria_store.open(store_path, readonly=True) as store:
        summary.router_kind = store.info()["router"]
    summary.seconds = time.perf_counter() - started
    if own_dir and not summary.violations:
        shutil.rmtree(workdir)
    elif summary.violations:
        print(f"violation: the store and journal are kept in {workdir}", file=sys.stderr)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--router", choices=["learned", "sign", "tree"], default="learned")
    ap.add_argument("--max-delay", type=float, default=3.0, help="latest timed kill, seconds after the child is ready")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "crasher.jsonl")
    ap.add_argument("--child-of", type=Path, help=argparse.SUPPRESS)  # internal: run as the child
    args = ap.parse_args()
    if args.child_of is not None:
        child_main(args.child_of)
        return
    summary = run(args.cycles, args.seed, args.router, args.out, max_delay=args.max_delay)
    print(summary.table())
    sys.exit(1 if summary.violations else 0)


if __name__ == "__main__":
    main()
