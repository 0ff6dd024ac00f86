"""Filtered search on real data: asteria-store vs LanceDB (prefilter) vs Chroma.

    python benchmarks/bench_filter.py --nq 1000 --single 200 --rounds 2 \\
        --systems asteria,lancedb,chroma --work /tmp/asteria-bench/filter \\
        --out docs/results/filter_wordnet.jsonl

Peers: ``pip install lancedb chromadb`` (measured: lancedb 0.40.0, chromadb 1.5.9); one that
fails to import, build or search is reported in ``--out`` and the run goes on without it.

Data: wordnet-minilm (106,697 definitions x 384, float16 -> float32, inner product), the first
``--nq`` held-out queries. Attributes per base row come from the WordNet files the corpus was
built from (Debian ``wordnet-base``, ``apt-get download`` into ``--wordnet``, parsed once to
``attributes.parquet`` there): ``pos`` (satellites are adj), ``lexfile``, ``length`` (chars).
A gloss's unquoted parts (split at ``;`` outside double quotes, whitespace normalised, joined
by ``"; "``) are its definition, matched to ``base_texts.txt`` (first occurrence; a gloss with
a stray quote matches once the parts holding it are dropped). FILTERS (~50/10/1/0.1% of rows)
are ANDed ``column op value`` clauses rendered as SQL and as a Chroma ``where``. Truth: exact
top 10 by inner product over the rows DuckDB matches with that SQL.

* asteria: ``create(dim=384, metric="ip")``, one ``ingest`` with 5 metadata columns (those 3,
  ``first_letter``, ``is_long``) and, for the cost of metadata, one of the vectors alone. Batch
  ``search(threads=1)``, single ``query`` (the store holds BLAS at one thread). Sweep: probes.
* lancedb: IVF_PQ (sqrt(N) partitions, 48 x 8 bits, dot) + BITMAP (pos, lexfile) and BTREE
  (length) indexes, built in a child with lance's default threads, searched with
  ``LANCE_CPU_THREADS=1``, ``where(sql, prefilter=True)``; batch = a loop. Sweep: nprobes
  (refine_factor 10) and ``bypass_vector_index`` (flat over the matching rows).
* chroma: ``PersistentClient``, HNSW ``ip`` built with default threads, searched with
  ``num_threads=1``; batch = one ``query`` call. Sweep: ``ef_search`` (via ``modify``, then a
  reload: the segment reads it when loaded).

Per setting: a few warm-up queries, one timed batch (QPS = queries / s), then single queries
(p50). The peers, 10-100x slower here, get the first ``--peer-nq`` / ``--peer-single`` queries
(rows carry ``nq``) so that a run fits in ~12 minutes. ``--rounds`` rounds, the systems' order
reversed every other one; medians reported. ``--out`` is written anew (setup, build lines, one
line per system x filter x setting), then a summary: per filter, each system's fastest setting
with recall@10 >= 0.95, else its best recall.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from asteria_store.testing import recall_at_k

os.environ.setdefault("LANCE_CPU_THREADS", "1")  # read when lancedb (imported later) starts

LEXNAMES = (  # lex_filenum -> lexicographer file (WordNet 3.0 lexnames(5WN))
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object "
    "noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
    "noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession "
    "verb.social verb.stative verb.weather adj.ppl").split()
POS = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}

FILTERS = [  # (label, ANDed clauses (column, op, value)); shares measured on the base rows
    ("~50%", [("pos", "=", "noun"), ("length", ">", 40)]),  # 51.7%
    ("~10%", [("lexfile", "=", "noun.artifact")]),  # 9.9%
    ("~1%", [("lexfile", "=", "verb.social")]),  # 0.95%
    ("~0.1%", [("pos", "=", "verb"), ("length", ">", 105)]),  # 0.10%
]
K = 10


def to_sql(clauses) -> str:
    return " AND ".join(f"{c} {op} " + (f"'{v}'" if isinstance(v, str) else str(v)) for c, op, v in clauses)


def to_chroma(clauses) -> dict:
    parts = [{c: {{"=": "$eq", ">": "$gt", "<": "$lt"}[op]: v}} for c, op, v in clauses]
    return parts[0] if len(parts) == 1 else {"$and": parts}


def emit(row: dict, out) -> None:
    print(json.dumps(row), flush=True)
    print(json.dumps(row), file=out, flush=True)


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def definition(gloss: str, drop_quoted: bool = False) -> str:
    """The definition of a gloss: its parts (split at ``;`` outside double quotes) that are
    not quoted examples, whitespace normalised, joined by ``"; "``. ``drop_quoted``: also
    drop parts with a stray quote anywhere, and strip quotes (unbalanced glosses)."""
    parts, cur, quoted = [], [], False
    for ch in gloss:
        quoted ^= ch == '"'
        if ch == ";" and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts = [" ".join(p.split()) for p in parts + ["".join(cur)]]
    keep = [p for p in parts if p and not p.startswith('"')]
    if drop_quoted:
        keep = [p.replace('"', "") for i, p in enumerate(keep) if i == 0 or '"' not in p]
    return "; ".join(keep)


def wordnet_attributes(texts: list[str], cache: Path) -> tuple[pa.Table, int]:
    """pos, lexfile, length per base row (cached parquet) and how many rows matched."""
    target = cache / "attributes.parquet"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        if not list(cache.glob("wordnet-base_*.deb")):
            subprocess.run(["apt-get", "download", "wordnet-base"], cwd=cache, check=True)
        root = cache / "root"
        subprocess.run(["dpkg-deb", "-x", str(next(cache.glob("wordnet-base_*.deb"))), str(root)], check=True)
        exact, loose = {}, {}
        for pos in ("noun", "verb", "adj", "adv"):
            for line in next(root.rglob(f"data.{pos}")).read_text(encoding="utf-8", errors="replace").splitlines():
                if line.startswith("  ") or " | " not in line:  # the license header
                    continue
                head, gloss = line.split(" | ", 1)
                f = head.split()
                attrs = (POS[f[2]], LEXNAMES[int(f[1])])
                exact.setdefault(definition(gloss), attrs)
                loose.setdefault(definition(gloss, drop_quoted=True), attrs)
        found = [exact.get(t) or loose.get(t) for t in texts]
        pq.write_table(pa.table({"pos": [a and a[0] for a in found], "lexfile": [a and a[1] for a in found],
                                 "length": pa.array([len(t) for t in texts], pa.int64())}), target)
    table = pq.read_table(target)
    return table, len(table) - table["pos"].null_count


def matching(table: pa.Table, sql: str) -> np.ndarray:
    import duckdb

    res = duckdb.connect().from_arrow(table).project(f"coalesce(({sql}), false) AS m").to_arrow_table()
    return res.column(0).to_numpy(zero_copy_only=False).astype(bool)


def exact_topk(base: np.ndarray, q: np.ndarray, mask: np.ndarray) -> np.ndarray:
    idx = np.flatnonzero(mask)
    scores = q @ base[idx].T
    top = np.argpartition(-scores, K - 1, axis=1)[:, :K]
    order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1)
    return idx[np.take_along_axis(top, order, 1)]


# -- systems: build() -> build lines; open(); settings; batch(q, f, st) -> (nq, K) ids; one(v, f, st)

class Asteria:
    name, warm, peer = "asteria", 20, False

    def __init__(self, a, base, attrs):
        import asteria_store

        self.lib, self.a, self.base, self.path = asteria_store, a, base, Path(a.work) / "asteria-meta"
        self.meta = attrs.append_column("first_letter", pa.array([t[:1].lower() for t in a.texts])).append_column(
            "is_long", pc.greater(attrs["length"], 100))
        self.settings = [{"probes": p} for p in (8, 16, 32, 64)]

    def build(self):
        rows = []
        for what, path, meta in (("5 metadata columns", self.path, self.meta),
                                 ("vectors only", Path(self.a.work) / "asteria-plain", None)):
            shutil.rmtree(path, ignore_errors=True)
            t = time.perf_counter()
            s = self.lib.create(path, dim=self.base.shape[1], metric="ip")
            s.ingest(self.base, metadata=meta)
            seconds, info = time.perf_counter() - t, s.info()
            s.close()
            rows.append({"system": self.name, "phase": "build", "what": what, "ingest_s": seconds,
                         "disk_bytes": info["disk_bytes"], "buckets": info.get("buckets")})
        return rows

    def open(self):
        self.s = self.lib.open(self.path, readonly=True)

    def batch(self, q, f, st):
        return self.s.search(q, K, where=f["sql"], probes=st["probes"], threads=1)[0]

    def one(self, v, f, st):
        return self.s.query(v, K, where=f["sql"], probes=st["probes"])[0]

    def extra(self, q, f, st):
        return {"plan": self.s.search(q[:1], K, where=f["sql"], probes=st["probes"], explain=True)[2].plan}


class Lance:
    name, warm, peer = "lancedb", 5, True

    def __init__(self, a, base, attrs):
        import lancedb

        self.lib, self.a, self.base, self.attrs, self.uri = lancedb, a, base, attrs, str(Path(a.work) / "lancedb")
        self.partitions = int(round(np.sqrt(len(base))))
        self.settings = [{"nprobes": n, "refine_factor": 10} for n in (32, 128)] + [{"flat": True}]

    def build(self):
        """In a child process with lance's default CPU threads (as the other builds get)."""
        env = {k: v for k, v in os.environ.items() if k != "LANCE_CPU_THREADS"}
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--build-lance"], env=env, check=True,
                             stdout=subprocess.PIPE, text=True).stdout
        return [json.loads(out.strip().splitlines()[-1])]

    def build_here(self):
        from lancedb.index import Bitmap, BTree, IvfPq

        shutil.rmtree(self.uri, ignore_errors=True)
        t = time.perf_counter()
        vec = pa.FixedSizeListArray.from_arrays(pa.array(self.base.ravel()), self.base.shape[1])
        data = self.attrs.add_column(0, "vector", vec).add_column(0, "id", pa.array(np.arange(len(self.base))))
        tbl = self.lib.connect(self.uri).create_table("rows", data)
        write_s = time.perf_counter() - t
        # with a config, create_index's first argument is the column
        tbl.create_index("vector", config=IvfPq(distance_type="dot", num_partitions=self.partitions,
                                                num_sub_vectors=48))
        for col, kind in (("pos", Bitmap()), ("lexfile", Bitmap()), ("length", BTree())):
            tbl.create_index(col, config=kind)
        return {"system": self.name, "phase": "build", "write_s": write_s, "build_s": time.perf_counter() - t,
                "disk_bytes": disk_bytes(Path(self.uri)), "index": f"IVF_PQ {self.partitions} x 48, dot",
                "scalar_indexes": "pos BITMAP, lexfile BITMAP, length BTREE", "version": self.lib.__version__}

    def open(self):
        self.tbl = self.lib.connect(self.uri).open_table("rows")

    def one(self, v, f, st):
        r = self.tbl.search(v).distance_type("dot").where(f["sql"], prefilter=True)
        r = r.bypass_vector_index() if st.get("flat") else r.nprobes(st["nprobes"]).refine_factor(st["refine_factor"])
        ids = r.limit(K).select(["id", "_distance"]).to_arrow()["id"].to_numpy()
        return np.pad(ids, (0, K - len(ids)), constant_values=-1)

    def batch(self, q, f, st):  # no batch API with a prefilter: a loop
        return np.stack([self.one(v, f, st) for v in q])


class Chroma:
    name, warm, peer = "chroma", 5, True

    def __init__(self, a, base, attrs):
        import chromadb

        self.lib, self.a, self.base, self.attrs, self.path = chromadb, a, base, attrs, str(Path(a.work) / "chroma")
        self.settings = [{"ef_search": ef} for ef in (20, 100)]  # 100: chroma's default

    def client(self):
        from chromadb.config import Settings

        return self.lib.PersistentClient(path=self.path, settings=Settings(anonymized_telemetry=False))

    def build(self):
        shutil.rmtree(self.path, ignore_errors=True)
        t = time.perf_counter()
        client = self.client()
        col = client.create_collection("rows", configuration={"hnsw": {"space": "ip"}}, embedding_function=None)
        metas = [{k: v for k, v in r.items() if v is not None} for r in self.attrs.to_pylist()]
        step = min(5000, client.get_max_batch_size())
        for i in range(0, len(self.base), step):
            col.add(ids=[str(j) for j in range(i, min(i + step, len(self.base)))],
                    embeddings=self.base[i: i + step], metadatas=metas[i: i + step])
        return [{"system": self.name, "phase": "build", "build_s": time.perf_counter() - t,
                 "disk_bytes": disk_bytes(Path(self.path)), "hnsw": col.configuration.get("hnsw"),
                 "version": self.lib.__version__}]

    def open(self, ef=None):
        """The HNSW segment reads ef_search and num_threads when a process first loads it: a
        change takes a fresh system (clear_system_cache) and client."""
        if ef is not None:
            self.col.modify(configuration={"hnsw": {"ef_search": ef, "num_threads": 1}})
            self.cl.clear_system_cache()
        self.cl = self.client()
        self.col, self.ef = self.cl.get_collection("rows", embedding_function=None), ef

    def batch(self, q, f, st):
        if self.ef != st["ef_search"]:
            self.open(st["ef_search"])
        res = self.col.query(query_embeddings=q, n_results=K, where=f["chroma"], include=[])
        return np.array([[int(x) for x in ids] + [-1] * (K - len(ids)) for ids in res["ids"]], np.int64)

    def one(self, v, f, st):
        return self.batch(v[None], f, st)[0]


SYSTEMS = {"asteria": Asteria, "lancedb": Lance, "chroma": Chroma}


def measure(sys_, q, truth, f, st, single: int) -> dict:
    for v in q[: sys_.warm]:
        sys_.one(v, f, st)
    t = time.perf_counter()
    ids = sys_.batch(q, f, st)
    batch_s = time.perf_counter() - t
    lat = []
    for v in q[:single]:
        t = time.perf_counter()
        sys_.one(v, f, st)
        lat.append(time.perf_counter() - t)
    return {"nq": len(q), "single": len(lat), "recall@10": recall_at_k(ids, truth[: len(q)], K),
            "batch_qps": len(q) / batch_s, "p50_ms": float(np.median(lat)) * 1000,
            "results_complete": float(np.mean((ids >= 0).sum(1) == K))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/wordnet-minilm"))
    ap.add_argument("--wordnet", default="/tmp/asteria-bench/wordnet-base", help="cache of the wordnet-base .deb")
    ap.add_argument("--nq", type=int, default=1000)
    ap.add_argument("--single", type=int, default=200)
    ap.add_argument("--peer-nq", type=int, default=200, help="queries of lancedb's and chroma's batch")
    ap.add_argument("--peer-single", type=int, default=50, help="their queries timed one at a time")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--systems", default="asteria,lancedb,chroma")
    ap.add_argument("--work", default="/tmp/asteria-bench/filter")
    ap.add_argument("--out", default="docs/results/filter_wordnet.jsonl")
    ap.add_argument("--reuse", action="store_true", help="keep the indexes an earlier run built in --work")
    ap.add_argument("--build-lance", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    data, t0 = Path(a.data), time.perf_counter()
    base = np.load(data / "base.f16.npy").astype(np.float32)
    q = np.load(data / "queries_heldout.f16.npy")[: a.nq].astype(np.float32)
    a.texts = (data / "base_texts.txt").read_text(encoding="utf-8").split("\n")[: len(base)]
    attrs, matched = wordnet_attributes(a.texts, Path(a.wordnet))
    if a.build_lance:
        return print(json.dumps(Lance(a, base, attrs).build_here()))
    print(f"attributes: {matched:,} of {len(base):,} base rows matched a WordNet synset", file=sys.stderr)
    Path(a.work).mkdir(parents=True, exist_ok=True)
    out = open(a.out, "w")
    filters = []
    for label, clauses in FILTERS:
        mask = matching(attrs, to_sql(clauses))
        filters.append({"label": label, "sql": to_sql(clauses), "chroma": to_chroma(clauses),
                        "matching": int(mask.sum()), "selectivity": float(mask.mean()), "truth": exact_topk(base, q, mask)})
        print(f"filter {label}: {to_sql(clauses)!r}: {mask.sum():,} rows, {mask.mean():.4%}", file=sys.stderr)
    emit({"phase": "setup", "n": len(base), "nq": len(q), "single": a.single, "peer_nq": a.peer_nq,
          "peer_single": a.peer_single, "rounds": a.rounds, "attributes_matched": matched,
          "filters": [{k: v for k, v in f.items() if k != "truth"} for f in filters]}, out)
    systems, builds = [], Path(a.work) / "builds.json"
    saved = json.loads(builds.read_text()) if a.reuse and builds.exists() else {}
    for name in a.systems.split(","):
        try:
            s = SYSTEMS[name](a, base, attrs)
            saved[name] = saved.get(name) or s.build()
            builds.write_text(json.dumps(saved))
            for r in saved[name]:
                emit(r, out)
            s.open()
            systems.append(s)
        except Exception as exc:  # a peer that fails is reported and left out
            emit({"system": name, "phase": "error", "error": f"{type(exc).__name__}: {exc}"}, out)
    results: dict = {}
    for r in range(a.rounds):
        for s in systems if r % 2 == 0 else systems[::-1]:
            nq, single = (a.peer_nq, a.peer_single) if s.peer else (a.nq, a.single)
            for f in filters:
                for st in s.settings:
                    try:
                        m = measure(s, q[:nq], f["truth"], f, st, single)
                    except Exception as exc:
                        m = {"error": f"{type(exc).__name__}: {exc}"}
                    results.setdefault((s, f["label"], json.dumps(st)), []).append(m)
            print(f"round {r + 1}: {s.name} done at {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    best: dict = {}
    for (s, label, st), runs in results.items():
        f = next(f for f in filters if f["label"] == label)
        row = {"system": s.name, "filter": f["sql"], "label": label, "selectivity": f["selectivity"],
               "setting": json.loads(st)}
        if any("error" in r for r in runs):
            row["error"] = next(r["error"] for r in runs if "error" in r)
        else:
            row.update({m: v if m in ("nq", "single") else statistics.median(r[m] for r in runs)
                        for m, v in runs[0].items()})
            row.update({"batch_qps_rounds": [r["batch_qps"] for r in runs], "p50_ms_rounds": [r["p50_ms"] for r in runs]})
            if hasattr(s, "extra"):
                row.update(s.extra(q, f, row["setting"]))
            ok = row["recall@10"] >= 0.95
            rank = (ok, row["batch_qps"] if ok else row["recall@10"])
            if (label, s.name) not in best or rank > best[label, s.name][0]:
                best[label, s.name] = (rank, row)
        emit(row, out)
    print(f"\n{'filter':<30} {'share':>6} {'system':<8} {'setting':<26} {'recall':>6} {'complete':>8} {'QPS':>7} "
          f"{'p50 ms':>7}")
    for f in filters:
        for s in systems:
            if (f["label"], s.name) in best:
                r = best[f["label"], s.name][1]
                st = ",".join(f"{k}={v}" for k, v in r["setting"].items())
                print(f"{f['sql']:<30} {f['selectivity']:>6.2%} {s.name:<8} {st:<26} {r['recall@10']:>6.3f} "
                      f"{r['results_complete']:>8.3f} {r['batch_qps']:>7.0f} {r['p50_ms']:>7.2f}")
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
