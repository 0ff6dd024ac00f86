"""A FUSE filesystem that models what a power cut keeps, for crash tests.

Mounted over an empty directory, it holds every file in memory and serves the writer's
view (read-your-writes, memory maps included: the kernel's page cache sits on top). It
also keeps, for each file and directory, what is *durable*:

* **file data** (as Jepsen's LazyFS models it): writes since the file's last ``fsync``
  (or ``fdatasync``) are pending; at a cut each file keeps none of them, a prefix, a
  prefix whose last write is torn, or any subset (writes reach the disk out of order);
* **directory entries**: a create, mkdir, unlink, rmdir or rename is durable only once its
  parent directory is fsynced (for a rename, the directory of the new name). At a cut each
  entry operation not made durable is undone or kept at random, the way a journaling
  filesystem may or may not have committed it; a rename is kept or undone whole;
* **order across files**: each file and directory decides on its own, so unsynced writes of
  different files persist in any subset.

:meth:`PowerCutFS.cut` writes one such crash image to a real directory (seeded), which a
test then opens as a store. Needs ``mfusepy`` and the ``fuse3`` package (``fusermount3``);
:func:`mount` serves it from a child process and hands back a handle for cuts.
"""

from __future__ import annotations

import errno
import json
import os
import random
import stat
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mfusepy


@dataclass
class EntryOp:
    """One change to directory entries since their directory's last fsync."""

    kind: str  # "add", "remove" or "rename"
    name: str
    node: Node
    old_dir: Dir | None = None  # rename: where the node came from
    old_name: str = ""
    replaced: Node | None = None  # a rename over an existing name: what it replaced
    dest: Dir | None = None  # rename: where the node went


@dataclass(eq=False)
class Node:
    mode: int
    mtime: float = field(default_factory=time.time)


@dataclass(eq=False)
class File(Node):
    data: bytearray = field(default_factory=bytearray)
    synced: bytes = b""
    pending: list = field(default_factory=list)  # ("write", offset, bytes) / ("truncate", size)


@dataclass(eq=False)
class Dir(Node):
    entries: dict = field(default_factory=dict)
    durable: dict = field(default_factory=dict)
    pending: list = field(default_factory=list)  # EntryOps, in order


class PowerCutFS(mfusepy.Operations):
    """The filesystem (see the module docstring). All state is guarded by one lock."""

    def __init__(self) -> None:
        self.root = Dir(stat.S_IFDIR | 0o755)
        self._mutex = threading.RLock()
        self.syncs = 0  # fsync and fsyncdir calls so far
        self.renames: list[EntryOp] = []  # renames not yet durable
        self.on_sync = None  # called (with the path) before each sync: a test may cut there

    # -- lookup --------------------------------------------------------------------------

    def _walk(self, path: str) -> Node:
        node: Node = self.root
        for part in [p for p in path.split("/") if p]:
            if not isinstance(node, Dir) or part not in node.entries:
                raise mfusepy.FuseOSError(errno.ENOENT)
            node = node.entries[part]
        return node

    def _parent(self, path: str) -> tuple[Dir, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        parent = self._walk(head or "/")
        if not isinstance(parent, Dir):
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        return parent, name

    # -- metadata ------------------------------------------------------------------------

    def getattr(self, path: str, fh: Any = None) -> dict:
        with self._mutex:
            node = self._walk(path)
            size = len(node.data) if isinstance(node, File) else 4096
            return {"st_mode": node.mode, "st_size": size, "st_nlink": 2 if isinstance(node, Dir) else 1,
                    "st_mtime": node.mtime, "st_ctime": node.mtime, "st_atime": node.mtime,
                    "st_uid": os.getuid(), "st_gid": os.getgid(), "st_blocks": (size + 511) // 512}

    def readdir(self, path: str, fh: Any) -> list[str]:
        with self._mutex:
            node = self._walk(path)
            return [".", "..", *node.entries]

    def statfs(self, path: str) -> dict:
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": 1 << 24, "f_bfree": 1 << 23, "f_bavail": 1 << 23,
                "f_files": 1 << 20, "f_ffree": 1 << 19, "f_namemax": 255}

    def chmod(self, path: str, mode: int) -> int:
        with self._mutex:
            node = self._walk(path)
            node.mode = (node.mode & ~0o7777) | (mode & 0o7777)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        return 0

    def utimens(self, path: str, times: Any = None) -> int:
        with self._mutex:
            self._walk(path).mtime = time.time()
        return 0

    def access(self, path: str, amode: int) -> int:
        with self._mutex:
            self._walk(path)
        return 0

    # -- entries -------------------------------------------------------------------------

    def _add(self, path: str, node: Node) -> None:
        parent, name = self._parent(path)
        if name in parent.entries:
            raise mfusepy.FuseOSError(errno.EEXIST)
        parent.entries[name] = node
        parent.pending.append(EntryOp("add", name, node))

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        with self._mutex:
            self._add(path, File(stat.S_IFREG | (mode & 0o7777)))
        return 0

    def mknod(self, path: str, mode: int, dev: int) -> int:
        if not stat.S_ISREG(mode):
            raise mfusepy.FuseOSError(errno.EPERM)
        return self.create(path, mode)

    def mkdir(self, path: str, mode: int) -> int:
        with self._mutex:
            self._add(path, Dir(stat.S_IFDIR | (mode & 0o7777)))
        return 0

    def unlink(self, path: str) -> int:
        with self._mutex:
            parent, name = self._parent(path)
            node = parent.entries.pop(name, None)
            if node is None:
                raise mfusepy.FuseOSError(errno.ENOENT)
            parent.pending.append(EntryOp("remove", name, node))
        return 0

    def rmdir(self, path: str) -> int:
        with self._mutex:
            node = self._walk(path)
            if not isinstance(node, Dir):
                raise mfusepy.FuseOSError(errno.ENOTDIR)
            if node.entries:
                raise mfusepy.FuseOSError(errno.ENOTEMPTY)
            return self.unlink(path)

    def rename(self, old: str, new: str) -> int:
        with self._mutex:
            src, old_name = self._parent(old)
            dst, new_name = self._parent(new)
            node = src.entries.get(old_name)
            if node is None:
                raise mfusepy.FuseOSError(errno.ENOENT)
            replaced = dst.entries.get(new_name)
            if isinstance(replaced, Dir) and replaced.entries:
                raise mfusepy.FuseOSError(errno.ENOTEMPTY)
            del src.entries[old_name]
            dst.entries[new_name] = node
            op = EntryOp("rename", new_name, node, src, old_name, replaced, dest=dst)
            dst.pending.append(op)
            self.renames.append(op)
        return 0

    # -- data ----------------------------------------------------------------------------

    def open(self, path: str, flags: int) -> int:
        with self._mutex:
            node = self._walk(path)
            if isinstance(node, File) and flags & os.O_TRUNC:
                self._truncate(node, 0)
        return 0

    def read(self, path: str, size: int, offset: int, fh: Any) -> bytes:
        with self._mutex:
            node = self._walk(path)
            return bytes(node.data[offset : offset + size])

    def write(self, path: str, data: bytes, offset: int, fh: Any) -> int:
        with self._mutex:
            node = self._walk(path)
            end = offset + len(data)
            if end > len(node.data):
                node.data.extend(b"\0" * (end - len(node.data)))
            node.data[offset:end] = data
            node.pending.append(("write", offset, bytes(data)))
            node.mtime = time.time()
        return len(data)

    def _truncate(self, node: File, length: int) -> None:
        if length < len(node.data):
            del node.data[length:]
        else:
            node.data.extend(b"\0" * (length - len(node.data)))
        node.pending.append(("truncate", length))

    def truncate(self, path: str, length: int, fh: Any = None) -> int:
        with self._mutex:
            self._truncate(self._walk(path), length)
        return 0

    def fallocate(self, path: str, mode: int, offset: int, length: int, fh: Any) -> int:
        with self._mutex:
            node = self._walk(path)
            if offset + length > len(node.data):
                self._truncate(node, offset + length)
        return 0

    def flush(self, path: str, fh: Any) -> int:
        return 0

    def release(self, path: str, fh: Any) -> int:
        return 0

    # -- durability ----------------------------------------------------------------------

    def fsync(self, path: str, datasync: int, fh: Any) -> int:
        return self._sync(path, self._sync_file)

    def fsyncdir(self, path: str, datasync: int, fh: Any) -> int:
        return self._sync(path, self._sync_dir)

    def _sync(self, path: str, commit) -> int:
        """One fsync: ``on_sync`` first (a cut as the sync begins), then ``commit``."""
        if self.on_sync is not None:
            self.on_sync(path)
        with self._mutex:
            commit(self._walk(path))
            self.syncs += 1
        return 0

    def _sync_file(self, node: Node) -> None:
        if isinstance(node, File):
            node.synced = bytes(node.data)
            node.pending.clear()

    def _sync_dir(self, node: Dir) -> None:
        # A rename is one journal entry: syncing either of its directories commits it.
        for op in [op for op in self.renames if op.old_dir is node or op in node.pending]:
            self._commit_rename(op)
        node.durable = dict(node.entries)
        node.pending.clear()

    def _commit_rename(self, op: EntryOp) -> None:
        dest = op.dest
        dest.durable[op.name] = op.node
        if op.old_dir.durable.get(op.old_name) is op.node:
            del op.old_dir.durable[op.old_name]
        if op in dest.pending:
            dest.pending.remove(op)
        self.renames.remove(op)

    # -- cuts ----------------------------------------------------------------------------

    def cut(self, dest: str | os.PathLike[str], seed: int) -> dict[str, int]:
        """Write a crash image of the filesystem as of now to ``dest`` (a directory that
        does not exist yet), seeded: its durable state plus a random part of what was
        pending. Returns counts of what the cut lost or kept."""
        rng = random.Random(seed)
        counts = {"files": 0, "writes_pending": 0, "writes_dropped": 0, "writes_torn": 0,
                  "entries_pending": 0, "entries_undone": 0}
        with self._mutex:
            keep: dict[int, bool] = {}
            for d in _dirs(self.root):
                for op in d.pending:
                    if id(op) not in keep:
                        keep[id(op)] = rng.random() < 0.5
                        counts["entries_pending"] += 1
                        counts["entries_undone"] += not keep[id(op)]
            moved = {(id(op.old_dir), op.old_name, id(op.node)) for op in self.renames if keep.get(id(op))}
            Path(dest).parent.mkdir(parents=True, exist_ok=True)
            _image(self.root, Path(dest), rng, keep, moved, counts)
        return counts


def _dirs(d: Dir, seen: set | None = None):
    """Every directory reachable live or durably from ``d``."""
    seen = set() if seen is None else seen
    if id(d) in seen:
        return
    seen.add(id(d))
    yield d
    for node in list(d.entries.values()) + list(d.durable.values()) + [op.node for op in d.pending]:
        if isinstance(node, Dir):
            yield from _dirs(node, seen)


def _entries_at_cut(d: Dir, keep: dict[int, bool], moved: set) -> dict[str, Node]:
    """What a cut leaves in ``d``: its durable entries, each pending operation applied or
    not as decided, less what a kept rename moved out of it."""
    entries = dict(d.durable)
    for op in d.pending:
        if not keep[id(op)]:
            continue
        if op.kind == "remove":
            if entries.get(op.name) is op.node:
                del entries[op.name]
        else:  # add, or a rename into d
            entries[op.name] = op.node
    return {name: node for name, node in entries.items() if (id(d), name, id(node)) not in moved}


def _file_at_cut(f: File, rng: random.Random, counts: dict[str, int]) -> bytes:
    data = bytearray(f.synced)
    pending = f.pending
    counts["writes_pending"] += sum(1 for op in pending if op[0] == "write")
    if pending:
        mode = rng.choice(["none", "prefix", "torn", "subset", "all"])
        if mode == "none":
            chosen = []
        elif mode in ("prefix", "torn"):
            chosen = pending[: rng.randint(0, len(pending))]
        elif mode == "subset":
            chosen = [op for op in pending if rng.random() < 0.5]
        else:
            chosen = list(pending)
        counts["writes_dropped"] += len(pending) - len(chosen)
        for i, op in enumerate(chosen):
            if op[0] == "truncate":
                size = op[1]
                del data[size:]
                data.extend(b"\0" * (size - len(data)))
                continue
            _, offset, payload = op
            if mode == "torn" and i == len(chosen) - 1 and len(payload) > 1:
                payload = payload[: rng.randint(1, len(payload) - 1)]
                counts["writes_torn"] += 1
            end = offset + len(payload)
            if end > len(data):
                data.extend(b"\0" * (end - len(data)))
            data[offset:end] = payload
    return bytes(data)


def _image(d: Dir, dest: Path, rng: random.Random, keep: dict[int, bool], moved: set, counts: dict[str, int]) -> None:
    dest.mkdir()
    for name, node in _entries_at_cut(d, keep, moved).items():
        if isinstance(node, Dir):
            _image(node, dest / name, rng, keep, moved, counts)
        else:
            (dest / name).write_bytes(_file_at_cut(node, rng, counts))
            os.chmod(dest / name, node.mode & 0o7777)
            counts["files"] += 1


def check_image(path: str | os.PathLike[str], allowed: list[dict[int, tuple]], *, atol: float = 1e-6) -> list[str]:
    """What is wrong with the store at ``path`` (a crash image), given the states it may
    hold: each ``{id: (normalised vector, metadata value of column "n")}``. It must open,
    verify, hold exactly one allowed state's ids, their vectors and metadata, and an exact
    search must return exactly those ids. Empty: nothing wrong."""
    import numpy as np

    import asteria_store

    try:
        with asteria_store.open(path) as store:
            report = store.verify()
            if not report.ok:
                return [f"verify: {p}" for p in report.problems[:3]]
            live = set(store.ids().tolist())
            states = [a for a in allowed if set(a) == live]
            if not states:
                sizes = [len(a) for a in allowed]
                return [f"{len(live)} live ids match no allowed state (sizes {sizes})"]
            if not live:
                return []
            ids = np.array(sorted(live))
            got = store.get(ids)
            n = store.fetch(ids, columns=["n"]).column("n").to_pylist() if store.info()["columns"] else None
            found, _ = store.search(got[:3], len(live) + 5, probes="all")
            if any(set(row[row >= 0].tolist()) != live for row in found):
                return ["an exact search does not return exactly the live ids"]
            problems = []
            for state in states:  # an upsert leaves the ids as they were: compare contents
                want = np.stack([state[i][0] for i in ids.tolist()])
                mine = []
                if np.abs(got - want).max() > atol:
                    mine.append("vectors differ from every allowed state's")
                if n is not None and n != [state[i][1] for i in ids.tolist()]:
                    mine.append("metadata differs from every allowed state's")
                if not mine:
                    return []
                problems = problems or mine
            return problems
    except Exception as exc:  # an image that cannot be opened or read is a violation too
        return [f"{type(exc).__name__}: {str(exc)[:200]}"]


class Mounted:
    """A :class:`PowerCutFS` served by another process (see :func:`mount`): cuts go to it."""

    def __init__(self, conn) -> None:
        self._conn = conn

    def cut(self, dest: str | os.PathLike[str], seed: int) -> dict[str, int]:
        """:meth:`PowerCutFS.cut` in the serving process."""
        self._conn.send(("cut", os.fspath(dest), seed))
        return self._conn.recv()

    def syncs(self) -> int:
        self._conn.send(("syncs",))
        return self._conn.recv()

    def cut_before_syncs(self, dest: str | os.PathLike[str] | None, *, every: int = 1, seed: int = 0) -> list[str]:
        """From now on, write a crash image into ``dest/cut-<n>`` just before every
        ``every``-th sync (the power failing as the sync begins); ``None`` stops it.
        Returns the images written since the last call, each a line: the image, the path
        the sync was for, and what the cut lost (JSON, as :meth:`PowerCutFS.cut` counts)."""
        self._conn.send(("before_syncs", None if dest is None else os.fspath(dest), every, seed))
        return self._conn.recv()


@contextmanager
def mount(mountpoint: str | os.PathLike[str], *, timeout: float = 30.0):
    """Serve a new :class:`PowerCutFS` at the empty directory ``mountpoint`` from a child
    process (FUSE's loop wants a process's main thread); yields a :class:`Mounted` once
    the mount serves; unmounts and stops the child on the way out."""
    import subprocess
    import sys
    import tempfile
    from multiprocessing.connection import Client

    mountpoint = os.fspath(mountpoint)
    sock = os.path.join(tempfile.mkdtemp(prefix="powercut-"), "control")
    child = subprocess.Popen([sys.executable, "-m", "asteria_store.testing.powercut", mountpoint, sock],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while not (os.path.ismount(mountpoint) and os.path.exists(sock)):
            if child.poll() is not None:
                raise RuntimeError(f"the power-cut filesystem did not mount at {mountpoint!r}: "
                                   f"{child.stderr.read().decode(errors='replace').strip()[-500:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the power-cut filesystem did not mount at {mountpoint!r} within {timeout} s")
            time.sleep(0.01)
        conn = Client(sock, family="AF_UNIX")
        try:
            yield Mounted(conn)
        finally:
            conn.close()
    finally:
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False, capture_output=True)
        try:
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        child.stderr.close()


def _serve(mountpoint: str, sock: str) -> None:
    """The child of :func:`mount`: FUSE's loop in the main thread, cuts in another."""
    from multiprocessing.connection import Listener

    fs = PowerCutFS()
    written: list[str] = []

    def cutter(dest: str, every: int, seed: int):
        seen = [0]

        def before_sync(path: str) -> None:
            seen[0] += 1
            if seen[0] % every == 0:
                image = os.path.join(dest, f"cut-{len(written):04d}")
                counts = fs.cut(image, seed + seen[0])
                written.append(f"{image} {path} {json.dumps(counts, separators=(',', ':'))}")

        return before_sync

    def control() -> None:
        with Listener(sock, family="AF_UNIX") as listener, listener.accept() as conn:
            while True:
                try:
                    request = conn.recv()
                except EOFError:
                    return
                if request[0] == "cut":
                    conn.send(fs.cut(request[1], request[2]))
                elif request[0] == "before_syncs":
                    done = list(written)
                    written.clear()
                    fs.on_sync = None if request[1] is None else cutter(*request[1:])
                    conn.send(done)
                else:
                    conn.send(fs.syncs)

    threading.Thread(target=control, daemon=True).start()
    # hard_remove: an unlinked file goes at once (no .fuse_hidden copy keeping its directory non-empty)
    mfusepy.FUSE(fs, mountpoint, foreground=True, hard_remove=True)


if __name__ == "__main__":
    import sys

    _serve(sys.argv[1], sys.argv[2])


__all__ = ["Mounted", "PowerCutFS", "check_image", "mount"]
