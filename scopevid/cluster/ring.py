"""Ring attention over the sequence: each rank keeps the queries of its part of the sequence and the
K/V blocks of every part pass round the ring, one hop per step; each step's partial attention comes
with its log-sum-exp and the partials merge exactly (the softmax over all keys, block by block).

The engine's masks hold: a query frame attends the key frames its `key_ranges` entry allows (or,
without ranges, every real frame, or with `causal` those up to its own), padding keys never. Cached
context K/V (clean frames served by selective computation) are replicated over the ring when they
are stored, so every rank attends the context locally; only the forwarded frames' K/V travel.
Partials are computed in float32 with an explicit mask (exact and portable; a fused kernel that
returns the log-sum-exp is the GPU path, see docs/DESIGN_NOTES.md).
"""

from __future__ import annotations

import math

import torch

from scopevid.adapters.base import ForwardSpec
from scopevid.cluster.groups import Group


def _allowed(qf: list[int], kf: list[int], spec: ForwardSpec, ranges: list | None, device) -> torch.Tensor:
    """[Sq_frames, Sk_frames] bool: which key frames each query frame attends."""
    q = torch.tensor(qf, device=device)
    k = torch.tensor(kf, device=device)
    real = (k >= 0)[None, :].expand(len(qf), -1)
    if ranges is not None:
        lo = torch.tensor([r[0] for r in ranges], device=device)[:, None]
        hi = torch.tensor([r[1] for r in ranges], device=device)[:, None]
        ok = real & (k[None, :] >= lo) & (k[None, :] < hi)
    elif spec.causal:
        ok = real & (k[None, :] <= q[:, None])
    else:
        ok = real
    return ok | ((q < 0)[:, None] & real)  # padded queries see every real key: no empty row (outputs dropped)


def partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed_frames: torch.Tensor, tpf: int):
    """(out [B, Sq, h, d] float32, lse [B, h, Sq] float32) of q over k/v under a frame mask; rows with
    no allowed key get out 0 and lse -inf (they add nothing when merged)."""
    h = q.shape[2]
    if k.shape[2] != h:  # grouped-query attention
        k = k.repeat_interleave(h // k.shape[2], dim=2)
        v = v.repeat_interleave(h // v.shape[2], dim=2)
    qt, kt, vt = (x.transpose(1, 2).float() for x in (q, k, v))  # [B, h, S, d]
    scores = qt @ kt.transpose(-1, -2) / math.sqrt(q.shape[-1])
    mask = allowed_frames.repeat_interleave(tpf, 0).repeat_interleave(tpf, 1)
    scores = scores.masked_fill(~mask[None, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    out = p @ vt
    return out.transpose(1, 2), lse


def merge(out_a, lse_a, out_b, lse_b):
    """The exact combination of two partial softmax attentions over disjoint key sets."""
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
    total = wa + wb
    lse = m + torch.log(total)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    out = (out_a * (wa / safe).transpose(1, 2)[..., None] + out_b * (wb / safe).transpose(1, 2)[..., None])
    return out, lse


def ring_attention(q, k, v, layer: int, spec: ForwardSpec, ring: Group, parts: list[tuple[int, int]]) -> torch.Tensor:
    """Attention of this rank's queries (frames spec.frames[lo:hi] of its ring part, all tokens of
    them, [B, S_part, h, d]) over every key of the forward, with k/v [B, S_part, hk, d] this rank's
    part; the parts of the other ring ranks arrive one hop per step. `parts`: the [lo, hi) slots of
    every ring member's part, in ring order (the mesh layout's)."""
    import torch.distributed as dist

    lo, hi = parts[ring.rank]
    my_frames = list(spec.frames[lo:hi])
    tpf = q.shape[1] // max(hi - lo, 1)
    ranges = list(spec.key_ranges[lo:hi]) if spec.key_ranges is not None else None
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
    out = lse = None
    if spec.context:
        got = spec.kv.get(layer, spec.context)
        if got is None:
            raise KeyError(f"KV cache lacks context frames {spec.context[0]}..{spec.context[-1]} at layer {layer}")
        kc, vc = got
        out, lse = partial(q, kc.to(k.dtype), vc.to(v.dtype), _allowed(my_frames, list(spec.context), spec, ranges, q.device), tpf)
    blk_k, blk_v = k.contiguous(), v.contiguous()
    for step in range(ring.world):
        src = (ring.rank - step) % ring.world  # the block in hand came from `step` hops back
        a, b = parts[src]
        key_frames = list(spec.frames[a:b])
        if step < ring.world - 1:  # send this block on while computing on it
            nxt_k, nxt_v = torch.empty_like(blk_k), torch.empty_like(blk_v)
            to, frm = ring.global_rank((ring.rank + 1) % ring.world), ring.global_rank((ring.rank - 1) % ring.world)
            ops = [dist.P2POp(dist.isend, blk_k, to, ring.pg), dist.P2POp(dist.isend, blk_v, to, ring.pg),
                   dist.P2POp(dist.irecv, nxt_k, frm, ring.pg), dist.P2POp(dist.irecv, nxt_v, frm, ring.pg)]
            with ring.collective("ring exchange of a K/V block", "ring", blk_k.numel() * blk_k.element_size()
                                 + blk_v.numel() * blk_v.element_size()):
                works = dist.batch_isend_irecv(ops)
        o, s = partial(q, blk_k, blk_v, _allowed(my_frames, key_frames, spec, ranges, q.device), tpf)
        out, lse = (o, s) if out is None else merge(out, lse, o, s)
        if step < ring.world - 1:
            with ring.collective("ring exchange of a K/V block"):
                for w in works:
                    w.wait()
            blk_k, blk_v = nxt_k, nxt_v
    return out.to(q.dtype)
