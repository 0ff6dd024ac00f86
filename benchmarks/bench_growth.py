"""A store grown by many ingests against one built in one ingest: recall, speed, upkeep, disk.

    python benchmarks/growth_data.py --n 10000000 --out /tmp/asteria-bench/growth-10m --seed 0 \\
        --gt-at 1000000,3000000,10000000
    python benchmarks/bench_growth.py --data /tmp/asteria-bench/growth-10m \\
        --store /tmp/asteria-bench/growth-stores --batches 100 --first 10000 \\
        --checkpoints 1000000,3000000,10000000 --probes 8,16,32,64 \\
        --out benchmarks/results/growth_10m.json --table docs/growth_10m_table.md

``--data`` is a folder written by ``growth_data.py`` (``base.f16.npy``, ``queries.f16.npy``,
``gt_{N}_ids.npy`` for every checkpoint N). Phases, each in its own ``python bench_growth.py
--child ...`` process so that its peak RSS (VmHWM) is its own:

* **grown**: an empty store (float16, learned router, default settings) at
  ``STORE/grown`` gets the base rows in ``--batches`` ingests (the first of ``--first`` rows,
  the rest equal, split where a checkpoint falls; ids = row numbers). Every ingest is timed
  and followed by ``store.info()`` (segments, extents, buckets, generation, disk bytes,
  re-fits and merges: whatever the store reports, read with ``.get``).
  ``store.compact()`` is never called: the store has to look after itself.
* **one-shot** (``--oneshot-at``, default: the last checkpoint): a store at ``STORE/oneshot-N``
  built from the first N rows in ONE ingest (of the ``.npy`` path when N is all of the
  file, else of a temporary prefix copy next to the stores, deleted after).
* **serve** (at each checkpoint, for each store there): recall@10 of the ``gt_{N}`` queries,
  batch QPS (one ``search`` of all queries after an untimed warm-up), one-query p50/p95
  latency (``query`` of the first ``--single``), rows scanned and KiB read per query
  (SearchStats), extents per probed bucket (catalog), at each of ``--probes``.
* ``--upkeep refit``: the stores grow as they did before local splits (no splits, a tree
  re-fits at GROWTH_FACTOR x its buckets), for an A/B against the default ``split``.
* ``--cap-mib M``: the serving processes run in a memory cgroup capped at M MiB, page
  cache included (cgroup v1, else v2); a process that cannot join one runs uncapped, and
  its rows say so (``memory``). A comma-separated list gives one cap per checkpoint, in
  ascending order of the checkpoints (e.g. ``512,1024,2048`` for 1M, 3M, 10M).
* **cold** (same processes): every file under the store is flushed and evicted from the
  page cache (``posix_fadvise(DONTNEED)``); the store is opened and the first ``--cold``
  queries are issued one at a time: open time, first and mean latency, bytes the process
  read from storage (``/proc/self/io`` read_bytes) and bytes SearchStats counts.

Writes every row (ingests, builds, serving, cold) to ``--out`` (JSON) and prints Markdown
tables (``--table``: also to that file) ready for docs/benchmarks.md. Threads are pinned
(``--threads``, default 1) before numpy is imported, in every phase.
"""

from __future__ import annotations

import os
import sys

from harness import (AnonPeak, anon_mib, join_memory_cap, peak_mib, pin_threads_from_argv,
                     remove_memory_cap)

pin_threads_from_argv()  # before numpy is imported

import argparse
import json
import platform
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from asteria_store.testing.pagecache import evict, read_bytes

ROW = "@@ROW "  # child stdout lines carrying a JSON row
CAP_GROUP = "asteria-bench-serve"  # the memory cgroup serving children run in (--cap-mib)


def ints(s: str | None) -> list[int]:
    return [int(v) for v in str(s).split(",")] if s else []


def emit(row: dict) -> None:
    print(ROW + json.dumps(row), flush=True)


def plan(total: int, batches: int, first: int, checkpoints: list[int]) -> list[int]:
    """Batch ends: the first batch of ``first`` rows, the rest of equal size, plus a cut at
    every checkpoint (so each checkpoint is measured at exactly N rows)."""
    ends = np.linspace(min(first, total), total, max(batches, 1)).round().astype(int)
    return sorted({int(e) for e in ends} | {c for c in checkpoints if c <= total})


def store_info(store) -> dict:
    """What ``store.info()`` tells about the index's shape, defensively (fields come and go;
    extents, the router's bits, growth state and upkeep are under ``"internals"``)."""
    info = store.info()
    internals = info.get("internals") or info
    router = internals.get("router") or {}
    bits = router.get("bits")
    return {"count": info.get("count"), "segments": info.get("segments"), "extents": internals.get("extents"),
            "router_kind": router.get("kind"), "bits": bits,
            "buckets": info.get("buckets", 2 ** bits if bits is not None else None),
            "generation": info.get("generation"), "disk_bytes": info.get("disk_bytes"),
            "fitted_rows": internals.get("fitted_rows"), "pending_training": info.get("pending_training"),
            "maintenance": internals.get("maintenance") or {},
            **{k: info[k] for k in ("refits", "merges") if k in info}}


RESULT_FIELDS = ("rows", "seconds", "trained", "train_seconds", "refitted", "merged_segments", "split_rows",
                 "upkeep_seconds")


def set_upkeep(policy: str) -> None:
    """``split``: the store's own growth policy (local splits; a tree re-fits at
    TREE_REFIT_FACTOR). ``refit``: no splits, and a tree re-fits whenever the data calls
    for GROWTH_FACTOR x its buckets (the policy before local splits), for A/B runs."""
    from asteria_store.write import upkeep

    if policy == "refit":
        upkeep.SPLIT_FACTOR = 10**12
        upkeep.TREE_REFIT_FACTOR = upkeep.GROWTH_FACTOR


# ----------------------------------------------------------------------------- children
def child_ingest(a: argparse.Namespace) -> None:
    """Ingest batches ``a.ends[i-1]:a.ends[i]`` for i in [a.lo, a.hi) into STORE/grown."""
    import torch

    import asteria_store
    torch.set_num_threads(int(a.threads))
    set_upkeep(a.upkeep)
    path = Path(a.store) / "grown"
    base = np.load(Path(a.data) / "base.f16.npy", mmap_mode="r")
    ends = ints(a.ends)
    store = (asteria_store.open(path) if path.exists()
             else asteria_store.create(path, dim=base.shape[1], dtype="float16", router="learned"))
    with store:
        for i in range(a.lo, a.hi):
            start, stop = (ends[i - 1] if i else 0), ends[i]
            vec, ids = np.array(base[start:stop]), np.arange(start, stop, dtype=np.int64)
            t = time.perf_counter()
            with AnonPeak() as anon:
                res = store.ingest(vec, ids)
            wall = time.perf_counter() - t
            emit({"phase": "ingest", "batch": i, "start": start, "stop": stop, "wall_s": wall,
                  **{f: getattr(res, f) for f in RESULT_FIELDS if hasattr(res, f)},
                  **store_info(store), "peak_rss_mib": peak_mib(), "anon_peak_mib": anon.mib})


def child_oneshot(a: argparse.Namespace) -> None:
    import torch

    import asteria_store
    torch.set_num_threads(int(a.threads))
    set_upkeep(a.upkeep)
    n, src = a.n, Path(a.data) / "base.f16.npy"
    base = np.load(src, mmap_mode="r")
    path, tmp = Path(a.store) / f"oneshot-{n}", None
    if path.exists():
        shutil.rmtree(path)
    t = time.perf_counter()
    if n < len(base):  # ingest streams a .npy path in blocks; an array slice would be mapped whole
        tmp = Path(a.store) / f"prefix-{n}.f16.npy"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=base.dtype, shape=(n, base.shape[1]))
        for s in range(0, n, 262144):
            out[s : s + 262144] = base[s : min(n, s + 262144)]
        out.flush()
        del out
        src = tmp
    copy_s = time.perf_counter() - t
    with asteria_store.create(path, dim=base.shape[1], dtype="float16", router="learned") as store:
        t = time.perf_counter()
        with AnonPeak() as anon:
            res = store.ingest(src, np.arange(n, dtype=np.int64))
        wall = time.perf_counter() - t
        emit({"phase": "oneshot", "n": n, "wall_s": wall, "prefix_copy_s": copy_s,
              **{f: getattr(res, f) for f in RESULT_FIELDS if hasattr(res, f)}, **store_info(store),
              "peak_rss_mib": peak_mib(), "anon_peak_mib": anon.mib})
    if tmp is not None:
        tmp.unlink()


def extents_per_probe(store, queries: np.ndarray, probes: int) -> float | None:
    """Mean extents (contiguous runs in segments) of the buckets each query probes first,
    from the catalog. Internals: None if they moved."""
    try:
        from asteria_store.query.engine import probe_order

        keys = probe_order(store.router, queries, probes)
        with store._reads.snapshot() as snap:
            per = {int(k): len(snap.view.extents(int(k))) for k in np.unique(keys)}
        return float(np.mean([per[int(k)] for k in keys.ravel()]))
    except Exception as exc:  # noqa: BLE001 - a diagnostic, never worth failing the run
        print(f"extents per probed bucket unavailable: {exc!r}", file=sys.stderr)
        return None


def child_serve(a: argparse.Namespace) -> None:
    import torch

    import asteria_store
    from asteria_store.testing import recall_at_k
    torch.set_num_threads(int(a.threads))
    path = Path(a.store) / a.which
    q = np.load(Path(a.data) / "queries.f16.npy").astype(np.float32)
    truth = np.load(Path(a.data) / f"gt_{a.n}_ids.npy")
    settings = [(p, r) for p in ints(a.probes) for r in ints(a.rerank)]  # rerank 0: certified search
    head = {"store": a.which.split("-")[0], "n": a.n}
    if int(a.cap_mib):
        head["memory"] = join_memory_cap(CAP_GROUP, int(a.cap_mib))
        print(f"serving {a.which}: {head['memory']}", file=sys.stderr)

    # cold first: nothing of this store has been read by this process yet
    for p, rr in settings:
        kw = {"rerank": rr} if rr else {}
        evicted = evict(path)
        r0, t = read_bytes(), time.perf_counter()
        store = asteria_store.open(path, readonly=True)
        open_s, open_read = time.perf_counter() - t, read_bytes() - r0
        lat, io, stat, t_end = [], [], [], time.perf_counter() + a.budget_s
        for v in q[: a.cold]:
            if len(lat) >= 5 and time.perf_counter() > t_end:
                break
            r0, t = read_bytes(), time.perf_counter()
            out = store.query(v, 10, probes=p, explain=True, **kw)
            lat.append(time.perf_counter() - t)
            io.append(read_bytes() - r0)
            stat.append(out[2]["bytes_read"])
        store.close()
        emit({**head, "phase": "cold", "probes": p, "rerank": rr, "files_evicted": evicted, "open_ms": open_s * 1000,
              "open_kib_read": open_read / 1024, "first_ms": lat[0] * 1000,
              "mean_ms": float(np.mean(lat)) * 1000, "p50_ms": float(np.median(lat)) * 1000,
              "first_kib_read": io[0] / 1024, "mean_kib_read": float(np.mean(io)) / 1024,
              "mean_kib_stats": float(np.mean(stat)) / 1024, "queries": len(lat)})

    store = asteria_store.open(path, readonly=True)
    base = np.load(Path(a.data) / "base.f16.npy", mmap_mode="r")
    others = np.asarray(base[np.sort(np.random.default_rng(1).choice(a.n, 2000, replace=False))], dtype=np.float32)
    info = store_info(store)
    if info["count"] != a.n:
        sys.exit(f"{path} holds {info['count']:,} vectors, expected {a.n:,}")
    for p, rr in settings:
        kw = {"rerank": rr} if rr else {}
        store.search(q, 10, probes=p, **kw)  # warm-up: page cache, catalog, memory maps
        store = evict_vectors(store, path, a.evict_vectors, others, p, kw)
        r0, t = read_bytes(), time.perf_counter()
        ids, _ = store.search(q, 10, probes=p, **kw)
        batch_s, batch_read = time.perf_counter() - t, read_bytes() - r0
        store = evict_vectors(store, path, a.evict_vectors, others, p, kw)
        lat, t_end, r0 = [], time.perf_counter() + a.budget_s, read_bytes()
        for v in q[: a.single]:
            if len(lat) >= 20 and time.perf_counter() > t_end:
                break
            t = time.perf_counter()
            store.query(v, 10, probes=p, **kw)
            lat.append(time.perf_counter() - t)
        single_read = (read_bytes() - r0) / len(lat)
        lat = np.array(lat) * 1000
        _, _, st = store.search(q, 10, probes=p, explain=True, **kw)
        emit({**head, "phase": "serve", "probes": p, "rerank": rr, "vectors_evicted": a.evict_vectors,
              "recall@10": recall_at_k(ids, truth, 10),
              "batch_qps": len(q) / batch_s, "p50_ms": float(np.percentile(lat, 50)),
              "p95_ms": float(np.percentile(lat, 95)), "p99_ms": float(np.percentile(lat, 99)),
              "single_n": len(lat),
              "buckets_probed": float(np.mean(st.buckets)), "scanned_per_query": float(np.mean(st.scanned)),
              "kib_read_per_query": float(np.mean(st.bytes_read)) / 1024,
              "device_kib_per_query_batch": batch_read / len(q) / 1024,
              "device_kib_per_query_single": single_read / 1024,
              "extents_per_probed_bucket": extents_per_probe(store, q, p),
              "segments": info["segments"], "buckets": info["buckets"], "extents": info["extents"],
              "disk_bytes": info["disk_bytes"], "peak_rss_mib": peak_mib(), "anon_mib": anon_mib()})
    store.close()


def evict_vectors(store, path: Path, on: bool, others: np.ndarray, probes: int, kw: dict):
    """With ``on``, drop the store's full vectors from the page cache (the rest stays): the
    state of a store whose vectors do not fit in memory, with its routing, ids and codes
    warm. Timed phases after the warm-up then read the vectors they rescore from the
    device, as a disk index such as DiskANN (O_DIRECT) reads its graph on every query.
    Pages a process maps cannot be dropped, so the store is closed first and opened again;
    ``others`` (base rows, not the timed queries) are searched then, untimed, to rebuild
    what the open dropped (bucket table, maps) with other rows' vectors. Returns the store
    to use."""
    import asteria_store

    if not on:
        return store
    store.close()
    for vectors in sorted((path / "segments.zarr").glob("seg-*/vectors")):
        evict(vectors)
    store = asteria_store.open(path, readonly=True)
    store.search(others, 10, probes=probes, **kw)
    return store


# ----------------------------------------------------------------------------- parent
def run_child(a: argparse.Namespace, args: list[str], cap_mib: int = 0) -> list[dict]:
    args = [*args, "--cap-mib", str(cap_mib)]
    cmd = [sys.executable, __file__, "--data", a.data, "--store", a.store, "--threads", str(a.threads),
           "--probes", a.probes, "--rerank", a.rerank, "--single", str(a.single), "--cold", str(a.cold),
           *(["--evict-vectors"] if a.evict_vectors else []),
           "--budget-s", str(a.budget_s), "--upkeep", a.upkeep, *args]
    proc_ = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    rows = []
    for line in proc_.stdout:
        if line.startswith(ROW):
            rows.append(json.loads(line[len(ROW):]))
            r = rows[-1]
            if r["phase"] == "ingest":
                print(f"ingest {r['batch']:4d} rows {r['stop']:>11,} {r['wall_s']:7.2f} s  "
                      f"segments {r['segments']} extents {r['extents']} buckets {r['buckets']} "
                      f"gen {r['generation']} disk {r['disk_bytes'] / 2**20:,.0f} MiB"
                      + ("  refit" if r.get("refitted") else "") + ("  trained" if r.get("trained") else "")
                      + (f"  merged {r['merged_segments']}" if r.get("merged_segments") else ""), file=sys.stderr)
            else:
                print(json.dumps(r), file=sys.stderr)
        else:
            sys.stderr.write(line)
    code = proc_.wait()
    remove_memory_cap(CAP_GROUP)
    if code != 0:
        sys.exit(f"child {' '.join(args)} failed (exit {proc_.returncode})")
    return rows


def parent(a: argparse.Namespace) -> None:
    data = Path(a.data)
    n_base = np.load(data / "base.f16.npy", mmap_mode="r").shape[0]
    checkpoints = ints(a.checkpoints) or [n_base]
    total = max(checkpoints)
    if total > n_base:
        sys.exit(f"--checkpoints go to {total:,} but {data}/base.f16.npy holds {n_base:,} rows")
    for n in checkpoints:
        if not (data / f"gt_{n}_ids.npy").exists():
            sys.exit(f"no ground truth {data}/gt_{n}_ids.npy: run growth_data.py with --gt-at {a.checkpoints}")
    oneshot = set(ints(a.oneshot_at)) if a.oneshot_at is not None else {total}  # "": none
    ends = plan(total, a.batches, a.first, checkpoints)
    store = Path(a.store)
    if (store / "grown").exists():
        sys.exit(f"{store / 'grown'} exists: pass a new --store (the grown store starts empty)")
    store.mkdir(parents=True, exist_ok=True)
    print(f"{len(ends)} ingests: first {ends[0]:,} rows, then ~{(total - ends[0]) // max(1, len(ends) - 1):,}; "
          f"checkpoints {checkpoints}, one-shot at {sorted(oneshot)}", file=sys.stderr)
    caps = ints(a.cap_mib) or [0]
    if len(caps) not in (1, len(checkpoints)):
        sys.exit(f"--cap-mib gives {len(caps)} caps for {len(checkpoints)} checkpoints: give one, or one each")
    cap_at = dict(zip(sorted(checkpoints), caps * len(checkpoints) if len(caps) == 1 else caps))
    rows, lo, t0 = [], 0, time.perf_counter()
    for n in sorted(checkpoints):
        hi = ends.index(n) + 1
        rows += run_child(a, ["--child", "ingest", "--ends", ",".join(map(str, ends)), "--lo", str(lo), "--hi", str(hi)])
        lo = hi
        rows += run_child(a, ["--child", "serve", "--which", "grown", "--n", str(n)], cap_at[n])
        if n in oneshot:
            rows += run_child(a, ["--child", "oneshot", "--n", str(n)])
            rows += run_child(a, ["--child", "serve", "--which", f"oneshot-{n}", "--n", str(n)], cap_at[n])
            if not a.keep:
                shutil.rmtree(store / f"oneshot-{n}")
    meta = {"data": str(data.resolve()), "n_base": n_base, "checkpoints": checkpoints, "batches": len(ends),
            "first": ends[0], "probes": ints(a.probes), "threads": int(a.threads), "single": a.single,
            "cold": a.cold, "budget_s": a.budget_s, "cap_mib": cap_at, "oneshot_at": sorted(oneshot), "wall_s": time.perf_counter() - t0,
            "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "generator": json.loads((data / "meta.json").read_text()) if (data / "meta.json").exists() else None}
    result = {"meta": meta, "rows": rows}
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    text = report(result)
    print(text)
    if a.table:
        Path(a.table).write_text(text + "\n")


def summarise(rows: list[dict], n: int, which: str) -> dict | None:
    """Build figures of one store at N: ingest seconds, rate, peak RSS, disk, shape."""
    if which == "grown":
        ing = [r for r in rows if r["phase"] == "ingest" and r["stop"] <= n]
        if not ing or ing[-1]["stop"] != n:
            return None
        last, secs = ing[-1], sum(r["wall_s"] for r in ing)
        upkeep = sum(r.get("upkeep_seconds") or 0 for r in ing)
        return {"ingests": len(ing), "ingest_s": secs, "upkeep_s": upkeep, "rate": n / secs,
                "slowest_s": max(r["wall_s"] for r in ing), "refits": sum(bool(r.get("refitted")) for r in ing),
                "merged": sum(r.get("merged_segments") or 0 for r in ing),
                "peak_rss_mib": max(r["peak_rss_mib"] for r in ing), **{k: last[k] for k in (
                    "segments", "extents", "buckets", "generation", "disk_bytes")}}
    one = [r for r in rows if r["phase"] == "oneshot" and r["n"] == n]
    if not one:
        return None
    r = one[0]
    return {"ingests": 1, "ingest_s": r["wall_s"], "upkeep_s": r.get("upkeep_seconds") or 0, "rate": n / r["wall_s"],
            "slowest_s": r["wall_s"], "refits": int(bool(r.get("refitted"))), "merged": r.get("merged_segments") or 0,
            "peak_rss_mib": r["peak_rss_mib"], **{k: r[k] for k in ("segments", "extents", "buckets", "generation",
                                                                      "disk_bytes")}}


def report(result: dict) -> str:
    rows, meta = result["rows"], result["meta"]
    dim = 384
    out = [(f"Growth benchmark: {meta['batches']} ingests (first {meta['first']:,} rows), checkpoints "
            f"{', '.join(f'{n:,}' for n in meta['checkpoints'])}, {meta['threads']} thread(s), {meta['machine']}, "
            f"{meta['date']}; total wall {meta['wall_s'] / 60:.1f} min."), "",
           ("| N | store | ingests | ingest s | rows/s | slowest ingest s | upkeep s | re-fits | segments merged | "
            "segments | buckets | extents | disk GiB | disk / raw f16 | peak RSS MiB (ingest) |"),
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    builds = {}
    for n in meta["checkpoints"]:
        for which in ("grown", "oneshot"):
            s = summarise(rows, n, which)
            if s is None:
                continue
            builds[n, which] = s
            out.append(f"| {n:,} | {which} | {s['ingests']} | {s['ingest_s']:,.0f} | {s['rate']:,.0f} | "
                       f"{s['slowest_s']:,.1f} | {s['upkeep_s']:,.0f} | {s['refits']} | {s['merged']} | "
                       f"{s['segments']} | {s['buckets']:,} | {s['extents']:,} | {s['disk_bytes'] / 2**30:.2f} | "
                       f"{s['disk_bytes'] / (n * dim * 2):.2f} | {s['peak_rss_mib']:,.0f} |")
    out += ["", ("| N | store | probes | recall@10 | batch QPS | p50 ms | p95 ms | timed 1 by 1 | rows scanned/q | "
                 "KiB read/q | extents per probed bucket | peak RSS MiB (serve) | anon MiB |"),
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    serve = {(r["n"], r["store"], r["probes"]): r for r in rows if r["phase"] == "serve"}
    for (n, which, p), r in sorted(serve.items()):
        ext = r["extents_per_probed_bucket"]
        out.append(f"| {n:,} | {which} | {p} | {r['recall@10']:.3f} | {r['batch_qps']:,.0f} | {r['p50_ms']:.2f} | "
                   f"{r['p95_ms']:.2f} | {r['single_n']} | {r['scanned_per_query']:,.0f} | {r['kib_read_per_query']:,.0f} | "
                   f"{'-' if ext is None else f'{ext:.1f}'} | {r['peak_rss_mib']:,.0f} | {r.get('anon_mib', 0):,.0f} |")
    pairs = [(n, p) for (n, w, p) in serve if w == "oneshot" and (n, "grown", p) in serve]
    if pairs:
        out += ["", "Grown / one-shot ratios (1.00: growing cost nothing):", "",
                ("| N | probes | recall@10 | batch QPS | p50 ms | p95 ms | KiB read/q | segments | extents | "
                 "disk | ingest s |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
        for n, p in sorted(pairs):
            g, o = serve[n, "grown", p], serve[n, "oneshot", p]
            bg, bo = builds.get((n, "grown")), builds.get((n, "oneshot"))

            def ratio(x, y):
                return f"{x / y:.2f}" if y else "-"
            out.append(f"| {n:,} | {p} | {ratio(g['recall@10'], o['recall@10'])} | "
                       f"{ratio(g['batch_qps'], o['batch_qps'])} | {ratio(g['p50_ms'], o['p50_ms'])} | "
                       f"{ratio(g['p95_ms'], o['p95_ms'])} | {ratio(g['kib_read_per_query'], o['kib_read_per_query'])} | "
                       f"{ratio(g['segments'], o['segments'])} | {ratio(g['extents'], o['extents'])} | "
                       f"{ratio(g['disk_bytes'], o['disk_bytes'])} | "
                       f"{ratio(bg['ingest_s'], bo['ingest_s']) if bg and bo else '-'} |")
    cold = sorted((r for r in rows if r["phase"] == "cold"), key=lambda r: (r["n"], r["store"], r["probes"]))
    if cold:
        out += ["", "Cold page cache (store files evicted, then opened; first queries one at a time):", "",
                ("| N | store | probes | open ms | first query ms | mean ms | p50 ms | first query KiB read (OS) | "
                 "mean KiB read/q (OS) | mean KiB read/q (SearchStats) | queries |"),
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in cold:
            out.append(f"| {r['n']:,} | {r['store']} | {r['probes']} | {r['open_ms']:.0f} | {r['first_ms']:.1f} | "
                       f"{r['mean_ms']:.1f} | {r['p50_ms']:.1f} | {r['first_kib_read']:,.0f} | "
                       f"{r['mean_kib_read']:,.0f} | {r['mean_kib_stats']:,.0f} | {r['queries']} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder written by growth_data.py")
    ap.add_argument("--store", required=True, help="folder for the stores (grown/, oneshot-N/); must be new")
    ap.add_argument("--batches", type=int, default=100, help="ingests of the grown store (>= this many)")
    ap.add_argument("--first", type=int, default=10_000, help="rows of the first ingest")
    ap.add_argument("--checkpoints", default=None, help="comma-separated N to measure at (default: all rows)")
    ap.add_argument("--oneshot-at", default=None, help="checkpoints with a one-shot store too (default: the last; '' for none)")
    ap.add_argument("--probes", default="8,16,32,64")
    ap.add_argument("--single", type=int, default=200, help="queries timed one by one")
    ap.add_argument("--cold", type=int, default=20, help="queries timed one by one after evicting the store")
    ap.add_argument("--budget-s", type=float, default=120.0,
                    help="stop a one-by-one timing loop (--single, --cold) after this many seconds "
                         "(at least 20 / 5 queries): a store that scans everything stays measurable")
    ap.add_argument("--threads", default="1")
    ap.add_argument("--evict-vectors", action="store_true",
                    help="serve: evict the store's vectors from the page cache before each timed phase")
    ap.add_argument("--rerank", default="0",
                    help="comma-separated rerank values to serve at each probe count (0: certified search, no rerank)")
    ap.add_argument("--upkeep", choices=["split", "refit"], default="split",
                    help="growth policy of the grown and one-shot stores (refit: no local splits, as before)")
    ap.add_argument("--cap-mib", default="0",
                    help="serve inside a memory cgroup of this many MiB, page cache included (0: no cap); "
                         "comma-separated: one per checkpoint")
    ap.add_argument("--keep", action="store_true", help="keep the one-shot stores (default: removed when measured)")
    ap.add_argument("--out", default=None, help="JSON results file")
    ap.add_argument("--table", default=None, help="also write the Markdown tables here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ends", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--lo", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--hi", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--which", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        {"ingest": child_ingest, "oneshot": child_oneshot, "serve": child_serve}[a.child](a)
    else:
        parent(a)


if __name__ == "__main__":
    main()
