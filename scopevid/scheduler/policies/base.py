"""The one interface every step policy implements (SCOPE and the baselines).

Per iteration the engine asks `decide`, acts, then calls `record` with the mode it really took
(a Predict can fall back to Recompute when the prediction fails its stability check). A policy
sees only reduced scalars, never tensors or ranks, so every rank that feeds it the same all-reduced
sums takes the same decision, and no collective can hide inside one branch.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Mode(IntEnum):
    RECOMPUTE = 0
    CACHE = 1
    PREDICT = 2

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Discrepancy:
    """The two partial sums of Eq. 4, summed over frames (and ranks) in float64."""

    num: float  # sum |phi_k - phi_{k-1}|
    den: float  # sum |phi_{k-1}|

    def value(self, eps: float) -> float:
        return self.num / (self.den + eps)


@dataclass(frozen=True)
class StepContext:
    """What a policy may know about the iteration besides the discrepancy."""

    serial: int  # iteration over the whole rollout
    index: int  # iteration within the current window
    window: int
    num_steps: int
    cache_ready: bool  # every active frame has a recomputed velocity to reuse
    history: int  # fewest recomputed velocities held by any active frame
    min_step: int  # smallest denoising step (0-based) among active frames
    max_step: int  # largest denoising step (0-based) among active frames


@dataclass(frozen=True)
class Decision:
    mode: Mode
    d: float | None = None  # d_k of Eq. 4 (None when no previous feature)
    r: float | None = None  # r_k^- of Eq. 5, the score the thresholds were compared with
    reason: str = ""  # why: warmup, horizon, threshold, no-history, ...


class Policy:
    """Base class. Subclasses set `name` and `needs_feature` and implement `decide`."""

    name = "policy"
    needs_feature = False  # whether the engine must compute the host feature

    def decide(self, ctx: StepContext, disc: Discrepancy | None) -> Decision:
        raise NotImplementedError

    def record(self, mode: Mode) -> None:
        """The mode actually taken at this iteration."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
