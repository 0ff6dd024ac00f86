"""String ids: a store holds ids of one kind; string ids map to internal ids in the
catalog, in the commits that add and delete their rows, and come back as str."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import asteria_store
from conftest import run
from asteria_store import InvalidArgumentError, InvalidInputError
from asteria_store.errors import DuplicateIdError, IdNotFoundError

N = 1500


def names(n: int, prefix: str = "doc") -> list[str]:
    return [f"{prefix}-{i:05d}" for i in range(n)]


@pytest.fixture(scope="module")
def pair(wordnet, tmp_path_factory):
    """The same rows in two stores: one with string ids, one with their row numbers."""
    import torch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ids")
    x = wordnet.base[:N]
    s = asteria_store.create(root / "s", dim=384, bits=4, seed=0)
    s.ingest(x, ids=names(N))
    i = asteria_store.create(root / "i", dim=384, bits=4, seed=0)
    i.ingest(x, ids=np.arange(N))
    yield s, i
    s.close()
    i.close()


def test_results_come_back_as_the_strings_given(pair, wordnet) -> None:
    s, i = pair
    q = wordnet.queries[:20]
    got, got_scores = s.search(q, 10)
    ref, ref_scores = i.search(q, 10)
    assert got.dtype == object and all(isinstance(x, str) for x in got.reshape(-1))
    assert got.tolist() == [[f"doc-{j:05d}" for j in row] for row in ref.tolist()]
    np.testing.assert_array_equal(got_scores, ref_scores)
    one, _ = s.query(q[0], 3)
    assert one.tolist() == got[0, :3].tolist()
    np.testing.assert_array_equal(s.get(["doc-00007", "doc-00003"]), i.get([7, 3]))
    assert s.ids().tolist() == names(N)
    assert s.id_kind == "string" and i.id_kind == "int"
    assert s.info()["format_version"] == 2
    assert s.search_table(q[:2], 3).column("id").to_pylist() == got[:2, :3].reshape(-1).tolist()
    assert s.verify().ok


def test_an_empty_query_result_is_none_not_minus_one(tmp_path: Path) -> None:
    with asteria_store.create(tmp_path / "s", dim=4) as s:
        s.ingest(np.eye(4)[:2], ids=["a", "b"])
        ids, scores = s.search(np.ones((1, 4)), 3)
        assert ids.tolist() == [["a", "b", None]] or ids.tolist() == [["b", "a", None]]
        assert np.isneginf(scores[0, 2])


def test_upsert_delete_and_compact_keep_each_string_on_its_row(tmp_path: Path, wordnet) -> None:
    x = wordnet.base[:300]
    with asteria_store.create(tmp_path / "s", dim=384) as s:
        res = s.ingest(x[:200], ids=names(200))
        assert res.ids.tolist() == names(200)
        s.upsert(x[200:210], ids=names(5) + names(5, "new"))  # 5 replaced, 5 added
        expect = x[200:210] / np.linalg.norm(x[200:210], axis=1, keepdims=True)
        np.testing.assert_allclose(s.get(names(5) + names(5, "new")), expect, atol=1e-6)
        assert len(s) == 205
        s.delete(["doc-00010", "doc-00010", "new-00001"])  # repeats are one delete
        assert len(s) == 203
        with pytest.raises(IdNotFoundError, match="Id 'doc-00010' is not in the store"):
            s.get(["doc-00010"])
        before = s.search(wordnet.queries[:5], 10)
        s.compact()
        after = s.search(wordnet.queries[:5], 10)
        assert before[0].tolist() == after[0].tolist()
        np.testing.assert_allclose(s.get(names(5)), expect[:5], atol=1e-6)
        s.ingest(x[210:211], ids=["doc-00010"])  # a deleted string is free again
        assert s.verify().ok


@pytest.mark.parametrize("first,then,message", [
    (["a", "b"], [7, 8], "This store holds string ids; pass ids as a list of strings."),
    (["a", "b"], None, "This store holds string ids; pass ids as a list of strings."),
    ([1, 2], ["c", "d"], "This store holds integer ids; got string ids."),
    (None, ["c", "d"], "This store holds integer ids; got string ids."),
    (["a", "b"], ["c", "c"], "Expected unique ids, got id 'c' more than once in this batch."),
    (["a", "b"], ["c", ""], "Expected string ids (non-empty str), got ''."),
    (["a", "b"], ["c"], "Expected 2 ids (one per vector), got 1."),
])
def test_ids_of_the_other_kind_or_bad_strings_are_refused_and_nothing_changes(tmp_path, disk_snapshot, first,
                                                                               then, message) -> None:
    with asteria_store.create(tmp_path / "s", dim=4) as s:
        s.ingest(np.eye(4)[:2], ids=first)
        before = disk_snapshot(s.path)
        with pytest.raises(InvalidInputError) as info:
            s.ingest(np.eye(4)[2:], ids=then)
        assert str(info.value).startswith(message)
        assert disk_snapshot(s.path) == before


def test_a_string_already_stored_is_refused_unless_replacing(tmp_path, disk_snapshot) -> None:
    with asteria_store.create(tmp_path / "s", dim=4) as s:
        s.ingest(np.eye(4)[:2], ids=["a", "b"])
        before = disk_snapshot(s.path)
        with pytest.raises(DuplicateIdError, match=r"got 1 already in the store \(first: 'b'\)"):
            s.ingest(np.eye(4)[2:], ids=["c", "b"])
        with pytest.raises(IdNotFoundError, match=r"Cannot delete: 1 id\(s\) not in the store \(first: 'zz'\)"):
            s.delete(["a", "zz"])
        assert disk_snapshot(s.path) == before


def test_batch_jobs_refuse_a_store_of_string_ids(pair, wordnet, tmp_path) -> None:
    s, _ = pair
    with pytest.raises(InvalidArgumentError, match="Batch jobs write integer ids, and .* holds string ids"):
        asteria_store.batch.search(s.path, wordnet.queries[:4], tmp_path / "out", k=5)


def test_cli_takes_string_ids_from_npy(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.save(tmp_path / "v.npy", rng.standard_normal((50, 8)).astype(np.float32))
    np.save(tmp_path / "ids.npy", np.array(names(50)))
    np.save(tmp_path / "gone.npy", np.array(["doc-00003"]))
    store = tmp_path / "s"
    assert run("create", store, "--dim", 8).exit_code == 0
    assert run("ingest", store, tmp_path / "v.npy", "--ids", tmp_path / "ids.npy", "--quiet").exit_code == 0
    assert run("delete", store, "--ids", tmp_path / "gone.npy").exit_code == 0
    np.save(tmp_path / "q.npy", np.load(tmp_path / "v.npy")[3:5])
    res = run("query", store, tmp_path / "q.npy", "-k", 2, "--json")
    assert res.exit_code == 0, res.output
    first = json.loads(res.output.splitlines()[0])
    second = json.loads(res.output.splitlines()[1])
    assert "doc-00003" not in first["ids"] and second["ids"][0] == "doc-00004"
