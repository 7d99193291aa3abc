"""Ulysses attention (cluster.ulysses) on 2 real gloo processes: equal to one process's attention over
the whole sequence, the all-to-all pair is an exact round trip, and, where DeepSpeed is installed, every
output is bit-identical to DeepSpeed's `DistributedAttention(scatter_idx=2, gather_idx=1)`, the layer it
replaced (grouped-query heads included)."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch

from conftest import ROOT
from scopevid.cluster.launch import spawn
from scopevid.extras import available

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
ENV = {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
SHAPES = [(1, 6, 4, 4, 8), (2, 5, 6, 2, 16)]  # (B, frames per rank, query heads, key/value heads, head dim)


def _full(q, k, v, *_):
    """Local attention over [B, S, h, D] (heads second for SDPA); grouped-query K/V repeated."""
    rep = q.shape[2] // k.shape[2]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)))
    return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2).contiguous()


def _inputs(b, s, h, hk, d, world):
    g = torch.Generator().manual_seed(7)
    return [torch.randn(b, s * world, n, d, generator=g) for n in (h, hk, hk)]


def _suite(topo, with_deepspeed: bool):
    """Runs on every rank: this rank's slice of each case through our Ulysses (and DeepSpeed's)."""
    from scopevid.cluster.ulysses import UlyssesAttention, gather_heads, scatter_heads

    pg, world, rank = topo.uly.pg, topo.uly.world, topo.uly.rank
    ours = UlyssesAttention(_full, pg, world)
    theirs = _deepspeed(topo, pg) if with_deepspeed else None
    out = []
    for b, s, h, hk, d in SHAPES:
        q, k, v = (x[:, rank * s:(rank + 1) * s] for x in _inputs(b, s, h, hk, d, world))
        mid = scatter_heads(q, world, pg)
        res = {"ours": ours(q, k, v, 0, None), "roundtrip": torch.equal(gather_heads(mid, world, pg), q),
               "mid_shape": tuple(mid.shape)}
        if theirs is not None:
            res["deepspeed"] = theirs(q, k, v, 0, None, 0, None)
        out.append(res)
    return out


def _deepspeed(topo, pg):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import importlib

    import deepspeed
    import deepspeed.comm as ds_comm
    from deepspeed.sequence.layer import DistributedAttention

    if not ds_comm.is_initialized():
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # no 20 s C++ build
        deepspeed.init_distributed(dist_backend="gloo", verbose=False, timeout=timedelta(seconds=60))
    return DistributedAttention(_full, pg, scatter_idx=2, gather_idx=1)


@pytest.fixture(scope="module")
def runs():
    return spawn("test_ulysses:_suite", 2, args=(available("deepspeed"),), timeout_s=240, threads=1, env=ENV)


def test_two_ranks_equal_one_process(runs):
    for i, (b, s, h, hk, d) in enumerate(SHAPES):
        q, k, v = _inputs(b, s, h, hk, d, 2)
        ref = _full(q, k, v)
        got = torch.cat([runs[r][i]["ours"] for r in range(2)], dim=1)
        assert got.shape == ref.shape
        assert float((got - ref).abs().max()) < 1e-6
        for r in range(2):
            assert runs[r][i]["roundtrip"] and runs[r][i]["mid_shape"] == (b, 2 * s, h // 2, d)


def test_bit_identical_to_deepspeed(runs):
    if not available("deepspeed"):
        pytest.skip("DeepSpeed is not installed (the reference of this comparison only)")
    for r in range(2):
        for i in range(len(SHAPES)):
            assert torch.equal(runs[r][i]["ours"], runs[r][i]["deepspeed"]), (r, SHAPES[i])
