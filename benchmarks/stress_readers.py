"""Stress test: reader processes against one writer that ingests, deletes and retrains.

    python benchmarks/stress_readers.py --readers 3 --seconds 120 --seed 0 --out stress.jsonl

A learned store (dim 16, 2**5 buckets, chunk_rows 64) is created and trained by one first
ingest. Once every reader has made its first read, one writer process ingests batches, deletes random live ids and retrains
(``store.train(bits=5, epochs=1)``, torch on one thread) in a random mix for ``--seconds``
(and at least ``--min-retrains`` retrains). After every committed operation it appends to a
journal (JSON lines, fsynced) the catalog generation right after the call, how many commits
the call made, and what changed: the ids added (contiguous, with the seed that regenerates
their vectors) or the ids deleted.

Meanwhile N reader processes, each with ONE read-only handle open for the whole run (so it
lives across many retrains), loop: ``g0 = info()["generation"]``, one read, ``g1`` again.
The reads: an exact search (``probes="all"``) and a default-probes search (32 probes: with
2**5 buckets that visits every bucket) of two queries with ``k`` above the live count, so
each must return exactly the live id set; ``get`` of ids the reader last saw live;
``len(store)``; ``store.verify()``. Each read is recorded with its window ``[g0, g1]`` and a
summary of its result (id-set digest, count, the 10 best ids and scores, the score sum;
vectors; the exception's type and message).

The checker (in the parent, after the run) replays the journal: the state at generation g
is the live id set after every change committed at or before g, and a read is correct when
it matches at least one state whose generation lies in its window. Searches must return
one such state's whole live set with exact scores (numpy brute force); ``get`` must return
the ingested vectors of ids live in a state of the window and raise IdNotFoundError (never a
raw KeyError) only where some id is dead in one; ``len`` and the ``info`` counts must match;
``verify`` must report ok; no read may raise anything else. Also reported: retired
segment/model directories left on disk after the readers close and one more writable open
and commit, and each reader's count of memory maps of deleted files (``/proc/<pid>/maps``
lines ending "(deleted)") over the run and at its end, which must not keep growing.

Prints a summary; JSON lines (config, every inconsistency, maps per reader, summary) go to
``--out``. Exits 1 on any inconsistency or failure.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # run as a script (the parent and every child): BLAS on one thread
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = "1"

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, NamedTuple  # noqa: E402

import numpy as np  # noqa: E402

import asteria_store  # noqa: E402
from asteria_store.query.engine import DEFAULT_PROBES  # noqa: E402
from asteria_store.testing import clustered_vectors  # noqa: E402

DIM = 16
BITS = 5  # 32 buckets: the default 32 probes visit them all
CHUNK_ROWS = 64
CLUSTERS = 20
INITIAL_ROWS = 2000  # >= MIN_TRAIN_ROWS: the first ingest trains the model (one commit)
LOW_LIVE, HIGH_LIVE = 1500, 3500  # the writer keeps the live count between these
MAX_BATCH = 400
#: Above any live count the writer allows (HIGH_LIVE + MAX_BATCH), so a search returns the
#: whole live set; and at most the 4,096 a search pads with -1 beyond a small store.
K = 4096
QUERIES = 2
HEAD = 10
#: The readers' mix of reads (weights).
READS = {"exact": 3, "probed": 3, "get": 3, "len": 2, "verify": 1}
#: Score tolerances: one score, and the sum over a whole live set.
SCORE_TOL = 1e-5
SUM_TOL_PER_ROW = 1e-6
NEVER = np.iinfo(np.int64).max
#: Rounds of ``info()`` a reader tries before it gives up on a read's window.
INFO_ATTEMPTS = 100


# --- data, journal ----------------------------------------------------------------------------


def batch_vectors(seed: int, n: int) -> np.ndarray:
    """The ``n`` vectors of the batch (or query set) drawn with ``seed``."""
    return clustered_vectors(n, DIM, clusters=CLUSTERS, seed=seed)


def id_digest(ids: np.ndarray) -> str:
    """Digest of a multiset of ids (order-independent; a duplicate changes it)."""
    return hashlib.sha256(np.sort(np.asarray(ids, dtype="<i8")).tobytes()).hexdigest()[:16]


def append_journal(fh, entry: dict) -> None:
    """Append one JSON line to the journal and make it durable before going on."""
    fh.write(json.dumps(entry) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


def read_jsonl(path: str | os.PathLike[str]) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def setup_store(path: Path, journal: Path, seed: int) -> dict:
    """Create the learned store and train it with one first ingest (a single commit);
    journal that ingest. Returns the writer's starting point."""
    import torch

    torch.set_num_threads(1)
    assert 2**BITS <= DEFAULT_PROBES, "the probed search must visit every bucket"
    batch_seed = seed * 1_000_003 + 1
    with asteria_store.create(path, dim=DIM, router="learned", bits=BITS, chunk_rows=CHUNK_ROWS,
                              seed=seed) as store:
        result = store.ingest(batch_vectors(batch_seed, INITIAL_ROWS),
                              ids=np.arange(INITIAL_ROWS, dtype=np.uint64))
        assert result.trained
        generation = store.info()["generation"]
    with open(journal, "a") as fh:
        append_journal(fh, {"op": "ingest", "generation": generation, "commits": generation,
                            "first_id": 0, "n": INITIAL_ROWS, "seed": batch_seed, "t": time.time()})
    return {"generation": generation, "next_id": INITIAL_ROWS}


# --- the writer -------------------------------------------------------------------------------


def writer_main(cfg: dict) -> None:
    """Once every reader has read once, say go, then ingest, delete and retrain at random until
    ``cfg["seconds"]`` have passed and at least ``cfg["min_retrains"]`` retrains committed;
    journal every committed call."""
    import torch

    torch.set_num_threads(1)
    # Warm-up while the readers start: a store's first training in a process pays several
    # seconds of torch imports and first calls, which would eat a short run.
    asteria_store.train_model(batch_vectors(0, 1000), bits=BITS, epochs=1)
    rng = np.random.default_rng([cfg["seed"], 1])
    live = np.arange(cfg["next_id"], dtype=np.int64)
    next_id, generation = cfg["next_id"], cfg["generation"]
    retrains = 0
    with asteria_store.open(cfg["store"]) as store, open(cfg["journal"], "a") as fh:
        while not all((Path(cfg["dir"]) / f"reader{i}.ready").exists() for i in range(cfg["readers"])):
            time.sleep(0.05)
        (Path(cfg["dir"]) / "go").touch()
        started = time.monotonic()
        while time.monotonic() - started < cfg["seconds"] or retrains < cfg["min_retrains"]:
            if len(live) > HIGH_LIVE:
                op = "delete"
            elif len(live) < LOW_LIVE:
                op = "ingest"
            else:
                op = str(rng.choice(["ingest", "delete", "train"], p=[0.35, 0.35, 0.3]))
            entry: dict[str, Any] = {"op": op}
            t0 = time.monotonic()
            if op == "ingest":
                n, seed = int(rng.integers(50, MAX_BATCH + 1)), int(rng.integers(2**31))
                store.ingest(batch_vectors(seed, n), ids=np.arange(next_id, next_id + n, dtype=np.uint64))
                entry.update(first_id=next_id, n=n, seed=seed)
                live = np.concatenate([live, np.arange(next_id, next_id + n)])
                next_id += n
            elif op == "delete":
                gone = rng.choice(live, size=int(rng.integers(10, 200)), replace=False)
                store.delete(gone)
                entry["ids"] = sorted(gone.tolist())
                live = np.setdiff1d(live, gone)
            else:
                store.train(bits=BITS, epochs=1, seed=int(rng.integers(2**31)))
                retrains += 1
            after = store.info()["generation"]
            entry.update(generation=after, commits=after - generation, s=round(time.monotonic() - t0, 3),
                         t=time.time())
            generation = after
            append_journal(fh, entry)
            assert len(live) < K
            time.sleep(float(rng.uniform(0, 0.05)))


# --- the readers ------------------------------------------------------------------------------


def describe_error(exc: BaseException) -> dict:
    """Type, module, AsteriaError or not, and the message of an exception."""
    return {"type": type(exc).__name__, "module": type(exc).__module__,
            "asteria": isinstance(exc, asteria_store.AsteriaError), "message": str(exc)[:300]}


def deleted_maps(pid: int | str = "self") -> int | None:
    """How many memory maps of process ``pid`` are of deleted files (None: no /proc)."""
    try:
        with open(f"/proc/{pid}/maps") as fh:
            return sum(1 for line in fh if line.rstrip().endswith("(deleted)"))
    except OSError:
        return None


def summarise_search(ids: np.ndarray, scores: np.ndarray) -> list[dict]:
    """Per query: how many results, the digest of their id set, the first HEAD ids and
    scores, the score sum, and whether results come first and best first."""
    out = []
    for row_i, row_s in zip(ids, scores):
        valid = row_i >= 0
        n = int(valid.sum())
        s = row_s[valid]
        out.append({"n": n, "digest": id_digest(row_i[valid]), "packed": bool(valid[:n].all()),
                    "sorted": bool(np.all(np.diff(s) <= 0)), "head_ids": row_i[valid][:HEAD].tolist(),
                    "head_scores": [float(x) for x in s[:HEAD]], "sum": float(s.astype(np.float64).sum())})
    return out


def do_read(store: asteria_store.Store, op: str, rng: np.random.Generator, believed: np.ndarray,
            rec: dict) -> np.ndarray | None:
    """Run one read, recording its arguments and then its result in ``rec``; returns the
    ids a search returned (None for other reads)."""
    if op in ("exact", "probed"):
        rec["seed"] = int(rng.integers(2**31))
        probes = "all" if op == "exact" else DEFAULT_PROBES
        ids, scores = store.search(batch_vectors(rec["seed"], QUERIES), k=K, probes=probes)
        rec["queries"] = summarise_search(ids, scores)
        return ids[0][ids[0] >= 0]
    if op == "get":
        ids = rng.choice(believed, size=min(len(believed), int(rng.integers(1, 9))), replace=False)
        rec["ids"] = ids.tolist()
        rec["vectors"] = store.get(ids.astype(np.uint64)).tolist()
    elif op == "len":
        rec["value"] = len(store)
    else:
        report = store.verify()
        rec.update(ok=report.ok, problems=report.problems[:3])
    return None


def observe(store: asteria_store.Store, out, index: int) -> tuple[int, int] | None:
    """``(generation, count)`` from ``info()``; a failing ``info`` is recorded as a read
    and retried (None after INFO_ATTEMPTS failures)."""
    for _ in range(INFO_ATTEMPTS):
        try:
            info = store.info()
            return info["generation"], info["count"]
        except Exception as exc:  # noqa: BLE001 - every failure is a finding
            out.write(json.dumps({"reader": index, "op": "info", "error": describe_error(exc)}) + "\n")
    return None


def reader_main(cfg: dict, index: int) -> None:
    """Read in a loop with one long-lived read-only handle until the stop file appears
    (after the first read, wait for the writer's go); one JSON line per read, and one per
    generation change with the deleted-file maps."""
    rng = np.random.default_rng([cfg["seed"], 2, index])
    ops, weights = list(READS), np.array(list(READS.values()), dtype=float)
    believed = np.arange(cfg["next_id"])
    deadline = time.monotonic() + cfg["hard_limit_s"]
    ready, go, stop = (Path(cfg["dir"]) / name for name in (f"reader{index}.ready", "go", "stop"))
    maps_generation = None
    with asteria_store.open(cfg["store"], readonly=True) as store, \
            open(Path(cfg["dir"]) / f"reader{index}.jsonl", "w") as out:
        # Warm-up, not recorded: a process's first probed search loads the compiled search
        # (~1.5 s from numba's cache, more to compile), which would eat a short run.
        store.search(batch_vectors(cfg["seed"], QUERIES), k=K, probes=DEFAULT_PROBES)
        while not stop.exists() and time.monotonic() < deadline:
            before = observe(store, out, index)
            if before is None:
                continue
            op = str(rng.choice(ops, p=weights / weights.sum()))
            rec: dict[str, Any] = {"reader": index, "op": op, "g0": before[0], "c0": before[1]}
            try:
                seen = do_read(store, op, rng, believed, rec)
                if seen is not None and len(seen):
                    believed = seen
            except Exception as exc:  # noqa: BLE001 - every failure is a finding
                rec["error"] = describe_error(exc)
            after = observe(store, out, index)
            rec.update(g1=None if after is None else after[0], c1=None if after is None else after[1])
            out.write(json.dumps(rec) + "\n")
            if after is not None and after[0] != maps_generation:
                maps_generation = after[0]
                out.write(json.dumps({"reader": index, "op": "maps", "generation": after[0],
                                      "deleted_maps": deleted_maps()}) + "\n")
            if not ready.exists():  # one read done: wait for the writer's go
                ready.touch()
                while not go.exists() and not stop.exists():
                    time.sleep(0.05)


# --- running it -------------------------------------------------------------------------------


def spawn(cfg_path: Path, role: str, index: int = 0) -> subprocess.Popen:
    """Start this script as a writer or reader child process."""
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--role", role,
                             "--config", str(cfg_path), "--index", str(index)])


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Return codes of ``procs``; one still running after ``timeout`` is killed (-9)."""
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            codes.append(-9)
    return codes


def run_stress(workdir: str | os.PathLike[str], *, readers: int, seconds: float, seed: int,
               min_retrains: int) -> dict:
    """Set up the store, run the writer and ``readers`` reader processes, then close them
    all and check the disk. Returns everything the checker needs (see :func:`check_run`)."""
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    store_path, journal = work / "store", work / "journal.jsonl"
    t0 = time.monotonic()
    start = setup_store(store_path, journal, seed)
    timings = {"setup_s": time.monotonic() - t0}
    cfg = {"store": str(store_path), "journal": str(journal), "dir": str(work), "seed": seed,
           "readers": readers, "seconds": seconds, "min_retrains": min_retrains,
           "hard_limit_s": 10 * seconds + 600, **start}
    cfg_path = work / "config.json"
    cfg_path.write_text(json.dumps(cfg))
    procs = [spawn(cfg_path, "reader", i) for i in range(readers)]
    writer = spawn(cfg_path, "writer")
    try:
        deadline = time.monotonic() + cfg["hard_limit_s"]
        while writer.poll() is None and time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                break  # a reader died: stop the run
            time.sleep(0.1)
        writer_rc = wait_all([writer], 0)[0]
        timings["writer_s"] = time.monotonic() - t0 - timings["setup_s"]
        time.sleep(1.0)  # the readers move on to the last generation
        maps_end = [deleted_maps(p.pid) for p in procs]
    finally:
        if writer.poll() is None:
            writer.kill()
        (work / "stop").touch()
        reader_rcs = wait_all(procs, 300)
    timings["stop_s"] = time.monotonic() - t0 - timings["setup_s"] - timings["writer_s"]
    records = [r for i in range(readers) if (work / f"reader{i}.jsonl").exists()
               for r in read_jsonl(work / f"reader{i}.jsonl")]
    t1 = time.monotonic()
    disk = final_disk_check(store_path, journal)
    timings["disk_check_s"] = time.monotonic() - t1
    return {"config": cfg, "writer_rc": writer_rc, "reader_rcs": reader_rcs, "maps_end": maps_end,
            "records": records, "disk": disk, "timings": {k: round(v, 1) for k, v in timings.items()}}


def final_disk_check(path: Path, journal: Path) -> dict:
    """With every other handle closed: one writable open and one more commit (a journaled
    delete), then count ``seg-*`` and model directories against the catalog's."""
    history = load_history(read_jsonl(journal))
    victim = int(np.flatnonzero(history.died == NEVER)[0])
    with asteria_store.open(path) as store:
        store.delete([victim])
        info = store.info()
        report = store.verify()
        count = len(store)
        seg_dirs = sorted(p.name for p in (path / "segments.zarr").iterdir()
                          if p.is_dir() and p.name.startswith("seg-"))
        model_dirs = sorted(p.name for p in (path / "model").iterdir() if p.is_dir())
    with open(journal, "a") as fh:
        append_journal(fh, {"op": "delete", "ids": [victim], "generation": info["generation"],
                            "commits": 1, "t": time.time()})
    return {"generation": info["generation"], "count": count, "verify_ok": report.ok,
            "verify_problems": report.problems[:3], "segments": info["segments"],
            "segment_dirs": len(seg_dirs), "model_dirs": len(model_dirs),
            "leftover_dirs": len(seg_dirs) - info["segments"] + len(model_dirs) - 1}


# --- the checker ------------------------------------------------------------------------------


class History(NamedTuple):
    """The committed states, replayed from the journal. Ids are 0..n-1."""

    born: np.ndarray  # generation whose commit made the id live
    died: np.ndarray  # generation whose commit deleted it (NEVER: still live)
    vectors: np.ndarray  # (n, DIM) as ingested
    changes: np.ndarray  # sorted generations at which the live set changed
    retrains: np.ndarray  # generations of the committed retrains
    last: int  # the last committed generation
    cache: dict  # generation -> (live ids, digest)


def load_history(journal: list[dict]) -> History:
    """Replay journal entries. A call that committed ``c`` times and ended at generation
    ``g`` changed the live set at its first commit, ``g - c + 1`` (an ingest that trains
    the model afterwards re-buckets the same rows in its second commit)."""
    n = max(e["first_id"] + e["n"] for e in journal if e["op"] == "ingest")
    born, died = np.full(n, NEVER, dtype=np.int64), np.full(n, NEVER, dtype=np.int64)
    vectors = np.zeros((n, DIM), dtype=np.float32)
    changes, retrains = set(), []
    for e in journal:
        first_commit = e["generation"] - e["commits"] + 1
        if e["op"] == "ingest":
            sl = slice(e["first_id"], e["first_id"] + e["n"])
            born[sl] = first_commit
            vectors[sl] = batch_vectors(e["seed"], e["n"])
            changes.add(first_commit)
        elif e["op"] == "delete":
            died[e["ids"]] = first_commit
            changes.add(first_commit)
        else:
            retrains.append(e["generation"])
    return History(born, died, vectors, np.array(sorted(changes), dtype=np.int64),
                   np.array(retrains, dtype=np.int64), max(e["generation"] for e in journal), {})


def state(h: History, g: int) -> tuple[np.ndarray, str]:
    """``(sorted live ids, their digest)`` at generation ``g``."""
    if g not in h.cache:
        ids = np.flatnonzero((h.born <= g) & (h.died > g))
        h.cache[g] = (ids, id_digest(ids))
    return h.cache[g]


def window(h: History, g0: int, g1: int) -> list[int]:
    """One generation per distinct state committed in ``[g0, g1]``."""
    return [g0] + [int(c) for c in h.changes if g0 < c <= g1]


def check_search(h: History, rec: dict, gens: list[int]) -> list[str]:
    """Every query returned the whole live set of one state of the window, exact scores."""
    queries = batch_vectors(rec["seed"], QUERIES)
    results = rec["queries"]
    match = [g for g in gens if all(r["digest"] == state(h, g)[1] for r in results)]
    if not match:
        expected = sorted({len(state(h, g)[0]) for g in gens})
        return [f"returned {[r['n'] for r in results]} ids, not the live set of any state in the window "
                f"(live counts {expected})"]
    ids = state(h, match[0])[0]
    problems = []
    for q, r in zip(queries, results):
        exact = h.vectors[ids] @ q
        by_id = dict(zip(ids.tolist(), exact.tolist()))
        top = np.sort(exact)[::-1][:HEAD]
        head = np.array(r["head_scores"])
        if not (r["packed"] and r["sorted"]):
            problems.append("results not packed best first")
        elif any(abs(by_id[i] - s) > SCORE_TOL for i, s in zip(r["head_ids"], r["head_scores"])) \
                or len(head) != len(top) or np.abs(head - top).max(initial=0) > SCORE_TOL:
            problems.append(f"top scores {r['head_scores'][:3]}... differ from brute force "
                            f"{top[:3].tolist()}...")
        elif abs(r["sum"] - float(exact.astype(np.float64).sum())) > SUM_TOL_PER_ROW * len(ids) + SCORE_TOL:
            problems.append(f"score sum {r['sum']:.6f} differs from brute force {float(exact.sum()):.6f}")
    return problems


def check_get(h: History, rec: dict, gens: list[int]) -> list[str]:
    """Vectors of ids all live in one state, or IdNotFoundError for an id dead in one."""
    ids = np.array(rec["ids"], dtype=np.int64)
    all_live = [bool(np.isin(ids, state(h, g)[0]).all()) for g in gens]
    err = rec.get("error")
    if err is None:
        if not any(all_live):
            return [f"returned vectors for ids {rec['ids']}, not all live in any state of the window"]
        if np.abs(np.array(rec["vectors"], dtype=np.float32) - h.vectors[ids]).max() > SCORE_TOL:
            return [f"returned wrong vectors for ids {rec['ids']}"]
        return []
    if err["type"] != "IdNotFoundError" or not err["asteria"]:
        return [f"raised {err['module']}.{err['type']}: {err['message']}"]
    if all(all_live):
        return [f"IdNotFoundError for ids {rec['ids']}, live in every state of the window: {err['message']}"]
    named = re.search(r"\d+", err["message"])
    if named is None or all(int(named.group()) in state(h, g)[0] for g in gens):
        return [f"IdNotFoundError names an id live in every state of the window: {err['message']}"]
    return []


def check_read(h: History, rec: dict) -> list[str]:
    """The problems of one recorded read (empty: it matches a state of its window)."""
    if rec["op"] == "info":
        return [f"info raised {rec['error']['module']}.{rec['error']['type']}: {rec['error']['message']}"]
    g0, g1 = rec["g0"], rec["g1"]
    if g1 is None:
        return ["no generation after the read: info kept failing"]
    if not 0 <= g0 <= g1 <= h.last:
        return [f"window [{g0}, {g1}] is not within the committed generations 0..{h.last}"]
    problems = [f"info count {c} at generation {g}, committed count {len(state(h, g)[0])}"
                for g, c in ((g0, rec["c0"]), (g1, rec["c1"])) if c != len(state(h, g)[0])]
    gens = window(h, g0, g1)
    if rec["op"] == "get":
        return problems + check_get(h, rec, gens)
    if "error" in rec:
        err = rec["error"]
        return problems + [f"raised {err['module']}.{err['type']}: {err['message']}"]
    if rec["op"] in ("exact", "probed"):
        return problems + check_search(h, rec, gens)
    if rec["op"] == "len":
        counts = {len(state(h, g)[0]) for g in gens}
        return problems + ([] if rec["value"] in counts else [f"len {rec['value']}, committed {sorted(counts)}"])
    return problems + ([] if rec["ok"] else [f"verify not ok: {rec['problems']}"])


def check_run(run: dict) -> dict:
    """Check every recorded read against the journal; summarise the run. ``problems``
    lists the inconsistent reads, ``failures`` everything else that went wrong."""
    h = load_history(read_jsonl(run["config"]["journal"]))
    reads: Counter = Counter()
    during: Counter = Counter()  # reads whose window overlaps the first to the last retrain
    problems = []
    maps: dict[int, list[int]] = {}
    spans: dict[int, list[int]] = {}
    for rec in run["records"]:
        if rec["op"] == "maps":
            maps.setdefault(rec["reader"], []).append(rec["deleted_maps"])
            continue
        reads[rec["op"]] += 1
        if rec["op"] != "info":
            gens = [g for g in (rec["g0"], rec["g1"]) if g is not None]
            reads["info"] += len(gens)
            spans.setdefault(rec["reader"], []).extend(gens)
            if len(h.retrains) and rec["g1"] is not None and rec["g1"] >= h.retrains[0] \
                    and rec["g0"] <= h.retrains[-1]:
                during[rec["op"]] += 1
        problems += [{"reader": rec["reader"], "op": rec["op"], "g0": rec.get("g0"), "g1": rec.get("g1"),
                      "problem": p} for p in check_read(h, rec)]
    disk = run["disk"]
    failures = [f"writer exited with {run['writer_rc']}"] if run["writer_rc"] else []
    failures += [f"reader {i} exited with {rc}" for i, rc in enumerate(run["reader_rcs"]) if rc]
    if disk["leftover_dirs"]:
        failures.append(f"{disk['leftover_dirs']} retired directories left on disk ({disk['segment_dirs']} "
                        f"seg-* for {disk['segments']} segments, {disk['model_dirs']} models)")
    committed = len(state(h, disk["generation"])[0])
    if not disk["verify_ok"] or disk["count"] != committed:
        failures.append(f"final store: verify ok={disk['verify_ok']} {disk['verify_problems']}, "
                        f"count {disk['count']}, committed {committed}")
    readers = [reader_figures(h, i, spans.get(i, [0]), [m for m in maps.get(i, []) if m is not None],
                              run["maps_end"][i]) for i in range(len(run["reader_rcs"]))]
    return {"reads": dict(sorted(reads.items())), "reads_during_retrains": dict(sorted(during.items())),
            "retrains": len(h.retrains), "generations": h.last, "inconsistencies": len(problems),
            "inconsistency_kinds": _kinds(problems), "failures": failures, "readers": readers,
            "disk": disk, "timings": run["timings"], "problems": problems}


def reader_figures(h: History, index: int, span: list[int], maps: list[int], maps_end: int | None) -> dict:
    """One reader's retrains inside its first-to-last read window, and its counts of maps
    of deleted files (one per generation it saw: mid-run, peak; and at the end)."""
    retrains = int(((h.retrains > min(span)) & (h.retrains <= max(span))).sum())
    return {"reader": index, "retrains_in_window": retrains, "generations_seen": len(maps),
            "deleted_maps_mid": maps[len(maps) // 2] if maps else None,
            "deleted_maps_peak": max(maps, default=None), "deleted_maps_end": maps_end}


def _kinds(inconsistencies: list[dict]) -> dict[str, int]:
    """Inconsistencies counted by read type and the problem's first words."""
    return dict(Counter(f"{i['op']}: {' '.join(i['problem'].split()[:3])}" for i in inconsistencies).most_common())


def format_summary(summary: dict) -> str:
    """The human-readable summary printed at the end of a run."""
    lines = [f"reads checked: {summary['reads']}",
             f"  of which between the first and the last retrain: {summary['reads_during_retrains']}",
             f"retrains committed: {summary['retrains']} (final generation {summary['generations']})",
             f"inconsistencies: {summary['inconsistencies']}"]
    lines += [f"  {n:6d}  {kind}" for kind, n in summary["inconsistency_kinds"].items()]
    lines += [f"  e.g. reader {e['reader']} {e['op']} [{e['g0']}, {e['g1']}]: {e['problem']}"
              for e in summary["problems"][:5]]
    for r in summary["readers"]:
        lines.append(f"reader {r['reader']}: {r['retrains_in_window']} retrains in its window, "
                     f"{r['generations_seen']} generations seen; maps of deleted files mid-run "
                     f"{r['deleted_maps_mid']}, peak {r['deleted_maps_peak']}, at the end {r['deleted_maps_end']}")
    d = summary["disk"]
    lines.append(f"after close + writable open + one commit: {d['segment_dirs']} seg-* dirs for "
                 f"{d['segments']} catalog segments, {d['model_dirs']} model dirs (leftover {d['leftover_dirs']})")
    lines.append(f"timings (s): {summary['timings']}")
    lines += [f"FAILURE: {f}" for f in summary["failures"]]
    lines.append("PASS" if not summary["inconsistencies"] and not summary["failures"] else "FAIL")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readers", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=120.0, help="writer run time")
    ap.add_argument("--min-retrains", type=int, default=2, help="the writer runs on until this many retrains")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="keep the store and logs here (default: a temporary directory)")
    ap.add_argument("--out", help="append JSON lines here")
    ap.add_argument("--role", choices=["main", "writer", "reader"], default="main", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role != "main":
        cfg = json.loads(Path(args.config).read_text())
        if args.role == "writer":
            writer_main(cfg)
        else:
            reader_main(cfg, args.index)
        return 0

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="stress-readers-") as tmp:
        run = run_stress(args.workdir or Path(tmp) / "run", readers=args.readers, seconds=args.seconds,
                         seed=args.seed, min_retrains=args.min_retrains)
        summary = check_run(run)
    summary["wall_s"] = round(time.time() - started, 1)
    print(format_summary(summary))
    if args.out:
        conf = {"kind": "config", "readers": args.readers, "seconds": args.seconds, "seed": args.seed,
                "min_retrains": args.min_retrains, "dim": DIM, "bits": BITS, "chunk_rows": CHUNK_ROWS,
                "date": time.strftime("%Y-%m-%d %H:%M"), "commit": _git_head()}
        with open(args.out, "a") as fh:
            fh.write(json.dumps(conf) + "\n")
            for problem in summary["problems"]:
                fh.write(json.dumps({"kind": "inconsistency", **problem}) + "\n")
            for r in summary["readers"]:
                fh.write(json.dumps({"kind": "reader", **r}) + "\n")
            rest = {k: v for k, v in summary.items() if k != "problems"}
            fh.write(json.dumps({"kind": "summary", **rest}) + "\n")
    return 1 if summary["inconsistencies"] or summary["failures"] else 0


def _git_head() -> str:
    """The checked-out commit (read-only git call), for the record."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
