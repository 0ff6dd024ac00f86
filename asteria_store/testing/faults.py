"""Fault injection for atomicity and crash tests: make the n-th call of a method fail.

Used by the test suite (in-process failures, and SIGKILL in child processes started by
crash tests) and available to anyone testing code built on asteria-store.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any


def fail_on_call(monkeypatch: Any, owner: Any, name: str, nth: int, exc: BaseException) -> list[int]:
    """Make the ``nth`` call of ``owner.name`` raise ``exc`` (via pytest's ``monkeypatch``,
    undone at teardown); returns the call counter, a one-element list."""
    original = getattr(owner, name)
    calls = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == nth:
            raise exc
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def die() -> None:
    """SIGKILL this process, after flushing stdout (what the parent reads)."""
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_on_call(owner: Any, name: str, nth: int, *, after: bool = False) -> None:
    """Replace ``owner.name`` so that its ``nth`` call SIGKILLs this process, before the
    call runs or (``after=True``) once it has returned. For child processes: never undone."""
    original = getattr(owner, name)
    calls = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == nth and not after:
            die()
        result = original(*args, **kwargs)
        if calls[0] == nth and after:
            die()
        return result

    setattr(owner, name, wrapper)


__all__ = ["die", "fail_on_call", "kill_on_call"]
