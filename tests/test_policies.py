"""Step policies (scheduler/policies): SCOPE's tri-modal decision (paper Eq. 3-5, section 3.5) and Original.

Scripted sequences of discrepancies with hand-computed r_k^- and r_k. Discrepancies are dyadic
(num/16 with eps = 0) so every sum and every decay below is exact in binary floating point.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from scopevid.errors import ConfigError
from scopevid.scheduler.policies import (
    Decision,
    Discrepancy,
    Mode,
    Original,
    Policy,
    Scope,
    ScopeConfig,
    StepContext,
    build,
)

C, P, R = Mode.CACHE, Mode.PREDICT, Mode.RECOMPUTE


def ctx(index: int = 10, *, cache: bool = True, history: int = 4, window: int = 0, serial: int | None = None) -> StepContext:
    return StepContext(
        serial=index if serial is None else serial,
        index=index,
        window=window,
        num_steps=50,
        cache_ready=cache,
        history=history,
        min_step=3,
        max_step=7,
    )


def d16(k: float) -> Discrepancy:
    """A discrepancy of k/16 (with eps = 0)."""
    return Discrepancy(num=k, den=16.0)


def scope(**kw) -> Scope:
    base = dict(tau_c=0.25, tau_p=0.75, decay=0.5, horizon=100, warmup=0, eps=0.0)
    base.update(kw)
    return Scope(ScopeConfig(**base))


def step(pol: Policy, c: StepContext, disc, taken: Mode | None = None) -> Decision:
    dec = pol.decide(c, disc)
    pol.record(dec.mode if taken is None else taken)
    return dec


def test_discrepancy_eq4():
    assert Discrepancy(3.0, 4.0).value(0.0) == 0.75
    assert Discrepancy(3.0, 0.0).value(1.0) == 3.0  # eps keeps a zero feature finite
    assert Discrepancy(0.0, 0.0).value(1e-8) == 0.0


def test_scope_scripted_sequence():
    """tau_c = 1/4, tau_p = 3/4, lambda = 1/2: every r_k^- and r_k by hand."""
    pol = scope(warmup=2)
    script = [
        # (index, 16 d_k, expected mode, r_k^-, r_k after record)
        (0, None, R, 0.0, 0.0),  # warm-up, no previous feature
        (1, 1, R, 1 / 16, 0.0),  # warm-up even though r^- < tau_c
        (2, 1, C, 1 / 16, 1 / 16),  # r^- < tau_c: Cache, r = r^-
        (3, 2, C, 3 / 16, 3 / 16),
        (4, 2, P, 5 / 16, 5 / 32),  # tau_c <= r^- < tau_p: Predict, r = lambda r^-
        (5, 1, C, 7 / 32, 7 / 32),  # decayed back under tau_c
        (6, 8, P, 23 / 32, 23 / 64),  # just under tau_p
        (7, 8, R, 55 / 64, 0.0),  # r^- >= tau_p: Recompute, r reset to 0
        (8, 4, P, 4 / 16, 1 / 8),  # r^- == tau_c exactly is Predict (tau_c <= r)
        (9, 10, R, 12 / 16, 0.0),  # r^- == tau_p exactly is Recompute (r < tau_p fails)
        (10, 0, C, 0.0, 0.0),
    ]
    for index, k, mode, r_minus, r_after in script:
        dec = pol.decide(ctx(index), None if k is None else d16(k))
        assert dec.mode == mode, f"iteration {index}: {dec}"
        assert dec.r == r_minus, f"iteration {index}: r^- {dec.r} != {r_minus}"
        assert dec.d == (None if k is None else k / 16)
        pol.record(dec.mode)
        assert pol.r == r_after, f"iteration {index}: r {pol.r} != {r_after}"


def test_scope_reasons():
    pol = scope(warmup=1, horizon=2)
    assert pol.decide(ctx(0), d16(0)).reason == "warmup"
    pol.record(R)
    assert pol.decide(ctx(1), None).reason == "no-feature-history"
    pol.record(R)
    assert step(pol, ctx(2), d16(1)).reason == "below-tau_c"
    assert step(pol, ctx(3), d16(4)).reason == "below-tau_p"
    assert step(pol, ctx(4), d16(0)).reason == "horizon"
    assert step(pol, ctx(5), d16(12)).reason == "above-tau_p"
    pol = scope()
    assert step(pol, ctx(), d16(8), R).mode == P
    assert pol.decide(ctx(history=1), d16(8)).reason == "no-history"


def test_scope_horizon_forces_recompute():
    pol = scope(horizon=3)
    modes = [step(pol, ctx(i), d16(0)).mode for i in range(10)]
    assert modes == [C, C, C, R, C, C, C, R, C, C]
    # Predict counts towards the horizon as well, and the run restarts after any Recompute
    pol = scope(horizon=2)
    modes = [step(pol, ctx(i), d16(k)).mode for i, k in enumerate([4, 0, 0, 0, 12, 0, 5])]
    assert modes == [P, C, R, C, R, C, P]


def test_scope_horizon_zero_always_recomputes():
    pol = scope(horizon=0)
    assert all(step(pol, ctx(i), d16(0)).mode == R for i in range(5))


def test_scope_warmup_every_window():
    pol = scope(warmup=2)
    modes = []
    for window in range(3):
        for index in range(4):
            modes.append(step(pol, ctx(index, window=window, serial=4 * window + index), d16(0)).mode)
    assert modes == [R, R, C, C] * 3


def test_scope_no_cache_means_no_cache():
    pol = scope()
    dec = pol.decide(ctx(cache=False, history=0), d16(1))
    assert dec.mode == R and dec.r == 1 / 16 and dec.reason == "no-cache"
    # Eq. 3: below tau_c without a cached velocity is Recompute, never Predict
    assert pol.decide(ctx(cache=False, history=3), d16(1)).mode == R
    pol.record(R)
    assert pol.r == 0.0


def test_scope_short_history_means_no_predict():
    for history in (0, 1):
        pol = scope()
        dec = pol.decide(ctx(history=history), d16(8))
        assert dec.mode == R and dec.r == 0.5
    pol = scope()
    assert pol.decide(ctx(history=2), d16(8)).mode == P


def test_scope_predict_turned_recompute_resets():
    """The engine rejected the prediction (stability check) and recomputed: record(RECOMPUTE)."""
    pol = scope(horizon=3)
    step(pol, ctx(0), d16(1))
    step(pol, ctx(1), d16(1))
    assert pol.run == 2 and pol.r == 2 / 16
    dec = pol.decide(ctx(2), d16(4))
    assert dec.mode == P and dec.r == 6 / 16
    pol.record(R)
    assert pol.r == 0.0 and pol.run == 0
    # the run restarted: three more non-Recompute steps before the horizon bites
    assert [step(pol, ctx(3 + i), d16(0)).mode for i in range(4)] == [C, C, C, R]


def test_scope_decay_one_keeps_r():
    pol = scope(decay=1.0)
    step(pol, ctx(0), d16(5))
    assert pol.r == 5 / 16
    step(pol, ctx(1), d16(2))
    assert pol.r == 7 / 16


def test_scope_state_dict_roundtrip():
    a, b = scope(horizon=4), scope(horizon=4)
    for i, k in enumerate([1, 3, 2]):
        step(a, ctx(i), d16(k))
    b.load_state_dict(a.state_dict())
    # C (r^- 1/16), P (r^- 4/16 -> 1/8), P (r^- 1/8 + 2/16 -> 1/8)
    assert (b.r, b.run) == (a.r, a.run) == (1 / 8, 3)
    for i, k in enumerate([0, 2, 9, 1]):
        assert step(a, ctx(3 + i), d16(k)) == step(b, ctx(3 + i), d16(k))


def test_scope_nonfinite_discrepancy_recomputes():
    pol = scope()
    dec = pol.decide(ctx(), Discrepancy(float("nan"), 1.0))
    assert dec.mode == R and dec.reason == "above-tau_p"
    pol.record(dec.mode)
    assert pol.r == 0.0


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(tau_c=0.5, tau_p=0.25), "tau_c"),
        (dict(tau_c=-0.1, tau_p=0.25), "tau_c"),
        (dict(tau_c=0.1, tau_p=0.25, decay=0.0), "decay"),
        (dict(tau_c=0.1, tau_p=0.25, decay=-0.5), "decay"),
        (dict(tau_c=0.1, tau_p=0.25, decay=1.5), "decay"),
        (dict(tau_c=0.1, tau_p=0.25, horizon=-1), "horizon"),
        (dict(tau_c=0.1, tau_p=0.25, warmup=-1), "warmup"),
        (dict(tau_c=0.1, tau_p=0.25, predictor="taylor3"), "predictor"),
    ],
)
def test_scope_config_errors(kwargs, field):
    with pytest.raises(ConfigError) as e:
        ScopeConfig(**{"decay": 0.75, "horizon": 5, **kwargs})
    assert field in str(e.value)


def test_scope_config_edges_are_valid():
    ScopeConfig(tau_c=0.2, tau_p=0.2, decay=1.0, horizon=5)  # tau_c == tau_p: no Predict band; lambda = 1 allowed
    ScopeConfig(tau_c=0.0, tau_p=0.0, decay=1e-6, horizon=0, warmup=0)


def test_original_always_recomputes():
    pol = Original()
    assert pol.needs_feature is False
    for c in (ctx(0), ctx(5, cache=True, history=4), ctx(9, cache=False, history=0)):
        for disc in (None, d16(0), d16(100)):
            assert pol.decide(c, disc).mode == R
            pol.record(R)


def test_build_from_presets():
    spec = {"kind": "scope", "tau_c": 0.12, "tau_p": 0.30, "decay": 0.75, "horizon": 5, "warmup": 2, "predictor": "taylor2"}
    pol = build(spec, "scope-slow")
    assert isinstance(pol, Scope) and pol.name == "scope-slow" and pol.needs_feature
    assert pol.cfg == ScopeConfig(tau_c=0.12, tau_p=0.30, decay=0.75, horizon=5, warmup=2, predictor="taylor2")
    assert spec["kind"] == "scope"  # the preset dict is not consumed
    assert isinstance(build({"kind": "original"}, "original"), Original)


def test_build_shipped_presets():
    path = Path(__file__).resolve().parents[1] / "configs" / "policies" / "tiny.yaml"
    if not path.exists():
        pytest.skip("no policy presets shipped")
    presets = yaml.safe_load(path.read_text())
    for name, spec in presets.items():
        assert isinstance(build(spec, name), Policy), name


@pytest.mark.parametrize(
    "spec, needles",
    [
        ({"kind": "teacache-9000"}, ["my-policy", "teacache-9000"]),
        ({"tau_c": 0.1}, ["my-policy", "kind"]),
        ({"kind": "scope", "tau_c": 0.1, "tau_p": 0.2, "lambda": 0.5}, ["my-policy", "lambda"]),  # unknown field
        ({"kind": "scope", "tau_c": 0.1}, ["my-policy", "tau_p"]),  # missing field
        ({"kind": "scope", "tau_c": 0.3, "tau_p": 0.2, "decay": 0.75, "horizon": 5}, ["tau_c"]),
        ({"kind": "scope", "tau_c": "0.1", "tau_p": 0.2, "decay": 0.75, "horizon": 5},  # a string is not a number
         ["policies.my-policy.tau_c: Input should be a valid number (got '0.1')"]),
        ({"kind": "teacache", "thresh": 0.1, "coefficients": [1, "x"]}, ["policies.my-policy.coefficients.1"]),
        ({"kind": "deltadit", "interval": 2.5}, ["policies.my-policy.interval: Input should be a valid integer"]),
    ],
)
def test_build_errors_are_config_errors(spec, needles):
    with pytest.raises(ConfigError) as e:
        build(spec, "my-policy")
    for needle in needles:
        assert needle in str(e.value)
