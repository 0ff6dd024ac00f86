"""Readers that are never wrong: snapshot reads across commits, pins, read-only opens, fork.

A retrain that commits while a reader is inside a search, ``get`` or ``verify`` must not
change what that read returns (it sees one generation from start to end), and the files of
that generation must stay on disk until the read ends. The injection tests commit the
retrain from inside the read (a second handle, as another process would), and a control
run without pins shows that the same injection does break a read.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

import asteria_store
import asteria_store.reads as reads_mod
import asteria_store.verify as verify_mod
from asteria_store import CorruptStoreError, ReadOnlyError
from asteria_store.storage import pins
from asteria_store.storage.catalog import Catalog
from asteria_store.storage.segments import list_segment_dirs
from asteria_store.testing import clustered_vectors
from asteria_store.write import learned_plan

DIM = 16
N = 1500
ALL = 4096  # more than every row: a probes="all" search returns the whole live set


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("template") / "store"
    x = clustered_vectors(N, DIM, clusters=12, seed=0)
    with asteria_store.create(path, dim=DIM, chunk_rows=64, bits=learned_plan(1000).bits) as store:  # no re-fit
        store.ingest(x[:1000])
        store.ingest(x[1000:])
        store.delete(np.arange(0, N, 7))
    return path


@pytest.fixture
def two_segments(template: Path, tmp_path: Path) -> Path:
    """A learned store of two segments with some deletions (trained at its first ingest;
    a copy of one built once per module)."""
    path = tmp_path / "store"
    shutil.copytree(template, path)
    return path


def segment_dirs(path: Path) -> list[str]:
    return list_segment_dirs(path / "segments.zarr")


def retrain_from_another_handle(path: Path) -> list[str]:
    """Retrain through a second handle (as another process would); the segment dirs on
    disk just after its commit."""
    with asteria_store.open(path) as writer:
        writer.train(epochs=1)
        return segment_dirs(path)


QUERIES = clustered_vectors(8, DIM, clusters=12, seed=3)


def test_a_retrain_inside_an_exact_search_changes_nothing_it_returns(two_segments, monkeypatch) -> None:
    with asteria_store.open(two_segments, readonly=True) as reader:
        before = reader.search(QUERIES, ALL, probes="all")
        seen = []
        original = reads_mod.search_exact

        def commit_then_search(view, queries, k, **kwargs):
            seen.append(retrain_from_another_handle(two_segments))
            return original(view, queries, k, **kwargs)

        monkeypatch.setattr(reads_mod, "search_exact", commit_then_search)
        during = reader.search(QUERIES, ALL, probes="all")
        monkeypatch.undo()
        # The old segments were retired by the commit but kept for this reader's read.
        assert seen == [["seg-00000001", "seg-00000002", "seg-00000003"]]
        np.testing.assert_array_equal(during[0], before[0])
        np.testing.assert_array_equal(during[1], before[1])
        # Its next read sees the new generation; the old files go at the next collection
        # (a writer's next commit, or a writable open, as here).
        assert len(reader) == len(before[0][0][before[0][0] >= 0])
        assert len(segment_dirs(two_segments)) == 3
        asteria_store.open(two_segments).close()
        assert segment_dirs(two_segments) == ["seg-00000003"]
        after = reader.search(QUERIES, ALL, probes="all")
        np.testing.assert_array_equal(after[0], before[0])


def test_a_retrain_inside_a_routed_search_keeps_its_model_and_rows(two_segments, monkeypatch) -> None:
    with asteria_store.open(two_segments, readonly=True) as reader:
        before = reader.search(QUERIES, 10, probes=4)
        original = reads_mod.search_batch

        def commit_then_search(view, router, *args, **kwargs):
            retrain_from_another_handle(two_segments)
            return original(view, router, *args, **kwargs)

        monkeypatch.setattr(reads_mod, "search_batch", commit_then_search)
        during = reader.search(QUERIES, 10, probes=4)
        np.testing.assert_array_equal(during[0], before[0])
        np.testing.assert_array_equal(during[1], before[1])


def test_a_retrain_inside_get_returns_the_vectors_and_no_raw_error(two_segments, monkeypatch) -> None:
    live = np.setdiff1d(np.arange(N), np.arange(0, N, 7))
    with asteria_store.open(two_segments, readonly=True) as reader:
        before = reader.get(live)
        original = Catalog.locate

        def locate_then_commit(self, txn, ids):
            out = original(self, txn, ids)
            retrain_from_another_handle(two_segments)
            return out

        monkeypatch.setattr(Catalog, "locate", locate_then_commit)
        np.testing.assert_array_equal(reader.get(live), before)
        monkeypatch.undo()
        np.testing.assert_array_equal(reader.get(live), before)  # now from the new segment


def test_a_retrain_inside_verify_finds_nothing_wrong(two_segments, monkeypatch) -> None:
    with asteria_store.open(two_segments, readonly=True) as reader:
        original = verify_mod._verify_segment
        calls = []

        def commit_then_check(store, *args, **kwargs):
            if not calls:
                retrain_from_another_handle(two_segments)
            calls.append(1)
            return original(store, *args, **kwargs)

        monkeypatch.setattr(verify_mod, "_verify_segment", commit_then_check)
        report = reader.verify()
        assert report.ok, report.problems
        assert (report.checked_segments, len(calls)) == (2, 2)  # the two old segments, whole
        assert report.checked_chunks > 0


def test_without_pins_the_same_injection_breaks_the_read(two_segments, monkeypatch) -> None:
    """The control: with pins disabled, the retrain's collection removes the files the
    reader is about to read, and it fails. The tests above can fail."""
    monkeypatch.setattr(pins.ReaderPin, "pin", lambda self, generation: None)
    with asteria_store.open(two_segments, readonly=True) as reader:
        original = reads_mod.search_exact

        def commit_then_search(view, queries, k, **kwargs):
            for r in view.segments.values():
                r.close()  # drop any cached maps: the read has to open the files
            assert retrain_from_another_handle(two_segments) == ["seg-00000003"]
            return original(view, queries, k, **kwargs)

        monkeypatch.setattr(reads_mod, "search_exact", commit_then_search)
        with pytest.raises(CorruptStoreError, match="is missing or truncated"):
            reader.search(QUERIES, ALL, probes="all")


def deleted_maps() -> int:
    """Memory maps of this process onto deleted files."""
    return sum("(deleted)" in line for line in Path("/proc/self/maps").read_text().splitlines())


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_a_long_lived_reader_lets_go_of_retired_segments(two_segments) -> None:
    x = clustered_vectors(200, DIM, clusters=12, seed=9)
    with asteria_store.open(two_segments, readonly=True) as reader, asteria_store.open(two_segments) as writer:
        base = deleted_maps()
        for round_ in range(4):
            reader.search(QUERIES, ALL, probes="all")  # maps every chunk of every segment
            reader.get(writer.search(QUERIES, 5, probes="all")[0].ravel())
            writer.ingest(x[50 * round_ : 50 * (round_ + 1)])
            writer.train(epochs=1)  # retires every segment; idle readers pin nothing: collected
            assert len(segment_dirs(two_segments)) == 1
        reader.search(QUERIES, ALL, probes="all")  # the new view drops the old maps
        assert sorted(reader._reads.readers) == sorted(writer._current_view().segments)
        assert deleted_maps() <= base


def test_a_dead_readers_pin_expires(two_segments, python_child) -> None:
    child = python_child(
        """
        import sys, asteria_store
        from asteria_store.storage import pins
        store = asteria_store.open(sys.argv[1], readonly=True)
        store._pin.pin(0)  # as if killed inside a read of generation 0
        print("pinned", flush=True)
        __import__("time").sleep(600)
        """,
        two_segments,
    )
    assert child.stdout.readline() == "pinned\n"
    with asteria_store.open(two_segments) as writer:
        writer.train(epochs=1)
        assert pins.oldest_pin(two_segments) == 0
        assert len(segment_dirs(two_segments)) == 3  # kept: a live reader pins generation 0
        child.kill()
        child.wait()
        assert pins.oldest_pin(two_segments) is None  # its flock is gone: the pin expired
        assert writer._writes.garbage.collect() == ["seg-00000001", "seg-00000002", "model/ecvh-g1"]
    assert segment_dirs(two_segments) == ["seg-00000003"]
    assert os.listdir(two_segments / "readers") == []


def test_pin_files_hold_the_oldest_generation_in_use(tmp_path: Path) -> None:
    (tmp_path / "readers").mkdir()
    a, b = pins.ReaderPin(tmp_path), pins.ReaderPin(tmp_path)
    assert pins.oldest_pin(tmp_path) is None  # idle readers pin nothing
    a.pin(7)
    a.pin(5)
    b.pin(9)
    assert pins.oldest_pin(tmp_path) == 5
    a.unpin(5)
    assert pins.oldest_pin(tmp_path) == 7
    a.unpin(7)
    b.unpin(9)
    assert pins.oldest_pin(tmp_path) is None
    a.close()
    b.close()
    assert os.listdir(tmp_path / "readers") == []


# --- read-only deployments ----------------------------------------------------------------

@contextmanager
def read_only_copy(path: Path):
    """``path`` seen through a read-only mount (as root: a read-only bind mount, so the
    file system itself refuses writes), or with every write bit removed (other users)."""
    if os.geteuid() != 0:
        subprocess.run(["chmod", "-R", "a-w", str(path)], check=True)
        try:
            yield path
        finally:
            subprocess.run(["chmod", "-R", "u+w", str(path)], check=True)
        return
    mnt = path.parent / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "--bind", str(path), str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mnt)], check=True)
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("lock", [True, False])
def test_read_only_mount_opens_read_only(tmp_path: Path, lock: bool, disk_snapshot) -> None:
    path = tmp_path / "store"
    with asteria_store.create(path, dim=DIM, chunk_rows=64) as store:
        store.ingest(clustered_vectors(1200, DIM, clusters=12, seed=0))
    before = disk_snapshot(path)
    with read_only_copy(path) as ro:
        with asteria_store.open(ro, readonly=True, lock=lock) as store:
            ids, _ = store.search(store.get([1, 2, 3]), 5)
            assert ids[:, 0].tolist() == [1, 2, 3]
            assert len(store) == 1200
            assert store.verify().ok
            assert store._pin is None  # nothing can be written there, pins neither
            with pytest.raises(ReadOnlyError):
                store.delete([1])
        with pytest.raises(ReadOnlyError, match="cannot be written here .* open it with readonly=True"):
            asteria_store.open(ro)
    assert disk_snapshot(path) == before


def test_lock_false_needs_readonly(two_segments) -> None:
    with pytest.raises(asteria_store.InvalidArgumentError, match="lock=False needs readonly=True"):
        asteria_store.open(two_segments, lock=False)


def test_lock_false_reads_without_writing_anything(two_segments, disk_snapshot, python_child) -> None:
    before = disk_snapshot(two_segments)
    child = python_child(
        """
        import sys, numpy as np, asteria_store
        with asteria_store.open(sys.argv[1], readonly=True, lock=False) as store:
            assert store._pin is None and store._catalog.readonly_env
            ids, _ = store.search(store.get([1, 2]), 3, probes="all")
            assert ids[:, 0].tolist() == [1, 2], ids
            assert store.verify().ok
            try:
                store.delete([1])
            except asteria_store.ReadOnlyError:
                print("refused")
        """,
        two_segments,
    )
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert out == "refused\n"
    assert disk_snapshot(two_segments) == before


# --- fork, spawn, pickling ------------------------------------------------------------------

_FORKED_STORE: asteria_store.Store | None = None


def _search_in_child(row: int) -> list[int]:
    assert _FORKED_STORE is not None
    ids, _ = _FORKED_STORE.search(QUERIES[row : row + 1], 5, probes="all")
    return ids[0].tolist()


def _search_with(args: tuple[asteria_store.Store, int]) -> list[int]:
    store, row = args
    ids, _ = store.search(QUERIES[row : row + 1], 5, probes="all")
    return ids[0].tolist()


def test_a_store_opened_before_fork_works_in_the_children(two_segments) -> None:
    global _FORKED_STORE
    with asteria_store.open(two_segments, readonly=True) as store:
        expected = store.search(QUERIES, 5, probes="all")[0].tolist()  # reader slots in use
        _FORKED_STORE = store
        try:
            with multiprocessing.get_context("fork").Pool(2) as pool:
                got = pool.map(_search_in_child, range(len(QUERIES)))
        finally:
            _FORKED_STORE = None
        assert got == expected
        assert store.search(QUERIES, 5, probes="all")[0].tolist() == expected  # the parent still works


def test_a_store_pickles_as_what_reopens_it(two_segments) -> None:
    import pickle

    with asteria_store.open(two_segments, readonly=True) as store:
        expected = store.search(QUERIES, 5, probes="all")[0].tolist()
        clone = pickle.loads(pickle.dumps(store))
        assert (clone.path, clone.readonly) == (store.path, True)
        assert clone.search(QUERIES, 5, probes="all")[0].tolist() == expected
        clone.close()
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            got = pool.map(_search_with, [(store, r) for r in range(len(QUERIES))])
        assert got == expected
    with pytest.raises(asteria_store.StoreClosedError):
        pickle.dumps(store)


def test_a_writer_after_fork_commits_in_the_child(two_segments, tmp_path) -> None:
    x = clustered_vectors(20, DIM, clusters=12, seed=5)
    with asteria_store.open(two_segments) as store:
        n = len(store)
        pid = os.fork()
        if pid == 0:  # the child ingests through the inherited handle
            code = 1
            try:
                store.ingest(x, ids=np.arange(10**6, 10**6 + 20))
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert len(store) == n + 20
        np.testing.assert_allclose(store.get([10**6]), x[:1] / np.linalg.norm(x[0]), atol=1e-6)


def test_a_read_only_catalog_cannot_be_written(two_segments) -> None:
    with asteria_store.open(two_segments, readonly=True, lock=False) as store:
        with pytest.raises(ReadOnlyError):
            store._catalog.write(lambda txn: None)



def test_cli_reads_with_no_lock(two_segments, disk_snapshot) -> None:
    from asteria_store_cli.main import cli
    from click.testing import CliRunner

    before = disk_snapshot(two_segments)
    runner = CliRunner()
    for args in (["info", "--no-lock"], ["verify", "--no-lock", "--quiet"]):
        result = runner.invoke(cli, [args[0], str(two_segments), *args[1:]])
        assert result.exit_code == 0, result.output
    assert result.output.endswith("OK\n")
    assert disk_snapshot(two_segments) == before
