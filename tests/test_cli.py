"""The ``asteria-store`` command line, through click's CliRunner.

Happy paths check exit code 0 and what is printed (against the library's own results);
error cases check the exact ``Error: ...`` line on stderr, the exit code, that no
traceback escaped, and that the store was left as it was.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import Result

import asteria_store
from conftest import run
from asteria_store import FORMAT_VERSION
from asteria_store.demo import run_demo
from asteria_store.storage.catalog import Catalog
from asteria_store.testing import clustered_vectors

DIM = 16
N = 500
N_QUERIES = 20
COMMANDS = ["create", "ingest", "query", "info", "verify", "delete", "demo"]


# --- helpers and fixtures -----------------------------------------------------------------




def error_line(result: Result, *, exit_code: int = 1) -> str:
    """Check that the command failed cleanly (no traceback); return stderr's last line."""
    assert result.exit_code == exit_code, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # nothing escaped
    assert "Traceback" not in result.output
    return result.stderr.splitlines()[-1]


def assert_error(result: Result, line: str, *, exit_code: int = 1) -> None:
    """The command failed with exactly ``line`` as the last line of stderr."""
    assert error_line(result, exit_code=exit_code) == line


def snapshot(path: Path) -> tuple[int, int]:
    with asteria_store.open(path, readonly=True) as store:
        return len(store), store.info()["generation"]


def save(tmp_path: Path, name: str, arr: np.ndarray) -> Path:
    path = tmp_path / name
    np.save(path, arr)
    return path


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    x = clustered_vectors(N + N_QUERIES, DIM, clusters=10, seed=0)
    return x[:N], x[N:]


@pytest.fixture
def base_file(tmp_path: Path, data) -> Path:
    return save(tmp_path, "base.npy", data[0])


@pytest.fixture
def query_file(tmp_path: Path, data) -> Path:
    return save(tmp_path, "queries.npy", data[1])


@pytest.fixture
def store(tmp_path: Path, data) -> Path:
    """A store holding the N base vectors under ids 0..N-1."""
    path = tmp_path / "store"
    with asteria_store.create(path, dim=DIM, expected_size=N, router="sign") as s:
        s.ingest(data[0])
    return path


# --- happy paths --------------------------------------------------------------------------


def test_version():
    result = run("--version")
    assert result.exit_code == 0
    assert result.output == f"asteria-store, version {asteria_store.__version__}\n"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_an_example(command):
    result = run(command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.output
    assert f"asteria-store {command} " in result.output  # the example's line survived wrapping


def test_create(tmp_path: Path):
    path = tmp_path / "new"
    result = run("create", path, "--dim", 8, "--metric", "ip", "--dtype", "float16", "--bits", 3,
                 "--seed", 7, "--router", "sign")
    assert result.exit_code == 0, result.output
    assert result.stdout == (f"Created store {str(path)!r}: dim 8, metric ip, dtype float16, "
                             "8 buckets (sign router).\n")
    with asteria_store.open(path, readonly=True) as s:
        info = s.info()
    assert (info["dim"], info["metric"], info["dtype"], info["count"]) == (8, "ip", "float16", 0)
    assert (info["internals"]["router"]["bits"], info["internals"]["router"]["seed"]) == (3, 7)


def test_create_sizes_buckets_from_expected_size(tmp_path: Path):
    result = run("create", tmp_path / "s", "--dim", 8, "--expected-size", 4096, "--router", "sign")
    assert result.exit_code == 0, result.output
    assert "16 buckets" in result.stdout  # 4096 / ~256 per bucket


def test_create_learned_store_says_when_it_trains(tmp_path: Path):
    result = run("create", tmp_path / "s", "--dim", 8)
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith(", the learned model trains once it holds >= 1,000 vectors.\n")
    with asteria_store.open(tmp_path / "s", readonly=True) as s:
        assert s.info()["pending_training"] is True


def test_ingest(tmp_path: Path, base_file: Path, data):
    path = tmp_path / "s"
    assert run("create", path, "--dim", DIM, "--expected-size", N).exit_code == 0
    ids = save(tmp_path, "ids.npy", np.arange(1000, 1000 + N, dtype=np.int64))
    result = run("ingest", path, base_file, "--ids", ids)
    assert result.exit_code == 0, result.output
    assert re.fullmatch(rf"Added {N} vectors as segment 1 in \d+\.\d\d s \([\d,]+ vectors/s\)\.\n",
                        result.stdout)
    assert "hashing" in result.stderr and "writing" in result.stderr  # progress on stderr only
    with asteria_store.open(path, readonly=True) as s:
        assert len(s) == N
        np.testing.assert_allclose(s.get([1000, 1000 + N - 1]), data[0][[0, -1]], rtol=1e-6)


def test_ingest_quiet_and_auto_ids(store: Path, base_file: Path):
    result = run("ingest", store, base_file, "--quiet")
    assert result.exit_code == 0, result.output
    # the store doubled: the index re-sizes itself (one more commit) after the ingest's own
    assert result.stdout.splitlines() == [
        "Re-sized the index to 4 buckets as the store grew.",
        result.stdout.splitlines()[1]]
    assert result.stdout.splitlines()[1].startswith(f"Added {N} vectors as segment 2 in ")
    assert result.stderr == ""
    assert snapshot(store) == (2 * N, 3)


@pytest.mark.parametrize("probes", [None, "4", "all"])
def test_query_json_matches_library(store: Path, query_file: Path, data, probes):
    extra = [] if probes is None else ["--probes", probes]
    result = run("query", store, query_file, "-k", 5, "--json", *extra)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    lib_probes = {None: 32, "4": 4, "all": "all"}[probes]
    with asteria_store.open(store, readonly=True) as s:
        ids, scores = s.search(data[1], 5, probes=lib_probes)
    assert [r["query"] for r in rows] == list(range(N_QUERIES))
    for r, want_ids, want_scores in zip(rows, ids, scores):
        assert r["ids"] == want_ids.tolist()
        assert np.array_equal(np.float32(r["scores"]), want_scores)


def test_query_text(store: Path, query_file: Path, data):
    result = run("query", store, query_file, "-k", 3, "--probes", "all")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    with asteria_store.open(store, readonly=True) as s:
        ids, scores = s.search(data[1], 3, probes="all")
    assert len(lines) == N_QUERIES
    assert lines[0] == "0: " + ", ".join(f"{i} ({sc:.4f})" for i, sc in zip(ids[0], scores[0]))


def test_query_omits_missing_results(store: Path, query_file: Path):
    """k above the store size: the -1 / -inf padding is not printed."""
    result = run("query", store, query_file, "-k", N + 10, "--probes", "all", "--json")
    assert result.exit_code == 0, result.output
    for line in result.stdout.splitlines():
        row = json.loads(line)  # -inf would not even be valid JSON
        assert sorted(row["ids"]) == list(range(N))
        assert np.isfinite(row["scores"]).all()
    text = run("query", store, query_file, "-k", N + 10, "--probes", "all").stdout
    assert "-1 (" not in text and "inf" not in text


def test_query_candidates(store: Path, query_file: Path, data):
    result = run("query", store, query_file, "-k", 5, "--candidates", 50, "--json")
    assert result.exit_code == 0, result.output
    with asteria_store.open(store, readonly=True) as s:
        ids, _ = s.search(data[1], 5, candidates=50)
    assert [json.loads(line)["ids"] for line in result.stdout.splitlines()] == \
        [row[row >= 0].tolist() for row in ids]


def test_info(store: Path):
    result = run("info", store)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) <= 10  # a summary: internals are for --verbose and --json
    assert f"vectors: {N}" in lines
    assert f"dim: {DIM}, metric cosine, stored as float32" in lines
    assert "ids: int" in lines and "columns: none" in lines
    assert any(re.fullmatch(r"index: sign, \d+ buckets", line) for line in lines)
    assert any(re.fullmatch(r"disk: \d+\.\d (B|KiB|MiB)", line) for line in lines)
    verbose = run("info", store, "--verbose").stdout.splitlines()
    assert f"count: {N}" in verbose and "router: sign" in verbose
    assert any(line.startswith("internals.chunk_rows: ") for line in verbose)


def test_info_json(store: Path):
    result = run("info", store, "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    with asteria_store.open(store, readonly=True) as s:
        want = s.info()
    got.pop("disk_bytes"), want.pop("disk_bytes")
    assert got == want


def test_verify_ok(store: Path):
    result = run("verify", store)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"Checked 1 segment(s), {N} row(s), 2 chunk checksum(s).\nOK\n"  # vectors, ids


def test_verify_lists_orphans_and_repair_removes_them(store: Path):
    orphan = store / "segments.zarr" / "seg-00000099"
    orphan.mkdir()
    result = run("verify", store)  # read-only: reports, removes nothing
    assert result.exit_code == 0, result.output
    assert "orphan: seg-00000099 (harmless; remove with --repair)" in result.stdout.splitlines()
    assert orphan.exists()
    result = run("verify", store, "--repair")
    assert result.exit_code == 0, result.output
    assert not orphan.exists()
    assert "orphan: seg-00000099 (removed)" in result.stdout.splitlines()
    assert result.stdout.splitlines()[-1] == "OK"


def test_verify_damaged_store_exits_1(store: Path):
    chunk = store / "segments.zarr" / "seg-00000001" / "vectors" / "c" / "0" / "0"
    with open(chunk, "r+b") as f:
        f.truncate(100)
    result = run("verify", store)
    assert_error(result, f"Error: The store {str(store)!r} has 1 problem(s).")
    problems = [line for line in result.stdout.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 1 and "has 100 bytes" in problems[0]


def test_delete(tmp_path: Path, store: Path, query_file: Path):
    result = run("delete", store, "--ids", save(tmp_path, "del.npy", np.array([0, 1, 2])))
    assert result.exit_code == 0, result.output
    assert result.stdout == "Deleted 3 vectors.\n"
    assert snapshot(store) == (N - 3, 2)
    found = run("query", store, query_file, "-k", N, "--probes", "all", "--json").stdout
    assert all(set(json.loads(line)["ids"]) == set(range(3, N)) for line in found.splitlines())


def test_demo_with_kept_store(tmp_path: Path):
    keep = tmp_path / "demo"
    result = run("demo", "--n", 3000, "--queries", 20, "--keep", keep)
    assert result.exit_code == 0, result.output
    assert re.search(r"recall@10", result.stdout)
    table = {line.split()[0]: line.split() for line in result.stdout.splitlines()[-2:]}
    assert float(table["all"][1]) == 1.0  # exact search through the store finds brute force
    assert 0.0 < float(table["32"][1]) <= 1.0
    assert "vectors/s" in result.stdout
    assert "hashing" in result.stderr  # progress bars go to stderr
    assert snapshot(keep) == (3000, 1)


def test_run_demo_returns_figures():
    lines: list[str] = []
    figures = run_demo(n=2000, dim=32, queries=10, k=5, print_fn=lines.append)
    assert figures["path"] is None
    assert (figures["n"], figures["dim"], figures["queries"], figures["k"]) == (2000, 32, 10, 5)
    assert figures["ingest_rate"] > 0
    assert [r["probes"] for r in figures["runs"]] == [32, "all"]
    assert figures["runs"][1]["recall"] == 1.0
    assert all(r["qps"] > 0 and r["latency_ms"] > 0 for r in figures["runs"])
    assert any("recall@5" in line for line in lines)


# --- errors -------------------------------------------------------------------------------

BAD_ARRAYS = {
    "wrong-dim": (np.ones((5, 8), np.float32), "Expected {what} of dimension 16, got 8. "
                  "Was the store created with --dim 8?"),
    "nan": (None, "Expected finite {what}, got NaN or inf (first in row 3). "
            "Clean or drop those rows and retry."),
    "strings": (np.array([["a", "b"], ["c", "d"]]),
                "Expected {what} with a real numeric dtype (float or int), got dtype <U1."),
    "1-d": (np.ones(DIM, np.float32), "Expected {what} as a 2-D array of shape (n, d), got 1-D "
            "shape (16,). For one vector, pass vec[None, :]."),
    "empty": (np.zeros((0, DIM), np.float32), "Expected at least one row of {what}, got an empty array."),
    "zero-row": (None, "Expected non-zero {what} for metric 'cosine', got an all-zero vector in row 2."),
}


def _bad_array(case: str, data) -> np.ndarray:
    arr, _ = BAD_ARRAYS[case]
    if case == "nan":
        arr = data[0][:10].copy()
        arr[3, 5] = np.nan
    elif case == "zero-row":
        arr = data[0][:10].copy()
        arr[2] = 0
    return arr


@pytest.mark.parametrize("command", ["ingest", "query"])
@pytest.mark.parametrize("case", list(BAD_ARRAYS))
def test_bad_input_arrays(tmp_path: Path, store: Path, data, command, case):
    path = save(tmp_path, f"{case}.npy", _bad_array(case, data))
    before = snapshot(store)
    result = run(command, store, path)
    what = "vectors" if command == "ingest" else "queries"
    assert_error(result, "Error: " + BAD_ARRAYS[case][1].format(what=what))
    assert snapshot(store) == before
    with asteria_store.open(store, readonly=True) as s:
        assert s.verify().orphans == []  # a failed ingest leaves no debris


@pytest.mark.parametrize("command", ["ingest", "query"])
def test_unreadable_files(tmp_path: Path, store: Path, command):
    what = "vectors" if command == "ingest" else "queries"
    before = snapshot(store)
    missing = tmp_path / "missing.npy"
    assert_error(run(command, store, missing),
                 f"Error: Cannot read {what} file {str(missing)!r}: no such file.")
    text = tmp_path / "notes.npy"
    text.write_text("these are not vectors\n")
    assert_error(run(command, store, text),
                 f"Error: Cannot read {what} file {str(text)!r}: not a .npy file "
                 "(save arrays with numpy.save).")
    assert snapshot(store) == before


@pytest.mark.parametrize("k", [0, -3])
def test_k_must_be_positive(store: Path, query_file: Path, k):
    assert_error(run("query", store, query_file, "-k", k), f"Error: k must be a positive integer, got {k}.")


def test_probes_must_be_positive(store: Path, query_file: Path):
    assert_error(run("query", store, query_file, "--probes", 0),
                 "Error: probes must be a positive integer or 'all', got 0.")


@pytest.mark.parametrize("command", ["ingest", "query", "info", "verify", "delete"])
def test_missing_store(tmp_path: Path, base_file: Path, command):
    path = tmp_path / "nowhere"
    args = {"ingest": [base_file], "query": [base_file], "delete": ["--ids", base_file]}.get(command, [])
    assert_error(run(command, path, *args),
                 f"Error: No store at {str(path)!r}. Create one with `asteria-store create {path} --dim D`.")
    assert not path.exists()


def test_directory_that_is_not_a_store(tmp_path: Path):
    assert_error(run("info", tmp_path),
                 f"Error: No asteria-store at {str(tmp_path)!r}: the directory has no catalog. "
                 "Create one with `asteria-store create`.")


def test_create_over_existing_store(store: Path):
    before = snapshot(store)
    assert_error(run("create", store, "--dim", 8),
                 f"Error: Cannot create a store at {str(store)!r}: it already exists. "
                 "Open it instead, or choose a new path.")
    assert snapshot(store) == before


def test_duplicate_ids_in_batch(tmp_path: Path, store: Path, base_file: Path):
    ids = np.arange(1000, 1000 + N)
    ids[7] = ids[3]
    before = snapshot(store)
    assert_error(run("ingest", store, base_file, "--ids", save(tmp_path, "ids.npy", ids)),
                 "Error: Expected unique ids, got id 1003 more than once in this batch.")
    assert snapshot(store) == before


def test_ids_already_in_store(tmp_path: Path, store: Path, base_file: Path):
    ids = np.arange(1000, 1000 + N)
    ids[10] = 5  # the fixture's store holds ids 0..N-1
    before = snapshot(store)
    assert_error(run("ingest", store, base_file, "--ids", save(tmp_path, "ids.npy", ids)),
                 "Error: Expected new ids, got 1 already in the store (first: 5). "
                 "Delete them first, choose other ids, or replace them (upsert, or ingest --on-conflict replace).")
    assert snapshot(store) == before


def test_delete_unknown_id(tmp_path: Path, store: Path):
    before = snapshot(store)
    assert_error(run("delete", store, "--ids", save(tmp_path, "del.npy", np.array([1, 9999]))),
                 "Error: Cannot delete: 1 id(s) not in the store (first: 9999). Nothing was deleted.")
    assert snapshot(store) == before


@pytest.mark.parametrize("command", ["info", "query", "ingest"])
def test_newer_format_version(store: Path, base_file: Path, command):
    catalog = Catalog(store / "catalog.lmdb")
    try:
        catalog.write(lambda txn: catalog.put_meta(txn, "format_version", 999))
        before = catalog.dump()
    finally:
        catalog.close()
    args = [] if command == "info" else [base_file]
    assert_error(run(command, store, *args),
                 f"Error: The store at {str(store)!r} has format version 999; this asteria-store "
                 f"reads versions up to {FORMAT_VERSION}. Upgrade asteria-store.")
    catalog = Catalog(store / "catalog.lmdb")
    try:
        assert catalog.dump() == before
    finally:
        catalog.close()


def test_demo_bad_argument():
    assert_error(run("demo", "--n", 0), "Error: n must be a positive integer, got 0.")


@pytest.mark.parametrize(("args", "line"), [
    (["create", "x"], "Error: Missing option '--dim'."),
    (["create", "x", "--dim", 8, "--metric", "l1"],
     "Error: Invalid value for '--metric': 'l1' is not one of 'cosine', 'ip', 'l2'."),
    (["query", "x", "q.npy", "--probes", "many"],
     "Error: Invalid value for '--probes': expected an integer or 'all', got 'many'."),
    (["delete", "x"], "Error: Missing option '--ids'."),
    (["frobnicate"], "Error: No such command 'frobnicate'."),
])
def test_usage_errors_exit_2(args, line):
    assert_error(run(*args), line, exit_code=2)


def test_query_explain(store: Path, query_file: Path, data):
    result = run("query", store, query_file, "-k", 3, "--probes", 4, "--explain", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    with asteria_store.open(store, readonly=True) as s:
        _, _, stats = s.search(data[1], 3, probes=4, explain=True)
    assert [r["explain"] for r in rows] == stats.rows()
    text = run("query", store, query_file, "-k", 3, "--probes", 4, "--explain")
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert lines[1].startswith(f"   buckets {stats.rows()[0]['buckets']}, scanned ")


def test_query_rerank_matches_library(small_learned: Path, tmp_path: Path):
    queries = clustered_vectors(20, 16, clusters=12, seed=5)
    qfile = save(tmp_path, "q.npy", queries)
    result = run("query", small_learned, qfile, "-k", 5, "--probes", 3, "--rerank", 12, "--json")
    assert result.exit_code == 0, result.output
    with asteria_store.open(small_learned, readonly=True) as s:
        ids, _ = s.search(queries, 5, probes=3, rerank=12)
    assert [json.loads(line)["ids"] for line in result.stdout.splitlines()] == [row[row >= 0].tolist() for row in ids]


def test_query_rerank_without_a_sketch_is_one_line(store: Path, query_file: Path):
    result = run("query", store, query_file, "--rerank", 40)
    assert result.exit_code != 0
    assert result.output.count("\n") == 1 and "rerank needs a model with a sketch" in result.output


def cli_in_a_fresh_interpreter(*commands: list[object]) -> tuple[list[str], set[str]]:
    """Run CLI ``commands`` (each must succeed) in a new Python process: their outputs,
    and the modules that process had loaded by the end."""
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from click.testing import CliRunner\n"
        "from asteria_store_cli.main import cli\n"
        "outputs = []\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    result = CliRunner().invoke(cli, args)\n"
        "    assert result.exit_code == 0, result.output\n"
        "    outputs.append(result.output)\n"
        "print(json.dumps({'outputs': outputs, 'modules': sorted(sys.modules)}))\n"
    )
    args = json.dumps([[str(a) for a in c] for c in commands])
    out = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    return record["outputs"], set(record["modules"])


def test_the_cli_info_and_a_query_do_not_import_torch(small_learned: Path, tmp_path: Path):
    """torch takes ~1.5 s to import: the CLI, opening a learned store, info and one query
    (certified and by sketch) run without it. Checked in a fresh interpreter."""
    qfile = save(tmp_path, "q.npy", clustered_vectors(1, 16, clusters=12, seed=5))
    _, modules = cli_in_a_fresh_interpreter(["--version"], ["info", small_learned],
                                            ["query", small_learned, qfile, "--probes", 3],
                                            ["query", small_learned, qfile, "--probes", 3, "--rerank", 20])
    assert sorted(m for m in modules if m == "torch" or m.startswith("torch.")) == []


def test_a_one_shot_query_of_a_small_store_skips_the_compiled_path(small_learned: Path, tmp_path: Path):
    """Loading numba's kernels costs ~1 s, more than searching a few MiB of rows whole: the
    CLI's query of a small store does not load them, and its results are the library's
    (pruned) ones. Checked in a fresh interpreter."""
    q = clustered_vectors(3, 16, clusters=12, seed=6)
    qfile = save(tmp_path, "q.npy", q)
    (output,), modules = cli_in_a_fresh_interpreter(["query", small_learned, qfile, "--probes", 3, "--json"])
    assert "numba" not in modules
    with asteria_store.open(small_learned, readonly=True) as store:
        want = store.search(q, 10, probes=3, prune=True)[0]
    assert [json.loads(line)["ids"] for line in output.splitlines()] == [row[row >= 0].tolist() for row in want]
