"""Delta-DiT (Chen et al., 2024, arXiv 2406.01125; no official code), Delta-Cache over a block range.

Front blocks shape outline, rear blocks detail. Every `interval` (N) iterations, and in the first
`warmup` of a window, the whole model runs and the engine stores, per frame and CFG branch, the delta
(output minus input) of the front and of the rear block range. In between, the cached range is
skipped and its stored delta is added to its current input (engine/reuse.py, `reuse = "blocks"`):
the *rear* range before the stage boundary b (outline stage, early steps), the *front* range after
it (detail stage). The range is a fraction of the model's depth, so one preset serves models of any
depth (at least one block, at most depth - 1).

AR adaptation (as the SCOPE paper does, "block-skip decisions per AR unit"): counters restart with
every window; the stage is that of the iteration's active frames, by their mean denoising step.
"""

from __future__ import annotations

from dataclasses import dataclass

from scopevid.errors import ConfigError
from scopevid.scheduler.policies.base import Decision, Discrepancy, Mode, Policy, Reuse, StepContext


@dataclass(frozen=True)
class DeltaDiTConfig:
    interval: int = 2  # N: full compute every N-th iteration
    fraction: float = 0.5  # cached block range as a fraction of the depth
    boundary: float = 0.5  # b as a fraction of the denoising steps: rear range before, front after
    warmup: int = 1  # leading iterations per window that compute fully

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ConfigError(f"interval: N must be >= 1, got {self.interval}")
        if not 0.0 < self.fraction < 1.0:
            raise ConfigError(f"fraction: the cached range must be a fraction in (0, 1) of the depth, got {self.fraction}")
        if not 0.0 <= self.boundary <= 1.0:
            raise ConfigError(f"boundary: must be a fraction of the steps in [0, 1], got {self.boundary}")
        if self.warmup < 1:
            raise ConfigError(f"warmup: must be >= 1 (a delta needs one full compute), got {self.warmup}")


class DeltaDiT(Policy):
    needs_feature = False
    reuse = Reuse.BLOCKS

    def __init__(self, cfg: DeltaDiTConfig, name: str = "deltadit"):
        self.cfg, self.name = cfg, name
        self.counter = 0

    def decide(self, ctx: StepContext, disc: Discrepancy | None = None) -> Decision:
        cfg = self.cfg
        if ctx.index == 0:
            self.counter = 0
        if ctx.index < cfg.warmup:
            return Decision(Mode.RECOMPUTE, reason="warmup")
        if self.counter >= cfg.interval - 1:
            return Decision(Mode.RECOMPUTE, reason="interval")
        stage = (ctx.min_step + ctx.max_step) / 2.0
        if stage < cfg.boundary * ctx.num_steps:
            return Decision(Mode.CACHE, reason="rear-blocks", blocks=(1.0 - cfg.fraction, 1.0))
        return Decision(Mode.CACHE, reason="front-blocks", blocks=(0.0, cfg.fraction))

    def record(self, mode: Mode) -> None:
        self.counter = 0 if mode == Mode.RECOMPUTE else self.counter + 1

    def state_dict(self) -> dict:
        return {"counter": self.counter}

    def load_state_dict(self, state: dict) -> None:
        self.counter = int(state["counter"])
