"""Progress reporting: silent by default, a tqdm bar on request, or any callable.

``progress`` arguments accept ``None``/``False`` (silent), ``True`` (a tqdm bar on stderr),
a callable ``fn(done, total, desc)`` called after each step, or a tqdm-like object with
``update(n)`` (and optionally ``close()``), which is used as given.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Union

ProgressLike = Union[None, bool, Callable[[int, int, str], Any], Any]


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class _Callback:
    def __init__(self, fn: Callable[[int, int, str], Any], total: int, desc: str):
        self.fn, self.total, self.desc, self.done = fn, total, desc, 0

    def update(self, n: int = 1) -> None:
        self.done += n
        self.fn(self.done, self.total, self.desc)

    def close(self) -> None:
        pass


class _Borrowed:
    """A caller's tqdm-like object: updated, never closed by us."""

    def __init__(self, bar: Any):
        self.bar = bar

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        pass


def make_progress(progress: ProgressLike, *, total: int, desc: str, unit: str = "vec"):
    """A bar-like object with ``update(n)`` and ``close()`` for one phase of work."""
    if progress is None or progress is False:
        return _Silent()
    if progress is True:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr,
                    dynamic_ncols=True, leave=True)
    if hasattr(progress, "update"):
        return _Borrowed(progress)
    if callable(progress):
        return _Callback(progress, total, desc)
    raise TypeError(f"progress must be a bool, a callable or a tqdm-like object, got {progress!r}")
