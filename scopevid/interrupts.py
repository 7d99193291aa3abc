"""Stopping a run on a signal without breaking a file that is being written.

The CLI's SIGTERM / SIGINT handler calls `request`: outside a `critical()` block it raises Stopped at
once (every `finally` on the way out then closes its outputs); inside one, e.g. while a frame is
handed to the video encoder or a log part is written, it only records the signal, and the block
raises Stopped when it ends. An exception raised in the middle of the encoder's writer would make it
kill ffmpeg and leave an MP4 without its index.
"""

from __future__ import annotations

from contextlib import contextmanager

from scopevid.errors import Stopped

_pending: str | None = None
_depth = 0


def _stopped(name: str) -> Stopped:
    return Stopped(f"stopped by {name}; what was finished is kept (the video and steps.parquet are readable up to "
                   "here); continue a --checkpoint run with --resume, or start over with --overwrite")


def request(name: str) -> None:
    global _pending
    _pending = name
    if _depth == 0:
        _pending = None  # raised once: the writes on the way out (closing files, a manifest) must not raise it again
        raise _stopped(name)


def reset() -> None:
    global _pending, _depth
    _pending, _depth = None, 0


@contextmanager
def critical():
    """A block a signal may not interrupt; a signal that arrived during it stops the run after it."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    except BaseException:
        _depth -= 1
        raise
    _depth -= 1
    if _depth == 0 and _pending is not None:
        name, _pending = _pending, None
        raise _stopped(name)
