"""Metadata columns: ingest, fetch, filtered search, table results, and what upkeep,
compaction, retraining, upserts, deletes and checksums do to them."""

from __future__ import annotations

from pathlib import Path

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import asteria_store
from conftest import run
from asteria_store import InvalidArgumentError, InvalidInputError
from asteria_store.errors import IdNotFoundError
from asteria_store.storage import segments as seglib

N = 3000


def attributes(n: int, seed: int = 0) -> dict:
    """Seeded metadata of ``n`` rows: a category of 2 values (~50%), a year (uniform over
    100 values), a flag, a score, a timestamp, tags (list of strings, some null)."""
    rng = np.random.default_rng(seed)
    year = rng.integers(1900, 2000, n)
    return {
        "half": np.where(rng.random(n) < 0.5, "a", "b").tolist(),
        "year": year,
        "flag": rng.random(n) < 0.3,
        "weight": rng.random(n),
        "when": pd.to_datetime(year.astype(str), format="%Y"),
        "tags": [None if i % 7 == 0 else ["x", "y"] if i % 3 == 0 else ["z"] for i in range(n)],
    }


def matches(md: dict, where) -> np.ndarray:
    """Row mask of a predicate evaluated here with numpy (the truth a store is held to)."""
    return np.asarray(where(md), dtype=bool)


@pytest.fixture(scope="module")
def store(wordnet, tmp_path_factory) -> asteria_store.Store:
    """The wordnet slice (learned router, 2 ingests) with ``attributes`` as metadata."""
    import torch

    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("meta") / "store"
    s = asteria_store.create(path, dim=384, bits=5)
    md = pd.DataFrame(attributes(N))
    s.ingest(wordnet.base[:2000], metadata=md.iloc[:2000])
    s.ingest(wordnet.base[2000:], metadata=pa.Table.from_pandas(md.iloc[2000:], preserve_index=False))
    yield s
    s.close()


def brute_force(base: np.ndarray, queries: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    """Ids of the exact top k among the rows of ``mask`` (cosine; ties by id), -1 padded."""
    x = base / np.linalg.norm(base, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    s = q @ x.T
    s[:, ~mask] = -np.inf
    out = np.full((len(q), k), -1)
    for r in range(len(q)):
        order = np.lexsort((np.arange(len(x)), -s[r]))[:k]
        keep = np.isfinite(s[r, order])
        out[r, : keep.sum()] = order[keep]
    return out


def recall(ids: np.ndarray, ref: np.ndarray) -> float:
    hits = sum(len(set(a[a >= 0]) & set(b[b >= 0])) for a, b in zip(ids, ref))
    return hits / max(1, int((ref >= 0).sum()))


# -- fetch -----------------------------------------------------------------------------------


def test_fetch_returns_each_rows_metadata_in_the_order_asked(store, wordnet) -> None:
    md = attributes(N)
    ids = [2999, 0, 1500, 2000, 7]
    table = store.fetch(ids, vectors=True)
    assert table.column_names == ["id", "half", "year", "flag", "weight", "when", "tags", "vector"]
    assert table.column("id").to_pylist() == ids
    assert table.column("year").to_pylist() == [int(md["year"][i]) for i in ids]
    assert table.column("half").to_pylist() == [md["half"][i] for i in ids]
    assert table.column("tags").to_pylist() == [md["tags"][i] for i in ids]
    assert table.column("weight").to_pylist() == [float(md["weight"][i]) for i in ids]
    vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(vectors, store.get(ids))
    only = store.fetch(ids, columns=["tags", "year"])
    assert only.column_names == ["id", "tags", "year"]
    assert only.to_pandas()["year"].tolist() == [int(md["year"][i]) for i in ids]


def test_fetch_refuses_unknown_ids_and_columns(store) -> None:
    with pytest.raises(IdNotFoundError, match="Id 99999 is not in the store"):
        store.fetch([1, 99999])
    with pytest.raises(InvalidArgumentError, match="Unknown column 'nope'; this store's columns are: half, year"):
        store.fetch([1], columns=["nope"])


# -- filtered search -------------------------------------------------------------------------

FILTERS = [  # (SQL, the same predicate in numpy)
    ("half = 'a'", lambda m: np.asarray(m["half"]) == "a"),  # ~50%
    ("year >= 1990", lambda m: m["year"] >= 1990),  # ~10%
    ("year = 1950 OR (year = 1951 AND flag)", lambda m: (m["year"] == 1950) | ((m["year"] == 1951) & m["flag"])),
    ("year = 1950 AND half = 'b' AND weight < 0.3", lambda m: (m["year"] == 1950) & (np.asarray(m["half"]) == "b")
     & (m["weight"] < 0.3)),  # a handful of rows: fewer than k
    ("list_contains(tags, 'x') AND year < 1930", lambda m: np.array([t is not None and "x" in t for t in m["tags"]])
     & (m["year"] < 1930)),
]


@pytest.fixture
def probe_plans(monkeypatch):
    """Filters plan as on a big store: matching rows are never few enough to gather."""
    from asteria_store.query import filter as qfilter

    monkeypatch.setattr(qfilter, "EXACT_BYTES", 0)


@pytest.mark.parametrize("sql,truth", FILTERS, ids=[f[0] for f in FILTERS])
def test_filtered_search_returns_only_matching_rows_and_k_of_them(store, wordnet, sql, truth, probe_plans) -> None:
    k = 10
    mask = matches(attributes(N), truth)
    ids, scores, stats = store.search(wordnet.queries[:50], k, where=sql, probes=4, explain=True)
    assert stats.plan["matching"] == int(mask.sum())
    real = ids[ids >= 0]
    assert mask[real].all()  # nothing that does not match
    assert ((ids >= 0).sum(axis=1) == min(k, int(mask.sum()))).all()  # k whenever k match
    ref = brute_force(wordnet.base, wordnet.queries[:50], mask, k)
    if stats.plan["plan"] == "exact":
        np.testing.assert_array_equal(ids, ref)
    else:  # as good as the unfiltered search at the probes asked, or near it
        plain, _ = store.search(wordnet.queries[:50], k, probes=4)
        every = brute_force(wordnet.base, wordnet.queries[:50], np.ones(N, dtype=bool), k)
        assert recall(ids, ref) >= recall(plain, every) - 0.03


def test_exhaustive_filtered_search_is_brute_force_over_the_matching_rows(store, wordnet) -> None:
    sql, truth = FILTERS[0]
    ids, _ = store.search(wordnet.queries[:40], 10, where=sql, probes="all")
    np.testing.assert_array_equal(ids, brute_force(wordnet.base, wordnet.queries[:40], matches(attributes(N), truth), 10))


def test_rows_that_fit_in_memory_are_gathered_and_searched_exactly(store, wordnet) -> None:
    sql, truth = FILTERS[0]  # half the rows, 3 MB of vectors
    ids, _, stats = store.search(wordnet.queries[:40], 10, where=sql, probes=4, explain=True)
    assert stats.plan["plan"] == "exact"
    np.testing.assert_array_equal(ids, brute_force(wordnet.base, wordnet.queries[:40], matches(attributes(N), truth), 10))


def test_the_plan_follows_selectivity(store, wordnet, probe_plans) -> None:
    plans = {}
    for sql, _ in FILTERS[:2]:
        plans[sql] = store.query(wordnet.queries[0], 10, where=sql, probes=4, explain=True)[2]["filter"]
    assert plans["half = 'a'"]["plan"] == "probed"  # most rows match: probe, a little wider
    assert plans["half = 'a'"]["probes"] > 4
    assert plans["year >= 1990"]["plan"] == "exact"  # few rows match: score them all
    assert 0.05 < plans["year >= 1990"]["selectivity"] < 0.15


def test_a_probed_filtered_search_equals_the_same_probes_over_the_matching_rows(store, wordnet, probe_plans) -> None:
    """Non-matching rows are treated as deleted: a probed plan scores what an unfiltered
    search of the same probes scores, less them."""
    sql, truth = FILTERS[0]
    mask = matches(attributes(N), truth)
    ids, _, stats = store.search(wordnet.queries[:30], 10, where=sql, probes=4, explain=True)
    assert stats.plan["plan"] == "probed"
    full, _ = store.search(wordnet.queries[:30], 50, probes=stats.plan["probes"], prune=False)
    for got, cands in zip(ids, full):
        want = [i for i in cands if i >= 0 and mask[i]][:10]
        if len(want) == 10:  # the unfiltered top 50 held 10 matching rows: they are the result
            assert list(got) == want


@pytest.mark.parametrize("where,message", [
    ("nope = 1", "Bad filter 'nope = 1': Binder Error: Referenced column \"nope\" not found"),
    ("year >", "Bad filter 'year >': Parser Error: syntax error at or near \")\" (at position 7 of the filter)"),
    ("year", "Bad filter 'year': it gives BIGINT, not true or false"),
    ("year >= 'x'", "Bad filter \"year >= 'x'\": Conversion Error: Could not convert string 'x' to INT64 "
                    "(at position 9 of the filter)"),
    ("", "where must be a non-empty SQL predicate string, got ''"),
])
def test_a_bad_filter_is_a_one_line_error(store, wordnet, where, message) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        store.search(wordnet.queries[:2], 10, where=where)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_a_store_without_columns_refuses_a_filter(tmp_store) -> None:
    tmp_store.ingest(np.random.default_rng(0).standard_normal((50, 32)))
    with pytest.raises(InvalidArgumentError, match="This store has no metadata columns to filter on"):
        tmp_store.search(np.ones((1, 32)), 5, where="a = 1")


def test_search_table_gives_ranked_results_with_their_columns(store, wordnet) -> None:
    q = wordnet.queries[:5]
    ids, scores = store.search(q, 4, where="half = 'b'")
    table = store.search_table(q, 4, where="half = 'b'", columns=["half", "year"])
    assert table.column_names == ["query", "rank", "id", "score", "half", "year"]
    df = table.to_pandas()
    assert df["id"].tolist() == ids.reshape(-1).tolist()
    assert df["query"].tolist() == np.repeat(np.arange(5), 4).tolist()
    np.testing.assert_array_equal(df["score"].to_numpy(), scores.reshape(-1))
    assert set(df["half"]) == {"b"}
    assert df["year"].tolist() == store.fetch(df["id"].tolist(), columns=["year"]).column("year").to_pylist()


# -- writing columns -------------------------------------------------------------------------


def test_columns_appear_later_and_read_as_null_before(tmp_store, disk_snapshot) -> None:
    rng = np.random.default_rng(1)
    tmp_store.ingest(rng.standard_normal((20, 32)), ids=np.arange(20))
    assert tmp_store.info()["format_version"] == 1  # no columns yet: any asteria-store reads it
    tmp_store.ingest(rng.standard_normal((5, 32)), ids=np.arange(20, 25), metadata={"lang": ["en"] * 5})
    tmp_store.ingest(rng.standard_normal((5, 32)), ids=np.arange(25, 30),
                     metadata={"n": pa.array([1, None, 3, 4, 5], type=pa.int16())})
    assert tmp_store.info()["format_version"] == 2
    assert tmp_store.info()["columns"] == {"lang": "string", "n": "int64"}
    t = tmp_store.fetch([0, 21, 27])
    assert t.to_pydict() == {"id": [0, 21, 27], "lang": [None, "en", None], "n": [None, None, 3]}
    ids, _ = tmp_store.search(np.ones((2, 32)), 3, where="lang = 'en'")
    assert (ids >= 20).all() and (ids < 25).all()


@pytest.mark.parametrize("metadata,message", [
    ({"lang": ["en"] * 4}, "Expected metadata with one row per vector (5), got 4 rows."),
    ({"lang": [1, 2, 3, 4, 5]}, "Metadata column 'lang' holds string in this store, got int64. Cast it"),
    ({"id": [1, 2, 3, 4, 5]}, "Metadata column 'id' is a reserved name"),
    ({"d": [{"a": 1}] * 5}, "Metadata column 'd' has type struct<a: int64>; columns hold ints, floats"),
    ({"z": [None] * 5}, "Metadata column 'z' holds only nulls, so its type is unknown"),
    ({"a": [1, 2], "b": [1]}, "Expected metadata columns of equal length, got lengths [1, 2]."),
    ("meta.csv", "Expected metadata as a .parquet file, got 'meta.csv'."),
    (42, "Expected metadata as a pyarrow Table, a pandas DataFrame, a dict of columns or a .parquet path, got int."),
])
def test_bad_metadata_is_refused_and_the_store_is_unchanged(tmp_store, disk_snapshot, metadata, message) -> None:
    rng = np.random.default_rng(2)
    tmp_store.ingest(rng.standard_normal((5, 32)), metadata={"lang": ["en"] * 5})
    before = disk_snapshot(tmp_store.path)
    with pytest.raises(InvalidInputError) as info:
        tmp_store.ingest(rng.standard_normal((5, 32)), metadata=metadata)
    assert str(info.value).startswith(message)
    assert disk_snapshot(tmp_store.path) == before


def test_metadata_from_a_parquet_file(tmp_store, tmp_path: Path) -> None:
    pq.write_table(pa.table({"lang": ["en", "fr", None]}), tmp_path / "m.parquet")
    tmp_store.ingest(np.eye(3, 32), ids=[5, 6, 7], metadata=tmp_path / "m.parquet")
    assert tmp_store.fetch([7, 5]).column("lang").to_pylist() == [None, "en"]


def test_columns_follow_their_rows_through_upsert_delete_compact_and_retrain(wordnet, tmp_path: Path) -> None:
    import torch

    torch.set_num_threads(1)
    md = attributes(N, seed=4)
    with asteria_store.create(tmp_path / "s", dim=384, bits=4) as s:
        s.ingest(wordnet.base[:1500], metadata={k: v[:1500] for k, v in md.items()})
        s.ingest(wordnet.base[1500:], metadata={k: v[1500:] for k, v in md.items()})
        s.upsert(wordnet.base[:10], ids=np.arange(10), metadata={"year": np.full(10, 2500)})
        s.delete(np.arange(10, 20))
        expect = s.fetch(np.arange(20, N)).to_pydict()
        assert s.fetch(np.arange(10)).column("year").to_pylist() == [2500] * 10
        assert s.fetch([3]).column("half").to_pylist() == [None]  # the upsert gave no half
        s.compact()
        assert len(s.info()["internals"]) and s.info()["segments"] == 1
        assert s.fetch(np.arange(20, N)).to_pydict() == expect
        s.train(bits=5, epochs=1)  # rewrites every row in a new bucket order
        assert s.fetch(np.arange(20, N)).to_pydict() == expect
        assert s.fetch(np.arange(10)).column("year").to_pylist() == [2500] * 10
        with pytest.raises(IdNotFoundError):
            s.fetch([15])
        assert s.search(wordnet.queries[:3], 10, where="year = 2500")[0].shape == (3, 10)
        assert set(s.search(wordnet.queries[:3], 10, where="year = 2500")[0].reshape(-1)) == set(range(10))
        assert s.verify().ok


def test_verify_finds_a_damaged_columns_chunk(wordnet, tmp_path: Path) -> None:
    with asteria_store.create(tmp_path / "s", dim=384, router="sign", bits=3, chunk_rows=256) as s:
        s.ingest(wordnet.base[:1000], metadata={"n": np.arange(1000)})
        seg = seglib.list_segment_dirs(s.path / "segments.zarr")[0]
        path = seglib.chunk_path(s.path / "segments.zarr" / seg, "columns", 1)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        report = s.verify()
        assert [(d["array"], d["chunk"]) for d in report.damaged] == [("columns", 1)]


# -- export and the CLI ----------------------------------------------------------------------


def test_export_streams_every_live_row_from_one_snapshot(tmp_store) -> None:
    rng = np.random.default_rng(5)
    tmp_store.ingest(rng.standard_normal((300, 32)), metadata={"n": np.arange(300)})
    tmp_store.ingest(rng.standard_normal((50, 32)))  # no columns: nulls
    tmp_store.delete(np.arange(0, 300, 3))
    batches = tmp_store.export(vectors=True, batch_rows=64)
    first = next(batches)
    tmp_store.delete(np.arange(1, 300, 3))  # after the export began: it does not see this
    table = pa.Table.from_batches([first, *batches])
    assert max(b.num_rows for b in table.to_batches()) <= 64
    live = sorted(set(range(350)) - set(range(0, 300, 3)))
    assert sorted(table.column("id").to_pylist()) == live
    by_id = dict(zip(table.column("id").to_pylist(), table.column("n").to_pylist()))
    assert all(by_id[i] == (i if i < 300 else None) for i in live)
    got = np.stack(table.column("vector").to_numpy(zero_copy_only=False))
    ids = table.column("id").to_numpy()
    still = (ids % 3 == 2) | (ids >= 300)  # rows the later delete left
    np.testing.assert_array_equal(got[still], tmp_store.get(ids[still]))
    with pytest.raises(InvalidArgumentError, match="Unknown column 'x'"):
        tmp_store.export(columns=["x"])


def test_cli_ingests_metadata_filters_prints_columns_and_exports(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    np.save(tmp_path / "v.npy", rng.standard_normal((200, 16)).astype(np.float32))
    np.save(tmp_path / "q.npy", rng.standard_normal((2, 16)).astype(np.float32))
    pq.write_table(pa.table({"lang": ["en", "fr"] * 100, "year": np.arange(200)}), tmp_path / "m.parquet")
    store = tmp_path / "s"
    assert run("create", store, "--dim", 16).exit_code == 0
    assert run("ingest", store, tmp_path / "v.npy", "--metadata", tmp_path / "m.parquet", "--quiet").exit_code == 0
    res = run("query", store, tmp_path / "q.npy", "-k", 3, "--where", "lang = 'fr' AND year < 50",
              "--columns", "year,lang", "--json")
    assert res.exit_code == 0, res.output
    for line in res.output.splitlines():
        rec = json.loads(line)
        assert len(rec["ids"]) == 3 and rec["columns"]["year"] == rec["ids"]
        assert set(rec["columns"]["lang"]) == {"fr"} and all(i % 2 == 1 and i < 50 for i in rec["ids"])
    bad = run("query", store, tmp_path / "q.npy", "--where", "yr < 5")
    assert bad.exit_code == 1
    assert bad.output.startswith("Error: Bad filter 'yr < 5': Binder Error: Referenced column \"yr\" not found")
    assert len(bad.output.strip().splitlines()) == 1
    assert run("export", store, tmp_path / "out.parquet", "--columns", "year", "--quiet").exit_code == 0
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.column_names == ["id", "year"]
    assert sorted(out.column("year").to_pylist()) == list(range(200))


def test_a_batch_job_writes_the_asked_columns_beside_its_results(store, wordnet, tmp_path: Path) -> None:
    from asteria_store import batch

    q = wordnet.queries[:30]
    res = batch.search(store.path, q, tmp_path / "r.zarr", k=5, probes=8, columns=["half", "year"],
                       block_rows=8, workers=0)
    assert res.blocks_run == 4
    table = pq.read_table(tmp_path / "r.zarr" / "columns.parquet")
    assert table.column_names == ["query", "rank", "id", "score", "half", "year"]
    ids, scores = store.search(q, 5, probes=8)
    assert table.column("id").to_pylist() == ids.reshape(-1).tolist()
    assert table.column("query").to_pylist() == np.repeat(np.arange(30), 5).tolist()
    assert table.column("year").to_pylist() == store.fetch(ids.reshape(-1), columns=["year"]).column("year").to_pylist()
    with pytest.raises(InvalidArgumentError, match="Unknown column 'nope'"):
        batch.search(store.path, q, tmp_path / "x.zarr", k=5, columns=["nope"], workers=0)
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "x.zarr.partial").exists()
