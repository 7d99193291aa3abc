"""The one interface every step policy implements (SCOPE and the baselines).

Per iteration the engine asks `decide`, acts, then calls `record` with the mode it really took
(a Predict can fall back to Recompute when the prediction fails its stability check). A policy
sees only reduced scalars, never tensors or ranks, so every rank that feeds it the same all-reduced
sums takes the same decision, and no collective can hide inside one branch.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, IntEnum

from scopevid.scheduler.signals import Feature


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
    chunks: tuple[tuple[int, float, float], ...] = ()  # (chunk, num, den) per chunk, for chunk policies

    def value(self, eps: float) -> float:
        return self.num / (self.den + eps)

    def chunk_values(self, eps: float) -> dict[int, float]:
        """Relative L1 change per chunk (chunks whose frames had a previous feature)."""
        return {c: n / (d + eps) for c, n, d in self.chunks}


@dataclass(frozen=True)
class ChunkState:
    """One chunk (a causal block of frames) of the window, for policies that decide per chunk."""

    chunk: int  # absolute frame // chunk size
    step: int  # its denoising step, 0-based (SkyReels-V2/FlowCache's per-chunk counter)
    active: bool  # it advances at this iteration


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
    last: bool = False  # the last iteration of the window (every frame takes its last step)
    chunks: tuple[ChunkState, ...] = ()  # filled for policies with chunk_sums


@dataclass(frozen=True)
class Decision:
    mode: Mode
    d: float | None = None  # d_k of Eq. 4 (None when no previous feature)
    r: float | None = None  # r_k^- of Eq. 5, the score the thresholds were compared with
    reason: str = ""  # why: warmup, horizon, threshold, no-history, ...
    skip: frozenset[int] = frozenset()  # chunk policies: chunks that reuse instead of computing
    blocks: tuple[int, int] | None = None  # block-range policies: [lo, hi) blocks whose delta is reused


class Reuse(str, Enum):
    """How a policy's Cache / Predict are carried out (engine/reuse.py has one executor per kind)."""

    VELOCITY = "velocity"  # the engine reuses or extrapolates whole velocities (SCOPE, Original)
    STACK = "stack"  # TeaCache: the block stack's residual
    MODULES = "modules"  # TaylorSeer: per-block module outputs forecast by Taylor series
    BLOCKS = "blocks"  # Delta-DiT: a block range skipped, its delta added
    CHUNKS = "chunks"  # FlowCache: per chunk, skipped chunks take their residual


class Policy:
    """Base class. Subclasses set `name` and what they need, and implement `decide`.

    What the engine reads, all declared here with defaults:
      needs_feature  compute the discrepancy (Eq. 4) before deciding
      feature        the signal it is taken on (Feature.HOST: adapter.host_feature)
      reuse          how Cache / Predict act (Reuse.VELOCITY: whole velocities)
      chunk_sums     also give per-chunk sums (Discrepancy.chunks) and per-chunk states (ctx.chunks)
      chunk          latent frames per chunk for those (None: the plan's causal block or chunk)
    """

    name = "policy"
    needs_feature = False
    feature: Feature = Feature.HOST
    reuse: Reuse = Reuse.VELOCITY
    chunk_sums = False
    chunk: int | None = None

    def decide(self, ctx: StepContext, disc: Discrepancy | None) -> Decision:
        raise NotImplementedError

    def record(self, mode: Mode) -> None:
        """The mode actually taken at this iteration."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
