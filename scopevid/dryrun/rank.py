"""`RankView`: the topology of rank 0 of a mesh, alone, on meta tensors: what one rank holds.

A dry run has no peers. This topology gives rank 0 its shard of every forward (the same layout as
cluster.sequence) and stands in for the collectives with tensors of the shapes they would return:
Ulysses' all-to-alls turn [tokens of the shard, all heads] into [tokens of the ring part, heads / U]
and back; the velocity gather returns the whole sequence; the cfg exchange returns a second
branch. So the activations, the K/V cache (this rank's heads of every frame) and the state a rank
keeps are those of the real run, and the memory tracker sees them. Ring attention allocates one
step's float32 partial and the ring's K/V blocks, as cluster.ring does. Sums are this rank's own
(the decisions of a dry run are fixed anyway); no state moves between shards.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from scopevid.adapters.base import ForwardSpec, local_attention
from scopevid.engine.topology import LocalTopology
from scopevid.mesh import MeshLayout


class RankView(LocalTopology):
    """Sums, checks and state stay those of one process (LocalTopology); shapes are a mesh rank's."""

    rank = 0

    def __init__(self, mesh: MeshLayout):
        super().__init__()
        self.mesh = mesh.group_mesh()  # one video's ranks (dp groups hold the same)
        self.U, self.R = self.mesh.ulysses, self.mesh.ring
        self.sp = self.mesh.seq
        self.world = self.mesh.video_world
        self.heads_split = self.U
        self.branch = self.mesh.branch(self.rank)

    def layout(self, n: int) -> tuple[int, tuple[int, int]]:
        return self.mesh.shard(n, self.rank)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, spec: ForwardSpec) -> torch.Tensor:
        U, R = self.U, self.R
        b, s, h, d = q.shape
        if h % U or k.shape[2] % U:
            raise ValueError(f"{h} query / {k.shape[2]} K/V heads are not divisible by ulysses={U}")
        q2 = torch.empty((b, s * U, h // U, d), dtype=q.dtype, device=q.device)  # after the all-to-all
        k2 = torch.empty((b, s * U, k.shape[2] // U, d), dtype=k.dtype, device=k.device)
        v2 = torch.empty((b, s * U, v.shape[2] // U, d), dtype=v.dtype, device=v.device)
        if R == 1:
            o2 = local_attention(q2, k2, v2, layer, spec)
        else:
            o2 = self._ring(q2, k2, v2, layer, spec)
        del o2
        return torch.empty_like(q)  # the all-to-all back: this shard's tokens, every head

    def _ring(self, q2, k2, v2, layer: int, spec: ForwardSpec) -> torch.Tensor:
        """What cluster.ring holds: the stored frames' K/V cached here, every part's K/V passed round
        and joined, then one attention call of this part's query rows over the whole sequence."""
        lo, hi = self.mesh.ring_part(len(spec.frames), self.mesh.coords(self.rank).r)
        tpf = q2.shape[1] // max(hi - lo, 1)
        if spec.kv is not None and spec.store:  # every part's K/V all-gathered, then the stored frames cached here
            gathered = [torch.empty_like(k2) for _ in range(2 * self.R)]
            for f in spec.frames:
                if f in spec.store:
                    shape = (k2.shape[0], tpf, *k2.shape[2:])
                    spec.kv.put(layer, f, torch.empty(shape, dtype=k2.dtype, device=k2.device),
                                torch.empty(shape, dtype=v2.dtype, device=v2.device))
            del gathered
        k_all = torch.cat([torch.empty_like(k2) for _ in range(self.R)], dim=1)
        v_all = torch.cat([torch.empty_like(v2) for _ in range(self.R)], dim=1)
        return local_attention(q2, k_all, v_all, layer, replace(spec, store=frozenset()), queries=(lo, hi))

    def gather(self, local: torch.Tensor, n: int) -> torch.Tensor:
        if self.sp == 1:
            return local[:n]
        return torch.empty((local.shape[0] * self.sp, *local.shape[1:]), dtype=local.dtype, device=local.device)[:n]

    def exchange(self, mine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return mine, torch.empty_like(mine)
