"""Batch search jobs on Dask (issue 11): a million queries against the wordnet store and a
4-shard collection of the same data, with and without Dask, plus kill tests.

    # the full benchmark (1M queries; builds model, store and collection once in --work)
    python benchmarks/bench_batch.py --queries 1000000 --json docs/results/batch_1m.json
    # the kill tests alone (200k queries; the speed runs skipped)
    python benchmarks/bench_batch.py --skip-speed --kill-tests --kill-queries 200000 \\
        --json docs/results/batch_kill.json
    # a smoke test
    python benchmarks/bench_batch.py --queries 20000 --block-rows 2000 --kill-tests \\
        --kill-queries 20000 --work /tmp/asteria-bench/batch-smoke

Data: wordnet-minilm (106,697 MiniLM vectors, float16). Queries (seeded, cached in --work):
the 10,000 held-out definitions first (their exact top-100 over base ships with the data
set: ids are base row numbers, the ids the store gives them), then base rows plus Gaussian
noise (per-dimension std ``--noise`` x the data's own), normalised, float16. Recall@10 is
measured on the held-out prefix against the shipped ground truth, and on a sample of the
noisy queries against a brute-force one over the float16 base (cached).

Targets (built once in --work from one model trained on base): a float16 store (ids = row
numbers) and a 4-shard collection of the same rows with the same model file.

Speed runs, one after another, each in its own ``python bench_batch.py --child`` process
(so its peak RSS is its own) after the target and the queries were read into the page
cache: ``workers=0`` (the same blocks in one process, no Dask: the baseline), then a local
Dask cluster of 1 and of 2 worker processes x 1 thread, for the store and the collection.
Every process is pinned to one thread (BLAS variables before numpy, ``torch.set_num_threads``;
Dask sets the BLAS variables of its workers to 1 and torch reads OMP_NUM_THREADS), so the
baseline is one Dask worker without Dask. Wall time is the whole ``batch.search`` call
(cluster start and stop included). Peak RSS per worker: a thread of the child polls its
descendant processes every 0.2 s (``/proc/PID/status`` VmHWM, the kernel's own peak;
RssAnon, the process's own memory without mapped files); the baseline reports its own
VmHWM. Every run's results are compared with the baseline's (ids exactly, scores within
1e-6), and the collection's with the store's (the collection claims equal results).

Kill tests (``--kill-tests``, on the first ``--kill-queries`` queries):

* worker: a LocalCluster of 2 worker processes made here, passed as ``client=``; once
  ``--kill-at`` of the blocks have their ``done/`` marker, one worker process is SIGKILLed.
  The job must finish (Dask re-runs the lost tasks; the nanny restarts the worker) with
  results equal to an undisturbed run.
* client: the CLI (``asteria-store search-batch ... --workers 2``; a ``python -c`` calling
  ``batch.search`` where the CLI has no such command, noted in the JSON) runs in its own
  session; at ``--kill-at`` its whole process group is SIGKILLed. The ``.partial`` job must
  remain with no published output and no process left; the same command with ``--resume``
  must skip the blocks already done and give results equal to an undisturbed run.

Prints a Markdown table; writes everything to ``--json`` (default WORK/results.json).
"""

from __future__ import annotations

import os
import sys

from harness import pin_threads_from_argv

pin_threads_from_argv()  # before numpy is imported (the children inherit the variables)

import argparse
import json
import platform
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "wordnet-minilm"
ROW = "@@ROW "  # child stdout lines carrying a JSON row
SCORE_TOL = 1e-6
HELDOUT = 10_000


def emit(row: dict) -> None:
    print(ROW + json.dumps(row), flush=True)


def status_kib(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, VmHWM and RssAnon of a process in KiB (from /proc/PID/status); {} if gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key = line.split(":", 1)[0]
                if key in ("VmRSS", "VmHWM", "RssAnon"):
                    out[key] = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    return out


def mib(kib: float | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


class RssSampler:
    """Polls every descendant of this process every ``interval`` s and keeps, per pid, the
    largest VmRSS, VmHWM and RssAnon seen. Dask worker processes are the ones started by
    multiprocessing's spawn (``spawn_main`` in their command line)."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self._psutil = psutil
        self.interval = interval
        self.procs: dict[int, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        try:
            children = self._psutil.Process(os.getpid()).children(recursive=True)
        except self._psutil.Error:
            return
        for ch in children:
            rec = self.procs.get(ch.pid)
            if rec is None:
                try:
                    cmd = " ".join(ch.cmdline())
                except self._psutil.Error:
                    continue
                rec = self.procs[ch.pid] = {"pid": ch.pid, "worker": "spawn_main" in cmd, "cmd": cmd[:120],
                                            "VmRSS": 0, "VmHWM": 0, "RssAnon": 0, "samples": 0}
            st = status_kib(ch.pid)
            if not st:
                continue
            rec["samples"] += 1
            for key, val in st.items():
                rec[key] = max(rec[key], val)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def workers(self) -> list[dict]:
        return [{"pid": r["pid"], "peak_rss_mib": mib(r["VmHWM"]), "peak_anon_mib": mib(r["RssAnon"]),
                 "samples": r["samples"]} for r in self.procs.values() if r["worker"]]


class MarkerWatcher:
    """Reads each block's ``done/`` marker of the job at ``out`` as it appears (every 0.1 s):
    when it appeared (s after start) and the block's own seconds, as the task measured them.
    Splits a run's wall time into start-up (to the first block), blocks, and the end."""

    def __init__(self, out: str, interval: float = 0.1):
        self.done = Path(out + ".partial") / "done"
        self.interval = interval
        self.seen: dict[str, tuple[float, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                names = [p.name for p in self.done.iterdir() if p.name.isdigit() and p.name not in self.seen]
            except FileNotFoundError:
                names = []
            now = time.perf_counter() - self.t0
            for name in names:
                try:
                    rec = json.loads((self.done / name).read_text())
                except (OSError, ValueError):
                    continue
                self.seen[name] = (now, float(rec.get("seconds", 0.0)))
            self._stop.wait(self.interval)

    def summary(self) -> dict:
        if not self.seen:
            return {"markers_seen": 0}
        at = np.array([a for a, _ in self.seen.values()])
        sec = np.array([b for _, b in self.seen.values()])
        return {"markers_seen": len(self.seen), "first_block_done_s": round(float(at.min()), 3),
                "last_block_done_s": round(float(at.max()), 3), "block_seconds_sum": round(float(sec.sum()), 3),
                "block_seconds_median": round(float(np.median(sec)), 4)}


# ----------------------------------------------------------------------------- children
def child_run(spec: dict) -> None:
    """One timed batch job (the speed runs and the undisturbed references)."""
    import torch

    from asteria_store import batch

    torch.set_num_threads(1)
    if spec.get("glibc_trim"):  # ablation: Dask's own default, which batch/cluster.py leaves out
        os.environ["MALLOC_TRIM_THRESHOLD_"] = "65536"  # inherited by the spawned workers
    before = status_kib()
    with RssSampler() as sampler, MarkerWatcher(spec["out"]) as markers:
        t = time.perf_counter()
        res = batch.search(spec["target"], spec["queries"], spec["out"], k=spec["k"], probes=spec["probes"],
                           block_rows=spec["block_rows"], workers=spec["workers"], threads_per_worker=1,
                           progress=None)
        wall = time.perf_counter() - t
    own = status_kib()
    emit({"wall_s": wall, "result_seconds": res.seconds, "qps": res.queries / wall, "blocks": res.blocks,
          "blocks_run": res.blocks_run, "result_workers": res.workers, "threads_per_worker": res.threads_per_worker,
          "torch_threads": torch.get_num_threads(), "process_rss_before_mib": mib(before.get("VmRSS")),
          "process_peak_rss_mib": mib(own.get("VmHWM")), "process_anon_end_mib": mib(own.get("RssAnon")),
          "workers_rss": sampler.workers(), "blocks_timeline": markers.summary()})


def count_done(out: str) -> int:
    try:
        return sum(1 for p in (Path(out + ".partial") / "done").iterdir() if p.name.isdigit())
    except FileNotFoundError:
        return 0


def child_kill_worker(spec: dict) -> None:
    """A job on a 2-worker LocalCluster made here; one worker SIGKILLed at spec['kill_at']."""
    import logging

    import torch
    from distributed import Client, LocalCluster

    from asteria_store import batch

    torch.set_num_threads(1)
    n_blocks = -(-spec["n_queries"] // spec["block_rows"])
    threshold = max(1, round(spec["kill_at"] * n_blocks))
    state: dict = {"n_blocks": n_blocks, "kill_threshold_blocks": threshold}
    stop = threading.Event()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        pids = client.run(os.getpid)
        state["worker_torch_threads"] = sorted(client.run(torch.get_num_threads).values())
        victim_addr = min(pids)
        victim = pids[victim_addr]
        state["workers_before"] = pids

        def killer() -> None:
            while not stop.is_set():
                done = count_done(spec["out"])
                if done >= threshold:
                    os.kill(victim, signal.SIGKILL)
                    state.update(killed_pid=victim, killed_worker=victim_addr, blocks_done_at_kill=done,
                                 killed_after_s=round(time.perf_counter() - t, 3))
                    return
                stop.wait(0.02)

        t = time.perf_counter()
        th = threading.Thread(target=killer, daemon=True)
        th.start()
        error = None
        try:
            res = batch.search(spec["target"], spec["queries"], spec["out"], k=spec["k"], probes=spec["probes"],
                               block_rows=spec["block_rows"], client=client, progress=None)
        except Exception as exc:  # noqa: BLE001 - reported as the test's failure
            res, error = None, f"{type(exc).__name__}: {exc}"
        wall = time.perf_counter() - t
        stop.set()
        th.join()
        try:
            client.wait_for_workers(2, timeout=60)
            state["workers_after"] = client.run(os.getpid)
        except Exception as exc:  # noqa: BLE001
            state["workers_after"] = f"{type(exc).__name__}: {exc}"
    victim_alive = False
    if "killed_pid" in state:
        try:
            os.kill(state["killed_pid"], 0)
            victim_alive = True
        except ProcessLookupError:
            pass
    emit({**state, "wall_s": wall, "error": error, "victim_still_alive": victim_alive,
          "blocks": None if res is None else res.blocks, "blocks_run": None if res is None else res.blocks_run})


# ----------------------------------------------------------------------------- parent
def spawn_child(kind: str, spec: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--spec", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    rows = [json.loads(line[len(ROW):]) for line in proc.stdout.splitlines() if line.startswith(ROW)]
    if proc.returncode != 0 or not rows:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"child {kind} failed (exit {proc.returncode})")
    return rows[-1]


def warm(*paths: Path) -> None:
    """Read every file under ``paths`` once, so no run pays for a cold page cache."""
    for path in paths:
        files = [path] if path.is_file() else [Path(r) / f for r, _, fs in os.walk(path) for f in fs]
        for f in files:
            try:
                with open(f, "rb") as fh:
                    while fh.read(1 << 24):
                        pass
            except OSError:
                pass


def make_queries(work: Path, n: int, seed: int, noise: float) -> Path:
    """Held-out queries first, then base rows plus scaled Gaussian noise, normalised; f16."""
    path = work / f"queries-{n}-seed{seed}-noise{noise:g}.f16.npy"
    if path.exists():
        return path
    base = np.load(DATA / "base.f16.npy").astype(np.float32)
    held = np.load(DATA / "queries_heldout.f16.npy")
    std = base.std(axis=0) * np.float32(noise)
    rng = np.random.default_rng(seed)
    tmp = path.with_name(path.name + ".tmp")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, base.shape[1]))
    n_held = min(n, len(held))
    out[:n_held] = held[:n_held]
    step = 65536
    for s in range(n_held, n, step):
        m = min(step, n - s)
        v = base[rng.integers(0, len(base), size=m)] + rng.standard_normal((m, base.shape[1]), dtype=np.float32) * std
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        out[s:s + m] = v.astype(np.float16)
    out.flush()
    del out
    os.replace(tmp, path)
    return path


def noisy_truth(work: Path, queries: Path, sample: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k over the float16 base (as float32) of ``sample`` noisy queries (the
    rows after the held-out prefix): (row numbers, ids). Cached."""
    q = np.load(queries, mmap_mode="r")
    start = min(len(q), HELDOUT)
    rows = np.arange(start, min(len(q), start + sample))
    path = work / f"gt-{queries.stem}-{len(rows)}-k{k}.npy"
    if path.exists():
        return rows, np.load(path)
    base = np.load(DATA / "base.f16.npy").astype(np.float32)
    gt = np.empty((len(rows), k), dtype=np.int64)
    for s in range(0, len(rows), 1000):
        qq = np.asarray(q[rows[s:s + 1000]], dtype=np.float32)
        qq /= np.linalg.norm(qq, axis=1, keepdims=True)
        sc = qq @ base.T
        top = np.argpartition(-sc, k, axis=1)[:, :k]
        order = np.lexsort((top, -np.take_along_axis(sc, top, axis=1)), axis=1)
        gt[s:s + 1000] = np.take_along_axis(top, order, axis=1)
    np.save(path, gt)
    return rows, gt


def build(work: Path, threads: int) -> dict:
    """Model, store and 4-shard collection in ``work`` (each reused when its .ok marker is there)."""
    import torch

    import asteria_store
    from asteria_store import batch

    torch.set_num_threads(threads)
    base_path = DATA / "base.f16.npy"
    n = len(np.load(base_path, mmap_mode="r"))
    info: dict = {}
    model = work / "model.pt"
    if not model.exists():
        t = time.perf_counter()
        tmp = work / "model.tmp.pt"
        asteria_store.train_model(str(base_path), save=tmp, dim=384)
        os.replace(tmp, model)
        info["train_s"] = round(time.perf_counter() - t, 1)
    for name in ("store", "collection"):
        path, ok = work / name, work / f"{name}.ok"
        if ok.exists():
            continue
        if path.exists():
            shutil.rmtree(path)
        t = time.perf_counter()
        if name == "store":
            with asteria_store.create(path, dim=384, dtype="float16", model=model) as s:
                s.ingest(str(base_path), ids=np.arange(n, dtype=np.int64))
                assert np.array_equal(s.ids(), np.arange(n)), "store ids are not base row numbers"
        else:
            with batch.create_collection(path, shards=4, dim=384, dtype="float16", model=model) as c:
                c.ingest(str(base_path))
                assert np.array_equal(c.ids(), np.arange(n)), "collection ids are not base row numbers"
        info[f"{name}_build_s"] = round(time.perf_counter() - t, 1)
        ok.write_text("ok\n")
    with asteria_store.open(work / "store", readonly=True) as s:
        si = s.info()
    with batch.open_collection(work / "collection", readonly=True) as c:
        ci = c.info()
    info.update(store={"count": si["count"], "buckets": si["buckets"], "segments": si["segments"],
                       "disk_mib": round(si["disk_bytes"] / 2**20, 1)},
                collection={"count": ci["count"], "buckets": ci["buckets"], "shards": ci["shards"],
                            "shard_counts": ci["shard_counts"], "disk_mib": round(ci["disk_bytes"] / 2**20, 1)})
    return info


def load_out(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import zarr

    g = zarr.open_group(str(path), mode="r")
    return np.asarray(g["ids"][:]), np.asarray(g["scores"][:])


def compare(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> dict:
    ids_a, sc_a = a
    ids_b, sc_b = b
    if ids_a.shape != ids_b.shape:
        return {"equal": False, "why": f"shapes {ids_a.shape} vs {ids_b.shape}"}
    same_rows = np.all(ids_a == ids_b, axis=1)
    finite = np.isfinite(sc_a) & np.isfinite(sc_b)
    inf_same = np.array_equal(np.isfinite(sc_a), np.isfinite(sc_b))
    diff = float(np.max(np.abs(sc_a[finite] - sc_b[finite]), initial=0.0))
    same_sets = np.mean([set(x) == set(y) for x, y in zip(ids_a[~same_rows], ids_b[~same_rows])]) \
        if (~same_rows).any() else 1.0
    return {"equal": bool(same_rows.all() and inf_same and diff <= SCORE_TOL), "ids_equal": bool(same_rows.all()),
            "rows_differing": int((~same_rows).sum()), "differing_rows_same_id_set": float(same_sets),
            "max_score_diff": diff}


def recalls(ids: np.ndarray, gt_held: np.ndarray, noisy_rows: np.ndarray, gt_noisy: np.ndarray, k: int) -> dict:
    from asteria_store.testing import recall_at_k

    n_held = min(len(ids), len(gt_held))
    out = {"recall_heldout": round(recall_at_k(ids[:n_held], gt_held[:n_held], k), 4) if n_held else None,
           "heldout_n": n_held}
    if len(noisy_rows):
        out.update(recall_noisy=round(recall_at_k(ids[noisy_rows], gt_noisy, k), 4), noisy_n=len(noisy_rows))
    return out


def fresh(out: Path) -> None:
    for p in (out, out.with_name(out.name + ".partial")):
        if p.exists():
            shutil.rmtree(p)


def has_cli() -> bool:
    exe = shutil.which("asteria-store")
    if exe is None:
        return False
    return subprocess.run([exe, "search-batch", "--help"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, check=False).returncode == 0


PY_JOB = ("import dataclasses, json, sys, torch; torch.set_num_threads(1); from asteria_store import batch; "
          "a = sys.argv; r = batch.search(a[1], a[2], a[3], k=int(a[4]), probes=int(a[5]), block_rows=int(a[6]), "
          "workers=2, threads_per_worker=1, resume=a[7] == '1'); "
          "print(json.dumps(dataclasses.asdict(r)), flush=True)")


def job_command(cli: bool, target: Path, queries: Path, out: Path, k: int, probes: int, block_rows: int,
                resume: bool) -> list[str]:
    if cli:
        cmd = [shutil.which("asteria-store"), "search-batch", str(target), str(queries), "--out", str(out),
               "-k", str(k), "--probes", str(probes), "--workers", "2", "--threads-per-worker", "1",
               "--block-rows", str(block_rows), "--quiet"]
        return cmd + (["--resume"] if resume else [])
    return [sys.executable, "-c", PY_JOB, str(target), str(queries), str(out), str(k), str(probes),
            str(block_rows), "1" if resume else "0"]


def group_alive(pgid: int) -> list[int]:
    import psutil

    alive = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
        except (ProcessLookupError, psutil.Error, OSError):
            pass
    return alive


def kill_client_test(cli: bool, target: Path, queries: Path, out: Path, n_queries: int, args) -> dict:
    """Run the job as a command in its own session, SIGKILL its process group at --kill-at,
    then finish it with --resume."""
    fresh(out)
    n_blocks = -(-n_queries // args.block_rows)
    threshold = max(1, round(args.kill_at * n_blocks))
    rec: dict = {"via": "cli" if cli else "python -c batch.search (no search-batch CLI yet)",
                 "n_blocks": n_blocks, "kill_threshold_blocks": threshold}
    cmd = job_command(cli, target, queries, out, args.k, args.probes, args.block_rows, False)
    log = out.with_name(out.name + ".killed-run.log")
    t = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + args.kill_timeout
    done = 0
    while proc.poll() is None and time.time() < deadline:
        done = count_done(str(out))
        if done >= threshold:
            os.killpg(proc.pid, signal.SIGKILL)
            rec.update(killed=True, blocks_done_at_kill=done, killed_after_s=round(time.perf_counter() - t, 3))
            break
        time.sleep(0.02)
    else:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        rec.update(killed=False, exit_code=proc.returncode, output_tail=log.read_text()[-2000:])
        return rec
    proc.wait()
    time.sleep(0.5)
    survivors = group_alive(proc.pid)
    for pid in survivors:  # ours (same process group): none should be there
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    stage = out.with_name(out.name + ".partial")
    rec.update(survivors=survivors, partial_left=stage.is_dir(), out_absent=not out.exists(),
               markers_after_kill=count_done(str(out)))
    cmd = job_command(cli, target, queries, out, args.k, args.probes, args.block_rows, True)
    t = time.perf_counter()
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    text = res.stdout or ""
    rec.update(resume_exit=res.returncode, resume_wall_s=round(time.perf_counter() - t, 3),
               resume_output_tail=text[-1500:], out_published=out.is_dir(), partial_gone=not stage.exists())
    skipped = None
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                skipped = json.loads(line).get("blocks_skipped", skipped)
            except ValueError:
                pass
    if skipped is None:
        # the CLI's summary: "Searched 7 of 10 blocks (3 done before, skipped) on ..."
        m = (re.search(r"([\d,]+) done before", text) or re.search(r"([\d,]+)\D{0,12}skipped", text, re.IGNORECASE)
             or re.search(r"skipped\D{0,12}([\d,]+)", text, re.IGNORECASE))
        if m:
            skipped = int(m.group(1).replace(",", ""))
    rec["resume_blocks_skipped"] = skipped
    return rec


def fmt(v, nd=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def print_tables(report: dict) -> None:
    """The Markdown tables of ``report`` (what --json holds)."""
    rows, kills = report.get("runs", []), report.get("kill_tests", [])
    cfg = report["config"]
    if rows:
        print(f"\n{cfg['queries']:,} queries, k={cfg['k']}, probes={cfg['probes']}, "
              f"block_rows={cfg['block_rows']:,}, 1 thread per process, {report['machine']['cpus']} cores\n")
        print("| target | run | wall s | queries/s | vs no-Dask | recall@10 held-out | recall@10 noisy | "
              "peak RSS per worker MiB (anon) | 1st block done s | sum of block s | results = baseline |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            if r["workers"] == 0:
                run, rss = "no Dask (1 process)", f"{fmt(r['process_peak_rss_mib'])}"
            else:
                run = f"Dask {r['workers']} worker{'s' if r['workers'] > 1 else ''} x 1 thread"
                if r["variant"]:
                    run += f" ({r['variant']})"
                ws = r["workers_rss"]
                rss = ", ".join(f"{fmt(w['peak_rss_mib'])} ({fmt(w['peak_anon_mib'])})" for w in ws) or "-"
            vs = r.get("overhead_pct")
            vs = "-" if vs is None or r["workers"] == 0 else f"{vs:+.1f}%"
            eq = r["vs_baseline_results"]
            eqs = "reference" if r.get("is_reference") else (
                "yes" if eq["equal"] else f"NO ({eq['rows_differing']} rows, max score diff {eq['max_score_diff']:.1e})")
            if "vs_store_results" in r:
                st = r["vs_store_results"]
                eqs += "; = store: " + ("yes" if st["equal"] else
                                        f"NO ({st['rows_differing']} rows, {st['differing_rows_same_id_set']:.0%} "
                                        f"same id set, max score diff {st['max_score_diff']:.1e})")
            tl = r.get("blocks_timeline", {})
            blocks = fmt(tl.get("block_seconds_sum"))
            if r["target"] == "collection" and r["workers"] > 0:
                blocks += " (merges only)"  # a collection block's marker times its merge task alone
            print(f"| {r['target']} | {run} | {r['wall_s']:.1f} | {r['qps']:,.0f} | {vs} | "
                  f"{fmt(r.get('recall_heldout'), 4)} | {fmt(r.get('recall_noisy'), 4)} | {rss} | "
                  f"{fmt(tl.get('first_block_done_s'))} | {blocks} | {eqs} |")
        print()
        for r in rows:
            if r["workers"] == 1 and not r["variant"] and r.get("overhead_pct") is not None:
                print(f"Dask overhead at 1 worker, {r['target']}: {r['overhead_pct']:+.1f}% of the no-Dask wall time "
                      f"(issue 11: under 10%) -> {'met' if r['overhead_pct'] < 10 else 'NOT met'}")
    if kills:
        kq, blocks = cfg["kill_queries"], -(-cfg["kill_queries"] // cfg["block_rows"])
        print(f"\nKill tests ({kq:,} queries, {blocks} blocks, kill at {cfg['kill_at']:.0%} of blocks)\n")
        print("| test | target | blocks done at kill | outcome | results = undisturbed | passed |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in kills:
            eq = r.get("vs_undisturbed", {})
            if r["test"].startswith("worker"):
                outcome = (f"finished in {r['wall_s']:.1f} s (undisturbed {r['undisturbed_wall_s']:.1f} s)"
                           if r.get("error") is None else f"failed: {r['error']}")
            else:
                outcome = (f"{r['via']}: .partial kept={r.get('partial_left')}, no output={r.get('out_absent')}, "
                           f"survivors={len(r.get('survivors', []))}; --resume exit {r.get('resume_exit')}, "
                           f"skipped {r.get('resume_blocks_skipped')} of {r.get('markers_after_kill')} done")
            print(f"| {r['test']} | {r['target']} | {r.get('blocks_done_at_kill', '-')} / {r['n_blocks']} | "
                  f"{outcome} | {'yes' if eq.get('equal') else 'NO'} | {'PASS' if r['passed'] else 'FAIL'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=1_000_000, help="queries in the speed runs")
    ap.add_argument("-k", dest="k", type=int, default=10)
    ap.add_argument("--probes", type=int, default=32)
    ap.add_argument("--block-rows", type=int, default=16384, help="queries per block (batch.search default)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/asteria-bench/batch"))
    ap.add_argument("--json", type=Path, default=None, help="results (default WORK/results.json)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", type=float, default=0.4, help="noise std per dimension, x the data's std")
    ap.add_argument("--noisy-gt", type=int, default=10_000, help="noisy queries given brute-force ground truth")
    ap.add_argument("--targets", default="store,collection")
    ap.add_argument("--workers", default="0,1,2", help="worker counts of the speed runs (0: no Dask)")
    ap.add_argument("--ablate-malloc-trim", action="store_true",
                    help="also run 1 Dask worker with MALLOC_TRIM_THRESHOLD_=65536 (Dask's default, which "
                         "asteria's local cluster leaves out)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of the speed runs (median wall reported)")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--kill-tests", action="store_true")
    ap.add_argument("--kill-queries", type=int, default=200_000)
    ap.add_argument("--kill-targets", default="store,collection", help="targets of the worker-kill test")
    ap.add_argument("--kill-at", type=float, default=0.3, help="fraction of blocks done when killing")
    ap.add_argument("--kill-timeout", type=float, default=3600)
    ap.add_argument("--build-threads", type=int, default=os.cpu_count() or 1, help="torch threads for training")
    ap.add_argument("--threads", default="1", help="BLAS/torch threads of every run (keep 1)")
    ap.add_argument("--table", type=Path, default=None, help="only print the tables of a results JSON")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        {"run": child_run, "kill-worker": child_kill_worker}[args.child](json.loads(args.spec))
        return
    if args.table:
        print_tables(json.loads(args.table.read_text()))
        return

    import asteria_store

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    runs_dir = work / "runs"
    runs_dir.mkdir(exist_ok=True)
    json_path = args.json or work / "results.json"
    t0 = time.perf_counter()
    report: dict = {
        "issue": 11, "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                if k not in ("child", "spec", "table")},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "numpy": np.__version__},
    }
    try:
        import dask
        import distributed
        import torch
        import zarr

        report["machine"].update(dask=dask.__version__, distributed=distributed.__version__,
                                 torch=torch.__version__, zarr=zarr.__version__,
                                 asteria_store=getattr(asteria_store, "__version__", None))
    except ImportError:
        pass
    print("building (cached in --work) ...", flush=True)
    report["build"] = build(work, args.build_threads)
    print(json.dumps(report["build"]), flush=True)
    gt_held = np.load(DATA / "gt_heldout_ids.npy")[:, : args.k].astype(np.int64)
    targets = {"store": work / "store", "collection": work / "collection"}

    rows: list[dict] = []
    if not args.skip_speed:
        qpath = make_queries(work, args.queries, args.seed, args.noise)
        noisy_rows, gt_noisy = noisy_truth(work, qpath, args.noisy_gt, args.k)
        report["queries"] = {"path": str(qpath), "n": args.queries, "heldout_prefix": min(args.queries, HELDOUT),
                             "noisy_gt_sample": len(noisy_rows)}
        worker_counts: list = [int(w) for w in args.workers.split(",")]
        if args.ablate_malloc_trim:
            worker_counts.append("1-glibc-trim")
        names = [t for t in args.targets.split(",") if t]
        walls: dict[tuple[str, int | str], list[dict]] = {}
        store_res = None
        for rnd in range(args.repeat):
            for name in names:
                for w in worker_counts:
                    out = runs_dir / f"{name}-w{w}.zarr"
                    fresh(out)
                    warm(targets[name], qpath)
                    trim = isinstance(w, str)
                    spec = {"target": str(targets[name]), "queries": str(qpath), "out": str(out), "k": args.k,
                            "probes": args.probes, "block_rows": args.block_rows, "workers": 1 if trim else w,
                            "glibc_trim": trim}
                    row = spawn_child("run", spec)
                    row.update(target=name, workers=spec["workers"], variant="Dask's MALLOC_TRIM_THRESHOLD_=65536" if trim else None,
                               round=rnd)
                    print(f"  {name} workers={w} round {rnd}: {row['wall_s']:.1f} s, {row['qps']:,.0f} q/s",
                          flush=True)
                    walls.setdefault((name, w), []).append(row)
                    if rnd + 1 < args.repeat:
                        continue
                    res = load_out(out)
                    row.update(recalls(res[0], gt_held, noisy_rows, gt_noisy, args.k))
                    row["is_reference"] = w == worker_counts[0]
                    if row["is_reference"]:  # the run the others' results are compared with
                        base_res = res
                        if name == "store":
                            store_res = res
                    row["vs_baseline_results"] = compare(base_res, res)
                    if name == "collection" and store_res is not None:
                        row["vs_store_results"] = compare(store_res, res)
                    if w != worker_counts[0]:
                        fresh(out)  # keep only the baselines' outputs
        for reps in walls.values():
            last = dict(reps[-1])
            wall = float(np.median([r["wall_s"] for r in reps]))
            last.update(wall_s=wall, qps=args.queries / wall, walls=[round(r["wall_s"], 3) for r in reps])
            rows.append(last)
        for name in names:
            base = next((r for r in rows if r["target"] == name and r["workers"] == 0 and not r["variant"]), None)
            for r in rows:
                if r["target"] == name and base is not None:
                    r["wall_vs_baseline"] = r["wall_s"] / base["wall_s"]
                    r["overhead_pct"] = round(100 * (r["wall_s"] / base["wall_s"] - 1), 1)
        report["runs"] = rows

    kills: list[dict] = []
    if args.kill_tests:
        kq = make_queries(work, args.kill_queries, args.seed, args.noise)
        cli = has_cli()
        report["kill_queries"] = {"path": str(kq), "n": args.kill_queries, "block_rows": args.block_rows,
                                  "blocks": -(-args.kill_queries // args.block_rows)}
        for name in [t for t in args.kill_targets.split(",") if t]:
            ref_out = runs_dir / f"kill-ref-{name}.zarr"
            fresh(ref_out)
            warm(targets[name], kq)
            spec = {"target": str(targets[name]), "queries": str(kq), "out": str(ref_out), "k": args.k,
                    "probes": args.probes, "block_rows": args.block_rows, "workers": 2}
            ref_row = spawn_child("run", spec)
            ref = load_out(ref_out)
            print(f"  kill tests, {name}: undisturbed run {ref_row['wall_s']:.1f} s", flush=True)
            # (a) one worker SIGKILLed mid-job
            out = runs_dir / f"kill-worker-{name}.zarr"
            fresh(out)
            spec = {**spec, "out": str(out), "n_queries": args.kill_queries, "kill_at": args.kill_at}
            rec = spawn_child("kill-worker", spec)
            rec.update(test="worker SIGKILL", target=name, undisturbed_wall_s=ref_row["wall_s"])
            if rec.get("error") is None and out.is_dir():
                rec["vs_undisturbed"] = compare(ref, load_out(out))
            rec["passed"] = bool("killed_pid" in rec and rec.get("error") is None and not rec["victim_still_alive"]
                                 and rec.get("vs_undisturbed", {}).get("equal"))
            kills.append(rec)
            print(f"  worker kill ({name}): {'PASS' if rec['passed'] else 'FAIL'}", flush=True)
            fresh(out)
            # (b) the client's whole process group SIGKILLed, then --resume (the store only)
            if name == "store":
                out = runs_dir / "kill-client-store.zarr"
                rec = kill_client_test(cli, targets[name], kq, out, args.kill_queries, args)
                rec.update(test="client SIGKILL + resume", target=name, undisturbed_wall_s=ref_row["wall_s"])
                if rec.get("killed") and out.is_dir():
                    rec["vs_undisturbed"] = compare(ref, load_out(out))
                want_skip = rec.get("markers_after_kill")
                rec["passed"] = bool(rec.get("killed") and not rec.get("survivors") and rec.get("partial_left")
                                     and rec.get("out_absent") and rec.get("resume_exit") == 0
                                     and rec.get("partial_gone")
                                     and rec.get("vs_undisturbed", {}).get("equal")
                                     and rec.get("resume_blocks_skipped") == want_skip and want_skip)
                kills.append(rec)
                print(f"  client kill + resume ({name}): {'PASS' if rec['passed'] else 'FAIL'}", flush=True)
                fresh(out)
            fresh(ref_out)
        report["kill_tests"] = kills

    report["total_s"] = round(time.perf_counter() - t0, 1)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1, default=str))

    print_tables(report)
    print(f"\nwrote {json_path} ({report['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
