"""Per-frame state keyed by absolute latent index: recomputed velocities and host features.

Keyed by absolute frame, so a window that slides or a shard boundary that moves carries the state
along instead of losing it.
"""

from __future__ import annotations

from collections import deque

import torch


class VelocityHistory:
    """The last `depth` recomputed (sigma, v) per frame, oldest first."""

    def __init__(self, depth: int = 4) -> None:
        self.depth = depth
        self._h: dict[int, deque] = {}

    def push(self, frame: int, sigma: float, v: torch.Tensor) -> None:
        self._h.setdefault(frame, deque(maxlen=self.depth)).append((float(sigma), v))

    def get(self, frame: int) -> list[tuple[float, torch.Tensor]]:
        return list(self._h.get(frame, ()))

    def count(self, frame: int) -> int:
        return len(self._h.get(frame, ()))

    def last(self, frame: int) -> torch.Tensor:
        return self._h[frame][-1][1]

    def drop_before(self, frame: int) -> None:
        for f in [f for f in self._h if f < frame]:
            del self._h[f]

    def drop(self, frames) -> None:
        for f in frames:
            self._h.pop(f, None)

    def state_dict(self) -> dict:
        return {f: list(d) for f, d in self._h.items()}

    def load_state_dict(self, state: dict) -> None:
        self._h = {int(f): deque(items, maxlen=self.depth) for f, items in state.items()}


class FeatureMemory:
    """The previous host feature per frame, for the discrepancy of Eq. 4."""

    def __init__(self) -> None:
        self._phi: dict[int, torch.Tensor] = {}

    def sums(self, frames: list[int], phi: torch.Tensor) -> tuple[float, float]:
        """(sum |phi - phi_prev|, sum |phi_prev|) over frames that have a previous feature; float64."""
        num = den = 0.0
        for i, f in enumerate(frames):
            prev = self._phi.get(f)
            if prev is not None:
                num += float((phi[i].double() - prev.double()).abs().sum())
                den += float(prev.double().abs().sum())
            self._phi[f] = phi[i].detach()
        return num, den

    def seen(self, frames: list[int]) -> int:
        return sum(1 for f in frames if f in self._phi)

    def drop_before(self, frame: int) -> None:
        for f in [f for f in self._phi if f < frame]:
            del self._phi[f]

    def state_dict(self) -> dict:
        return dict(self._phi)

    def load_state_dict(self, state: dict) -> None:
        self._phi = {int(f): t for f, t in state.items()}
