"""Reuse inside the forward: how the engine carries out the baselines' decisions.

SCOPE's Cache and Predict act on whole velocities and need nothing from the model. The baselines
reuse pieces *inside* the forward, through the optional hook points of adapters/base.py:

  policy.reuse  hooks                 what a cheap iteration does
  "stack"       ResidualHooks         TeaCache: embedded input + cached block-stack residual, head
  "modules"     TaylorHooks           TaylorSeer: per-block module outputs forecast by Taylor series
  "blocks"      DeltaHooks            Delta-DiT: a block range skipped, its cached delta added
  "chunks"      ResidualHooks + KV    FlowCache: per chunk, computed chunks forwarded, skipped ones
                                      take their residual; only the active chunks' span is forwarded

An executor here turns the policy's decision into one or two forwards through Rollout._forward with
hooks, keeps the hooks' state per (CFG branch, absolute frame), restarts it with every window (a
diffusion-forcing window is a new denoising loop, as in the official pipelines), and falls back to a
full forward when a frame has nothing cached (recorded as a fallback, like an unstable Predict).
A forward that skips blocks writes no K/V: the clean re-forward of newly finished context frames then
runs first, on its own (it is never skipped), and the skipping forward stores nothing.
Policies stay tensor-free: they see reduced sums (per chunk for FlowCache) and iteration indices.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from scopevid.adapters.base import ForwardHooks, ForwardSpec, HookContext
from scopevid.errors import ConfigError
from scopevid.scheduler.plan import Iteration
from scopevid.scheduler.policies.base import ChunkState, Decision, Discrepancy, Mode, Policy

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
    got = store.get(key)
    return torch.zeros_like(like) if got is None else got  # padding rows (frame -1) only


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
                rows.append(torch.zeros_like(like[i]))
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
class Executor:
    """Runs one policy kind's decisions. `prepare` is called first every iteration."""

    needs_points: frozenset[str] = frozenset()

    def __init__(self, policy: Policy, adapter, plan):
        self.policy, self.adapter, self.plan = policy, adapter, plan
        self.window = None
        self.reset()

    def reset(self) -> None:
        self.store: dict = {}

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
        for d, at in self._stores():
            for k in [k for k in d if k[at] < frame]:
                del d[k]

    def _stores(self) -> list[tuple[dict, int]]:
        return [(self.store, 1)]  # (store, position of the absolute frame in its keys)

    def context(self, it: Iteration) -> dict:
        return {}

    def discrepancy(self, ro, comp: list[int], sig: dict, it: Iteration) -> Discrepancy | None:
        if not comp:
            return None
        x = torch.stack([ro.latents[f] for f in comp])
        s = torch.tensor([sig[f][0] for f in comp], device=ro.device, dtype=torch.float32)
        spec = ForwardSpec(frames=comp, origin=it.start)
        kind = self.policy.feature
        with torch.no_grad():
            if kind == "host":
                phi = self.adapter.host_feature(x, s, ro.cond, spec)
            else:
                phi = self.adapter.named_feature(kind, x, s, ro.cond, spec)
        seen = ro.features.seen(comp)
        per = [ro.features.sums([f], phi[i : i + 1]) for i, f in enumerate(comp)]
        if seen == 0:
            return None
        num = sum(n for n, _ in per)
        den = sum(d for _, d in per)
        return Discrepancy(num, den, self.chunk_sums(comp, per))

    def chunk_sums(self, comp, per) -> tuple:
        return ()

    def ready(self, frames: list[int], key=lambda f: ("cond", f)) -> bool:
        return all(key(f) in self.store for f in frames)

    def step(self, ro, it, comp, active, sig, decision: Decision):
        """-> (velocities of the active frames, frames forwarded, FLOPs, mode taken, reason)"""
        raise NotImplementedError


class StackExecutor(Executor):
    """TeaCache: Cache = ResidualHooks(reuse) on the active frames; Recompute records residuals."""

    needs_points = frozenset({"stack"})

    def step(self, ro, it, comp, active, sig, decision):
        if decision.mode == Mode.CACHE:
            if self.ready(active):
                v, n, fl = ro._forward(it, active, sig, hooks=ResidualHooks(self.store, reuse=True))
                return v, n, fl, Mode.CACHE, decision.reason
            reason = "no-cached-residual"
        else:
            reason = decision.reason
        v, n, fl = ro._forward(it, comp, sig, hooks=ResidualHooks(self.store, reuse=False))
        return v, n, fl, Mode.RECOMPUTE, reason


class TaylorExecutor(Executor):
    """TaylorSeer: Predict = forecast on the active frames; Recompute records the Taylor factors."""

    def __init__(self, policy, adapter, plan):
        self.level = getattr(policy, "granularity_level", "modules")
        self.needs_points = frozenset({"block"} if self.level == "modules" else {"stack"})
        super().__init__(policy, adapter, plan)

    def step(self, ro, it, comp, active, sig, decision):
        order = getattr(self.policy, "order", 1)
        if decision.mode == Mode.PREDICT:
            if self.ready(active):
                hooks = TaylorHooks(self.store, it.index, order, forecast=True, level=self.level)
                v, n, fl = ro._forward(it, active, sig, hooks=hooks)
                return v, n, fl, Mode.PREDICT, decision.reason
            reason = "no-cached-features"
        else:
            reason = decision.reason
        hooks = TaylorHooks(self.store, it.index, order, forecast=False, level=self.level)
        v, n, fl = ro._forward(it, comp, sig, hooks=hooks)
        return v, n, fl, Mode.RECOMPUTE, reason


class BlockExecutor(Executor):
    """Delta-DiT: Cache = the decided block range skipped (its delta added); Recompute records deltas."""

    needs_points = frozenset({"block"})

    def step(self, ro, it, comp, active, sig, decision):
        fraction = self.policy.cfg.fraction
        if decision.mode == Mode.CACHE and decision.blocks is not None:
            which = "front" if decision.blocks[0] == 0.0 else "rear"
            if self.ready(comp, key=lambda f: ("cond", f, which)):
                v, n, fl = ro._forward(it, comp, sig, hooks=DeltaHooks(self.store, fraction, which))
                return v, n, fl, Mode.CACHE, decision.reason
            reason = "no-cached-delta"
        else:
            reason = decision.reason
        v, n, fl = ro._forward(it, comp, sig, hooks=DeltaHooks(self.store, fraction, None))
        return v, n, fl, Mode.RECOMPUTE, reason


class ChunkExecutor(Executor):
    """FlowCache: forwards the active chunks' span only; computed chunks in one forward (attending
    skipped earlier chunks' last K/V), skipped chunks through their residual."""

    needs_points = frozenset({"stack"})

    def reset(self) -> None:
        super().reset()
        self.stale: dict = {}  # (branch, layer, frame) -> (k, v) of noisy frames at their last compute

    def _stores(self) -> list[tuple[dict, int]]:
        return [(self.store, 1), (self.stale, 2)]

    @property
    def size(self) -> int:
        return self.policy.chunk or getattr(self.plan, "block", None) or getattr(self.plan, "chunk", 1)

    def prepare(self, it, comp, active):
        super().prepare(it, comp, active)
        if not active:
            return comp
        return list(range(active[0], active[-1] + 1))

    def hand_over(self, ro, it) -> None:
        """finished_kv: last_step (the official FlowCache): a finished frame's K/V from its last computed
        step become its clean context, so the engine's clean re-forward of it is not needed."""
        for f in it.frames:
            if f in ro.final and not ro.kv.has(f) and ("cond", 0, f) in self.stale:
                for (b, layer, g), (k, v) in list(self.stale.items()):
                    if g == f:
                        ro.kv.branch(b).put(layer, f, k, v)

    def context(self, it: Iteration) -> dict:
        size, by_chunk = self.size, {}
        for j, f in enumerate(it.frames):
            c = by_chunk.setdefault(f // size, [it.progress[j], False])
            c[0] = max(c[0], it.progress[j])
            c[1] = c[1] or it.update[j]
        chunks = tuple(ChunkState(c, max(u - 1, 0), act) for c, (u, act) in sorted(by_chunk.items()))
        return {"chunks": chunks}

    def chunk_sums(self, comp, per) -> tuple:
        sums: dict[int, list[float]] = {}
        for f, (n, d) in zip(comp, per):
            if d > 0 or n > 0:
                acc = sums.setdefault(f // self.size, [0.0, 0.0])
                acc[0] += n
                acc[1] += d
        return tuple((c, n, d) for c, (n, d) in sorted(sums.items()))

    def step(self, ro, it, comp, active, sig, decision):
        size = self.size
        if getattr(self.policy.cfg, "finished_kv", "clean") == "last_step":
            self.hand_over(ro, it)
        skip_frames = [f for f in active if f // size in decision.skip]
        have_kv = {f for (b, layer, f) in self.stale if b == "cond" and layer == 0}
        reason = decision.reason
        if skip_frames and not all(("cond", f) in self.store and f in have_kv for f in skip_frames):
            skip_frames, reason = [], "no-cached-residual"
        computed = [f for f in comp if f not in skip_frames]
        v, n, fl = {}, 0, 0.0
        if computed:
            hooks = FlowHooks(self.store, self.stale, ro.kv, ro.final)
            v, n, fl = ro._forward(it, computed, sig, hooks=hooks, context_to=computed[0])
        if skip_frames:
            v2, n2, fl2 = ro._forward(it, skip_frames, sig, hooks=ResidualHooks(self.store, reuse=True))
            v.update(v2)
            n, fl = n + n2, fl + fl2
        mode = Mode.CACHE if not computed else Mode.RECOMPUTE
        return v, n, fl, mode, reason


EXECUTORS = {"stack": StackExecutor, "modules": TaylorExecutor, "blocks": BlockExecutor, "chunks": ChunkExecutor}


def for_policy(policy: Policy, adapter, plan, topology) -> Executor | None:
    """The executor a policy needs (None for whole-velocity policies: SCOPE, Original), after checking
    that the adapter offers the capabilities it relies on; a clear ConfigError otherwise."""
    kind = getattr(policy, "reuse", "velocity")
    if kind == "velocity":
        return None
    if kind not in EXECUTORS:
        raise ConfigError(f"policy {policy.name}: reuse kind {kind!r} unknown; allowed: velocity, {', '.join(EXECUTORS)}")
    ex = EXECUTORS[kind](policy, adapter, plan)
    name = getattr(adapter, "name", type(adapter).__name__)
    missing = sorted(ex.needs_points - set(getattr(adapter, "hook_points", ())))
    if missing:
        raise ConfigError(
            f"policy {policy.name}: needs the model's forward hook point(s) {', '.join(missing)} "
            f"(adapters/base.py, ForwardHooks), which model {name} does not offer; use original or scope-* with it"
        )
    feature = getattr(policy, "feature", "host")
    if policy.needs_feature and feature != "host" and feature not in getattr(adapter, "feature_kinds", ()):
        raise ConfigError(f"policy {policy.name}: needs the pre-forward signal {feature!r}, which model {name} does not offer")
    if kind == "chunks" and not getattr(adapter, "causal", False):
        raise ConfigError(
            f"policy {policy.name}: FlowCache skips chunks through a K/V cache of earlier chunks; model {name} "
            "serves no K/V context (adapter.causal is false), so it cannot run FlowCache"
        )
    if getattr(topology, "world", 1) > 1:
        raise ConfigError(f"policy {policy.name}: in-forward reuse (the baselines) runs on one process; got {topology.world}")
    return ex
