"""The communication model (cluster.comm) against the bytes real gloo runs put on the wire: every
forward of a rollout, summed per kind (Ulysses all-to-alls, ring K/V passes, the ring's K/V store
gather, the velocity gather, the guidance-branch exchange), equals what the collectives counted,
byte for byte, on meshes that exercise every kind (tiny model: ulysses=2 x ring=2 with its causal
K/V store, cfg=2 x ulysses=2; a tiny SkyReels-V2 checkpoint: ulysses=2), under Original and
scope-fast (whose forwards are shorter and uneven). The same formulas, at published sizes, make
docs/COMM_MODEL.md."""

from __future__ import annotations

import pytest

from conftest import ROOT, TINY_ARCH, write_tiny_config
from scopevid.adapters.base import AttentionShape
from scopevid.cluster import comm
from scopevid.cluster.launch import spawn
from scopevid.mesh import MeshLayout

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
ENV = {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}


def _runs(cases, world: int, mesh: MeshLayout) -> list[list[dict]]:
    return spawn("scopevid.cluster.worker:collect_rollout_many", world, args=(cases,), kwargs={"check_decisions": False},
                 timeout_s=500, threads=1, dist_timeout_s=60, env=ENV, mesh=mesh.parallel)


def _predicted(run: dict, mesh: MeshLayout) -> dict[str, int]:
    total = dict.fromkeys(comm.KINDS[:-1], 0)
    extra = run.setdefault("extra_pass_forwards", [0, 0])
    shape = run["attention_shape"]
    for (n_pad, stores, rows), count in run["forwards"].items():
        one = comm.forward_bytes(shape, mesh, n_pad, stores=stores, frame_elems=run["frame_elems"], rows=rows, branch_bytes=4)
        plain = shape.layers * comm.passes(mesh, run["guided"]) * n_pad // (mesh.ulysses * mesh.ring) * shape.tokens_per_frame
        assert rows >= plain, (n_pad, rows, plain)
        extra[rows > plain] += count  # forwards with more passes than the branches (MAGI-1 distill's copy)
        for k, v in one.items():
            total[k] += count * v
    return total


def _assert_model(runs: list[list[dict]], mesh: MeshLayout, kinds: set[str], extra_passes: bool = False) -> None:
    for rank_runs in runs:
        for run in rank_runs:
            measured = {k: v for k, v in run["comm_bytes"].items() if k != "handover"}
            predicted = {k: v for k, v in _predicted(run, mesh).items() if v}
            assert measured == predicted, (mesh, measured, predicted)
            assert set(measured) == kinds, measured  # every kind of this mesh really ran
            # every forward ran the branches' passes and no more, unless the adapter adds some
            assert bool(run["extra_pass_forwards"][1]) == extra_passes, run["forwards"]


@pytest.fixture(scope="module")
def tiny_cases(tmp_path_factory):
    cfg = str(write_tiny_config(tmp_path_factory.mktemp("comm"), frames=20, guidance=2.5))
    return [(cfg, "original"), (cfg, "scope-fast")]


def test_attention_shape_is_the_architecture():
    from scopevid import adapters

    a = adapters.load({"kind": "tiny", "weights": "random", "init_seed": 0, "arch": TINY_ARCH}, "cpu")
    hd = TINY_ARCH["dim"] // TINY_ARCH["heads"]
    tpf = (TINY_ARCH["size"] // TINY_ARCH["patch"]) ** 2
    assert a.attention_shape() == AttentionShape(TINY_ARCH["depth"], TINY_ARCH["heads"], TINY_ARCH["heads"], hd, tpf, 4)


def test_hand_computed_bytes_of_one_forward():
    """ulysses=2 x ring=2, 8 frames, 2 layers, 4 heads of 8, 16 tokens a frame, fp16, guided, storing."""
    s = AttentionShape(layers=2, heads=4, kv_heads=2, head_dim=8, tokens_per_frame=16, element_bytes=2)
    got = comm.forward_bytes(s, MeshLayout(ulysses=2, ring=2), 8, stores=True, guided=True, frame_elems=48)
    tokens = 2 * 16  # 8 frames over 4 sequence ranks
    assert got["ulysses"] == 2 * 2 * (tokens * (4 + 4 + 2 + 2) * 8 * 2 // 2)  # passes x layers x half of q,out,k,v
    assert got["ring"] == got["ring_store"] == 2 * 2 * 1 * 2 * tokens * 2 * 8 * 2  # passes x layers x hops x (k,v)
    assert got["gather"] == 3 * 2 * 48 * 4 and got["cfg"] == 0
    cfg = comm.forward_bytes(s, MeshLayout(cfg=2, ulysses=2), 8, stores=False, guided=True, frame_elems=48)
    assert cfg["cfg"] == 4 * 48 * 2 and cfg["ring"] == 0 and cfg["gather"] == 1 * 4 * 48 * 4
    assert cfg["ulysses"] == 1 * 2 * (2 * tokens * (4 + 4 + 2 + 2) * 8 * 2 // 2)  # one branch, twice the tokens


def test_ulysses2_times_ring2_bytes_match_the_model(tiny_cases):
    mesh = MeshLayout(ulysses=2, ring=2)
    _assert_model(_runs(tiny_cases, 4, mesh), mesh, {"ulysses", "ring", "ring_store", "gather"})


def test_cfg2_times_ulysses2_bytes_match_the_model(tiny_cases):
    mesh = MeshLayout(cfg=2, ulysses=2)
    _assert_model(_runs(tiny_cases, 4, mesh), mesh, {"ulysses", "gather", "cfg"})


def test_skyreels_ulysses2_bytes_match_the_model(tmp_path):
    sky = pytest.importorskip("test_skyreels_v2")
    from test_cluster_skyreels import case_config

    ckpt = sky.build_tiny_checkpoint(tmp_path / "SkyReels-V2-DF-tiny")
    cases = [(case_config(sky, ckpt, tmp_path / f"c{i}.yaml", p, 0, "paper"), p) for i, p in enumerate(("original", "scope-fast"))]
    mesh = MeshLayout(ulysses=2)
    _assert_model(_runs(cases, 2, mesh), mesh, {"ulysses", "gather"})


def test_magi1_ulysses2_bytes_match_the_model(tmp_path):
    """Grouped-query attention (4 query heads, 2 K/V groups), chunk-causal with a K/V cache, unguided."""
    from conftest import write_magi_fixture_config

    path = write_magi_fixture_config(tmp_path, frames=24)
    mesh = MeshLayout(ulysses=2)
    runs = _runs([(str(path), "original"), (str(path), "scope-chunk-fast")], 2, mesh)
    assert runs[0][0]["attention_shape"].kv_heads == 2 and not runs[0][0]["guided"]
    _assert_model(runs, mesh, {"ulysses", "gather"}, extra_passes=True)  # the distill recipe's copy of a chunk
