"""Identical decisions on every rank.

SCOPE (and TeaCache-like policies) threshold a ratio of two sums over all frames of the compute
interval. Each rank holds the partial sums of its own frames; `reduce_sums` combines them so every
rank computes the same d_k and takes the same Cache / Predict / Recompute decision, with no
collective that only one branch issues (the deadlock of vllm-omni #6180).

The combination is an all-gather of the float64 partials followed by a sum in rank order, done
identically on every rank: the result is bit-identical across ranks by construction (it does not rely
on how a backend orders an all-reduce), and it is the float64 sum over the same terms as one rank
takes, so a threshold decision cannot flip between 1 and N ranks except for a value within a few
ulps of the threshold.

`check_digest` is the debug cross-check: every rank contributes a digest of its decision; any
disagreement raises a DistributedError naming the ranks and digests. `check_same` does the same
for any value that must agree before a run starts (config, seed).
"""

from __future__ import annotations

import hashlib
import json

import torch

from scopevid.cluster.groups import Group
from scopevid.errors import RanksDisagree


def reduce_sums(group: Group, values: list[float], what: str = "all-reduce of discrepancy sums") -> list[float]:
    """Sum each value over ranks in float64; bit-identical on every rank."""
    import torch.distributed as dist

    if group.world == 1:
        return [float(v) for v in values]
    local = torch.tensor([float(v) for v in values], dtype=torch.float64, device=group.device)
    parts = [torch.empty_like(local) for _ in range(group.world)]
    with group.collective(what):
        dist.all_gather(parts, local, group=group.pg)
    total = parts[0].cpu().clone()
    for p in parts[1:]:
        total += p.cpu()
    return [float(v) for v in total]


def gather_objects(group: Group, obj, what: str) -> list:
    import torch.distributed as dist

    if group.world == 1:
        return [obj]
    out = [None] * group.world
    with group.collective(what):
        dist.all_gather_object(out, obj, group=group.pg)
    return out


def check_digest(group: Group, digest: str, what: str = "decision") -> None:
    """Raise on every rank if the ranks' digests differ."""
    got = gather_objects(group, digest, f"{what} digest check")
    if any(d != got[0] for d in got):
        detail = ", ".join(f"rank {r}: {d}" for r, d in enumerate(got))
        raise RanksDisagree(f"ranks disagree on the {what} ({detail})")


def digest_of(value) -> str:
    blob = json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def check_same(group: Group, value, what: str) -> None:
    """Fail fast (before any rollout) when ranks were started with different settings."""
    check_digest(group, digest_of(value), what)
