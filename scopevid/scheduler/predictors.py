"""Velocity extrapolation in the noise-level coordinate (paper Eq. 6-7) and its stability checks.

A predictor sees one frame's history of *recomputed* velocities [(sigma, v), ...], oldest first,
and a target sigma, and returns an estimate of v at the target. Inputs are tensors (or anything
with arithmetic); nothing here touches a model.

- taylor1: Eq. 6, forward difference slope times (sigma* - sigma_k).
- taylor2: Eq. 7 exactly as printed: Eq. 6 plus 0.5 * (second divided difference over the mean
  spacing) * (sigma* - sigma_k)^2. Note: for a velocity exactly quadratic in sigma, v = a + b s + c s^2,
  Eq. 7 is off by c * (sigma_{k-1} - sigma_k) * (sigma* - sigma_k), because its slope is the backward
  difference rather than the derivative at sigma_k.
- newton2: the quadratic through the last three points (Newton form); exact for quadratics. It is
  what Eq. 7 approximates; offered so users can choose and the difference can be measured.
- momentum: v_k + (beta * slope_k + (1 - beta) * slope_{k-1}) * (sigma* - sigma_k): a smoothed slope.
- auto: back-tests taylor1 and taylor2 on the newest history point and uses the one that
  predicted it better (falls back to taylor1 when history is too short to back-test).

Each uses the highest order its history supports (a frame with two points gets taylor1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

History = Sequence[tuple[float, object]]  # [(sigma, v)], oldest first

PREDICTORS = ("taylor1", "taylor2", "newton2", "momentum", "auto")


def min_history(name: str) -> int:
    """Points a predictor needs at the least (it degrades to taylor1 above this)."""
    return 2


def taylor1(hist: History, target: float):
    (s1, v1), (s0, v0) = hist[-2], hist[-1]
    return v0 + (v0 - v1) / (s0 - s1) * (target - s0)


def taylor2(hist: History, target: float):
    if len(hist) < 3:
        return taylor1(hist, target)
    (s2, v2), (s1, v1), (s0, v0) = hist[-3], hist[-2], hist[-1]
    d_prev, d_prev2 = s0 - s1, s1 - s2  # Δσ_{k-1}, Δσ_{k-2}
    slope, slope_prev = (v0 - v1) / d_prev, (v1 - v2) / d_prev2
    curv = (slope - slope_prev) / ((d_prev + d_prev2) / 2)
    dt = target - s0  # Δσ_k
    return v0 + slope * dt + 0.5 * curv * dt * dt


def newton2(hist: History, target: float):
    if len(hist) < 3:
        return taylor1(hist, target)
    (s2, v2), (s1, v1), (s0, v0) = hist[-3], hist[-2], hist[-1]
    f01 = (v0 - v1) / (s0 - s1)
    f12 = (v1 - v2) / (s1 - s2)
    f012 = (f01 - f12) / (s0 - s2)
    return v0 + f01 * (target - s0) + f012 * (target - s0) * (target - s1)


def momentum(hist: History, target: float, beta: float = 0.7):
    if len(hist) < 3:
        return taylor1(hist, target)
    (s2, v2), (s1, v1), (s0, v0) = hist[-3], hist[-2], hist[-1]
    slope = beta * (v0 - v1) / (s0 - s1) + (1 - beta) * (v1 - v2) / (s1 - s2)
    return v0 + slope * (target - s0)


def auto(hist: History, target: float):
    if len(hist) < 4:
        return taylor1(hist, target)
    s_last, v_last = hist[-1]
    err1 = _l1(taylor1(hist[:-1], s_last) - v_last)
    err2 = _l1(taylor2(hist[:-1], s_last) - v_last)
    return taylor2(hist, target) if err2 < err1 else taylor1(hist, target)


def _l1(x) -> float:
    return float(x.abs().sum()) if hasattr(x, "abs") else abs(x)


_TABLE: dict[str, Callable] = {
    "taylor1": taylor1,
    "taylor2": taylor2,
    "newton2": newton2,
    "momentum": momentum,
    "auto": auto,
}


def get(name: str) -> Callable:
    if name not in _TABLE:
        from scopevid.errors import ConfigError

        raise ConfigError(f"predictor: unknown {name!r}; allowed: {', '.join(PREDICTORS)}")
    return _TABLE[name]


@dataclass(frozen=True)
class Stability:
    """Bounds on a prediction relative to the newest recomputed velocity.

    Ratios are of L2 norms summed over all frames (and all ranks: the caller reduces the sums,
    so every rank reaches the same verdict). A non-finite prediction, or one whose change from
    v_k exceeds `explode` * |v_k|, is rejected (the step falls back to Recompute); a change above
    `clip` * |v_k| is scaled down to that size (conservative clipping).

    `max_velocity` bounds what a forward may return: the largest |v| element, per unit of guidance
    scale (`velocity_bound`). A flow-matching velocity eps - x0 is O(1) in latent units (healthy
    models stay below ~10 per unit of guidance); far above it the weights are corrupt and the run
    stops (docs/DESIGN_NOTES.md).
    """

    clip: float = 1.0
    explode: float = 4.0
    max_velocity: float = 1000.0

    def __post_init__(self) -> None:
        from scopevid.errors import ConfigError

        for field, what in (("clip", "ratio"), ("explode", "ratio"), ("max_velocity", "number")):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < math.inf:
                raise ConfigError(f"stability.{field}: must be a finite {what} > 0, got {value!r}")

    def velocity_bound(self, guidance: float) -> float:
        """The largest |v| element a forward may return: classifier-free guidance scales the guided
        velocity's branch difference by `guidance`, so the bound scales with it (never below 1x)."""
        return self.max_velocity * max(1.0, float(guidance))

    def verdict(self, delta_sq: float, ref_sq: float, nonfinite: float) -> tuple[bool, float]:
        """(accept, scale for the delta) from reduced sums: |v̂-v_k|^2, |v_k|^2, count of non-finite."""
        # any non-finite input rejects: a NaN or inf |v_k| would otherwise pass every comparison below
        if nonfinite > 0 or not (math.isfinite(delta_sq) and math.isfinite(ref_sq)):
            return False, 0.0
        ref = ref_sq**0.5
        delta = delta_sq**0.5
        if ref == 0.0:
            return delta == 0.0, 1.0
        if delta > self.explode * ref:
            return False, 0.0
        if delta > self.clip * ref:
            return True, self.clip * ref / delta
        return True, 1.0
