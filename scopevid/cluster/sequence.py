"""The engine's Topology for a mesh of ranks: `MeshTopology` implements `engine.topology.Topology`
over one rank's `ParallelState` (cluster.groups), which owns the layout.

Sharding rule (scopevid.mesh). A forward over n frames is padded at the END to n_pad = ceil(n / W) * W
frames, W the sequence ranks (padding frames have index -1: zero latents, clean sigma, masked as keys
by `local_attention`, outputs dropped), and sequence rank s holds the contiguous slots
[s * n_pad / W, (s + 1) * n_pad / W). Every rank thus holds the same number of frames (Ulysses'
all-to-all needs equal shards), at most W - 1 padding frames are computed in total, and only the
last ranks carry padding (a rank may hold padding only, e.g. n = 1). The host feature uses the same
rule without computing padding (a rank whose slots are all padding contributes zero sums).

Attention (`MeshTopology.attention`): Ulysses (cluster.ulysses, torch's all_to_all_single; the layout of
DeepSpeed's `DistributedAttention(scatter_idx=2, gather_idx=1)`, bit for bit). Each rank's q/k/v
[B, S_local, H, D] are exchanged by all-to-all into
[B, S_full, H / W, D]; `local_attention` runs on the whole padded sequence for H / W heads (this is
where the KV cache is written and read, so every rank caches its own heads for every frame and no
K/V ever moves between ranks); a second all-to-all returns [B, S_local, H, D]. H must be divisible by
W (a ConfigError says so otherwise).

Velocities (`gather`): all-gather of every rank's [n_pad / W, ...] rows, concatenated in rank order,
padding dropped: every rank then holds the same velocities, takes the same solver step and keeps
identical latents and velocity histories (so histories need no hand-over).

Host features (`migrate`): the previous host feature of a frame lives on the rank that computed it.
When the compute interval slides, a frame's owner can change; before the new host feature is
computed, every rank announces which stored frames it holds that now belong to another rank
(all_gather_object of (frame, destination, shape, dtype) only, no payload), then the tensors move
point to point (batch_isend_irecv) and the sender forgets them. So the N-rank discrepancy sums run
over exactly the terms of the 1-rank sums. When the frame list did not change, ownership did not
either and no collective is issued (every rank takes the same branch: the lists are replicated).
"""

from __future__ import annotations

import time

import torch

from scopevid.adapters.base import ForwardSpec, local_attention
from scopevid.cluster import consensus
from scopevid.cluster.groups import ParallelState
from scopevid.cluster.ulysses import UlyssesAttention
from scopevid.cluster.weights import NodeShared
from scopevid.engine.topology import FrameKeyed
from scopevid.errors import ConfigError


class _LocalFailure(Exception):
    """Carries an error raised inside local attention past `Group.collective` unchanged."""

    def __init__(self, original: BaseException):
        super().__init__(str(original))
        self.original = original


class MeshTopology:
    """The frames of every forward sharded over the sequence ranks of this rank's video; attention by
    Ulysses all-to-all over heads and, with a ring, K/V passed round it; the guidance branches on
    two rank groups with cfg=2. What the layout is, `state` (a ParallelState) says.

    `rank` / `world` are this process's place among its video's ranks (the writer, checkpoint files,
    control flags); the shard layout and the discrepancy sums are the sequence group's; `branch` /
    `exchange` let the engine run one guidance branch here and combine it with the other."""

    def __init__(self, state: ParallelState):
        self.state = state
        self.group = state.sp  # the ranks of one forward: shards, discrepancy sums, the velocity gather
        self.video = state.video
        self.cfg = state.cfg if state.cfg.world > 1 else None
        self.ring = state.ring if state.ring.world > 1 else None
        self.uly = state.ulysses  # the all-to-all's ranks
        self.rank, self.world = self.video.rank, self.video.world
        self.sp_world = self.group.world
        self.heads_split = self.uly.world
        self.branch = state.branch
        self.weights = NodeShared(state.node)  # adapters.weights.WeightSource: one rank per node reads the checkpoint
        self.migrated_frames = 0  # per-frame states handed to another rank (stats)
        self.handovers = 0  # hand-over rounds that issued collectives
        self.local_attention_seconds = 0.0  # attention compute inside the Ulysses all-to-alls (stats)
        self._ulysses = UlyssesAttention(self._local, self.uly.pg, self.uly.world) if self.uly.world > 1 else None

    # --- Topology protocol --------------------------------------------------------------------
    def layout(self, n: int) -> tuple[int, tuple[int, int]]:
        return self.state.shard(n)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, spec: ForwardSpec) -> torch.Tensor:
        if self._ulysses is None:
            return self._local(q, k, v, layer, spec, direct=True)
        heads, uw = q.shape[2], self.uly.world
        if heads % uw or k.shape[2] % uw:
            raise ConfigError(
                f"parallel.ulysses: Ulysses sequence parallelism splits attention heads over ranks, and this model has "
                f"{heads} query / {k.shape[2]} key heads, not divisible by {uw} ranks; use a degree that divides {heads}"
            )
        # four all-to-alls (q, k, v in, out back): each rank keeps 1/U of every tensor and sends the rest
        sent = (uw - 1) * (2 * q.numel() + k.numel() + v.numel()) * q.element_size() // uw
        try:
            with self.uly.collective(f"Ulysses all-to-all of attention layer {layer}", "ulysses", sent):
                return self._ulysses(q, k, v, layer, spec)
        except _LocalFailure as f:
            raise f.original

    def _local(self, q, k, v, layer, spec, direct: bool = False):
        """Attention between the all-to-alls: the whole sequence here (Ulysses), or this ring part's
        queries over every part's keys (ring)."""
        if self.ring is None:
            if direct:
                return local_attention(q, k, v, layer, spec)
            t0 = time.monotonic()
            try:
                return local_attention(q, k, v, layer, spec)
            except Exception as e:  # not a communication error: re-raised as is by attention()
                raise _LocalFailure(e) from e
            finally:
                self.local_attention_seconds += time.monotonic() - t0
        from scopevid.cluster.ring import ring_attention

        return ring_attention(q, k, v, layer, spec, self.ring, self.state.ring_parts(len(spec.frames)))

    @property
    def comm_seconds(self) -> float:
        """Wall time in collectives, attention compute excluded (includes waiting for slower ranks),
        over every group of this rank: shards, Ulysses, ring, guidance branches, control flags."""
        return sum(g.comm_seconds for g in self.state.groups()) - self.local_attention_seconds

    def comm_bytes(self) -> dict[str, int]:
        """Bytes this rank sent, by kind (cluster.comm.KINDS), over every group it belongs to."""
        out: dict[str, int] = {}
        for g in self.state.groups():
            for k, v in g.sent_bytes.items():
                out[k] = out.get(k, 0) + v
        return out

    def allreduce(self, values: list[float]) -> list[float]:
        return consensus.reduce_sums(self.video, values, "all-reduce of a control flag")

    def reduce_shards(self, values: list[float]) -> list[float]:
        return consensus.reduce_sums(self.group, values)

    def gather(self, local: torch.Tensor, n: int) -> torch.Tensor:
        if self.sp_world == 1:
            return local[:n]
        import torch.distributed as dist

        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(self.sp_world)]
        with self.group.collective("all-gather of velocities", "gather", (self.sp_world - 1) * local.numel() * local.element_size()):
            dist.all_gather(parts, local, group=self.group.pg)
        return torch.cat(parts)[:n]

    def exchange(self, mine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) velocities of this shard: this rank's branch and its cfg peer's."""
        import torch.distributed as dist

        mine = mine.contiguous()
        parts = [torch.empty_like(mine) for _ in range(2)]
        with self.cfg.collective("all-gather of the guidance branches", "cfg", mine.numel() * mine.element_size()):
            dist.all_gather(parts, mine, group=self.cfg.pg)
        return parts[0], parts[1]

    def check(self, digest: str) -> None:
        consensus.check_digest(self.video, digest, "decision")

    def state_dict(self) -> dict:
        return {"migrated_frames": self.migrated_frames, "handovers": self.handovers}

    def load_state_dict(self, state: dict) -> None:
        self.migrated_frames, self.handovers = int(state["migrated_frames"]), int(state["handovers"])

    def migrate(self, old: list[int], new: list[int], stores: list[FrameKeyed]) -> None:
        if self.sp_world == 1 or list(old) == list(new):
            return
        import torch.distributed as dist

        owner = {f: self.state.layout.shard_owner(i, len(new)) for i, f in enumerate(new)}
        dicts = [s.data for s in stores]
        # what this rank holds that another rank owns now: tensors go point to point, anything else
        # (e.g. a history deque) rides along in the announcement
        plan, tensors = [], []
        for si, d in enumerate(dicts):
            frame_of = stores[si].frame_of
            for key in sorted(d, key=lambda k: (frame_of(k), repr(k))):  # keys may be tuples
                dst = owner.get(frame_of(key))
                if dst is None or dst == self.group.rank:
                    continue
                val = d[key]
                if isinstance(val, torch.Tensor):
                    plan.append((si, key, dst, tuple(val.shape), val.dtype, None))
                    tensors.append(val.contiguous())
                else:
                    plan.append((si, key, dst, None, None, val))
        plans = consensus.gather_objects(self.group, plan, "shard hand-over announcement")
        if not any(plans):
            return
        ops, received = [], []
        ti = 0
        for si, f, dst, shape, dtype, payload in plan:
            if payload is None:  # point-to-point peers are global ranks
                ops.append(dist.P2POp(dist.isend, tensors[ti], self.group.global_rank(dst), self.group.pg))
                ti += 1
        for src, their in enumerate(plans):
            for si, f, dst, shape, dtype, payload in their:
                if dst != self.group.rank:
                    continue
                if payload is not None:
                    received.append((si, f, payload))
                else:
                    buf = torch.empty(shape, dtype=dtype, device=self.group.device)
                    ops.append(dist.P2POp(dist.irecv, buf, self.group.global_rank(src), self.group.pg))
                    received.append((si, f, buf))
        if ops:
            sent = sum(t.numel() * t.element_size() for t in tensors)
            with self.group.collective("point-to-point hand-over of per-frame state", "handover", sent):
                for work in dist.batch_isend_irecv(ops):
                    work.wait()
        for si, f, dst, *_ in plan:
            del dicts[si][f]
        for si, f, val in received:
            dicts[si][f] = val
        self.migrated_frames += sum(len(p) for p in plans)
        self.handovers += 1
