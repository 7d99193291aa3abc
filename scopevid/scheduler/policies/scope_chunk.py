"""SCOPE with per-chunk decisions, for chunk-causal schedules (MAGI-1): an additive variant of `Scope`.

The paper decides once per iteration from one discrepancy summed over the whole window (Eq. 4-5).
Under MAGI-1's pipeline the window holds up to four chunks at different stages, and a chunk that
just entered (pure noise, moving fast) or one about to finish is averaged with the others. Here every
chunk keeps its own accumulated score r_c (Eq. 5 per chunk, from its own frames' feature sums in
`Discrepancy.chunks`) and its own candidate mode (Eq. 3). One forward still serves the whole window
(the chunks attend each other's K/V), so the iteration takes the most conservative candidate:
Recompute if any chunk needs it, else Predict if any chunk needs it, else Cache. The stability controls
are the paper's: lambda decay after Predict, reset after Recompute, at most H consecutive
non-Recompute iterations; warmup applies per chunk (its first `warmup` iterations recompute).

The engine fills `Discrepancy.chunks` for a policy that sets `chunk_sums` (chunks of `chunk` frames).
"""

from __future__ import annotations

from dataclasses import dataclass

from scopevid.errors import ConfigError
from scopevid.scheduler.policies.base import Decision, Discrepancy, Mode, Policy, StepContext
from scopevid.scheduler.signals import Feature
from scopevid.scheduler.policies.scope import ScopeConfig

_SEVERITY = {Mode.CACHE: 0, Mode.PREDICT: 1, Mode.RECOMPUTE: 2}


@dataclass(frozen=True)
class ScopeChunkConfig(ScopeConfig):
    """ScopeConfig (same fields, same checks) plus the chunk width; warmup counts per chunk."""

    chunk: int = 6  # latent frames per chunk (MAGI-1: 6)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk < 1:
            raise ConfigError(f"chunk: must be >= 1 latent frame, got {self.chunk}")


class ScopeChunk(Policy):
    name = "scope_chunk"
    needs_feature = True
    chunk_sums = True

    def __init__(self, cfg: ScopeChunkConfig, name: str = "scope_chunk"):
        self.cfg, self.name = cfg, name
        self.feature = Feature(cfg.feature)
        self.chunk = cfg.chunk
        self.r: dict[int, float] = {}  # accumulated score per chunk after the last decision
        self.age: dict[int, int] = {}  # iterations a chunk has been scored
        self.run = 0  # consecutive non-Recompute iterations
        self._pending: dict[int, float] = {}

    def decide(self, ctx: StepContext, disc: Discrepancy | None) -> Decision:
        cfg = self.cfg
        per = disc.chunk_values(cfg.eps) if disc is not None else {}
        self._pending = {c: self.r.get(c, 0.0) + d for c, d in per.items()}
        for c in per:
            self.age[c] = self.age.get(c, 0) + 1
        d_max = max(per.values(), default=None)
        r_max = max(self._pending.values(), default=0.0)
        if ctx.index < cfg.warmup:
            return Decision(Mode.RECOMPUTE, d_max, r_max, "warmup")
        if not per:
            return Decision(Mode.RECOMPUTE, d_max, r_max, "no-feature-history")
        if self.run >= cfg.horizon:
            return Decision(Mode.RECOMPUTE, d_max, r_max, "horizon")
        young = [c for c in per if self.age[c] < cfg.warmup]  # + its unscored first iteration
        if young:
            return Decision(Mode.RECOMPUTE, d_max, r_max, f"chunk-warmup:{young[0]}")
        mode, why = Mode.CACHE, "below-tau_c"
        for c, r in sorted(self._pending.items()):
            if r < cfg.tau_c and ctx.cache_ready:
                cand, reason = Mode.CACHE, "below-tau_c"
            elif r < cfg.tau_p and ctx.history >= 2:
                cand, reason = Mode.PREDICT, "below-tau_p"
            else:
                cand, reason = Mode.RECOMPUTE, ("above-tau_p" if r >= cfg.tau_p else "no-history")
            if _SEVERITY[cand] > _SEVERITY[mode]:
                mode, why = cand, f"{reason}:chunk{c}"
        return Decision(mode, d_max, r_max, why)

    def record(self, mode: Mode) -> None:
        if mode == Mode.RECOMPUTE:
            self.r, self.run = {c: 0.0 for c in self._pending}, 0
        elif mode == Mode.PREDICT:
            self.r, self.run = {c: self.cfg.decay * r for c, r in self._pending.items()}, self.run + 1
        else:
            self.r, self.run = dict(self._pending), self.run + 1
        self.age = {c: a for c, a in self.age.items() if c in self._pending}  # chunks that left the window

    def state_dict(self) -> dict:
        return {"r": dict(self.r), "age": dict(self.age), "run": self.run}

    def load_state_dict(self, state: dict) -> None:
        self.r = {int(c): float(v) for c, v in state["r"].items()}
        self.age = {int(c): int(v) for c, v in state["age"].items()}
        self.run = int(state["run"])


def _build(params: dict, name: str) -> ScopeChunk:
    from scopevid.validation import build

    return ScopeChunk(build(ScopeChunkConfig, params, f"policies.{name}.", "ScopeChunk"), name=name)
