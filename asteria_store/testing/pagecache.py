"""The page cache, for tests and benchmarks of cold reads (Linux): drop files from it and
count what a process reads from storage."""

from __future__ import annotations

import os


def read_bytes() -> int:
    """Bytes this process has caused to be read from storage (page cache misses), from
    ``/proc/self/io``."""
    with open("/proc/self/io") as fh:
        for line in fh:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    raise RuntimeError("no read_bytes in /proc/self/io")


def evict(path) -> int:
    """Flush and drop every file under ``path`` (a folder or one file) from the page cache;
    returns the files evicted."""
    paths = [path] if os.path.isfile(path) else [
        os.path.join(root, name) for root, _dirs, files in os.walk(path) for name in files]
    count = 0
    for file in paths:
        try:
            fd = os.open(file, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            count += 1
        except OSError:
            pass
        finally:
            os.close(fd)
    return count
