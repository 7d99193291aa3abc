"""The paper's baselines (scheduler/policies/{teacache,taylorseer,flowcache,deltadit}.py) and the
in-forward reuse that carries out their decisions (engine/reuse.py, the tiny adapter's hooks).

Decision rules are checked against hand-computed sequences: distances are dyadic and polynomials
have dyadic coefficients, so every accumulated sum below is exact in binary floating point.
The hook tests check the engine side exactly: reusing what was recorded from the same input must
reproduce the full forward, and FlowCache with nothing skipped must reproduce Original.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from scopevid import adapters
from scopevid import config as config_lib
from scopevid.adapters.base import Capabilities, ForwardSpec
from scopevid.engine import reuse
from scopevid.engine.runner import run_once
from scopevid.errors import ConfigError
from scopevid.scheduler.policies import (
    ChunkState,
    DeltaDiT,
    DeltaDiTConfig,
    Discrepancy,
    FlowCache,
    FlowCacheConfig,
    Mode,
    StepContext,
    TaylorSeer,
    TaylorSeerConfig,
    TeaCache,
    TeaCacheConfig,
    build,
)
from scopevid.scheduler.policies.teacache import poly1d
from scopevid.scheduler.schedules import DiffusionForcingPlan

C, P, R = Mode.CACHE, Mode.PREDICT, Mode.RECOMPUTE
ROOT = Path(__file__).resolve().parents[1]


def ctx(index: int, *, last: bool = False, steps: tuple[int, int] = (3, 7), num_steps: int = 20, chunks=()) -> StepContext:
    return StepContext(serial=index, index=index, window=0, num_steps=num_steps, cache_ready=True, history=4,
                       min_step=steps[0], max_step=steps[1], last=last, chunks=tuple(chunks))


def d16(k: float) -> Discrepancy:
    return Discrepancy(num=k, den=16.0)


def run(policy, contexts, discs, taken=None):
    """Decide and record along a sequence; returns (modes, r values)."""
    modes, rs = [], []
    for i, (c, d) in enumerate(zip(contexts, discs)):
        dec = policy.decide(c, d)
        policy.record(dec.mode if taken is None or taken[i] is None else taken[i])
        modes.append(dec.mode)
        rs.append(dec.r)
    return modes, rs


# ------------------------------------------------------------------------------- TeaCache
def test_poly1d_matches_numpy_on_the_published_coefficients():
    wan13_ret = [-5.21862437e4, 9.23041404e3, -5.28275948e2, 1.36987616e1, -4.99875664e-2]
    for x in (0.0, 0.013, 0.05, 0.2):
        assert poly1d(tuple(wan13_ret), x) == pytest.approx(float(np.poly1d(wan13_ret)(x)), rel=1e-12, abs=1e-12)


def test_teacache_rule_hand_computed():
    # poly(x) = 2x, thresh 1/2, two ret-steps, last step forced
    pol = TeaCache(TeaCacheConfig(thresh=0.5, coefficients=(2.0, 0.0), ret_steps=2, last_step=True, eps=0.0))
    d = [None, d16(4), d16(1), d16(2), d16(2), d16(1), d16(4), d16(1)]  # d = k/16
    c = [ctx(i, last=(i == 7)) for i in range(8)]
    modes, rs = run(pol, c, d)
    # idx 0, 1: ret-steps. idx 2: acc = 2/16 -> C. idx 3: 2/16 + 4/16 = 6/16 -> C. idx 4: 6/16 + 4/16 = 10/16
    # >= 8/16 -> R, acc = 0. idx 5: 2/16 -> C. idx 6: 2/16 + 8/16 = 10/16 -> R. idx 7: last step -> R.
    assert modes == [R, R, C, C, R, C, R, R]
    assert rs[2:7] == [2 / 16, 6 / 16, 10 / 16, 2 / 16, 10 / 16]


def test_teacache_engine_fallback_resets_accumulator():
    pol = TeaCache(TeaCacheConfig(thresh=0.5, coefficients=(1.0, 0.0), ret_steps=1, eps=0.0))
    # idx 1 decides Cache (acc 4/16) but the engine had no residual and recomputed: acc restarts at 0,
    # so idx 2 accumulates 4/16 again (Cache) and idx 3 reaches 8/16 (Recompute)
    modes, rs = run(pol, [ctx(i) for i in range(4)], [None, d16(4), d16(4), d16(4)], taken=[None, R, None, None])
    assert modes == [R, C, C, R]
    assert rs[1:] == [4 / 16, 4 / 16, 8 / 16]


def test_teacache_restarts_each_window_and_period():
    pol = TeaCache(TeaCacheConfig(thresh=10.0, coefficients=(1.0, 0.0), ret_steps=1, eps=0.0))
    modes, _ = run(pol, [ctx(0), ctx(1), ctx(0), ctx(1)], [None, d16(1), d16(1), d16(1)])
    assert modes == [R, C, R, C]  # index 0 of the next window is a ret-step again
    pol = TeaCache(TeaCacheConfig(thresh=10.0, coefficients=(1.0, 0.0), ret_steps=1, eps=0.0, period=3))
    modes, _ = run(pol, [ctx(i) for i in range(7)], [None] + [d16(1)] * 6)
    assert modes == [R, C, C, R, C, C, R]  # the SkyReels-V2 DF reading: the counter restarts every period


def test_teacache_config_errors():
    with pytest.raises(ConfigError, match="feature"):
        TeaCacheConfig(thresh=0.1, feature="latent")
    with pytest.raises(ConfigError, match="ret_steps"):
        TeaCacheConfig(thresh=0.1, ret_steps=-1)


# ----------------------------------------------------------------------------- TaylorSeer
def test_taylorseer_schedule_hand_computed():
    pol = TaylorSeer(TaylorSeerConfig(interval=3, order=1, first_enhance=1))
    modes, _ = run(pol, [ctx(i) for i in range(10)], [None] * 10)
    assert modes == [R, P, P, R, P, P, R, P, P, R]
    pol = TaylorSeer(TaylorSeerConfig(interval=5, order=1, first_enhance=2))  # Wan default N 5
    modes, _ = run(pol, [ctx(i) for i in range(12)], [None] * 12)
    assert modes == [R, R, P, P, P, P, R, P, P, P, P, R]


def test_taylorseer_fallback_counts_as_full_compute():
    pol = TaylorSeer(TaylorSeerConfig(interval=3))
    modes, _ = run(pol, [ctx(i) for i in range(6)], [None] * 6, taken=[None, R, None, None, None, None])
    assert modes == [R, P, P, P, R, P]  # idx 1 was recomputed instead: the next full comes 2 forecasts after it


def test_taylor_hooks_finite_differences_over_steps():
    store = {}
    hc = reuse.HookContext("cond", (5,), 1)

    def rec(step, value):
        h = reuse.TaylorHooks(store, step, order=2, forecast=False, level="stack")
        h._record(hc, "stack", torch.tensor([[value]]))

    # a feature quadratic in the step index, 1 + 2 s + s^2, recorded at steps 0, 2, 4
    for s in (0, 2, 4):
        rec(s, 1 + 2 * s + s * s)
    f = store[("cond", 5)]["factors"]["stack"]
    # F0 = 25; F1 = (25 - 9) / 2 = 8; F2 = (8 - (9 - 1) / 2) / 2 = 2
    assert [float(x) for x in f] == [25.0, 8.0, 2.0]
    fc = reuse.TaylorHooks(store, 6, order=2, forecast=True, level="stack")
    # 25 + 8 * 2 + 2 * 2^2 / 2 = 45 (the true value at 6 is 49: TaylorSeer's backward differences)
    assert float(fc._predict(hc, "stack", torch.zeros(1, 1, 1))) == 45.0


# ------------------------------------------------------------------------------ FlowCache
def chunks(*spec):
    return [ChunkState(c, step, act) for c, step, act in spec]


def test_flowcache_per_chunk_rule_hand_computed():
    pol = FlowCache(FlowCacheConfig(thresh=0.5, coefficients=(2.0, 0.0), ret_steps=2, last_step=True, eps=0.0))

    def disc(per: dict) -> Discrepancy:  # chunk -> distance k/16
        return Discrepancy(0.0, 1.0, tuple((c, k, 16.0) for c, k in per.items()))

    # (chunk, its step, active): chunk 0 leads, chunk 1 starts at idx 2, chunk 2 at idx 4; T = 10
    seq = [
        (chunks((0, 0, True)), None),
        (chunks((0, 1, True)), disc({0: 1})),
        (chunks((0, 2, True), (1, 0, True)), disc({0: 1, 1: 1})),
        (chunks((0, 3, True), (1, 1, True)), disc({0: 2, 1: 1})),
        (chunks((0, 4, True), (1, 2, True), (2, 0, True)), disc({0: 1, 1: 3, 2: 1})),
        (chunks((0, 9, True), (1, 3, True), (2, 1, True)), disc({0: 1, 1: 1, 2: 1})),
        (chunks((0, 10, False), (1, 4, True), (2, 2, True)), disc({1: 1, 2: 1})),
    ]
    decs = []
    for i, (ch, d) in enumerate(seq):
        decs.append(pol.decide(ctx(i, num_steps=10, chunks=ch), d))
        pol.record(decs[-1].mode)
    # idx 0-1: chunk 0 in its ret-steps. idx 2: acc0 = 2/16 -> skip 0; chunk 1 ret-step. idx 3: acc0 =
    # 2/16 + 4/16 = 6/16 -> skip 0; chunk 1 ret-step. idx 4: acc0 = 6/16 + 2/16 = 8/16 >= 1/2 -> compute 0;
    # acc1 = 6/16 -> skip 1; chunk 2 ret-step. idx 5: chunk 0 at its last step (9 = T - 1) computes;
    # acc1 = 6/16 + 2/16 -> compute 1; chunk 2 ret-step. idx 6: acc1 = 2/16, acc2 = 2/16: both skip.
    assert [set(d.skip) for d in decs] == [set(), set(), {0}, {0}, {1}, set(), {1, 2}]
    assert [d.mode for d in decs] == [R, R, R, R, R, R, C]  # Cache only when every active chunk skips
    assert pol.acc == {0: 0.0, 1: 2 / 16, 2: 2 / 16}


def test_flowcache_never_skips_a_chunk_not_yet_computed():
    pol = FlowCache(FlowCacheConfig(thresh=10.0, ret_steps=0, last_step=False, eps=0.0))
    d = Discrepancy(0.0, 1.0, ((0, 1.0, 16.0),))
    first = pol.decide(ctx(0, chunks=chunks((0, 0, True))), d)
    pol.record(first.mode)
    second = pol.decide(ctx(1, chunks=chunks((0, 1, True))), d)
    assert first.skip == frozenset() and second.skip == {0}


# ------------------------------------------------------------------------------- Delta-DiT
def test_deltadit_schedule_and_stage_hand_computed():
    pol = DeltaDiT(DeltaDiTConfig(interval=3, fraction=0.25, boundary=0.5, warmup=1))
    # active frames at steps 2..8 (mean 5 < 0.5 * 20): outline stage, the rear quarter is reused;
    # from idx 4 at steps 10..14 (mean 12): detail stage, the front quarter
    decs = []
    for i in range(7):
        decs.append(pol.decide(ctx(i, steps=(2, 8) if i < 4 else (10, 14)), None))
        pol.record(decs[-1].mode)
    assert [d.mode for d in decs] == [R, C, C, R, C, C, R]
    assert [d.blocks for d in decs] == [None, (0.75, 1.0), (0.75, 1.0), None, (0.0, 0.25), (0.0, 0.25), None]


@pytest.mark.parametrize("depth,fraction,front,rear", [(2, 0.5, (0, 1), (1, 2)), (4, 0.35, (0, 1), (3, 4)),
                                                      (30, 0.35, (0, 10), (20, 30)), (2, 0.9, (0, 1), (1, 2))])
def test_deltadit_block_ranges(depth, fraction, front, rear):
    r = reuse.DeltaHooks({}, fraction, None).ranges(depth)
    assert r == {"front": front, "rear": rear}


# ---------------------------------------------------------------------- presets and errors
def test_shipped_presets_build():
    presets = yaml.safe_load((ROOT / "configs" / "policies" / "tiny.yaml").read_text())
    kinds = {build(spec, name).__class__.__name__ for name, spec in presets.items()}
    assert {"TeaCache", "TaylorSeer", "FlowCache", "DeltaDiT", "Scope", "Original"} <= kinds
    for name in ("teacache-slow", "teacache-fast", "taylorseer-slow", "taylorseer-fast", "flowcache-slow",
                 "flowcache-fast", "deltadit"):
        assert name in presets
    for model in ("skyreels_v2", "magi1"):  # every preset of the real models' files builds too
        for name, spec in yaml.safe_load((ROOT / "configs" / "policies" / f"{model}.yaml").read_text()).items():
            build(spec, name)


def test_unknown_setting_is_a_config_error():
    with pytest.raises(ConfigError, match="flowcache-x"):
        build({"kind": "flowcache", "thresh": 0.1, "treshold": 2}, "flowcache-x")


class _PlainAdapter:
    """What for_policy reads of an adapter that declares no hook points and no named features."""

    name = "plain"
    capabilities = Capabilities(causal=True)


_PLAN = DiffusionForcingPlan(latent_frames=8, window=8, num_steps=4)


@pytest.mark.parametrize("spec,point", [({"kind": "teacache", "thresh": 0.1}, "stack"), ({"kind": "taylorseer"}, "block"),
                                        ({"kind": "deltadit"}, "block"), ({"kind": "flowcache", "thresh": 0.1}, "stack")])
def test_capability_error_names_the_missing_hook(spec, point):
    with pytest.raises(ConfigError, match=f"hook point.*{point}.*plain"):
        reuse.for_policy(build(spec, "p"), _PlainAdapter(), _PLAN)


def test_velocity_policies_need_no_capability():
    assert reuse.for_policy(build({"kind": "scope", "tau_c": 0.1, "tau_p": 0.2, "decay": 0.75, "horizon": 5}, "s"), _PlainAdapter(), _PLAN) is None


# --------------------------------------------------------------------- hooks are exact
@pytest.fixture
def model(tiny_config):
    cfg = config_lib.load(tiny_config())
    ad = adapters.load(cfg.model)
    cond = ad.encode_prompt(cfg.prompt, None, 2.0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 16, 16, generator=gen)
    s = torch.tensor([0.9, 0.6, 0.3])
    return ad, cond, x, s, ForwardSpec(frames=[4, 5, 6], origin=4, causal=True)


def _vel(ad, cond, x, s, spec, hooks=None):
    with torch.no_grad():
        return ad.velocity(x, s, cond, spec, **({} if hooks is None else {"hooks": hooks}))


def test_residual_reuse_reproduces_the_forward(model):
    ad, cond, x, s, spec = model
    store = {}
    full = _vel(ad, cond, x, s, spec, reuse.ResidualHooks(store, reuse=False))
    assert torch.equal(full, _vel(ad, cond, x, s, spec))  # recording changes nothing
    assert set(store) == {(b, f) for b in ("cond", "uncond") for f in (4, 5, 6)}
    again = _vel(ad, cond, x, s, spec, reuse.ResidualHooks(store, reuse=True))
    torch.testing.assert_close(again, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("level", ["modules", "stack"])
def test_taylor_forecast_at_the_recorded_step_reproduces_the_forward(model, level):
    ad, cond, x, s, spec = model
    store = {}
    full = _vel(ad, cond, x, s, spec, reuse.TaylorHooks(store, 3, order=1, forecast=False, level=level))
    fc = _vel(ad, cond, x, s, spec, reuse.TaylorHooks(store, 3, order=1, forecast=True, level=level))
    torch.testing.assert_close(fc, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["front", "rear"])
def test_delta_reuse_reproduces_the_forward(model, which):
    ad, cond, x, s, spec = model
    store = {}
    full = _vel(ad, cond, x, s, spec, reuse.DeltaHooks(store, 0.5, None))
    hooks = reuse.DeltaHooks(store, 0.5, which)
    again = _vel(ad, cond, x, s, spec, hooks)
    torch.testing.assert_close(again, full, rtol=1e-5, atol=1e-5)
    assert hooks.blocks_run == 1 and ad.flops(3, 0, blocks=1) < ad.flops(3, 0)


def _presets(tmp_path, **specs) -> str:
    p = tmp_path / "presets.yaml"
    p.write_text(yaml.safe_dump({"original": {"kind": "original"}, **specs}))
    return str(p)


def _frames(cfg, name, ad):
    out = []

    class Sink:
        def write(self, px):
            out.append(px.clone())

    run_once(cfg, ad, name, frames_to=Sink())
    return torch.cat(out)


def test_flowcache_that_never_skips_equals_original(tiny_config, tmp_path):
    presets = _presets(tmp_path, never={"kind": "flowcache", "thresh": 0.0, "coefficients": [1.0, 0.0], "ret_steps": 0})
    off = config_lib.load(tiny_config(policy_presets=presets, frames=14, schedule={"selective": "off"}))
    ad = adapters.load(off.model)
    torch.testing.assert_close(_frames(off, "never", ad), _frames(off, "original", ad), rtol=0, atol=2e-5)


@pytest.mark.parametrize("spec", [
    {"kind": "teacache", "thresh": 1.5, "ret_steps": 2},
    {"kind": "taylorseer", "interval": 3},
    {"kind": "taylorseer", "interval": 3, "granularity": "stack", "order": 2},
    {"kind": "deltadit", "interval": 2, "fraction": 0.5},
    {"kind": "flowcache", "thresh": 1.5, "ret_steps": 1},
])
@pytest.mark.parametrize("selective", ["off", "causal"])
def test_baselines_run_and_save_compute(tiny_config, tmp_path, spec, selective):
    cfg = config_lib.load(tiny_config(policy_presets=_presets(tmp_path, b=spec), frames=14, schedule={"selective": selective}))
    ad = adapters.load(cfg.model)
    ref = run_once(cfg, ad, "original").summary
    res = run_once(cfg, ad, "b").summary
    assert res["flops"] < ref["flops"]
    assert res["frame_forwards"] < ref["frame_forwards"]  # embed+head-only passes count as no model forward
    assert sum(res["counts"].values()) == ref["iterations"]
    assert res["counts"]["recompute"] < ref["iterations"] or spec["kind"] == "flowcache"


def test_flowcache_last_step_kv_skips_the_clean_reforward(tiny_config, tmp_path):
    spec = {"kind": "flowcache", "thresh": 0.0, "coefficients": [1.0, 0.0], "ret_steps": 0}
    presets = _presets(tmp_path, clean=spec, last={**spec, "finished_kv": "last_step"})
    cfg = config_lib.load(tiny_config(policy_presets=presets, frames=14, schedule={"selective": "off"}))
    ad = adapters.load(cfg.model)
    clean, last = run_once(cfg, ad, "clean").summary, run_once(cfg, ad, "last").summary
    assert last["frame_forwards"] < clean["frame_forwards"]  # no clean re-forward of finished frames
    assert last["decision_digest"] != clean["decision_digest"] or last["flops"] < clean["flops"]


def test_scope_on_a_signal_the_model_lacks_is_refused():
    spec = {"kind": "scope", "tau_c": 0.1, "tau_p": 0.2, "decay": 0.75, "horizon": 5, "feature": "temb"}
    with pytest.raises(ConfigError, match="signal 'temb'.*plain.*offers host"):
        reuse.for_policy(build(spec, "s"), _PlainAdapter(), _PLAN)
