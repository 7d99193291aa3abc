"""SCOPE's tri-modal step policy (paper section 3.3 and 3.5, Eq. 3-5).

r_k^- = r_{k-1} + d_k with d_k the relative L1 change of the host feature (Eq. 4). Candidate mode
(Eq. 3): Cache if r^- < tau_c and a velocity is cached, Predict if tau_c <= r^- < tau_p and the
history suffices, else Recompute. Stability controls: after Predict r = lambda * r^-; after Cache
r = r^-; Recompute resets r to 0; at most H consecutive non-Recompute iterations; the first
`warmup` iterations of every window always recompute.

`feature` names the signal phi of Eq. 4: the adapter's host feature (the paper's), or another
pre-forward signal the adapter offers (signals.Feature), for the ablation of the host feature.
"""

from __future__ import annotations

from dataclasses import dataclass

from scopevid.errors import ConfigError
from scopevid.scheduler import predictors
from scopevid.scheduler.policies.base import Decision, Discrepancy, Mode, Policy, StepContext
from scopevid.scheduler.signals import Feature


@dataclass(frozen=True)
class ScopeConfig:
    tau_c: float
    tau_p: float
    decay: float  # lambda (paper: 0.75; the number lives in configs/policies/*.yaml)
    horizon: int  # H: consecutive non-Recompute iterations at most (paper: 5)
    warmup: int = 2  # iterations per window that always recompute
    eps: float = 1e-8
    predictor: str = "taylor2"
    feature: str = "host"  # phi of Eq. 4 (signals.Feature); the model must offer it

    def __post_init__(self) -> None:
        if not 0.0 <= self.tau_c <= self.tau_p:
            raise ConfigError(f"tau_c/tau_p: need 0 <= tau_c <= tau_p, got tau_c={self.tau_c}, tau_p={self.tau_p}")
        if not 0.0 < self.decay <= 1.0:
            raise ConfigError(f"decay: lambda must be in (0, 1], got {self.decay}")
        if self.horizon < 0:
            raise ConfigError(f"horizon: H must be >= 0, got {self.horizon}")
        if self.warmup < 0:
            raise ConfigError(f"warmup: must be >= 0, got {self.warmup}")
        if self.predictor not in predictors.PREDICTORS:
            raise ConfigError(f"predictor: unknown {self.predictor!r}; allowed: {', '.join(predictors.PREDICTORS)}")
        if self.feature not in {f.value for f in Feature}:
            raise ConfigError(f"feature: must be one of {', '.join(f.value for f in Feature)}, got {self.feature!r}")


class Scope(Policy):
    name = "scope"
    needs_feature = True

    def __init__(self, cfg: ScopeConfig, name: str = "scope"):
        self.cfg = cfg
        self.name = name
        self.feature = Feature(cfg.feature)
        self.r = 0.0  # accumulated discrepancy after the last decision
        self.run = 0  # consecutive non-Recompute iterations
        self._pending: float = 0.0  # r^- of the current decision

    def decide(self, ctx: StepContext, disc: Discrepancy | None) -> Decision:
        cfg = self.cfg
        d = None if disc is None else disc.value(cfg.eps)
        r_minus = self.r + (d or 0.0)
        self._pending = r_minus
        if ctx.index < cfg.warmup:
            return Decision(Mode.RECOMPUTE, d, r_minus, "warmup")
        if d is None:
            return Decision(Mode.RECOMPUTE, d, r_minus, "no-feature-history")
        if self.run >= cfg.horizon:
            return Decision(Mode.RECOMPUTE, d, r_minus, "horizon")
        # Eq. 3: each band allows exactly one cheap mode; without what that mode needs, Recompute.
        if r_minus < cfg.tau_c:
            if ctx.cache_ready:
                return Decision(Mode.CACHE, d, r_minus, "below-tau_c")
            return Decision(Mode.RECOMPUTE, d, r_minus, "no-cache")
        if r_minus < cfg.tau_p:
            if ctx.history >= predictors.min_history(cfg.predictor):
                return Decision(Mode.PREDICT, d, r_minus, "below-tau_p")
            return Decision(Mode.RECOMPUTE, d, r_minus, "no-history")
        return Decision(Mode.RECOMPUTE, d, r_minus, "above-tau_p")  # also a NaN r^-

    def record(self, mode: Mode) -> None:
        if mode == Mode.RECOMPUTE:
            self.r, self.run = 0.0, 0
        elif mode == Mode.PREDICT:
            self.r, self.run = self.cfg.decay * self._pending, self.run + 1
        else:
            self.r, self.run = self._pending, self.run + 1

    def state_dict(self) -> dict:
        return {"r": self.r, "run": self.run}

    def load_state_dict(self, state: dict) -> None:
        self.r, self.run = float(state["r"]), int(state["run"])
