"""The rollout loop (DESIGN.md, "data flow of one iteration").

For every iteration of the plan: the discrepancy on this process's shard (engine.forward) -> policy
decision -> velocity by forward (Recompute), extrapolation (Predict) or reuse (Cache), or by the
baselines' in-forward reuse (engine.reuse) -> solver step on the active frames -> finished frames
leave as clean latents, in order. What the loop holds between iterations is `RolloutState`.

`Rollout.run()` is a generator of (absolute latent index, clean latent [C, H, W]) so callers can
decode and write while the rollout goes on: memory is bounded by the window, not the video.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Iterator, Protocol

import pyarrow as pa
import torch

from scopevid import interrupts
from scopevid.adapters.base import Adapter, Conditioning, NoiseSchedule, VideoFacts
from scopevid.engine import reuse as reuse_lib
from scopevid.engine.forward import ForwardRunner, Levels, Outcome
from scopevid.engine.solvers import Euler, Solver
from scopevid.engine.state import RolloutState
from scopevid.engine.topology import LocalTopology, Topology
from scopevid.errors import StopRequested
from scopevid.scheduler import predictors
from scopevid.scheduler.plan import Iteration
from scopevid.scheduler.policies import ChunkState, Decision, Mode, Policy, StepContext


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


class RolloutObserver:
    """Something that watches a rollout (the run log, a progress bar, the checkpointer): the loop calls
    every observer in `Rollout.observers`, in order, before each iteration it runs and after it,
    with that iteration's record. The defaults do nothing; nothing else of the loop is patched."""

    def before_iteration(self, it: Iteration, next_emit: int) -> None:
        """Before iteration `it`, with the next frame to emit (a boundary observer may save here)."""

    def after_iteration(self, record: StepRecord) -> None:
        """After an iteration, with its row of the run log."""


class Records(RolloutObserver):
    """Keeps every record (tests, comparisons, the in-memory rollout of cluster.worker)."""

    def __init__(self) -> None:
        self.records: list[StepRecord] = []

    def after_iteration(self, record: StepRecord) -> None:
        self.records.append(record)


def frame_noise(seed: int, frame: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Initial noise of one absolute frame: independent of windows, shards and ranks."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + frame) % (2**63 - 1))
    return torch.randn(shape, generator=g)


class NoiseSource(Protocol):
    """Called once per window (or chunk) with the frames that enter noisy: [len(frames), *shape]."""

    def __call__(self, window: int, frames: list[int], shape: tuple[int, ...]) -> torch.Tensor: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class PerFrameNoise:
    """The default noise source: every absolute frame draws from its own seeded generator, so the
    video is the same however it is windowed or sharded (and has no state to resume). A
    pipeline-parity source can replay another pipeline's generator sequence instead."""

    def __init__(self, seed: int):
        self.seed = seed

    def __call__(self, window: int, frames: list[int], shape: tuple[int, ...]) -> torch.Tensor:
        return torch.stack([frame_noise(self.seed, f, shape) for f in frames])

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class DiffusersNoise:
    """The initial noise of diffusers' SkyReelsV2DiffusionForcingPipeline called with
    `generator=torch.Generator().manual_seed(seed)`: one generator, and per window one randn of the
    whole window [1, C, frames, h, w] (CPU, float32), whose overlap prefix the pipeline then
    overwrites with the previous window's clean latents (drawn and dropped here too). Its state is
    the generator's, checkpointed for resume."""

    def __init__(self, seed: int, prefix: int):
        self.g = torch.Generator().manual_seed(seed)
        self.prefix = prefix  # latent frames of overlap history that windows after the first start with

    def __call__(self, window: int, frames: list[int], shape: tuple[int, ...]) -> torch.Tensor:
        p = self.prefix if window > 0 else 0
        z = torch.randn((1, shape[0], p + len(frames), *shape[1:]), generator=self.g)
        return z[0, :, p:].transpose(0, 1)

    def state_dict(self) -> dict:
        return {"generator": self.g.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.g.set_state(state["generator"])


def video_facts(plan) -> VideoFacts:
    """What an adapter is told about one video before its first forward (Adapter.prepare)."""
    return VideoFacts(num_steps=plan.num_steps, latent_frames=plan.latent_frames, unit=plan.unit,
                      chunked=plan.chunked, prefixes=plan.prefixes())


class Rollout:
    def __init__(
        self,
        adapter: Adapter,
        plan,
        policy: Policy,
        cond: Conditioning,
        *,
        seed: int,
        solver: Solver | None = None,
        schedule: NoiseSchedule | None = None,
        topology: Topology | None = None,
        predictor: str = "taylor2",
        stability: predictors.Stability = predictors.Stability(),
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        observers: list[RolloutObserver] | tuple = (),
        check_decisions: bool = False,
        noise: NoiseSource | None = None,
        batched_branches: bool = False,
        kernel: str = "sdpa",
    ):
        """schedule: what `adapter.prepare(video_facts(plan))` returned, when the caller needed it
        first (to build the solver on the model's sigmas); prepared here otherwise.
        batched_branches: both guidance branches in one batched forward (parallel.cfg_mode: batched)."""
        self.adapter, self.plan, self.policy, self.cond = adapter, plan, policy, cond
        self.schedule = schedule if schedule is not None else adapter.prepare(video_facts(plan))
        self.sigmas = self.schedule.sigmas
        self.noise = noise or PerFrameNoise(seed)
        self.solver = solver or Euler()
        self.topo = topology or LocalTopology()
        self.predict = predictors.get(predictor)
        self.stability = stability
        self.device, self.dtype = torch.device(device), dtype
        self.observers: list[RolloutObserver] = list(observers)  # called in order around every iteration
        self.check_decisions = check_decisions
        self.reuse = reuse_lib.for_policy(policy, adapter, plan)  # baselines: reuse inside the forward
        components = {"policy": policy, "solver": self.solver, "noise": self.noise, "topology": self.topo}
        if self.reuse is not None:
            components["reuse"] = self.reuse
        self.state = RolloutState(components)
        self.runner = ForwardRunner(adapter, cond, self.topo, self.schedule, self.state, self.device, dtype,
                                    batched_branches=batched_branches and self.reuse is None, kernel=kernel,
                                    max_velocity=stability.velocity_bound(cond.guidance))
        self.chunk = (policy.chunk or plan.unit) if policy.chunk_sums else None

    # --- per-frame helpers -------------------------------------------------------------------
    def _levels(self, it: Iteration) -> Levels:
        t = len(self.sigmas) - 1
        noise, clean = self.schedule.noise, self.schedule.clean
        out = {}
        for f, u in zip(it.frames, it.progress):
            if u <= 0:
                out[f] = (noise, noise)
            elif u > t:
                out[f] = (clean, clean)
            else:
                out[f] = (self.sigmas[u - 1], self.sigmas[u])
        return out

    def _admit(self, it: Iteration) -> None:
        """Latents of the window's frames: clean ones from `final`, new ones from the noise source.
        A diffusion forcing window starts afresh; a chunk-causal window slides frames in."""
        st = self.state
        if it.window != st.window:
            st.enter_window(it.window)
        fresh = [f for f in it.frames if f not in st.latents and f not in st.final]
        for f in it.frames:
            if f not in st.latents and f in st.final:
                st.latents[f] = st.final[f]
        if fresh:
            noise = self.noise(it.window, fresh, self.runner.shape).to(self.device, self.dtype)
            st.latents.update((f, noise[i].clone()) for i, f in enumerate(fresh))

    # --- the loop ----------------------------------------------------------------------------
    def run(self) -> Iterator[tuple[int, torch.Tensor]]:
        st, timings = self.state, self.runner.timings
        for it in self.plan.iterations():
            if it.serial < st.next_serial:
                continue  # done before the checkpoint this rollout was restored from
            safe_point(self.topo, it.serial)
            for o in self.observers:
                o.before_iteration(it, st.next_emit)
            t0 = time.perf_counter()
            self._admit(it)
            rec = self._iterate(it)
            st.next_serial = it.serial + 1
            for o in self.observers:
                o.after_iteration(rec)
            timings.loop += time.perf_counter() - t0
            while st.next_emit in st.final:
                yield st.next_emit, st.final[st.next_emit]
                st.next_emit += 1
            t0 = time.perf_counter()
            # frames before the window and its context are final and already emitted (in order, above)
            st.evict_before(it.frames[0] if it.context_start is None else min(it.context_start, it.frames[0]))
            timings.loop += time.perf_counter() - t0

    def _iterate(self, it: Iteration) -> StepRecord:
        t0 = time.perf_counter()
        st = self.state
        frames = list(it.frames)
        c_lo, c_hi = it.compute
        comp = frames[c_lo:c_hi]
        active = [frames[j] for j in it.active]
        levels = self._levels(it)
        if self.reuse is not None:
            comp = self.reuse.prepare(it, comp, active)

        disc = None
        if self.policy.needs_feature:
            disc = self.runner.discrepancy(it, comp, levels, self.policy.feature, self.chunk)
        decision = self.policy.decide(self._context(it, active), disc)
        if self.check_decisions:
            self.topo.check(f"{it.serial}:{int(decision.mode)}:{decision.r!r}")

        if self.reuse is not None:  # the baselines act inside the forward (engine/reuse.py)
            out = self.reuse.step(self.runner, it, comp, active, levels, decision)
        else:
            out = self._act(it, comp, active, levels, decision)
        self.policy.record(out.mode)
        st.stats.fallbacks += int(out.mode != decision.mode)

        for f in active:
            s, s_next = levels[f]
            x = st.latents[f]
            st.latents[f] = self.solver.step(f, x, out.velocity[f].to(x.dtype), s, s_next, it.progress[f - it.start] - 1)
            if it.progress[f - it.start] == it.num_steps:
                st.final[f] = st.latents[f]
        for j in range(it.prefix):  # clean prefix frames are final from the start
            st.final.setdefault(frames[j], st.latents[frames[j]])

        st.stats.counts[out.mode.label] += 1
        st.stats.frame_forwards += out.computed
        st.stats.flops += out.flops
        st.stats.iterations += 1
        return StepRecord(window=it.window, iteration=it.index, serial=it.serial, mode=out.mode.label, reason=out.reason,
                          d=decision.d, r=decision.r, valid_lo=frames[it.valid[0]], valid_hi=frames[it.valid[1] - 1] + 1,
                          compute_lo=comp[0] if comp else frames[0], compute_hi=comp[-1] + 1 if comp else frames[0],
                          active=len(active), frames_computed=out.computed, flops=out.flops,
                          seconds=time.perf_counter() - t0)

    def _context(self, it: Iteration, active: list[int]) -> StepContext:
        """What the policy decides on besides the discrepancy: where the iteration is, and how much
        velocity history its active frames have."""
        steps = [u - 1 for u, m in zip(it.progress, it.update) if m] or [0]
        counts = [self.state.history.count(f) for f in active]
        return StepContext(serial=it.serial, index=it.index, window=it.window, num_steps=it.num_steps,
                           cache_ready=all(c >= 1 for c in counts), history=min(counts, default=0),
                           min_step=min(steps), max_step=max(steps), last=it.is_last_in_window(),
                           chunks=chunk_states(it, self.chunk) if self.chunk is not None else ())

    def _act(self, it: Iteration, comp: list[int], active: list[int], levels: Levels, decision: Decision) -> Outcome:
        """Whole-velocity policies (SCOPE, Original): Cache reuses, Predict extrapolates (falling back
        to Recompute when the stability check rejects it), Recompute forwards and records history."""
        hist = self.state.history
        if decision.mode == Mode.CACHE:
            return Outcome({f: hist.last(f) for f in active}, Mode.CACHE, decision.reason)
        if decision.mode == Mode.PREDICT:
            v = self._predict(active, levels)
            if v is not None:
                return Outcome(v, Mode.PREDICT, decision.reason)
            reason = "predict-unstable"
        else:
            reason = decision.reason
        res = self.runner.forward(it, comp, levels)
        for f in active:
            hist.push(f, levels[f][0], res.velocity[f])
        return Outcome(res.velocity, Mode.RECOMPUTE, reason, res.computed, res.flops)

    def _predict(self, active: list[int], levels: Levels) -> dict[int, torch.Tensor] | None:
        """The predictor's extrapolation of every active frame, or None when the stability check
        (non-finite values, or a step too far from the last velocity) rejects it; clipped if asked."""
        hist = self.state.history
        out = {f: self.predict(hist.get(f), levels[f][0]) for f in active}
        vh = torch.stack([out[f] for f in active]).double().flatten(1)
        vk = torch.stack([hist.last(f) for f in active]).double().flatten(1)
        bad = float((~torch.isfinite(vh)).sum())
        # per-frame float64 sums added in frame order: the same sums whatever the batching
        delta_sq = sum((vh - vk).pow(2).sum(1).tolist())
        ref_sq = sum(vk.pow(2).sum(1).tolist())
        ok, scale = self.stability.verdict(delta_sq, ref_sq, bad)
        if not ok:
            return None
        if scale != 1.0:
            out = {f: hist.last(f) + scale * (out[f] - hist.last(f)) for f in active}
        return out




def decision_digest(records) -> str:
    """A short hash of the decision sequence, for comparing runs and ranks."""
    d = DigestBuilder()
    for r in records:
        d.add(r)
    return d.hexdigest()


class DigestBuilder:
    """decision_digest, one record at a time (a run log streams: it keeps no list of records)."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def add(self, r: StepRecord) -> None:
        self._h.update(f"{r.serial}:{r.mode}:{r.compute_lo}:{r.compute_hi};".encode())

    def hexdigest(self) -> str:
        return self._h.hexdigest()[:16]


def safe_point(topo: Topology, serial: int) -> None:
    """Where a noted SIGTERM / SIGINT stops the rollout (scopevid.interrupts): nothing is half done
    here. With several ranks they agree first (one float64 sum), so they stop at the same iteration
    and none waits in a collective for a peer that has left."""
    name = interrupts.pending()
    if topo.world == 1:
        interrupts.check()
        return
    if topo.allreduce([1.0 if name else 0.0])[0] > 0:
        interrupts.reset()
        raise StopRequested(f"stopped by {name or 'a signal to another rank of the job'} before iteration "
                            f"{serial} (rank {topo.rank} of {topo.world}); what was finished is kept; "
                            "continue a --checkpoint run with --resume")


def chunk_states(it: Iteration, size: int) -> tuple[ChunkState, ...]:
    """Per chunk of the window: its furthest frame's step (0-based) and whether any frame advances."""
    by_chunk = {}
    for j, f in enumerate(it.frames):
        c = by_chunk.setdefault(f // size, [it.progress[j], False])
        c[0] = max(c[0], it.progress[j])
        c[1] = c[1] or it.update[j]
    return tuple(ChunkState(c, max(u - 1, 0), act) for c, (u, act) in sorted(by_chunk.items()))
