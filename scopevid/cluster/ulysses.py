"""Ulysses attention: heads scattered and the sequence gathered by one all-to-all, local attention on
the whole sequence for this rank's heads, and the inverse all-to-all back.

q/k/v of one rank are [B, S_local, H, D] (this rank's frames, every head). After the first all-to-all a
rank holds [B, W * S_local, H / W, D]: every rank's frames in rank order, heads [r * H / W, (r + 1) * H / W)
for rank r. The second all-to-all returns [B, S_local, H, D]. The layout is the one DeepSpeed's
`DistributedAttention(scatter_idx=2, gather_idx=1)` uses for an even head split, so results are
bit-identical to it (tests/test_ulysses.py compares both where DeepSpeed is installed); docs/DESIGN_NOTES.md
says why the engine does not depend on DeepSpeed for these two reshapes around one torch collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def scatter_heads(x: torch.Tensor, world: int, pg) -> torch.Tensor:
    """[B, S_local, H, D] on each rank -> [B, world * S_local, H / world, D] (all frames, this rank's heads)."""
    b, s, h, d = x.shape
    send = x.reshape(b, s, world, h // world, d).contiguous().permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)  # [world (source rank), B, S_local, H / world, D]
    dist.all_to_all_single(recv, send, group=pg)
    return recv.permute(1, 0, 2, 3, 4).contiguous().reshape(b, world * s, h // world, d).contiguous()


def gather_heads(x: torch.Tensor, world: int, pg) -> torch.Tensor:
    """The inverse: [B, world * S_local, H / world, D] -> [B, S_local, H, D] (this rank's frames, all heads)."""
    b, s_full, h, d = x.shape
    send = x.reshape(b, world, s_full // world, h, d).contiguous().permute(1, 0, 2, 3, 4).contiguous()
    recv = torch.empty_like(send)  # [world (source rank: its heads), B, S_local, h, D]
    dist.all_to_all_single(recv, send, group=pg)
    return recv.permute(1, 2, 0, 3, 4).contiguous().reshape(b, s_full // world, world * h, d).contiguous()


class UlyssesAttention:
    """`local(q, k, v, *args)` run between the two all-to-alls over the process group `pg` of `world` ranks.
    The head counts of q and of k/v (grouped-query attention) must both be divisible by `world`: the
    caller checks and says so in one line."""

    def __init__(self, local, pg, world: int):
        self.local, self.pg, self.world = local, pg, world

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args) -> torch.Tensor:
        w, pg = self.world, self.pg
        out = self.local(scatter_heads(q, w, pg), scatter_heads(k, w, pg), scatter_heads(v, w, pg), *args)
        return gather_heads(out, w, pg)
