"""The forward runner: every model call of a rollout goes through here.

It owns what a forward needs besides the latents: this process's shard of the frames (the
topology's layout), the clean re-forward of context frames whose K/V are not cached yet (never
skipped, whatever the policy), the gather of velocities, FLOPs, and the discrepancy of Eq. 4,
sequence-parallel aware, that SCOPE and every baseline decide on. The loop (engine.rollout) and the
baselines' executors (engine.reuse) call it; neither touches the adapter or the topology directly.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, replace

import torch

from scopevid.adapters.base import Adapter, Conditioning, ForwardHooks, ForwardSpec, NoiseSchedule
from scopevid.engine.state import RolloutState
from scopevid.engine.topology import FrameKeyed, Topology
from scopevid.errors import AbsurdVelocityError, ConfigError, NonFiniteError
from scopevid.scheduler.plan import Iteration
from scopevid.scheduler.policies import Discrepancy, Mode
from scopevid.scheduler.signals import Feature

Levels = dict[int, tuple[float, float]]  # frame -> (sigma now, sigma after this iteration's step)


@dataclass
class ForwardResult:
    velocity: dict[int, torch.Tensor]  # per forwarded frame of the request (clean fill excluded)
    frames: list[int]  # the full sequence forwarded (clean fill first), unpadded
    computed: int  # frames counted as forwarded (a partial forward counts its share of blocks)
    flops: float


@dataclass
class Outcome:
    """What one iteration did: the velocities of its active frames and how they were obtained."""

    velocity: dict[int, torch.Tensor]
    mode: Mode  # the mode really taken (a cheap decision that could not be served is a Recompute)
    reason: str
    computed: int = 0
    flops: float = 0.0


@dataclass
class Timings:
    """Where a rollout's seconds go, for the engine-overhead benchmark: `loop` is everything the
    rollout does per iteration (admission, discrepancy, decision, action, solver step, logging,
    eviction; not what the caller does with the frames it yields), `forward` and `feature` the part
    of it inside the adapter (model forwards with their gather, pre-forward signals)."""

    loop: float = 0.0
    forward: float = 0.0
    feature: float = 0.0

    @property
    def overhead(self) -> float:
        """Seconds of the loop outside the model: the engine's own cost."""
        return self.loop - self.forward - self.feature


class ForwardRunner:
    def __init__(self, adapter: Adapter, cond: Conditioning, topology: Topology, schedule: NoiseSchedule,
                 state: RolloutState, device: torch.device, dtype: torch.dtype, *, batched_branches: bool = False,
                 kernel: str = "sdpa", max_velocity: float = math.inf):
        """max_velocity: the largest |v| element a forward may return (Stability.velocity_bound)."""
        self.adapter, self.cond, self.topo, self.schedule, self.state = adapter, cond, topology, schedule, state
        self.max_velocity = max_velocity
        self.device, self.dtype = device, dtype
        self.causal = adapter.capabilities.causal
        h, w = adapter.latent_hw
        self.shape = (adapter.latent_channels, h, w)
        self.timings = Timings()
        self.kernel = kernel  # the self-attention backend (adapters.attention)
        # (padded frames, stores K/V, query rows through self-attention on this rank) -> forwards run: what
        # cluster.comm needs to account for every byte (an adapter may run extra passes, e.g. MAGI-1's copy)
        self.forwards: Counter[tuple[int, bool, int]] = Counter()
        self._hook_frames: list[int] = []  # frames of the last hooked forward (hook state owners)
        # both guidance branches of this process as one batched forward (not with in-forward reuse hooks,
        # whose state is kept per branch call; a run without guidance has nothing to batch)
        self.batched = batched_branches and topology.branch is None and cond.branches == 2
        if self.batched and not adapter.capabilities.batched_branches:
            raise ConfigError(f"parallel.cfg_mode: batched needs a model that batches its guidance branches; "
                              f"{adapter.name} does not (use sequential)")
        if topology.branch is not None and cond.branches != 2:
            raise ConfigError("parallel.cfg: 2 runs the two classifier-free guidance branches on two rank groups, and "
                              "this run has one branch (guidance 1, or a model without CFG); use cfg=1")

    # --- Eq. 4 ---------------------------------------------------------------------------------
    def discrepancy(self, it: Iteration, frames: list[int], levels: Levels, feature: Feature = Feature.HOST,
                    chunk: int | None = None) -> Discrepancy | None:
        """sum |phi_k - phi_{k-1}| and sum |phi_{k-1}| over `frames` (and, with `chunk`, per chunk of
        `chunk` frames), each rank taking its shard, reduced over ranks in float64 in rank order.

        phi is the policy's signal at this iteration; phi_{k-1} the previous one of the same frame,
        kept on the rank that computed it and handed over when the shard layout moves. None when no
        frame had a previous signal (the first iteration of a frame)."""
        st = self.state
        _, (lo, hi) = self.topo.layout(len(frames))
        self.topo.migrate(st.feature_frames, frames, st.features.keyed())
        mine = frames[lo:hi]
        per: list[tuple[float, float]] = []
        seen = 0
        if mine:
            x = torch.stack([st.latents[f] for f in mine])
            s = torch.tensor([levels[f][0] for f in mine], device=self.device, dtype=torch.float32)
            spec = ForwardSpec(frames=frames, origin=it.start, step=it.index, shard=(lo, min(hi, len(frames))),
                               kernel=self.kernel)
            t0 = time.perf_counter()
            with torch.no_grad():
                if feature == Feature.HOST:
                    phi = self.adapter.host_feature(x, s, self.cond, spec)
                else:
                    phi = self.adapter.named_feature(feature, x, s, self.cond, spec)
            self.timings.feature += time.perf_counter() - t0
            seen = st.features.seen(mine)
            per = st.features.sums(mine, phi)
        st.feature_frames = list(frames)
        # per-frame terms at their slot of the whole interval (zeros elsewhere): the rank-order reduction
        # adds each slot's one nonzero term to zeros, exactly, so every layout then adds the same
        # numbers in frame order (a per-rank subtotal would follow the shard: issue 24)
        values = [0.0] * (2 * len(frames)) + [float(seen)]
        for i, (n, d) in enumerate(per):
            values[2 * (lo + i)], values[2 * (lo + i) + 1] = n, d
        red = self.topo.reduce_shards(values)
        if red[-1] <= 0:
            return None
        terms = list(zip(frames, red[0:-1:2], red[1:-1:2]))
        num, den = sum(n for _, n, _ in terms), sum(d for _, _, d in terms)
        by_chunk: tuple = ()
        if chunk is not None:
            sums: dict[int, list[float]] = {}
            for f, n, d in terms:  # frame order within each chunk
                s = sums.setdefault(f // chunk, [0.0, 0.0])
                s[0] += n
                s[1] += d
            by_chunk = tuple((c, n, d) for c, (n, d) in sorted(sums.items()) if n > 0 or d > 0)
        return Discrepancy(num, den, by_chunk)

    # --- the forward -----------------------------------------------------------------------------
    def forward(self, it: Iteration, frames: list[int], levels: Levels, hooks: ForwardHooks | None = None,
                context_to: int | None = None, hook_state: list[FrameKeyed] = ()) -> ForwardResult:
        """Velocities of `frames` by one forward on this rank's shard (attention across shards).

        Clean context frames whose K/V are not cached are forwarded first in the same call (the clean
        re-forward that writes them); a forward whose hooks skip blocks writes no K/V, so it gets a
        separate clean re-forward first. `context_to`: attend the clean frames before that frame
        instead of the plan's context (FlowCache). `hook_state`: per-frame state of the hooks, handed
        to the frames' owners in this forward's layout."""
        st = self.state
        context, fill = self._context(it, context_to)
        if fill and hooks is not None and hooks.partial:
            clean = self.forward(it, [], levels, context_to=context_to)
            res = self.forward(it, frames, levels, hooks, context_to, hook_state)
            return ForwardResult(res.velocity, res.frames, res.computed + clean.computed, res.flops + clean.flops)
        seq = fill + frames
        n_pad, (lo, hi) = self.topo.layout(len(seq))
        full = seq + [-1] * (n_pad - len(seq))
        if hook_state:
            self.topo.migrate(self._hook_frames, seq, list(hook_state))
            self._hook_frames = list(seq)
        fill_set = set(fill)
        sigmas = tuple(self.schedule.clean if (f in fill_set or f < 0) else levels[f][0] for f in full)
        x = self._rows(full[lo:hi], fill_set)
        s = torch.tensor(sigmas[lo:hi], device=self.device, dtype=torch.float32)
        store = frozenset(fill) | frozenset(f for f in frames if self._is_clean(f, levels)) if self.causal else frozenset()
        spec = ForwardSpec(frames=full, origin=it.start, step=it.index, context=context, store=store,
                           kv=st.kv if self.causal else None, causal=self.causal, shard=(lo, hi), sigmas=sigmas,
                           kernel=self.kernel)
        if hooks is not None:
            spec = hooks.adjust(spec)
            if hooks.partial:
                spec = replace(spec, store=frozenset())
        rows = [0]

        def attention(q, k, v, layer, spec):
            rows[0] += q.shape[0] * q.shape[1]
            return self.topo.attention(q, k, v, layer, spec)

        t0 = time.perf_counter()
        with torch.no_grad():
            out = self._guided(x, s, spec, hooks, attention)
        self.forwards[(n_pad, bool(spec.store), rows[0])] += 1
        vel = self.topo.gather(out, len(seq))
        self.timings.forward += time.perf_counter() - t0
        self._check(vel, it, seq)
        v = {f: vel[i] for i, f in enumerate(seq) if f not in fill_set}
        branches = self.cond.branches
        if hooks is not None and hooks.blocks_run is not None:  # frames counted by the share of blocks run
            ran = round(len(seq) * hooks.blocks_run / max(hooks.depth, 1))
            return ForwardResult(v, seq, ran, self.adapter.flops(len(seq), len(spec.context), hooks.blocks_run, branches))
        return ForwardResult(v, seq, len(seq), self.adapter.flops(len(seq), len(spec.context), None, branches))

    def _check(self, vel: torch.Tensor, it: Iteration, seq: list[int]) -> None:
        """End the run on a NaN, inf or absurd velocity. One reduction (NaN and inf propagate into the
        max), on the gathered velocities: every rank takes the same branch."""
        peak = float(torch.linalg.vector_norm(vel, ord=math.inf)) if vel.numel() else 0.0
        where = f"window {it.window}, iteration {it.index} (serial {it.serial}), frames {seq[0]}..{seq[-1]}"
        if not math.isfinite(peak):
            raise NonFiniteError(f"the model returned NaN or inf velocities at {where}: check the weights and the guidance; "
                                 "frames finished before it are kept")
        if peak > self.max_velocity:
            raise AbsurdVelocityError(
                f"the model returned a velocity of {peak:.3g} at {where}, over the bound {self.max_velocity:g} "
                "(stability.max_velocity x guidance; healthy flow-matching velocities are O(1)): the weights look corrupt, "
                "check the checkpoint; frames finished before it are kept")

    def _context(self, it: Iteration, context_to: int | None) -> tuple[list[int], list[int]]:
        """(clean frames attended as cached K/V, clean frames forwarded first to write theirs): the
        plan's context (or the clean frames before `context_to`), split at the first frame whose K/V
        is not cached. Bidirectional models attend no cached context."""
        if not self.causal:
            return [], []
        context = list(it.context)
        if context_to is not None:
            context = [f for f in range(it.context.start, context_to) if f in self.state.final]
        missing = [f for f in context if not self.state.kv.has(f)]
        if not missing:
            return context, []
        first = context.index(missing[0])
        return context[:first], context[first:]

    def _rows(self, shard: list[int], fill: set[int]) -> torch.Tensor:
        """This rank's input rows [n, C, h, w]: clean latents of the K/V fill, the noisy latents of the
        request, zeros for padding (index -1)."""
        st = self.state
        zero = torch.zeros(self.shape, device=self.device, dtype=self.dtype)
        return torch.stack([st.final[f] if f in fill else st.latents[f] if f >= 0 else zero for f in shard])

    def _guided(self, x: torch.Tensor, s: torch.Tensor, spec: ForwardSpec, hooks, attention) -> torch.Tensor:
        """The guided velocity of this shard: both branches here, or (a cfg mesh) this process's
        branch and its peer's, exchanged and combined in the same order on both (identical results)."""
        a, cond = self.adapter, self.cond
        if self.batched and hooks is None:
            return a.guide(*a.branches_velocity(x, s, cond, spec, attention), cond).float()
        if self.topo.branch is None:
            return a.velocity(x, s, cond, spec, attention, hooks)
        mine = a.branch_velocity(x, s, cond, self.topo.branch, spec, attention, hooks)
        v_cond, v_uncond = self.topo.exchange(mine)
        return a.guide(v_cond, v_uncond, cond).float()

    def _is_clean(self, f: int, levels: Levels) -> bool:
        return f in self.state.final and levels[f][0] == self.schedule.clean
