"""The mesh layout as a table (scopevid.mesh, no processes): every rank of every mesh up to 8 ranks,
its coordinates and groups, against a hand-written table for two 8-rank meshes and against an
independent derivation (numpy's reshape of the ranks into [dp, cfg, ring, ulysses]) for all of
them; shards and ring parts; the one validation every entry point runs, value by value."""

from __future__ import annotations

import numpy as np
import pytest

from scopevid.config import ParallelConfig
from scopevid.errors import ConfigError
from scopevid.mesh import GROUPS, MeshLayout, parse, proposals, shard_layout, valid_meshes

# cfg=2 x ring=2 x ulysses=2 on 8 ranks, written out by hand from rank = (c * 2 + r) * 2 + u:
# rank: (d, c, r, u), video, sp, cfg, ulysses, ring
CFG2_RING2_ULY2 = {
    0: ((0, 0, 0, 0), (0, 1, 2, 3, 4, 5, 6, 7), (0, 1, 2, 3), (0, 4), (0, 1), (0, 2)),
    1: ((0, 0, 0, 1), (0, 1, 2, 3, 4, 5, 6, 7), (0, 1, 2, 3), (1, 5), (0, 1), (1, 3)),
    2: ((0, 0, 1, 0), (0, 1, 2, 3, 4, 5, 6, 7), (0, 1, 2, 3), (2, 6), (2, 3), (0, 2)),
    3: ((0, 0, 1, 1), (0, 1, 2, 3, 4, 5, 6, 7), (0, 1, 2, 3), (3, 7), (2, 3), (1, 3)),
    4: ((0, 1, 0, 0), (0, 1, 2, 3, 4, 5, 6, 7), (4, 5, 6, 7), (0, 4), (4, 5), (4, 6)),
    5: ((0, 1, 0, 1), (0, 1, 2, 3, 4, 5, 6, 7), (4, 5, 6, 7), (1, 5), (4, 5), (5, 7)),
    6: ((0, 1, 1, 0), (0, 1, 2, 3, 4, 5, 6, 7), (4, 5, 6, 7), (2, 6), (6, 7), (4, 6)),
    7: ((0, 1, 1, 1), (0, 1, 2, 3, 4, 5, 6, 7), (4, 5, 6, 7), (3, 7), (6, 7), (5, 7)),
}
# dp=2 x cfg=2 x ring=2 (ulysses=1): two videos of four ranks each
DP2_CFG2_RING2 = {
    0: ((0, 0, 0, 0), (0, 1, 2, 3), (0, 1), (0, 2), (0,), (0, 1)),
    1: ((0, 0, 1, 0), (0, 1, 2, 3), (0, 1), (1, 3), (1,), (0, 1)),
    2: ((0, 1, 0, 0), (0, 1, 2, 3), (2, 3), (0, 2), (2,), (2, 3)),
    3: ((0, 1, 1, 0), (0, 1, 2, 3), (2, 3), (1, 3), (3,), (2, 3)),
    4: ((1, 0, 0, 0), (4, 5, 6, 7), (4, 5), (4, 6), (4,), (4, 5)),
    5: ((1, 0, 1, 0), (4, 5, 6, 7), (4, 5), (5, 7), (5,), (4, 5)),
    6: ((1, 1, 0, 0), (4, 5, 6, 7), (6, 7), (4, 6), (6,), (6, 7)),
    7: ((1, 1, 1, 0), (4, 5, 6, 7), (6, 7), (5, 7), (7,), (6, 7)),
}


@pytest.mark.parametrize("mesh, table", [(MeshLayout(cfg=2, ring=2, ulysses=2), CFG2_RING2_ULY2),
                                         (MeshLayout(dp=2, cfg=2, ring=2), DP2_CFG2_RING2)], ids=["c2r2u2", "d2c2r2"])
def test_hand_written_tables(mesh, table):
    for rank, (coords, *groups) in table.items():
        assert tuple(mesh.coords(rank)) == coords
        assert mesh.rank_of(*coords) == rank
        assert tuple(mesh.group(k, rank) for k in GROUPS) == tuple(groups), rank
        assert mesh.branch(rank) == ("cond", "uncond")[coords[1]]
        assert mesh.replica(rank) == coords[0]
        assert mesh.video_rank(rank) == mesh.group("video", rank).index(rank)
        assert mesh.sp_rank(rank) == mesh.group("sp", rank).index(rank) == coords[2] * mesh.ulysses + coords[3]


def _every_mesh_up_to(n: int) -> list[MeshLayout]:
    return [m for w in range(1, n + 1) for m in valid_meshes(w)]


def test_every_mesh_up_to_8_ranks_against_an_independent_derivation():
    """Groups as slices of np.arange(world).reshape(dp, cfg, ring, ulysses): the varying axes of each kind."""
    meshes = _every_mesh_up_to(8)
    # ordered factorizations (dp, ring, ulysses) of w, sum over w <= 8: 38; with cfg=2 (of w / 2): 13 more
    assert len(meshes) == 51 and len({m.label for m in meshes}) == 51
    varying = {"video": (1, 2, 3), "sp": (2, 3), "cfg": (1,), "ulysses": (3,), "ring": (2,)}
    for m in meshes:
        grid = np.arange(m.world).reshape(m.dp, m.cfg, m.ring, m.ulysses)
        for rank in range(m.world):
            d, c, r, u = (int(x[0]) for x in np.nonzero(grid == rank))
            assert tuple(m.coords(rank)) == (d, c, r, u), (m.label, rank)
            for kind, axes in varying.items():
                index = tuple(slice(None) if a in axes else (d, c, r, u)[a] for a in range(4))
                assert m.group(kind, rank) == tuple(int(x) for x in grid[index].reshape(-1)), (m.label, kind, rank)
            assert m.branch(rank) == (None if m.cfg == 1 else ("cond", "uncond")[c])
        for kind in GROUPS:  # the groups of a kind partition the ranks, each listed once
            assert sorted(x for g in m.groups(kind) for x in g) == list(range(m.world)), (m.label, kind)


@pytest.mark.parametrize("n", [0, 1, 5, 7, 8, 13])
def test_shards_and_ring_parts(n):
    """A rank's shard is its sp index's contiguous slots; a ring part is its Ulysses group's shards together."""
    for m in _every_mesh_up_to(8):
        for rank in range(m.world):
            n_pad, (lo, hi) = m.shard(n, rank)
            assert (n_pad, (lo, hi)) == shard_layout(n, m.seq, m.sp_rank(rank))
            assert n <= n_pad < n + m.seq and n_pad % m.seq == 0 and hi - lo == n_pad // m.seq
            assert all(m.shard_owner(i, n) == m.sp_rank(rank) for i in range(lo, hi))
            part = m.ring_part(n_pad, m.coords(rank).r)
            mine = [m.shard(n, x)[1] for x in m.group("ulysses", rank)]
            assert part == (mine[0][0], mine[-1][1]) and all(a[1] == b[0] for a, b in zip(mine, mine[1:]))


def test_labels_read_back_as_the_same_mesh():
    for m in _every_mesh_up_to(8):
        assert MeshLayout.resolve(parse(m.label), m.world, batch=True) == m
    assert MeshLayout().label == "1" and MeshLayout(cfg=2, ring=2, ulysses=2).label == "cfg=2,ring=2,ulysses=2"
    assert MeshLayout(cfg_mode="batched").label == "cfg_mode=batched"


def test_ulysses_takes_what_the_other_axes_leave():
    assert MeshLayout.resolve(ParallelConfig(cfg=2), 6).ulysses == 3
    assert MeshLayout.resolve(ParallelConfig(ring=2), 4) == MeshLayout(ring=2, ulysses=2)
    assert MeshLayout.resolve(ParallelConfig(dp=2, cfg=2), 8, batch=True) == MeshLayout(dp=2, cfg=2, ulysses=2)


@pytest.mark.parametrize("text, world, kw, needle", [
    ("cfg=0", 1, {}, r"^parallel.cfg: must be 1 or 2 .*got 0$"),
    ("cfg=3", 3, {}, r"^parallel.cfg: must be 1 or 2"),
    ("ulysses=-1", 1, {}, r"^parallel.ulysses: must be a positive integer, got -1$"),
    ("ulysses=0", 1, {}, r"^parallel.ulysses: must be a positive integer, got 0$"),
    ("ring=0", 1, {}, r"^parallel.ring: must be a positive integer, got 0$"),
    ("dp=0", 1, {}, r"^parallel.dp: must be a positive integer"),
    ("dp=3", 3, {}, r"^parallel.dp: rank groups for several videos at once are for batch jobs"),
    ("cfg_mode=bogus", 1, {}, r"^parallel.cfg_mode: must be one of sequential, batched, got 'bogus'$"),
    ("cfg=2,cfg=1", 2, {}, r"^--parallel: cfg given twice \('cfg=2,cfg=1'\); give each key once$"),
    ("ulysses=2,ulysses=4", 4, {}, r"^--parallel: ulysses given twice"),
    ("uly=2", 2, {}, r"^--parallel: unknown key 'uly' in 'uly=2'; keys: dp, cfg, ring, ulysses, cfg_mode"),
    ("cfg=two", 2, {}, r"^--parallel: 'cfg=two' is not KEY=INTEGER"),
    ("cfg=2", 1, {}, r"^parallel: dp\*cfg\*ring\*ulysses = 1\*2\*1\*\? does not make the job's 1 rank\(s\); "
                     r"meshes that fit: 1 \(one process\)$"),
    ("cfg=2,ulysses=3", 4, {}, r"does not make the job's 4 rank\(s\); meshes that fit: cfg=2,ulysses=2, cfg=2,ring=2, "
                               r"ulysses=4, ring=2,ulysses=2$"),
    ("cfg=2", 2, {"guided": False}, r"^parallel.cfg: 2 puts the two classifier-free guidance branches on two rank groups, "
                                    r"and this run has one branch"),
    ("ulysses=2", 2, {"heads": (3,)}, r"^parallel.ulysses: 2 ranks cannot split this model's 3 attention heads .*: "
                                      r"cfg=2, ring=2$"),
    ("ulysses=4", 4, {"heads": (48, 8), "guided": False}, None),
    ("ulysses=8", 8, {"heads": (12,), "guided": False}, r"cannot split this model's 12 attention heads .* fit 8 rank\(s\): "
                                                        r"ring=2,ulysses=4, ring=4,ulysses=2, ring=8$"),
    ("cfg=2,cfg_mode=batched", 2, {}, r"^parallel.cfg_mode: batched runs both branches on one rank group"),
])
def test_one_validation_each_bad_value_one_line(text, world, kw, needle):
    if needle is None:
        assert MeshLayout.resolve(parse(text), world, **kw).ulysses == 4
        return
    with pytest.raises(ConfigError, match=needle) as e:
        MeshLayout.resolve(parse(text), world, **kw)
    assert "\n" not in str(e.value)


def test_proposals_when_no_mesh_fits():
    assert proposals(5, heads=(2,), guided=False) == "ring=5"
    assert proposals(4, heads=(3,), guided=False) == "ring=4"
    assert valid_meshes(6, heads=(4,), guided=True, batch=False) == [
        MeshLayout(ring=6), MeshLayout(ring=3, ulysses=2), MeshLayout(cfg=2, ring=3)]
