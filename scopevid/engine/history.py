"""Per-frame state keyed by absolute latent index: recomputed velocities and pre-forward features.

Keyed by absolute frame, so a window that slides or a shard boundary that moves carries the state
along instead of losing it; `drop_before` forgets frames that left the window for good. Entries are
stored as their own tensors (`clone`): a view would keep the whole batched forward output alive.
"""

from __future__ import annotations

from collections import deque

import torch

from scopevid.engine.topology import FrameKeyed


class VelocityHistory:
    """The last `depth` recomputed (sigma, v) per frame, oldest first."""

    def __init__(self, depth: int = 4) -> None:
        self.depth = depth
        self._h: dict[int, deque] = {}

    def push(self, frame: int, sigma: float, v: torch.Tensor) -> None:
        self._h.setdefault(frame, deque(maxlen=self.depth)).append((float(sigma), v.clone()))

    def get(self, frame: int) -> list[tuple[float, torch.Tensor]]:
        return list(self._h.get(frame, ()))

    def count(self, frame: int) -> int:
        return len(self._h.get(frame, ()))

    def last(self, frame: int) -> torch.Tensor:
        return self._h[frame][-1][1]

    def drop_before(self, frame: int) -> None:
        for f in [f for f in self._h if f < frame]:
            del self._h[f]

    def __len__(self) -> int:
        return len(self._h)

    def frames(self) -> set[int]:
        return set(self._h)

    def state_dict(self) -> dict:
        return {f: list(d) for f, d in self._h.items()}

    def load_state_dict(self, state: dict) -> None:
        self._h = {int(f): deque(items, maxlen=self.depth) for f, items in state.items()}


class FeatureMemory:
    """The previous pre-forward feature per frame, for the discrepancy of Eq. 4, with its L1 norm
    (computed once, when it is stored, in float64)."""

    def __init__(self) -> None:
        self._phi: dict[int, torch.Tensor] = {}
        self._norm: dict[int, float] = {}

    def sums(self, frames: list[int], phi: torch.Tensor) -> list[tuple[float, float]]:
        """Per frame (sum |phi - phi_prev|, sum |phi_prev|) in float64, (0, 0) for a frame without a
        previous feature; then phi becomes every frame's previous feature."""
        out = [(0.0, 0.0)] * len(frames)
        cur = phi.detach().double().flatten(1)  # batched: a Python loop of small ops costs more
        have = [i for i, f in enumerate(frames) if f in self._phi]
        if have:
            prev = torch.stack([self._phi[frames[i]] for i in have]).flatten(1).double()
            mine = cur if len(have) == len(frames) else cur[have]
            num = (mine - prev).abs_().sum(1).tolist()
            for j, i in enumerate(have):
                out[i] = (num[j], self._norm[frames[i]])
        norms = cur.abs().sum(1).tolist()
        for i, f in enumerate(frames):
            self._phi[f] = phi[i].detach().clone()
            self._norm[f] = norms[i]
        return out

    def seen(self, frames: list[int]) -> int:
        return sum(1 for f in frames if f in self._phi)

    def drop_before(self, frame: int) -> None:
        for f in [f for f in self._phi if f < frame]:
            del self._phi[f], self._norm[f]

    def __len__(self) -> int:
        return len(self._phi)

    def frames(self) -> set[int]:
        return set(self._phi)

    def keyed(self) -> list[FrameKeyed]:
        """For Topology.migrate: the previous feature of a frame lives on the rank that computed it."""
        return [FrameKeyed(self._phi), FrameKeyed(self._norm)]

    def state_dict(self) -> dict:
        return {"phi": dict(self._phi), "norm": dict(self._norm)}

    def load_state_dict(self, state: dict) -> None:
        self._phi = {int(f): t for f, t in state["phi"].items()}
        self._norm = {int(f): float(n) for f, n in state["norm"].items()}
