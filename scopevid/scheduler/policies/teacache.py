"""TeaCache (Liu et al., CVPR 2025), as ali-vilab/TeaCache and SkyReels-V2's transformer.py run it.

Per denoising loop (here: per diffusion-forcing window, whose iterations are SkyReels-V2's loop):
- the first `ret_steps` iterations always compute (and, with `last_step`, the window's last one);
- otherwise acc += poly(d), with d = mean|f_k - f_{k-1}| / mean|f_{k-1}| the relative L1 change of
  the signal f (the timestep embedding e, or its adaLN projection e0 with ret-steps) and poly the
  model's 4th-degree rescaling polynomial (highest power first, numpy.poly1d order);
- compute iff acc >= thresh (then acc = 0), else reuse: the engine adds the block stack's residual
  (its output minus input at the last computed iteration) to this iteration's embedded input and runs
  the head with this iteration's modulation (`reuse = "stack"`).
f_{k-1} is the previous iteration's signal whatever was decided there (the engine keeps it per frame).

The official code keeps this state per CFG branch; the signal does not depend on the prompt, so both
branches take the same decision and one decision per iteration is the same rule. The residual is
kept per branch (and per frame) by the engine. Differences from the official DF code, on purpose:
its counter counts forward *calls* (two per iteration under CFG) and wraps at `num_steps`
iterations, so it re-forces ret-steps halfway through every window and never reaches its cutoff;
we count iterations, as TeaCache4Wan2.1 does (docs/BENCHMARKS.md measures both readings' cost).
"""

from __future__ import annotations

from dataclasses import dataclass

from scopevid.errors import ConfigError
from scopevid.scheduler.policies.base import Decision, Discrepancy, Mode, Policy, Reuse, StepContext
from scopevid.scheduler.signals import Feature

FEATURES = tuple(f.value for f in Feature)


def check_rescaled_rule(cfg) -> None:
    """Checks shared by TeaCache and FlowCache: the threshold, the rescaling polynomial, the forced
    leading steps and the signal. Normalises `coefficients` to a tuple of floats."""
    object.__setattr__(cfg, "coefficients", tuple(float(c) for c in cfg.coefficients))
    if not cfg.thresh >= 0:
        raise ConfigError(f"thresh: must be >= 0, got {cfg.thresh}")
    if not cfg.coefficients:
        raise ConfigError("coefficients: need at least one polynomial coefficient")
    if cfg.ret_steps < 0:
        raise ConfigError(f"ret_steps: must be >= 0, got {cfg.ret_steps}")
    if cfg.feature not in FEATURES:
        raise ConfigError(f"feature: must be one of {', '.join(FEATURES)}, got {cfg.feature!r}")


def poly1d(coefficients: tuple[float, ...], x: float) -> float:
    """numpy.poly1d(coefficients)(x), highest power first (Horner)."""
    out = 0.0
    for c in coefficients:
        out = out * x + c
    return out


@dataclass(frozen=True)
class TeaCacheConfig:
    thresh: float  # accumulated rescaled distance below which the residual is reused
    coefficients: tuple[float, ...] = (1.0, 0.0)  # per model, highest power first; (1, 0) = raw distance
    ret_steps: int = 5  # leading iterations per window that always compute (5 with use_ret_steps, else 1)
    last_step: bool = False  # the window's last iteration always computes (non-ret cutoff)
    feature: str = "temb_mod"  # temb_mod = e0 (use_ret_steps), temb = e, host = first-block modulated input
    eps: float = 1e-12
    period: int | None = None  # None: count iterations per window (Wan). k: restart the counter every k
    # iterations, the official SkyReels-V2 DF behaviour (its call counter wraps at num_steps calls)

    def __post_init__(self) -> None:
        check_rescaled_rule(self)
        if self.period is not None and self.period < 1:
            raise ConfigError(f"period: must be >= 1 iteration or null, got {self.period}")


class TeaCache(Policy):
    needs_feature = True
    reuse = Reuse.STACK

    def __init__(self, cfg: TeaCacheConfig, name: str = "teacache"):
        self.cfg, self.name = cfg, name
        self.feature = Feature(cfg.feature)
        self.acc = 0.0  # accumulated rescaled distance since the last compute
        self._pending = 0.0

    def decide(self, ctx: StepContext, disc: Discrepancy | None) -> Decision:
        cfg = self.cfg
        if ctx.index == 0:  # a new window is a new denoising loop
            self.acc = 0.0
        d = None if disc is None else disc.value(cfg.eps)
        count = ctx.index if cfg.period is None else ctx.index % cfg.period
        self._pending = 0.0
        if count < cfg.ret_steps:
            return Decision(Mode.RECOMPUTE, d, None, "ret-steps")
        if cfg.last_step and ctx.last:
            return Decision(Mode.RECOMPUTE, d, None, "cutoff")
        if d is None:
            return Decision(Mode.RECOMPUTE, d, None, "no-feature-history")
        acc = self.acc + poly1d(cfg.coefficients, d)
        if acc < cfg.thresh:
            self._pending = acc
            return Decision(Mode.CACHE, d, acc, "below-thresh")
        return Decision(Mode.RECOMPUTE, d, acc, "above-thresh")

    def record(self, mode: Mode) -> None:
        self.acc = self._pending if mode == Mode.CACHE else 0.0

    def state_dict(self) -> dict:
        return {"acc": self.acc}

    def load_state_dict(self, state: dict) -> None:
        self.acc = float(state["acc"])
