"""The rollout loop (DESIGN.md, "data flow of one iteration").

For every iteration of the plan: host feature on this process's shard -> reduced discrepancy sums
-> policy decision -> velocity by forward (Recompute), extrapolation (Predict) or reuse (Cache)
-> solver step on the active frames -> finished frames leave as clean latents, in order.

`Rollout.run()` is a generator of (absolute latent index, clean latent [C, H, W]) so callers can
decode and write while the rollout goes on: memory is bounded by the window, not the video.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import pyarrow as pa
import torch

from scopevid.adapters.base import Adapter, Conditioning, ForwardSpec
from scopevid.engine.history import FeatureMemory, VelocityHistory
from scopevid.engine import reuse as reuse_lib
from scopevid.engine.kvcache import KVCache
from scopevid.engine.solvers import Euler
from scopevid.engine.topology import LocalTopology, Topology
from scopevid.scheduler import predictors
from scopevid.scheduler.plan import Iteration
from scopevid.scheduler.policies import Discrepancy, Mode, Policy, StepContext


@dataclass
class StepRecord:
    """One row of steps.parquet."""

    window: int
    iteration: int  # within the window
    serial: int
    mode: str
    reason: str
    d: float | None
    r: float | None
    valid_lo: int  # absolute latent indices, [lo, hi)
    valid_hi: int
    compute_lo: int
    compute_hi: int
    active: int  # frames that advanced
    frames_computed: int  # frames forwarded by the model (0 for Cache / Predict)
    flops: float
    seconds: float


STEP_SCHEMA = pa.schema(
    [("window", pa.int64()), ("iteration", pa.int64()), ("serial", pa.int64()), ("mode", pa.string()),
     ("reason", pa.string()), ("d", pa.float64()), ("r", pa.float64()), ("valid_lo", pa.int64()),
     ("valid_hi", pa.int64()), ("compute_lo", pa.int64()), ("compute_hi", pa.int64()), ("active", pa.int64()),
     ("frames_computed", pa.int64()), ("flops", pa.float64()), ("seconds", pa.float64())]
)


@dataclass
class RolloutStats:
    counts: dict = field(default_factory=lambda: {m.label: 0 for m in Mode})
    fallbacks: int = 0  # Predict rejected by the stability check and recomputed
    frame_forwards: int = 0
    flops: float = 0.0
    iterations: int = 0


def frame_noise(seed: int, frame: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Initial noise of one absolute frame: independent of windows, shards and ranks."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + frame) % (2**63 - 1))
    return torch.randn(shape, generator=g)


class PerFrameNoise:
    """The default noise source: every absolute frame draws from its own seeded generator, so the
    video is the same however it is windowed or sharded. A noise source is called once per window
    (or chunk) with the frames that enter noisy; a pipeline-parity source can replay another
    pipeline's generator sequence instead."""

    def __init__(self, seed: int):
        self.seed = seed

    def __call__(self, window: int, frames: list[int], shape: tuple[int, ...]) -> torch.Tensor:
        return torch.stack([frame_noise(self.seed, f, shape) for f in frames])


class Rollout:
    def __init__(
        self,
        adapter: Adapter,
        plan,
        policy: Policy,
        cond: Conditioning,
        *,
        seed: int,
        solver=None,
        topology: Topology | None = None,
        predictor: str = "taylor2",
        stability: predictors.Stability = predictors.Stability(),
        num_steps: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        on_step: Callable[[StepRecord], None] | None = None,
        check_decisions: bool = False,
        noise=None,
    ):
        self.adapter, self.plan, self.policy, self.cond = adapter, plan, policy, cond
        self.seed = seed
        self.noise = noise or PerFrameNoise(seed)
        self.solver = solver or Euler()
        self.topo = topology or LocalTopology()
        self.predict = predictors.get(predictor)
        self.stability = stability
        self.device, self.dtype = torch.device(device), dtype
        self.on_step = on_step
        self.check_decisions = check_decisions
        self.sigmas = tuple(adapter.sigmas(plan.num_steps))
        if hasattr(adapter, "prepare_rollout"):  # per-video facts an adapter needs (e.g. MAGI-1's chunk count)
            adapter.prepare_rollout(plan)
        self.noise_sigma = getattr(adapter, "noise_sigma", self.sigmas[0])
        self.clean_sigma = getattr(adapter, "clean_sigma", 0.0)
        self.history = VelocityHistory(depth=4)
        self.features = FeatureMemory()
        self.kv = KVCache()
        self.stats = RolloutStats()
        self.reuse = reuse_lib.for_policy(policy, adapter, plan, self.topo)  # baselines: reuse inside the forward
        self.final: dict[int, torch.Tensor] = {}  # clean latents still needed (prefix / KV fill)
        self.latents: dict[int, torch.Tensor] = {}  # current window's latents by absolute frame
        self._prev_forward: list[int] = []
        self._window = -1
        # resume (engine.checkpoint): a hook before every iteration, and where a restored rollout
        # goes on: (first serial still to run, next frame to emit)
        self.before_iteration: Callable[[Iteration, int], None] | None = None
        self.resume_at: tuple[int, int] = (0, 0)

    # --- per-frame helpers -------------------------------------------------------------------
    def _sigma_pair(self, u: int) -> tuple[float, float]:
        t = len(self.sigmas) - 1
        if u <= 0:
            return self.noise_sigma, self.noise_sigma
        if u > t:
            return self.clean_sigma, self.clean_sigma
        return self.sigmas[u - 1], self.sigmas[u]

    def _shape(self) -> tuple[int, int, int]:
        h, w = self.adapter.latent_hw
        return (self.adapter.latent_channels, h, w)

    def _enter_window(self, it: Iteration) -> None:
        """A diffusion forcing window restarts attention from its own first frame, so K/V computed in
        the previous window (which saw older frames) are not valid here: the cache starts empty."""
        self._window = it.window
        self.latents = {}
        self.kv = KVCache()
        fresh = [f for j, f in enumerate(it.frames) if j >= it.prefix]
        for f in it.frames[: it.prefix]:
            self.latents[f] = self.final[f]
        if fresh:
            noise = self.noise(it.window, fresh, self._shape()).to(self.device, self.dtype)
            self.latents.update(zip(fresh, noise))
        first = it.frames[0] if it.context_start is None else min(it.frames[0], it.context_start)
        for store in (self.history, self.features):
            store.drop_before(first)

    def _ensure_latents(self, it: Iteration) -> None:
        """Chunk-causal plans have no windows: frames enter as the window slides."""
        fresh = [f for f in it.frames if f not in self.latents and f not in self.final]
        for f in it.frames:
            if f not in self.latents and f in self.final:
                self.latents[f] = self.final[f]
        if fresh:
            noise = self.noise(it.window, fresh, self._shape()).to(self.device, self.dtype)
            self.latents.update(zip(fresh, noise))

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> Iterator[tuple[int, torch.Tensor]]:
        start, next_emit = self.resume_at
        for it in self.plan.iterations():
            if it.serial < start:
                continue  # done before the checkpoint this rollout was restored from
            if self.before_iteration is not None:
                self.before_iteration(it, next_emit)
            if it.window != self._window:
                self._enter_window(it)
            self._ensure_latents(it)
            rec = self._iterate(it)
            if self.on_step is not None:
                self.on_step(rec)
            while next_emit in self.final:
                yield next_emit, self.final[next_emit]
                next_emit += 1
            self._evict(it)

    def _iterate(self, it: Iteration) -> StepRecord:
        t0 = time.perf_counter()
        frames = list(it.frames)
        c_lo, c_hi = it.compute
        comp = frames[c_lo:c_hi]
        active = [frames[j] for j in it.active]
        sig = {frames[j]: self._sigma_pair(u) for j, u in enumerate(it.progress)}
        prog = {frames[j]: u for j, u in enumerate(it.progress)}
        if self.reuse is not None:
            comp = self.reuse.prepare(it, comp, active)

        disc = None
        if self.policy.needs_feature:
            disc = self.reuse.discrepancy(self, comp, sig, it) if self.reuse else self._discrepancy(comp, sig, it)
        steps = [prog[f] - 1 for f in active] or [0]
        ctx = StepContext(
            serial=it.serial,
            index=it.index,
            window=it.window,
            num_steps=it.num_steps,
            cache_ready=all(self.history.count(f) >= 1 for f in active),
            history=min((self.history.count(f) for f in active), default=0),
            min_step=min(steps),
            max_step=max(steps),
            last=it.is_last_in_window(),
            **(self.reuse.context(it) if self.reuse is not None else {}),
        )
        decision = self.policy.decide(ctx, disc)
        mode = decision.mode
        if self.check_decisions:
            self.topo.check(f"{it.serial}:{int(mode)}:{decision.r!r}")

        v: dict[int, torch.Tensor] = {}
        computed, flops = 0, 0.0
        if self.reuse is not None:  # the baselines act inside the forward (engine/reuse.py)
            v, computed, flops, mode, why = self.reuse.step(self, it, comp, active, sig, decision)
            if mode != decision.mode or why != decision.reason:
                self.stats.fallbacks += int(mode != decision.mode)
                decision = replace(decision, mode=mode, reason=why)
        if mode == Mode.PREDICT and self.reuse is None:
            v = self._predict(active, sig)
            if v is None:
                mode = Mode.RECOMPUTE
                self.stats.fallbacks += 1
        if mode == Mode.CACHE and self.reuse is None:
            v = {f: self.history.last(f) for f in active}
        if mode == Mode.RECOMPUTE and self.reuse is None:
            v, computed, flops = self._forward(it, comp, sig)
            for f in active:
                self.history.push(f, sig[f][0], v[f])
        self.policy.record(mode)

        for f in active:
            s, s_next = sig[f]
            self.latents[f] = self.solver.step(f, self.latents[f], v[f].to(self.latents[f].dtype), s, s_next, prog[f] - 1)
            if prog[f] == it.num_steps:
                self.final[f] = self.latents[f]
        for j in range(it.prefix):  # clean prefix frames are final from the start
            self.final.setdefault(frames[j], self.latents[frames[j]])

        self.stats.counts[mode.label] += 1
        self.stats.frame_forwards += computed
        self.stats.flops += flops
        self.stats.iterations += 1
        return StepRecord(
            window=it.window,
            iteration=it.index,
            serial=it.serial,
            mode=mode.label,
            reason=decision.reason if mode == decision.mode else "predict-unstable",
            d=decision.d,
            r=decision.r,
            valid_lo=frames[it.valid[0]],
            valid_hi=frames[it.valid[1] - 1] + 1,
            compute_lo=comp[0] if comp else frames[0],
            compute_hi=comp[-1] + 1 if comp else frames[0],
            active=len(active),
            frames_computed=computed,
            flops=flops,
            seconds=time.perf_counter() - t0,
        )

    def _discrepancy(self, comp: list[int], sig: dict, it: Iteration) -> Discrepancy | None:
        n_pad, (lo, hi) = self.topo.layout(len(comp))
        self.topo.migrate(self._prev_feature_frames(), comp, [self.features])
        mine = [f for f in comp[lo:hi]]
        num = den = 0.0
        seen = 0
        if mine:
            x = torch.stack([self.latents[f] for f in mine])
            s = torch.tensor([sig[f][0] for f in mine], device=self.device, dtype=torch.float32)
            spec = ForwardSpec(frames=comp, origin=it.start, shard=(lo, min(hi, len(comp))))
            with torch.no_grad():
                phi = self.adapter.host_feature(x, s, self.cond, spec)
            seen = self.features.seen(mine)
            if not getattr(self.policy, "chunk_feature_sums", None):
                num, den = self.features.sums(mine, phi)
        size = getattr(self.policy, "chunk_feature_sums", None)  # chunk-wise policies: sums per chunk too
        if size:
            return self._chunk_discrepancy(comp, mine, phi if mine else None, seen, size)
        self._feature_frames = comp
        num, den, seen = self.topo.allreduce([num, den, seen])
        return Discrepancy(num, den) if seen > 0 else None

    def _chunk_discrepancy(self, comp: list[int], mine: list[int], phi, seen: int, size: int) -> Discrepancy | None:
        """Per-chunk (num, den) in Discrepancy.chunks (chunk = frame // size), reduced over ranks in one
        float64 vector whose layout every rank derives from the replicated frame list."""
        chunks = sorted({f // size for f in comp})
        at = {c: i for i, c in enumerate(chunks)}
        part = [0.0] * (2 * len(chunks))
        for i, f in enumerate(mine):
            n, d = self.features.sums([f], phi[i : i + 1])
            part[2 * at[f // size]] += n
            part[2 * at[f // size] + 1] += d
        self._feature_frames = comp
        red = self.topo.allreduce([float(seen)] + part)
        seen, part = red[0], red[1:]
        per = tuple((c, part[2 * i], part[2 * i + 1]) for c, i in at.items() if part[2 * i + 1] > 0 or part[2 * i] > 0)
        num, den = sum(n for _, n, _ in per), sum(d for _, _, d in per)
        return Discrepancy(num, den, per) if seen > 0 else None

    def _prev_feature_frames(self) -> list[int]:
        return getattr(self, "_feature_frames", [])

    def _predict(self, active: list[int], sig: dict) -> dict[int, torch.Tensor] | None:
        out, delta_sq, ref_sq, bad = {}, 0.0, 0.0, 0.0
        for f in active:
            vk = self.history.last(f)
            vh = self.predict(self.history.get(f), sig[f][0])
            out[f] = vh
            bad += float((~torch.isfinite(vh)).sum())
            delta_sq += float((vh.double() - vk.double()).pow(2).sum())
            ref_sq += float(vk.double().pow(2).sum())
        ok, scale = self.stability.verdict(delta_sq, ref_sq, bad)
        if not ok:
            return None
        if scale != 1.0:
            out = {f: self.history.last(f) + scale * (out[f] - self.history.last(f)) for f in active}
        return out

    def _forward(self, it: Iteration, comp: list[int], sig: dict, hooks=None, context_to: int | None = None) -> tuple[dict, int, float]:
        """Recompute: forward the compute interval (plus clean context frames whose K/V are not yet
        cached: the clean re-forward that no policy may skip), gather, return velocities.
        engine.reuse passes `hooks` (adapters/base.py ForwardHooks) and may ask for the clean frames
        before `context_to` as context instead of the plan's."""
        causal = bool(getattr(self.adapter, "causal", False))
        context = list(it.context) if causal else []
        if causal and context_to is not None:
            context = [f for f in range(it.context.start, context_to) if f in self.final]
        fill: list[int] = []
        if context:
            missing = [f for f in context if not self._cached(f)]
            if missing:
                first = context.index(missing[0])
                fill, context = context[first:], context[:first]
        if fill and hooks is not None and hooks.partial:  # a forward that skips blocks writes no K/V:
            _, n0, f0 = self._forward(it, [], sig, context_to=context_to)  # clean re-forward first
            v, n, fl = self._forward(it, comp, sig, hooks, context_to)
            return v, n + n0, fl + f0
        seq = fill + comp
        n_pad, (lo, hi) = self.topo.layout(len(seq))
        full = seq + [-1] * (n_pad - len(seq))
        mine = full[lo:hi]
        x = torch.stack([self.final[f] if f in fill else (self.latents[f] if f >= 0 else torch.zeros(self._shape(), device=self.device, dtype=self.dtype)) for f in mine])
        s = torch.tensor([self.clean_sigma if (f in fill or f < 0) else sig[f][0] for f in mine], device=self.device, dtype=torch.float32)
        spec = ForwardSpec(
            frames=full,
            origin=it.start,
            context=context,
            store=frozenset(fill) | frozenset(f for f in comp if self._is_clean(f, sig)) if causal else frozenset(),
            kv=self.kv if causal else None,
            causal=causal,
            shard=(lo, hi),
            sigmas=tuple(self.clean_sigma if (f in fill or f < 0) else sig[f][0] for f in full),
        )
        extra = {}
        if hooks is not None:
            spec = hooks.adjust(spec) if hasattr(hooks, "adjust") else spec
            spec = replace(spec, store=frozenset()) if hooks.partial else spec
            extra = {"hooks": hooks}
        with torch.no_grad():
            out = self.adapter.velocity(x, s, self.cond, spec, self.topo.attention, **extra)
        vel = self.topo.gather(out, len(seq))
        v = {f: vel[i] for i, f in enumerate(seq) if f not in fill}
        if hooks is not None:  # frames counted by the share of the block stack they went through
            ran = len(seq) if hooks.blocks_run is None else round(len(seq) * hooks.blocks_run / max(hooks.depth, 1))
            return v, ran, self.adapter.flops(len(seq), len(spec.context), blocks=hooks.blocks_run)
        flops = self.adapter.flops(len(seq), len(context)) if hasattr(self.adapter, "flops") else 0.0
        return v, len(seq), flops

    def _is_clean(self, f: int, sig: dict) -> bool:
        return f in self.final and sig[f][0] == self.clean_sigma

    def _cached(self, f: int) -> bool:
        return self.kv.has(f)

    def _evict(self, it: Iteration) -> None:
        """Drop what no later iteration reads. Frames before the window and its context are final
        and already emitted (emission is in order and runs first)."""
        lo = it.frames[0] if it.context_start is None else min(it.context_start, it.frames[0])
        self.kv.evict_before(lo)
        for f in [f for f in self.final if f < lo]:
            del self.final[f]
        for f in [f for f in self.latents if f < lo]:
            del self.latents[f]

def decision_digest(records: list[StepRecord]) -> str:
    """A short hash of the decision sequence, for comparing runs and ranks."""
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.serial}:{r.mode}:{r.compute_lo}:{r.compute_hi};".encode())
    return h.hexdigest()[:16]
