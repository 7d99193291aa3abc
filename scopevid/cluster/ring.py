"""Ring attention over the sequence: each rank keeps the queries of its part of the sequence and the
K/V blocks of every part pass round the ring, one hop per step, until every rank holds the K/V of the
whole forward (for its heads); then its query rows attend them in ONE call of the run's kernel
(`adapters.base.local_attention` with the part's query slots).

Why not merge per-block partials by their log-sum-exp (what this module did, and ring-flash kernels
do): the merge is exact in real numbers, not in floats. A block-wise softmax rounds differently from
the one softmax one process computes, so ring=2 gave other bits than one process, which the rollout
amplified to a visibly different video (issue 24). One call over the gathered K/V gives every query
row the keys and kernel shapes of the unsharded forward: bit for bit the 1-process video. The cost is
memory (a rank holds every part's K/V for its heads, as Ulysses does) and the overlap of each hop
with a block's compute; the bytes sent are the same (docs/BENCHMARKS.md measures the time).

The engine's masks hold: a query frame attends the key frames its `key_ranges` entry allows (or,
without ranges, every real frame, or with `causal` those up to its own), padding keys never. Cached
context K/V (clean frames served by selective computation) are replicated over the ring when they
are stored, so every rank attends the context locally; only the forwarded frames' K/V travel.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from scopevid.adapters.base import ForwardSpec, local_attention
from scopevid.cluster.groups import Group


def ring_attention(q, k, v, layer: int, spec: ForwardSpec, ring: Group, parts: list[tuple[int, int]]) -> torch.Tensor:
    """Attention of this rank's queries (frames spec.frames[lo:hi] of its ring part, all tokens of
    them, [B, S_part, h, d]) over every key of the forward, with k/v [B, S_part, hk, d] this rank's
    part; the parts of the other ring ranks arrive one hop per step. `parts`: the [lo, hi) slots of
    every ring member's part, in ring order (the mesh layout's)."""
    import torch.distributed as dist

    lo, hi = parts[ring.rank]
    tpf = q.shape[1] // max(hi - lo, 1)
    if spec.kv is not None and spec.store:  # the stored frames' K/V on every ring rank (context later)
        kv_all = [torch.empty_like(k) for _ in range(ring.world)], [torch.empty_like(v) for _ in range(ring.world)]
        sent = (ring.world - 1) * (k.numel() * k.element_size() + v.numel() * v.element_size())
        with ring.collective("all-gather of stored K/V over the ring", "ring_store", sent):
            dist.all_gather(kv_all[0], k.contiguous(), group=ring.pg)
            dist.all_gather(kv_all[1], v.contiguous(), group=ring.pg)
        for src in range(ring.world):
            a, b = parts[src]
            for i, f in enumerate(spec.frames[a:b]):
                if f in spec.store:
                    sl = slice(i * tpf, (i + 1) * tpf)
                    spec.kv.put(layer, f, kv_all[0][src][:, sl].clone(), kv_all[1][src][:, sl].clone())
    blocks: list = [None] * ring.world  # every part's K/V, by part: the full sequence once the ring went round
    blk_k, blk_v = k.contiguous(), v.contiguous()
    for step in range(ring.world):
        src = (ring.rank - step) % ring.world  # the block in hand came from `step` hops back
        blocks[src] = (blk_k, blk_v)
        if step < ring.world - 1:
            nxt_k, nxt_v = torch.empty_like(blk_k), torch.empty_like(blk_v)
            to, frm = ring.global_rank((ring.rank + 1) % ring.world), ring.global_rank((ring.rank - 1) % ring.world)
            ops = [dist.P2POp(dist.isend, blk_k, to, ring.pg), dist.P2POp(dist.isend, blk_v, to, ring.pg),
                   dist.P2POp(dist.irecv, nxt_k, frm, ring.pg), dist.P2POp(dist.irecv, nxt_v, frm, ring.pg)]
            with ring.collective("ring exchange of a K/V block", "ring", blk_k.numel() * blk_k.element_size()
                                 + blk_v.numel() * blk_v.element_size()):
                for w in dist.batch_isend_irecv(ops):
                    w.wait()
            blk_k, blk_v = nxt_k, nxt_v
    k_all = torch.cat([b[0] for b in blocks], dim=1)
    v_all = torch.cat([b[1] for b in blocks], dim=1)
    # this part's query rows over every key, through the one kernel and the shapes one process uses
    # (the K/V were stored above on every ring rank)
    return local_attention(q, k_all, v_all, layer, replace(spec, store=frozenset()), queries=(lo, hi))
