"""Each rank's own log: OUT/logs/rank-NNNN.log.

A rank says who it is (rank, group, guidance branch, shard, the mesh, pid and host), each phase it
enters (rendezvous, model load, rollout, video by video in a batch), its progress every few seconds
(iteration, frames, rate), its timings, and the error it ended with. Ray's own worker logs hold only a
header; a rank's log is where a user looks first, also for a rank that was killed (the driver appends
the cause it saw). Lines are appended and flushed one by one, so a killed rank's log ends where it died.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from scopevid.engine.rollout import RolloutObserver, StepRecord

DIR = "logs"


def log_path(out: Path, rank: int) -> Path:
    return Path(out) / DIR / f"rank-{rank:04d}.log"


def describe(rank: int, layout) -> str:
    """'rank 3 of 4: group 1, branch uncond, shard 1 of 2 (mesh dp=2,cfg=2)'."""
    if layout is None:
        return f"rank {rank}"
    x = layout.coords(rank)
    return (f"rank {rank} of {layout.world}: group {x.d}, branch {layout.branch(rank) or 'both'}, "
            f"shard {layout.sp_rank(rank)} of {layout.seq} (mesh {layout.label})")


class RankLog:
    def __init__(self, out: Path, rank: int, layout=None):
        self.path = log_path(out, rank)
        self.rank = rank
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", buffering=1)
        self.line(f"{describe(rank, layout)}; pid {os.getpid()} on {socket.gethostname()}")

    def line(self, msg: str) -> None:
        if self._f is None:
            return
        try:
            self._f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")
        except OSError:  # a full disk must not end the rank: its log is a convenience
            pass

    def phase(self, name: str) -> "Phase":
        """`with log.phase("loading the model"):` logs the start, the seconds it took, or its error."""
        return Phase(self, name)

    def close(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass
            self._f = None


class Phase:
    def __init__(self, log: RankLog, name: str):
        self.log, self.name = log, name

    def __enter__(self) -> "Phase":
        self.t0 = time.perf_counter()
        self.log.line(f"{self.name} ...")
        return self

    def __exit__(self, kind, e, tb) -> None:
        took = time.perf_counter() - self.t0
        if e is None:
            self.log.line(f"{self.name}: done in {took:.1f} s")
        else:
            self.log.line(f"{self.name}: failed after {took:.1f} s: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")


class RankProgress(RolloutObserver):
    """Logs the rollout's progress at most every `every_s` seconds, and its last iteration."""

    def __init__(self, log: RankLog, every_s: float = 10.0):
        self.log, self.every_s = log, every_s
        self._t0 = self._last = time.perf_counter()
        self._rows = 0
        self._modes: dict[str, int] = {}

    def after_iteration(self, record: StepRecord) -> None:
        self._rows += 1
        self._modes[record.mode] = self._modes.get(record.mode, 0) + 1
        now = time.perf_counter()
        if now - self._last >= self.every_s:
            self._last = now
            rate = self._rows / max(now - self._t0, 1e-9)
            self.log.line(f"iteration {record.serial} (window {record.window}), {self._rows} run here, {rate:.2f} it/s, "
                          + ", ".join(f"{k} {v}" for k, v in sorted(self._modes.items())))


def append(out: Path, rank: int, msg: str) -> None:
    """A line from outside the rank (the driver saw it die): appended to its log, created if absent."""
    path = log_path(out, rank)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")
    except OSError:
        pass
