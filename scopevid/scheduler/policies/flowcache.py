"""FlowCache (Ma et al., ICLR 2026; mikeallen39/FlowCache), chunk-wise caching for AR video.

As FlowCache4SkyReels-V2 runs it: the window is split into chunks (causal blocks). Only chunks up to
the last active one are forwarded, finished chunks are not (they are attended as clean K/V), and
not-yet-started ones are not either (`interval = "active"`). Each chunk keeps its own TeaCache
state: its first `ret_steps` denoising steps and (with `last_step`) its last one always compute;
otherwise acc[c] += poly(d_c), d_c the relative L1 change of the chunk's signal (e0, the timestep
projection, with ret-steps), and the chunk computes iff acc[c] >= thresh (then acc[c] = 0); a
skipped chunk adds its cached block-stack residual (engine/reuse.py, `reuse = "chunks"`). Chunks
that compute attend to skipped earlier chunks through those chunks' K/V from their last compute.
The MAGI-1 variant is the same rule on the patch-embedded latent (`feature: embed`) with the raw
distance (`coefficients: [1, 0]`).

Differences from the official code: one decision set per iteration for both CFG branches (the
signal does not depend on the prompt, so the per-branch states are equal); a chunk that just
finished gets its clean K/V from the engine's clean re-forward (the official code keeps the K/V of
its last noisy step), the same clean context every other policy and Original use; `finished_kv:
last_step` restores the official behaviour (its effect is measured in docs/BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from scopevid.errors import ConfigError
from scopevid.scheduler.policies.base import Decision, Discrepancy, Mode, Policy, Reuse, StepContext
from scopevid.scheduler.signals import Feature
from scopevid.scheduler.policies.teacache import check_rescaled_rule, poly1d


@dataclass(frozen=True)
class FlowCacheConfig:
    thresh: float
    coefficients: tuple[float, ...] = (1.0, 0.0)  # highest power first; (1, 0) = raw distance (MAGI-1)
    ret_steps: int = 5  # leading denoising steps of every chunk that compute
    last_step: bool = True  # a chunk's last denoising step computes (cutoff = steps - 1)
    feature: str = "temb_mod"
    chunk: int | None = None  # latent frames per chunk; None = the plan's causal block size
    finished_kv: str = "clean"  # clean: the engine's clean re-forward; last_step: the K/V of the chunk's
    # last (noisy) computed step become its context, as the official code does (saves that re-forward)
    eps: float = 1e-12

    def __post_init__(self) -> None:
        check_rescaled_rule(self)
        if self.chunk is not None and self.chunk < 1:
            raise ConfigError(f"chunk: must be >= 1 latent frame or null, got {self.chunk}")
        if self.finished_kv not in ("clean", "last_step"):
            raise ConfigError(f"finished_kv: clean or last_step, got {self.finished_kv!r}")


class FlowCache(Policy):
    needs_feature = True
    reuse = Reuse.CHUNKS
    chunk_sums = True  # only the active chunks' span is forwarded: engine/reuse.py ChunkExecutor

    def __init__(self, cfg: FlowCacheConfig, name: str = "flowcache"):
        self.cfg, self.name = cfg, name
        self.feature = Feature(cfg.feature)
        self.chunk = cfg.chunk
        self.acc: dict[int, float] = {}  # per chunk, since its last compute
        self.computed: set[int] = set()  # chunks computed in this window (they have a residual)
        self._pending: dict[int, float] = {}
        self._skip: frozenset[int] = frozenset()
        self._decided = Mode.RECOMPUTE

    def decide(self, ctx: StepContext, disc: Discrepancy | None) -> Decision:
        cfg = self.cfg
        if ctx.index == 0:
            self.acc, self.computed = {}, set()
        dist = disc.chunk_values(cfg.eps) if disc is not None else {}
        pending, skip, active = {}, set(), 0
        for ch in ctx.chunks:
            if not ch.active:
                continue
            active += 1
            pending[ch.chunk] = 0.0
            if ch.step < cfg.ret_steps or (cfg.last_step and ch.step >= ctx.num_steps - 1):
                continue
            if ch.chunk not in dist or ch.chunk not in self.computed:
                continue
            acc = self.acc.get(ch.chunk, 0.0) + poly1d(cfg.coefficients, dist[ch.chunk])
            if acc < cfg.thresh:
                pending[ch.chunk] = acc
                skip.add(ch.chunk)
        self._pending, self._skip = pending, frozenset(skip)
        d = None if disc is None else disc.value(cfg.eps)
        r = max((pending[c] for c in skip), default=None)
        mode = Mode.CACHE if active and len(skip) == active else Mode.RECOMPUTE
        self._decided = mode
        return Decision(mode, d, r, f"chunks {active - len(skip)}/{active} computed", skip=self._skip)

    def record(self, mode: Mode) -> None:
        # the engine honours the skip set; it computes every chunk only when an all-skip (Cache)
        # decision cannot be served, and then reports Recompute
        fell_back = self._decided == Mode.CACHE and mode == Mode.RECOMPUTE
        for c, acc in self._pending.items():
            if c in self._skip and not fell_back:
                self.acc[c] = acc
            else:
                self.acc[c] = 0.0
                self.computed.add(c)

    def state_dict(self) -> dict:
        return {"acc": dict(self.acc), "computed": sorted(self.computed)}

    def load_state_dict(self, state: dict) -> None:
        self.acc = {int(k): float(v) for k, v in state["acc"].items()}
        self.computed = {int(c) for c in state["computed"]}
