"""The parallel mesh on real gloo processes: classifier-free guidance branches on two rank groups
(`parallel.cfg: 2`), alone and times Ulysses (cfg=2 x ulysses=2 on 4 processes), give the 1-process
video (latents bit-equal) with identical decisions, under Original and
scope-fast, on the tiny model and a tiny SkyReels-V2 checkpoint.

The cfg ranks exchange one branch's velocity rows per forward and combine them in one order, so
both hold the same guided velocity; the discrepancy sums reduce over the sequence shards only (the
branch replicas hold the same terms), and the decision digests are cross-checked over every rank of
the video at every iteration (check_decisions).
"""

from __future__ import annotations

import pytest
import torch

from conftest import ROOT, write_tiny_config
from scopevid.cluster.launch import spawn
from scopevid.cluster.worker import collect_rollout
from scopevid.config import ParallelConfig
from scopevid.engine.topology import LocalTopology

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
TOL = 0.0  # the same bits as one process (docs/DESIGN_NOTES.md 35)
ENV = {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}


def _mesh_runs(cases, world: int, mesh: ParallelConfig) -> list[list[dict]]:
    return spawn("scopevid.cluster.worker:collect_rollout_many", world, args=(cases,), kwargs={"check_decisions": True},
                 timeout_s=500, threads=1, dist_timeout_s=60, env=ENV, mesh=mesh)


def _assert_same(ref: dict, ranks: list[dict]) -> None:
    for r in ranks:
        assert r["frames"] == ref["frames"] == list(range(ref["latent_frames"]))
        assert torch.equal(r["latents"], ranks[0]["latents"])  # every rank holds the same video
        diff = float((r["latents"] - ref["latents"]).abs().max())
        assert diff <= TOL, f"mesh video differs from 1 process by {diff}"
        assert r["records"] == ranks[0]["records"]  # identical on every rank of the video
        # the same decisions as one process (serial, mode, reason, compute interval)
        assert [x[:3] + x[5:] for x in r["records"]] == [x[:3] + x[5:] for x in ref["records"]]
        assert r["records"] == ref["records"]  # d and r too, to the last bit
        assert r["modes"] == ref["modes"] and r["digest"] == ref["digest"]


@pytest.fixture(scope="module")
def tiny_cases(tmp_path_factory):
    d = tmp_path_factory.mktemp("mesh")
    cfg = str(write_tiny_config(d, frames=20, guidance=2.5, schedule={"selective": "causal"}))
    cases = [(cfg, "original"), (cfg, "scope-fast")]
    one = [collect_rollout(LocalTopology(), p, policy, check_decisions=True) for p, policy in cases]
    assert one[1]["counts"]["cache"] + one[1]["counts"]["predict"] > 0  # SCOPE really skipped work
    return cases, one


def test_cfg2_on_two_processes_equals_one(tiny_cases):
    cases, one = tiny_cases
    runs = _mesh_runs(cases, 2, ParallelConfig(cfg=2))
    for i in range(len(cases)):
        _assert_same(one[i], [runs[r][i] for r in range(2)])


def test_cfg2_times_ulysses2_on_four_processes_equals_one(tiny_cases):
    cases, one = tiny_cases
    runs = _mesh_runs(cases, 4, ParallelConfig(cfg=2, ulysses=2))
    for i in range(len(cases)):
        _assert_same(one[i], [runs[r][i] for r in range(4)])
    assert runs[0][1]["handovers"] > 0  # scope-fast: the sequence shards really moved within each branch group


@pytest.fixture(scope="module")
def skyreels_cases(tmp_path_factory):
    sky = pytest.importorskip("test_skyreels_v2")  # its tiny-checkpoint builder (diffusers + transformers)
    from test_cluster_skyreels import case_config

    tmp = tmp_path_factory.mktemp("mesh_skyreels")
    ckpt = sky.build_tiny_checkpoint(tmp / "SkyReels-V2-DF-tiny")
    cases = [(case_config(sky, ckpt, tmp / f"case{i}.yaml", policy, block, "paper"), policy)
             for i, (policy, block) in enumerate([("original", 0), ("scope-fast", 0), ("scope-fast", 2)])]
    torch.set_num_threads(1)
    one = [collect_rollout(LocalTopology(), p, policy, check_decisions=True) for p, policy in cases]
    return cases, one


def test_skyreels_cfg2_on_two_processes_equals_one(skyreels_cases):
    """Bidirectional and block-causal (per-branch K/V caches, each on its own branch's ranks)."""
    cases, one = skyreels_cases
    runs = _mesh_runs(cases, 2, ParallelConfig(cfg=2))
    for i in range(len(cases)):
        _assert_same(one[i], [runs[r][i] for r in range(2)])


# --- ring attention ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def odd_heads_cases(tmp_path_factory):
    """A tiny model with 3 attention heads: no Ulysses degree above 1 splits it; ring does."""
    d = tmp_path_factory.mktemp("ring")
    arch = {"size": 16, "patch": 4, "dim": 48, "depth": 2, "heads": 3,
            "vocab": ["<null>", "red", "green", "blue", "square", "moving", "left", "right"]}
    cfg = str(write_tiny_config(d, frames=20, guidance=2.5, schedule={"selective": "causal"},
                                model={"kind": "tiny", "weights": "random", "init_seed": 0, "shift": 3.0, "arch": arch}))
    cases = [(cfg, "original"), (cfg, "scope-fast")]
    one = [collect_rollout(LocalTopology(), p, policy, check_decisions=True) for p, policy in cases]
    return cases, one


def test_ring2_splits_a_model_with_three_heads(odd_heads_cases):
    cases, one = odd_heads_cases
    runs = _mesh_runs(cases, 2, ParallelConfig(ring=2))
    for i in range(len(cases)):
        _assert_same(one[i], [runs[r][i] for r in range(2)])


def test_ring3_on_three_processes_equals_one(odd_heads_cases):
    """Three ring ranks: each K/V block makes two hops, so a ring that takes its blocks from the wrong
    neighbour (or labels them with the wrong part) attends the wrong keys."""
    cases, one = odd_heads_cases
    runs = _mesh_runs(cases, 3, ParallelConfig(ring=3))
    for i in range(len(cases)):
        _assert_same(one[i], [runs[r][i] for r in range(3)])


def test_ulysses2_times_ring2_on_four_processes_equals_one(tiny_cases):
    cases, one = tiny_cases
    runs = _mesh_runs(cases, 4, ParallelConfig(ulysses=2, ring=2))
    for i in range(len(cases)):
        _assert_same(one[i], [runs[r][i] for r in range(4)])


def test_skyreels_ring2_on_two_processes_equals_one(skyreels_cases):
    """Ring over a bidirectional window and a block-causal one (key ranges, cached K/V context)."""
    cases, one = skyreels_cases
    runs = _mesh_runs(cases, 2, ParallelConfig(ring=2))
    for i in range(len(cases)):
        _assert_same(one[i], [runs[r][i] for r in range(2)])
