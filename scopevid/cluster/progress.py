"""Job progress as the driver shows it: frames done, iteration rate, ETA.

Rank 0 reports (iteration serial, total iterations, pixel frames written) through a `ProgressBoard`
(the driver runs it as a zero-CPU Ray actor); the driver polls the board and feeds a
`ProgressTracker`, which turns reports into a rate over a sliding window and an ETA. Nothing here
imports Ray, so it is testable and reusable by any launcher.
"""

from __future__ import annotations

import time
from collections import deque


class ProgressBoard:
    """Recent reports of the writer rank (a Ray actor in the driver: `report` is fire-and-forget)."""

    def __init__(self, keep: int = 256) -> None:
        self._reports: deque = deque(maxlen=keep)

    def report(self, state: dict) -> None:
        self._reports.append(dict(state))

    def since(self, t: float = 0.0) -> list[dict]:
        """Reports newer than rank-side time t, oldest first."""
        return [r for r in self._reports if r["time"] > t]

    # the driver's stop request (SIGTERM), which every rank polls between iterations
    _stop = False

    def request_stop(self) -> None:
        self._stop = True

    def stop_requested(self) -> bool:
        return self._stop


class StopPoll:
    """Rank-side: whether the board asks to stop, without ever waiting for it. At most one question
    is in flight; `ask()` sends one (e.g. `board.stop_requested.remote`), `answer(ref)` returns its
    reply if it has arrived, else None."""

    def __init__(self, ask, answer):
        self.ask, self.answer, self._pending = ask, answer, None

    def __call__(self) -> bool:
        if self._pending is None:
            self._pending = self.ask()
            return False
        reply = self.answer(self._pending)
        if reply is None:
            return False
        self._pending = None
        return bool(reply)


class Reporter:
    """Rank-side: rate-limits reports to a board (`send` is e.g. `board.report.remote`)."""

    def __init__(self, send, total_frames: int, every_s: float = 0.5):
        self.send, self.total_frames, self.every_s = send, total_frames, every_s
        self._last = 0.0

    def __call__(self, serial: int, total: int, next_emit: int, pixel_frames: int) -> None:
        now = time.time()
        if now - self._last < self.every_s and serial + 1 < total:
            return
        self._last = now
        self.send({"iteration": serial, "iterations": total, "latent_frames": next_emit,
                   "frames": pixel_frames, "total_frames": self.total_frames, "time": now})


def _duration(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class ProgressTracker:
    """Iteration rate over the last `window_s` seconds of reports, frames/s, ETA."""

    def __init__(self, window_s: float = 20.0):
        self.window_s = window_s
        self._samples: deque = deque()  # (time, iteration, frames)
        self.latest: dict | None = None

    @property
    def last_time(self) -> float:
        return self.latest["time"] if self.latest else 0.0

    def extend(self, reports: list[dict]) -> None:
        for r in reports:
            self.update(r)

    def update(self, report: dict | None) -> None:
        if report is None:
            return
        if self.latest is not None and report["time"] <= self.latest["time"]:
            return
        self.latest = report
        t = report["time"]
        self._samples.append((t, report["iteration"], report["frames"]))
        while len(self._samples) > 2 and t - self._samples[0][0] > self.window_s:
            self._samples.popleft()

    def rates(self) -> tuple[float | None, float | None]:
        """(iterations/s, frames/s) over the window, None before two reports."""
        if len(self._samples) < 2:
            return None, None
        (t0, i0, f0), (t1, i1, f1) = self._samples[0], self._samples[-1]
        if t1 <= t0:
            return None, None
        return (i1 - i0) / (t1 - t0), (f1 - f0) / (t1 - t0)

    def eta(self) -> float | None:
        it_s, _ = self.rates()
        if not it_s or self.latest is None:
            return None
        left = self.latest["iterations"] - self.latest["iteration"] - 1
        return max(0.0, left / it_s)

    def as_dict(self) -> dict:
        it_s, fr_s = self.rates()
        d = dict(self.latest or {})
        d.update(iterations_per_second=it_s, frames_per_second=fr_s, eta_seconds=self.eta())
        return d

    def line(self) -> str:
        r = self.latest
        if r is None:
            return "waiting for rank 0's first report"
        it_s, fr_s = self.rates()
        done = r["iteration"] + 1
        pct = 100.0 * done / max(1, r["iterations"])
        rate = f"{it_s:.1f} it/s, {fr_s:.1f} frames/s" if it_s is not None else "rate ?"
        return (f"{pct:5.1f}% | frames {r['frames']}/{r['total_frames']} | iteration {done}/{r['iterations']} | "
                f"{rate} | ETA {_duration(self.eta())}")
