"""Sequence parallelism on 2 real gloo processes: the 2-rank video equals the 1-rank video, decisions are
identical on every rank at every iteration and equal to the 1-rank decisions, for Original and SCOPE on
the diffusion forcing (selective causal and off) and chunk-causal schedules.

All 2-rank cases run in ONE process group (one start-up, ~10 s on a loaded 2-core machine): a
module-scoped fixture spawns it once and the tests below read its results.
"""

from __future__ import annotations

import pytest

from conftest import assert_two_ranks_match_one, one_and_two_ranks, write_tiny_config
from scopevid.cluster.worker import collect_rollout
from scopevid.errors import DistributedError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

# scope-mix: thresholds of this random tiny model at which all three modes occur (Predict included)
MIX = {"scope-mix": {"kind": "scope", "tau_c": 0.05, "tau_p": 0.5, "decay": 0.75, "horizon": 5, "warmup": 2,
                     "predictor": "taylor2"}}
DF_CAUSAL = {"selective": "causal"}
DF_OFF = {"selective": "off"}
CHUNK = {"kind": "chunk_causal", "chunk_width": 2, "window_size": 4, "context_chunks": 2}
CASES = [
    ("df-causal", DF_CAUSAL, "original"),
    ("df-causal", DF_CAUSAL, "scope-fast"),
    ("df-causal", DF_CAUSAL, "scope-mix"),
    ("df-off", DF_OFF, "original"),
    ("df-off", DF_OFF, "scope-fast"),
    ("chunk-causal", CHUNK, "original"),
    ("chunk-causal", CHUNK, "scope-fast"),
    ("chunk-causal", CHUNK, "scope-mix"),
]
IDS = [f"{s}-{p}" for s, _, p in CASES]
TOL = 0.0  # the same bits as one process (docs/DESIGN_NOTES.md 35)


def _suite(topo, cases):
    """Runs on every rank of the 2-rank group."""
    out = {"cases": []}
    for path, policy in cases:
        before = topo.migrated_frames
        res = collect_rollout(topo, path, policy, check_decisions=True)
        res["migrated_here"] = topo.migrated_frames - before
        out["cases"].append(res)
    # sensitivity: without the hand-over of host features the discrepancy sums lose terms
    migrate, topo.migrate = topo.migrate, lambda old, new, stores: None
    out["no_migration"] = collect_rollout(topo, cases[2][0], cases[2][1], check_decisions=True)
    topo.migrate = migrate
    # the debug cross-check fails loudly, on every rank, when ranks disagree
    try:
        topo.check(f"decision-of-rank-{topo.rank}")
        out["divergence"] = None
    except DistributedError as e:
        out["divergence"] = str(e)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    paths = []
    for i, (_, sched, policy) in enumerate(CASES):
        d = tmp_path_factory.mktemp(f"case{i}")
        paths.append(str(write_tiny_config(d, schedule=sched, policy=policy, frames=24, policies=MIX)))
    cases = [(p, policy) for p, (_, _, policy) in zip(paths, CASES)]
    return one_and_two_ranks("test_cluster_sequence:_suite", cases)


@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_two_ranks_match_one_rank(runs, i):
    one, two = runs
    ref, r0, r1 = one[i], two[0]["cases"][i], two[1]["cases"][i]
    assert_two_ranks_match_one(ref, r0, r1, TOL)
    for (s, m, why, d, r, lo, hi), (s1, m1, why1, d1, r1_, lo1, hi1) in zip(r0["records"], ref["records"]):
        assert (s, m, why, lo, hi) == (s1, m1, why1, lo1, hi1)
        assert d == d1, (s, d, d1)  # the same float, not a close one


def test_cases_cover_modes_padding_and_handover(runs):
    one, two = runs
    by = {IDS[i]: two[0]["cases"][i] for i in range(len(CASES))}
    for name in ("df-causal-scope-mix", "chunk-causal-scope-mix"):
        counts = by[name]["counts"]
        assert counts["cache"] > 0 and counts["predict"] > 0 and counts["recompute"] > 0, (name, counts)
    assert by["df-causal-scope-fast"]["counts"]["cache"] > 0
    # host features really moved between ranks as the compute interval slid
    assert by["df-causal-scope-mix"]["migrated_here"] > 0 and by["chunk-causal-scope-mix"]["migrated_here"] > 0
    # odd-length compute intervals occur, so the padding rule is exercised
    lengths = {rec[6] - rec[5] for rec in by["df-causal-original"]["records"]}
    assert any(n % 2 for n in lengths), lengths


def test_handover_is_what_makes_discrepancy_match(runs):
    """Negative control: the same 2-rank run without migration gets different d_k than 1 rank."""
    one, two = runs
    ref = one[2]["records"]
    bad = two[0]["no_migration"]["records"]
    assert any(
        (d is None) != (d1 is None) or (d is not None and abs(d - d1) > 1e-6)
        for (_, _, _, d, *_), (_, _, _, d1, *_) in zip(bad, ref)
    )


def test_decision_divergence_is_a_loud_error(runs):
    _, two = runs
    for rank in (0, 1):
        msg = two[rank]["divergence"]
        assert msg is not None and "ranks disagree on the decision" in msg
        assert "decision-of-rank-0" in msg and "decision-of-rank-1" in msg
