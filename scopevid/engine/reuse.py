"""Reuse inside the forward: how the engine carries out the baselines' decisions.

SCOPE's Cache and Predict act on whole velocities and need nothing from the model. The baselines
reuse pieces *inside* the forward, through the optional hook points of adapters/base.py:

  policy.reuse   hooks                 what a cheap iteration does
  Reuse.STACK    ResidualHooks         TeaCache: embedded input + cached block-stack residual, head
  Reuse.MODULES  TaylorHooks           TaylorSeer: per-block module outputs forecast by Taylor series
  Reuse.BLOCKS   DeltaHooks            Delta-DiT: a block range skipped, its cached delta added
  Reuse.CHUNKS   ResidualHooks + KV    FlowCache: per chunk, computed chunks forwarded, skipped ones
                                      take their residual; only the active chunks' span is forwarded

An executor here turns the policy's decision into one or two forwards through the forward runner
(engine.forward) with hooks, keeps the hooks' state per (CFG branch, absolute frame), restarts it with
every window (a diffusion-forcing window is a new denoising loop, as in the official pipelines), and
falls back to a full forward when a frame has nothing cached (recorded as a fallback, like an
unstable Predict). The discrepancy they decide on is the runner's, the same as SCOPE's.

Under sequence parallelism the hooks see this rank's frames only, so their per-frame state lives on
the rank that computed the frame and is handed to the frame's owner in each forward's layout (like
the host features); which frames have state is kept in a replicated index (`recorded`), so every rank
takes the same fallback decision. FlowCache's captured K/V are written inside attention, where every
rank holds its own heads for every frame (as the K/V cache): they never move.
A forward that skips blocks writes no K/V: the clean re-forward of newly finished context frames then
runs first, on its own (it is never skipped), and the skipping forward stores nothing.
Policies stay tensor-free: they see reduced sums (per chunk for FlowCache) and iteration indices.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from scopevid.adapters.base import Adapter, ForwardHooks, ForwardSpec, HookContext, HookPoint
from scopevid.engine.forward import ForwardResult, ForwardRunner, Levels, Outcome
from scopevid.engine.topology import FrameKeyed
from scopevid.errors import ConfigError
from scopevid.scheduler.plan import Iteration
from scopevid.scheduler.policies import DeltaDiT, FlowCache, TaylorSeer
from scopevid.scheduler.policies.base import Decision, Mode, Policy, Reuse
from scopevid.scheduler.signals import Feature

Key = tuple[str, int]  # (CFG branch, absolute frame)


# ----------------------------------------------------------------------------------- hooks
class ResidualHooks(ForwardHooks):
    """Record the block stack's residual (output - input) per frame, or add it instead of the stack."""

    def __init__(self, store: dict[Key, torch.Tensor], reuse: bool):
        self.store, self.reuse = store, reuse
        self.partial = reuse
        self.blocks_run = 0 if reuse else None

    def stack(self, ctx: HookContext, h, run):
        self.depth = ctx.depth
        if self.reuse:
            return h + torch.stack([_get(self.store, (ctx.branch, f), h[i]) for i, f in enumerate(ctx.frames)])
        out = run(h)
        for i, f in enumerate(ctx.frames):
            if f >= 0:
                self.store[(ctx.branch, f)] = (out[i] - h[i]).detach()
        return out


def _get(store: dict, key, like: torch.Tensor) -> torch.Tensor:
    """The recorded tensor of `key` (branch, frame, ...); zeros for a padding row (frame -1) only.
    A real frame without an entry is a bug (its state was not handed to this rank), never zeros."""
    got = store.get(key)
    if got is not None:
        return got
    if key[1] >= 0:
        raise RuntimeError(f"reuse: no recorded state for {key} on this process (hook state not handed over)")
    return torch.zeros_like(like)


class TaylorHooks(ForwardHooks):
    """TaylorSeer: at a full compute store, per frame, each block's module outputs (before gates) and
    their finite differences over the iteration index up to `order`; at a forecast step add
    sum_i F_i d^i / i! with this step's gates. `level="stack"`: one series for the stack residual."""

    def __init__(self, store: dict[Key, dict], step: int, order: int, forecast: bool, level: str = "modules"):
        self.store, self.step, self.order, self.forecast, self.level = store, step, order, forecast, level
        self.partial = forecast
        self.blocks_run = 0 if forecast else None

    def _series(self, key: Key, name) -> list[torch.Tensor] | None:
        entry = self.store.get(key)
        return None if entry is None else entry["factors"].get(name)

    def _predict(self, ctx: HookContext, name, like: torch.Tensor) -> torch.Tensor:
        rows = []
        for i, f in enumerate(ctx.frames):
            entry = self.store.get((ctx.branch, f))
            if entry is None:
                rows.append(_get(self.store, (ctx.branch, f), like[i]))  # padding only
                continue
            d = self.step - entry["step"]
            rows.append(sum(fi * (d**k / math.factorial(k)) for k, fi in enumerate(entry["factors"][name])))
        return torch.stack(rows)

    def _record(self, ctx: HookContext, name, value: torch.Tensor) -> None:
        for i, f in enumerate(ctx.frames):
            if f < 0:
                continue
            entry = self.store.setdefault((ctx.branch, f), {"step": None, "prev": None, "factors": {}})
            if entry["step"] != self.step:  # first module recorded at this step: shift the step pair
                entry["prev"], entry["step"] = entry["step"], self.step
            old = entry["factors"].get(name)
            new = [value[i].detach()]
            if old is not None and entry["prev"] is not None:
                dist = self.step - entry["prev"]
                for k in range(min(self.order, len(old))):  # derivative_approximation
                    new.append((new[k] - old[k]) / dist)
            entry["factors"][name] = new

    def stack(self, ctx, h, run):
        self.depth = ctx.depth
        if self.level != "stack":
            return run(h)
        if self.forecast:
            return h + self._predict(ctx, "stack", h)
        out = run(h)
        self._record(ctx, "stack", out - h)
        return out

    def block(self, ctx, layer, h, run, apply):
        if self.level != "modules":
            return run(h)[0]
        if self.forecast:
            return apply(h, {m: self._predict(ctx, (layer, m), h) for m in ctx.modules})
        out, outs = run(h)
        for m, value in outs.items():
            self._record(ctx, (layer, m), value)
        return out


class DeltaHooks(ForwardHooks):
    """Delta-DiT: record the delta (output - input) of the front and rear block ranges per frame, or
    skip one range and add its recorded delta to its current input."""

    def __init__(self, store: dict[tuple, torch.Tensor], fraction: float, reuse: str | None):
        self.store, self.fraction, self.reuse = store, fraction, reuse
        self.partial = reuse is not None
        self.blocks_run: int | None = None
        self._inputs: dict[str, torch.Tensor] = {}

    def ranges(self, depth: int) -> dict[str, tuple[int, int]]:
        k = min(max(round(self.fraction * depth), 1), depth - 1) if depth > 1 else 1
        return {"front": (0, k), "rear": (depth - k, depth)}

    def block(self, ctx, layer, h, run, apply):
        self.depth = ctx.depth
        ranges = self.ranges(ctx.depth)
        if self.reuse is not None:
            lo, hi = ranges[self.reuse]
            self.blocks_run = ctx.depth - (hi - lo)
            if lo <= layer < hi:
                if layer != lo:
                    return h
                return h + torch.stack([_get(self.store, (ctx.branch, f, self.reuse), h[i]) for i, f in enumerate(ctx.frames)])
            return run(h)[0]
        for name, (lo, _) in ranges.items():
            if layer == lo:
                self._inputs[name] = h
        out = run(h)[0]
        for name, (_, hi) in ranges.items():
            if layer == hi - 1:
                delta = (out - self._inputs.pop(name)).detach()
                for i, f in enumerate(ctx.frames):
                    if f >= 0:
                        self.store[(ctx.branch, f, name)] = delta[i]
        return out


class _KVView:
    """The KVStore a FlowCache forward sees: clean frames' K/V in the engine's cache, every other
    frame's K/V from its last compute (so a computed chunk attends a skipped earlier chunk's K/V)."""

    def __init__(self, clean, stale: dict, clean_frames: frozenset, name: str = "cond"):
        self.clean, self.stale, self.clean_frames, self.name = clean, stale, clean_frames, name

    def branch(self, name: str) -> "_KVView":
        return _KVView(self.clean, self.stale, self.clean_frames, name)

    def put(self, layer: int, frame: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if frame in self.clean_frames:
            self.clean.branch(self.name).put(layer, frame, k, v)
        else:
            self.stale[(self.name, layer, frame)] = (k, v)

    def get(self, layer: int, frames: list[int]):
        ks, vs = [], []
        for f in frames:
            got = self.clean.branch(self.name).get(layer, [f]) or self.stale.get((self.name, layer, f))
            if got is None:
                return None
            ks.append(got[0])
            vs.append(got[1])
        return torch.cat(ks, dim=1), torch.cat(vs, dim=1)


class FlowHooks(ResidualHooks):
    """FlowCache's full forward of the computed chunks: records residuals, captures the noisy frames'
    K/V, and attends skipped earlier chunks through their K/V from their last compute."""

    def __init__(self, store: dict, stale: dict, kv, final: dict):
        super().__init__(store, reuse=False)
        self.stale, self.kv, self.final = stale, kv, final

    def adjust(self, spec: ForwardSpec) -> ForwardSpec:
        fwd = [f for f in spec.frames if f >= 0]
        last = max(fwd)
        have = {f for (_, layer, f) in self.stale if layer == 0}
        extra = [f for f in sorted(have) if f < last and f not in fwd and f not in self.final]
        context = sorted(set(spec.context) | set(extra))
        return replace(spec, context=context, store=frozenset(fwd) | spec.store,
                       kv=_KVView(self.kv, self.stale, spec.store))


# ------------------------------------------------------------------------------- executors
def _frame_at(pos: int):
    return lambda key: key[pos]


class Executor:
    """Runs one policy kind's decisions. `prepare` is called first every iteration."""

    needs_points: frozenset[HookPoint] = frozenset()

    def __init__(self, policy: Policy, plan):
        self.policy, self.plan = policy, plan
        self.window: int | None = None
        self.reset()

    def reset(self) -> None:
        self.store: dict = {}  # (branch, frame, ...) -> what the hooks recorded
        self.recorded: set[int] = set()  # frames with recorded state (replicated on every rank)

    def prepare(self, it: Iteration, comp: list[int], active: list[int]) -> list[int]:
        """New window: fresh state. Returns the frames the policy's forward covers."""
        if it.window != self.window:
            self.window = it.window
            self.reset()
        else:
            self.drop_before(it.frames[0] if it.context_start is None else min(it.frames[0], it.context_start))
        return comp

    def drop_before(self, frame: int) -> None:
        """Forget frames that left the window (chunk-causal plans slide instead of restarting)."""
        for keyed in self._stores():
            d = keyed.data
            for k in [k for k in d if keyed.frame_of(k) < frame]:
                del d[k]
        self.recorded = {f for f in self.recorded if f >= frame}

    def _migrating(self) -> list[FrameKeyed]:
        """The stores whose entries live on the rank that computed their frame."""
        return [FrameKeyed(self.store, _frame_at(1))]

    def _stores(self) -> list[FrameKeyed]:
        """Every per-frame store, for forgetting frames (ChunkExecutor adds its captured K/V)."""
        return self._migrating()

    def ready(self, frames: list[int]) -> bool:
        return all(f in self.recorded for f in frames)

    def forward(self, runner: ForwardRunner, it: Iteration, frames: list[int], levels: Levels, hooks: ForwardHooks,
                context_to: int | None = None) -> ForwardResult:
        res = runner.forward(it, frames, levels, hooks, context_to, hook_state=self._migrating())
        if not hooks.partial:  # a full forward recorded every frame it ran
            self.recorded.update(f for f in res.frames if f >= 0)
        return res

    def step(self, runner: ForwardRunner, it: Iteration, comp: list[int], active: list[int], levels: Levels,
             decision: Decision) -> Outcome:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"window": self.window, "store": self.store, "recorded": sorted(self.recorded)}

    def load_state_dict(self, state: dict) -> None:
        self.window, self.store, self.recorded = state["window"], dict(state["store"]), set(state["recorded"])


def _outcome(res: ForwardResult, mode: Mode, reason: str) -> Outcome:
    return Outcome(res.velocity, mode, reason, res.computed, res.flops)


class StackExecutor(Executor):
    """TeaCache: Cache = ResidualHooks(reuse) on the active frames; Recompute records residuals."""

    needs_points = frozenset({HookPoint.STACK})

    def step(self, runner, it, comp, active, levels, decision):
        if decision.mode == Mode.CACHE:
            if self.ready(active):
                res = self.forward(runner, it, active, levels, ResidualHooks(self.store, reuse=True))
                return _outcome(res, Mode.CACHE, decision.reason)
            reason = "no-cached-residual"
        else:
            reason = decision.reason
        res = self.forward(runner, it, comp, levels, ResidualHooks(self.store, reuse=False))
        return _outcome(res, Mode.RECOMPUTE, reason)


class TaylorExecutor(Executor):
    """TaylorSeer: Predict = forecast on the active frames; Recompute records the Taylor factors."""

    def __init__(self, policy: TaylorSeer, plan):
        self.level, self.order = policy.cfg.granularity, policy.cfg.order
        self.needs_points = frozenset({HookPoint.BLOCK} if self.level == "modules" else {HookPoint.STACK})
        super().__init__(policy, plan)

    def step(self, runner, it, comp, active, levels, decision):
        if decision.mode == Mode.PREDICT:
            if self.ready(active):
                hooks = TaylorHooks(self.store, it.index, self.order, forecast=True, level=self.level)
                return _outcome(self.forward(runner, it, active, levels, hooks), Mode.PREDICT, decision.reason)
            reason = "no-cached-features"
        else:
            reason = decision.reason
        hooks = TaylorHooks(self.store, it.index, self.order, forecast=False, level=self.level)
        return _outcome(self.forward(runner, it, comp, levels, hooks), Mode.RECOMPUTE, reason)


class BlockExecutor(Executor):
    """Delta-DiT: Cache = the decided block range skipped (its delta added); Recompute records deltas."""

    needs_points = frozenset({HookPoint.BLOCK})

    def __init__(self, policy: DeltaDiT, plan):
        self.fraction = policy.cfg.fraction
        super().__init__(policy, plan)

    def step(self, runner, it, comp, active, levels, decision):
        if decision.mode == Mode.CACHE and decision.blocks is not None:
            which = "front" if decision.blocks[0] == 0.0 else "rear"
            if self.ready(comp):
                res = self.forward(runner, it, comp, levels, DeltaHooks(self.store, self.fraction, which))
                return _outcome(res, Mode.CACHE, decision.reason)
            reason = "no-cached-delta"
        else:
            reason = decision.reason
        res = self.forward(runner, it, comp, levels, DeltaHooks(self.store, self.fraction, None))
        return _outcome(res, Mode.RECOMPUTE, reason)


class ChunkExecutor(Executor):
    """FlowCache: forwards the active chunks' span only; computed chunks in one forward (attending
    skipped earlier chunks' last K/V), skipped chunks through their residual."""

    needs_points = frozenset({HookPoint.STACK})

    def __init__(self, policy: FlowCache, plan):
        self.size = policy.chunk or plan.unit
        self.last_step_kv = policy.cfg.finished_kv == "last_step"
        super().__init__(policy, plan)

    def reset(self) -> None:
        super().reset()
        self.stale: dict = {}  # (branch, layer, frame) -> (k, v) of noisy frames at their last compute

    def _stores(self) -> list[FrameKeyed]:
        return [FrameKeyed(self.store, _frame_at(1)), FrameKeyed(self.stale, _frame_at(2))]

    def state_dict(self) -> dict:
        return {**super().state_dict(), "stale": self.stale}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.stale = dict(state["stale"])

    def prepare(self, it, comp, active):
        super().prepare(it, comp, active)
        if not active:
            return comp
        return list(range(active[0], active[-1] + 1))

    def hand_over(self, runner: ForwardRunner, it: Iteration) -> None:
        """finished_kv: last_step (the official FlowCache): a finished frame's K/V from its last computed
        step become its clean context, so the engine's clean re-forward of it is not needed."""
        st = runner.state
        for f in it.frames:
            if f in st.final and not st.kv.has(f) and ("cond", 0, f) in self.stale:
                for (b, layer, g), (k, v) in list(self.stale.items()):
                    if g == f:
                        st.kv.put(b, layer, f, k, v)

    def step(self, runner, it, comp, active, levels, decision):
        size = self.size
        if self.last_step_kv:
            self.hand_over(runner, it)
        skip_frames = [f for f in active if f // size in decision.skip]
        have_kv = {f for (b, layer, f) in self.stale if b == "cond" and layer == 0}
        reason = decision.reason
        if skip_frames and not (self.ready(skip_frames) and all(f in have_kv for f in skip_frames)):
            skip_frames, reason = [], "no-cached-residual"
        computed = [f for f in comp if f not in skip_frames]
        v, n, fl = {}, 0, 0.0
        if computed:
            hooks = FlowHooks(self.store, self.stale, runner.state.kv, runner.state.final)
            res = self.forward(runner, it, computed, levels, hooks, context_to=computed[0])
            v, n, fl = res.velocity, res.computed, res.flops
        if skip_frames:
            res = self.forward(runner, it, skip_frames, levels, ResidualHooks(self.store, reuse=True))
            v.update(res.velocity)
            n, fl = n + res.computed, fl + res.flops
        return Outcome(v, Mode.CACHE if not computed else Mode.RECOMPUTE, reason, n, fl)


EXECUTORS = {Reuse.STACK: StackExecutor, Reuse.MODULES: TaylorExecutor, Reuse.BLOCKS: BlockExecutor, Reuse.CHUNKS: ChunkExecutor}


def for_policy(policy: Policy, adapter: Adapter, plan) -> Executor | None:
    """The executor a policy needs (None for whole-velocity policies: SCOPE, Original), after checking
    that the adapter declares the capabilities it relies on; a clear ConfigError otherwise."""
    caps = adapter.capabilities
    ex = None if policy.reuse == Reuse.VELOCITY else EXECUTORS[policy.reuse](policy, plan)
    missing = sorted(p.value for p in ex.needs_points - caps.hook_points) if ex is not None else []
    if missing:
        raise ConfigError(
            f"policy {policy.name}: needs the model's forward hook point(s) {', '.join(missing)} "
            f"(adapters/base.py, ForwardHooks), which model {adapter.name} does not offer; use original or scope-* with it"
        )
    if policy.needs_feature and policy.feature != Feature.HOST and policy.feature not in caps.features:
        raise ConfigError(f"policy {policy.name}: needs the pre-forward signal {policy.feature.value!r}, which model "
                          f"{adapter.name} does not offer (it offers host{''.join(', ' + f.value for f in sorted(caps.features))})")
    if ex is None:
        return None
    if policy.reuse == Reuse.CHUNKS and not caps.causal:
        raise ConfigError(
            f"policy {policy.name}: FlowCache skips chunks through a K/V cache of earlier chunks; model {adapter.name} "
            "serves no K/V context (capabilities.causal is false), so it cannot run FlowCache"
        )
    return ex
