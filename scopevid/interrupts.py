"""Stopping a run on a signal at a safe point, never in the middle of a write.

The CLI's SIGTERM / SIGINT handler calls `request`, which only notes the signal. The run acts on it at
its safe points (`check`): before every iteration of a rollout, between two videos of a batch. An
exception raised by the handler wherever the interpreter happened to be (between writing a run-log
part and counting it, between a manifest row and its status, inside the video encoder) would leave
files that disagree with each other; at a safe point nothing is half done. Where waiting is all a
process does (loading weights, a rendezvous), `interruptible()` lets a signal stop it at once, and
`critical()` inside such a block defers it again for a write.
"""

from __future__ import annotations

from contextlib import contextmanager

from scopevid.errors import Stopped

_pending: str | None = None
_interruptible = 0  # > 0: inside interruptible() and not inside critical(): a signal raises at once


def _stopped(name: str) -> Stopped:
    return Stopped(f"stopped by {name}; what was finished is kept (the video and steps.parquet are readable up to "
                   "here); continue a --checkpoint run with --resume, or start over with --overwrite")


def request(name: str) -> None:
    """A signal arrived (called from the handler): noted, acted on at the next safe point."""
    global _pending
    _pending = name
    if _interruptible > 0:
        _pending = None  # raised once: the writes on the way out must not raise it again
        raise _stopped(name)


def pending() -> str | None:
    return _pending


def check() -> None:
    """A safe point: raise Stopped if a signal was noted."""
    global _pending
    if _pending is not None:
        name, _pending = _pending, None
        raise _stopped(name)


def reset() -> None:
    global _pending, _interruptible
    _pending, _interruptible = None, 0


@contextmanager
def interruptible():
    """A block that only waits (nothing half written if it ends early): a signal stops it at once."""
    global _interruptible
    check()
    _interruptible += 1
    try:
        yield
    finally:
        _interruptible -= 1


@contextmanager
def critical():
    """A block no signal may interrupt, even inside `interruptible()`; a signal noted during it is
    acted on at the next safe point."""
    global _interruptible
    saved, _interruptible = _interruptible, 0
    try:
        yield
    finally:
        _interruptible = saved
