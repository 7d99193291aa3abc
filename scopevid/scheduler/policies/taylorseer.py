"""TaylorSeer (Liu et al., ICCV 2025), as Shenyi-Z/TaylorSeer runs it on Wan2.1.

Schedule (cal_type / force_scheduler): the first `first_enhance` iterations compute fully; after that
a full compute every `interval` (N, `fresh_threshold`) iterations, Taylor forecasts in between. The
decision is taken once per iteration (the official code decides on the cond stream and the uncond
stream follows), from the iteration index alone: no signal.

The forecast (engine/reuse.py, `reuse = "modules"`): every full compute stores, per block and module
(self-attention and MLP outputs before their gates), per frame and CFG branch, the value F0 and
finite differences over the iteration index, F_{i+1} = (F_i - F_i,prev) / (distance between the two
last full computes), up to `order`. A forecast step adds sum_i F_i d^i / i! (d = iterations since
the last full compute) to the residual stream with this iteration's gates, block after block, then
runs the head: no attention, no MLP. `granularity: stack` is our simplification (one forecast of the
whole block stack's residual instead of per module; measured in docs/BENCHMARKS.md).

In diffusion forcing the iteration index is the window's loop index, as it would be in a port of the
official loop; state restarts with every window.
"""

from __future__ import annotations

from dataclasses import dataclass

from scopevid.errors import ConfigError
from scopevid.scheduler.policies.base import Decision, Discrepancy, Mode, Policy, Reuse, StepContext

GRANULARITIES = ("modules", "stack")


@dataclass(frozen=True)
class TaylorSeerConfig:
    interval: int = 5  # N: full compute every N-th iteration (Wan default fresh_threshold 5)
    order: int = 1  # highest finite-difference order (Wan default max_order 1)
    first_enhance: int = 1  # leading iterations per window that compute fully
    granularity: str = "modules"  # modules (official) | stack (simplification)

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ConfigError(f"interval: N must be >= 1, got {self.interval}")
        if self.order < 0:
            raise ConfigError(f"order: must be >= 0, got {self.order}")
        if self.first_enhance < 1:
            raise ConfigError(f"first_enhance: must be >= 1 (a forecast needs one full compute), got {self.first_enhance}")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity: must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")


class TaylorSeer(Policy):
    needs_feature = False
    reuse = Reuse.MODULES

    def __init__(self, cfg: TaylorSeerConfig, name: str = "taylorseer"):
        self.cfg, self.name = cfg, name
        self.counter = 0  # forecast iterations since the last full compute (cache_counter)

    def decide(self, ctx: StepContext, disc: Discrepancy | None = None) -> Decision:
        cfg = self.cfg
        if ctx.index == 0:
            self.counter = 0
        if ctx.index < cfg.first_enhance:
            return Decision(Mode.RECOMPUTE, reason="first-enhance")
        if self.counter >= cfg.interval - 1:
            return Decision(Mode.RECOMPUTE, reason="interval")
        return Decision(Mode.PREDICT, reason="taylor")

    def record(self, mode: Mode) -> None:
        self.counter = 0 if mode == Mode.RECOMPUTE else self.counter + 1

    def state_dict(self) -> dict:
        return {"counter": self.counter}

    def load_state_dict(self, state: dict) -> None:
        self.counter = int(state["counter"])
