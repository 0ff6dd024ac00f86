"""The power-cut filesystem (asteria_store/testing/powercut.py): its model of what a cut
keeps, then a store on it, cut after acknowledged writes and just before syncs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import asteria_store
from asteria_store.testing import clustered_vectors
from asteria_store.testing.powercut import PowerCutFS

SEEDS = range(40)


def images(fs: PowerCutFS, tmp_path: Path, name: str) -> list[Path]:
    out = []
    for seed in SEEDS:
        dest = tmp_path / f"{name}-{seed}"
        fs.cut(dest, seed)
        out.append(dest)
    return out


def durable_file(fs: PowerCutFS, path: str, data: bytes) -> None:
    fs.create(path, 0o644)
    fs.write(path, data, 0, None)
    fs.fsync(path, 0, None)
    fs.fsyncdir("/", 0, None)


# -- the model -------------------------------------------------------------------------------


def test_synced_data_and_entries_survive_every_cut(tmp_path: Path) -> None:
    fs = PowerCutFS()
    fs.mkdir("/d", 0o755)
    fs.fsyncdir("/", 0, None)
    fs.create("/d/f", 0o644)
    fs.write("/d/f", b"hello", 0, None)
    fs.fsync("/d/f", 0, None)
    fs.fsyncdir("/d", 0, None)
    assert all((img / "d" / "f").read_bytes() == b"hello" for img in images(fs, tmp_path, "img"))


def test_unsynced_writes_are_lost_kept_or_torn(tmp_path: Path) -> None:
    fs = PowerCutFS()
    durable_file(fs, "/f", b"aaaa")
    fs.write("/f", b"bbbbbbbb", 0, None)  # not synced
    seen = {(img / "f").read_bytes() for img in images(fs, tmp_path, "img")}
    assert b"aaaa" in seen and b"bbbbbbbb" in seen  # dropped, kept
    assert any(v not in (b"aaaa", b"bbbbbbbb") and v[:1] == b"b" for v in seen)  # torn: part of it


def test_an_entry_is_durable_only_once_its_directory_is_synced(tmp_path: Path) -> None:
    fs = PowerCutFS()
    fs.create("/new", 0o644)
    fs.write("/new", b"x", 0, None)
    fs.fsync("/new", 0, None)  # the data, not the entry
    present = [(img / "new").exists() for img in images(fs, tmp_path, "a")]
    assert any(present) and not all(present)
    fs.fsyncdir("/", 0, None)
    assert all((img / "new").read_bytes() == b"x" for img in images(fs, tmp_path, "b"))
    fs.unlink("/new")  # not synced: may come back
    present = [(img / "new").exists() for img in images(fs, tmp_path, "c")]
    assert any(present) and not all(present)


def test_a_rename_is_kept_or_undone_whole(tmp_path: Path) -> None:
    fs = PowerCutFS()
    fs.mkdir("/a", 0o755)
    fs.mkdir("/b", 0o755)
    fs.fsyncdir("/", 0, None)
    durable_file(fs, "/a/f", b"data")
    fs.fsyncdir("/a", 0, None)
    fs.rename("/a/f", "/b/g")
    where = {((img / "a" / "f").exists(), (img / "b" / "g").exists()) for img in images(fs, tmp_path, "a")}
    assert where == {(True, False), (False, True)}
    fs.fsyncdir("/a", 0, None)  # either directory's sync commits the rename
    assert all((img / "b" / "g").exists() and not (img / "a" / "f").exists()
               for img in images(fs, tmp_path, "b"))


def test_unsynced_writes_of_different_files_persist_in_any_subset(tmp_path: Path) -> None:
    fs = PowerCutFS()
    durable_file(fs, "/one", b"0")
    durable_file(fs, "/two", b"0")
    fs.write("/one", b"1", 0, None)
    fs.write("/two", b"1", 0, None)  # written later than one's, may persist without it
    seen = {((img / "one").read_bytes(), (img / "two").read_bytes()) for img in images(fs, tmp_path, "img")}
    assert seen == {(b"0", b"0"), (b"0", b"1"), (b"1", b"0"), (b"1", b"1")}


# -- a store on the mounted filesystem -------------------------------------------------------


def fuse_available() -> str | None:
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        return "no /dev/fuse or fusermount3 here (install fuse3)"
    try:
        import mfusepy  # noqa: F401
    except ImportError:
        return "mfusepy is not installed"
    return None


@pytest.mark.skipif(fuse_available() is not None, reason=str(fuse_available()))
def test_a_store_keeps_every_acknowledged_write_across_power_cuts(tmp_path: Path) -> None:
    """Cuts after each acknowledged operation, and just before every other sync of an
    ingest in flight: every image opens, verifies, and holds the acknowledged state (with
    the ingest in flight, the state before it or after it, never a part)."""
    from asteria_store.testing.powercut import check_image, mount

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    x = clustered_vectors(1400, 16, clusters=12, seed=0)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)

    def rows(ids) -> dict[int, tuple]:
        return {int(i): (unit[i], int(i)) for i in ids}

    expected: list[tuple[Path, list[dict]]] = []
    with mount(mnt) as fs:
        s = asteria_store.create(mnt / "store", dim=16, chunk_rows=256)
        s.ingest(x[:1100], ids=np.arange(1100), metadata={"n": np.arange(1100)})
        a = rows(range(1100))
        for seed in range(3):
            fs.cut(tmp_path / f"after-a-{seed}", seed)
            expected.append((tmp_path / f"after-a-{seed}", [a]))
        fs.cut_before_syncs(tmp_path / "during-b", every=2, seed=7)
        s.ingest(x[1100:1300], ids=np.arange(1100, 1300), metadata={"n": np.arange(1100, 1300)})
        during = fs.cut_before_syncs(None)
        ab = rows(range(1300))
        expected += [(Path(line.split()[0]), [a, ab]) for line in during]
        s.delete(np.arange(50))
        s.compact()
        s.close()
        for seed in range(3):
            fs.cut(tmp_path / f"after-compact-{seed}", seed)
            expected.append((tmp_path / f"after-compact-{seed}", [rows(range(50, 1300))]))
    assert during  # the ingest synced, and was cut before its syncs
    problems = {str(image): check_image(image / "store", states) for image, states in expected}
    assert not any(problems.values()), {k: v for k, v in problems.items() if v}
