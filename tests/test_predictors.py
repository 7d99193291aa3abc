"""Velocity predictors (scheduler/predictors.py, paper Eq. 6-7) and the stability verdict.

Hand-computed cases use exact fractions on a non-uniform sigma grid, so equality is exact.
The history is [(sigma, v)], oldest first; sigma falls as denoising proceeds.
"""

from __future__ import annotations

import math
from fractions import Fraction as Fr

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from scopevid.errors import ConfigError
from scopevid.scheduler import predictors as P
from scopevid.scheduler.predictors import Stability

# sigma_{k-2} = 1, sigma_{k-1} = 3/4, sigma_k = 1/4 (steps of -1/4 then -1/2), target sigma* = 0
HIST = [(Fr(1), Fr(2)), (Fr(3, 4), Fr(3)), (Fr(1, 4), Fr(1))]
TARGET = Fr(0)


def test_taylor1_eq6_by_hand():
    # slope = (v_k - v_{k-1}) / (sigma_k - sigma_{k-1}) = (1 - 3) / (1/4 - 3/4) = 4
    # v_hat = v_k + slope * (sigma* - sigma_k) = 1 + 4 * (-1/4) = 0
    assert P.taylor1(HIST, TARGET) == 0
    assert P.taylor1(HIST, Fr(1, 8)) == Fr(1, 2)  # 1 + 4 * (-1/8)
    assert P.taylor1(HIST[:2], TARGET) == Fr(6)  # slope (3-2)/(-1/4) = -4: 3 + (-4)(-3/4)


def test_taylor2_eq7_as_printed_by_hand():
    # Δσ_{k-1} = -1/2, Δσ_{k-2} = -1/4; slopes 4 and (3-2)/(-1/4) = -4
    # curvature term = (4 - (-4)) / ((-1/2 - 1/4) / 2) = 8 / (-3/8) = -64/3
    # v_hat2 = v_hat1 + 1/2 * (-64/3) * (-1/4)^2 = 0 - 2/3
    assert P.taylor2(HIST, TARGET) == pytest.approx(-2 / 3, abs=1e-15)  # (the 1/2 is a float)
    # same history at sigma* = 1/8: 1/2 + 1/2 * (-64/3) * (1/8)^2 = 1/2 - 1/6
    assert P.taylor2(HIST, Fr(1, 8)) == pytest.approx(1 / 3, abs=1e-15)


def test_newton2_by_hand():
    # the parabola through (1, 2), (3/4, 3), (1/4, 1) at 0 (Lagrange: 2*1 + 3*(-2) + 1*2)
    assert P.newton2(HIST, TARGET) == -2


def test_momentum_by_hand():
    # slope = beta * 4 + (1 - beta) * (-4); beta = 1/2 -> 0: v_hat = v_k
    assert P.momentum(HIST, TARGET, beta=Fr(1, 2)) == 1
    # beta = 3/4 -> slope 2: 1 + 2 * (-1/4)
    assert P.momentum(HIST, TARGET, beta=Fr(3, 4)) == Fr(1, 2)
    # default beta 0.7 -> slope 1.6
    assert P.momentum(HIST, TARGET) == pytest.approx(1 - 0.4, abs=1e-12)


def test_uniform_reduction_of_eq7():
    """On a uniform grid Eq. 7's curvature is the plain second difference / h^2."""
    h = Fr(-1, 10)
    hist = [(Fr(1), Fr(5)), (1 + h, Fr(7)), (1 + 2 * h, Fr(4))]
    second = (Fr(4) - 2 * Fr(7) + Fr(5)) / h**2
    dt = Fr(3, 5) - (1 + 2 * h)
    assert P.taylor2(hist, Fr(3, 5)) == pytest.approx(float(P.taylor1(hist, Fr(3, 5)) + second / 2 * dt * dt), abs=1e-12)


# ----------------------------------------------------------------------------- exactness on polynomials

SIGMAS = st.lists(st.floats(0.0, 1.0), min_size=3, max_size=4, unique=True).filter(
    lambda s: min(abs(a - b) for i, a in enumerate(s) for b in s[i + 1 :]) > 0.05
).map(lambda s: sorted(s, reverse=True))


def _field(coeffs, s):
    """v(s) = a + b s + c s^2 as a [2, 3] float64 tensor field (each element its own polynomial)."""
    a, b, c = coeffs
    return a + b * s + c * s * s


@st.composite
def quadratic(draw):
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return tuple(torch.randn(2, 3, generator=gen, dtype=torch.float64) for _ in range(3))


@settings(max_examples=50, deadline=None)
@given(SIGMAS, st.floats(-0.2, 0.5), quadratic())
def test_newton2_exact_on_quadratics(sigmas, target, coeffs):
    hist = [(s, _field(coeffs, s)) for s in sigmas]
    assert torch.allclose(P.newton2(hist, target), _field(coeffs, target), rtol=0, atol=1e-10)


@settings(max_examples=50, deadline=None)
@given(SIGMAS, st.floats(-0.2, 0.5), quadratic())
def test_taylor2_bias_on_quadratics_is_documented_term(sigmas, target, coeffs):
    """Eq. 7 as printed is off by c * (sigma_{k-1} - sigma_k) * (sigma* - sigma_k) on v = a + b s + c s^2."""
    hist = [(s, _field(coeffs, s)) for s in sigmas]
    s1, s0 = sigmas[-2], sigmas[-1]
    bias = coeffs[2] * (s1 - s0) * (target - s0)
    assert torch.allclose(P.taylor2(hist, target) - _field(coeffs, target), bias, rtol=0, atol=1e-10)


def test_taylor2_bias_by_hand():
    # HIST lies on the parabola with leading coefficient c = f[s_k, s_{k-1}, s_{k-2}] = -32/3;
    # bias = c * (sigma_{k-1} - sigma_k) * (sigma* - sigma_k) = -32/3 * 1/2 * -1/4 = 4/3
    assert P.taylor2(HIST, TARGET) - P.newton2(HIST, TARGET) == pytest.approx(4 / 3, abs=1e-15)


@settings(max_examples=50, deadline=None)
@given(SIGMAS, st.floats(-0.2, 0.5), quadratic())
def test_first_order_exact_on_linear(sigmas, target, coeffs):
    a, b, _ = coeffs
    hist = [(s, a + b * s) for s in sigmas]
    for name in P.PREDICTORS:  # all of them reduce to the line on linear data
        assert torch.allclose(P.get(name)(hist, target), a + b * target, rtol=0, atol=1e-10), name


def test_short_history_degrades_to_taylor1():
    two = HIST[1:]
    for name in ("taylor2", "newton2", "momentum", "auto"):
        assert P.get(name)(two, TARGET) == P.taylor1(two, TARGET), name
    assert all(P.min_history(name) == 2 for name in P.PREDICTORS)


def test_predictors_act_elementwise_on_tensors():
    sig = [0.9, 0.7, 0.4]
    v = [torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64) * k for k in (1.0, 1.5, 3.0)]
    hist = list(zip(sig, v))
    for name in P.PREDICTORS:
        out = P.get(name)(hist, 0.2)
        assert out.shape == (2, 2) and out.dtype == torch.float64
        for i in range(2):
            for j in range(2):
                scalar = P.get(name)([(s, float(x[i, j])) for s, x in hist], 0.2)
                assert float(out[i, j]) == pytest.approx(scalar, rel=1e-12), name


# ----------------------------------------------------------------------------- auto


def test_auto_picks_taylor2_when_it_back_tests_better():
    """On a quadratic taylor2's back-test error c(s_{k-2}-s_{k-1})(s_k-s_{k-1}) beats taylor1's."""
    s = [1.0, 0.8, 0.55, 0.3]
    hist = [(x, 1.0 + 2.0 * x - 3.0 * x * x) for x in s]
    assert P.auto(hist, 0.1) == P.taylor2(hist, 0.1) != P.taylor1(hist, 0.1)


def test_auto_picks_taylor1_when_it_back_tests_better():
    # back-test on the first three points predicting sigma = 0.4:
    #   taylor1: 1 + (1-0)/(0.6-0.8) * (-0.2) = 2.0  (error 0.2)
    #   taylor2: 2.0 + 0.5 * 150 * 0.04 = 5.0          (error 2.8)
    hist = [(1.0, 5.0), (0.8, 0.0), (0.6, 1.0), (0.4, 2.2)]
    assert P.taylor1(hist, 0.2) != pytest.approx(P.taylor2(hist, 0.2))
    assert P.auto(hist, 0.2) == P.taylor1(hist, 0.2)


def test_auto_falls_back_to_taylor1_without_a_back_test():
    assert P.taylor2(HIST, TARGET) != P.taylor1(HIST, TARGET)
    assert P.auto(HIST, TARGET) == P.taylor1(HIST, TARGET)  # 3 points: nothing to back-test taylor2 on


def test_auto_back_test_uses_l1_over_tensor_elements():
    # back-test errors (taylor1, taylor2) per element: noisy line (0.2, 2.8); parabola c = -3 scaled
    # by 10: (2.4, 1.2). One line + three parabolas: L1 sums 7.4 vs 6.4 pick taylor2, although the
    # largest single error (2.4 vs 2.8) would pick taylor1.
    s = [1.0, 0.8, 0.6, 0.4]
    quad = [10 * (1.0 + 2.0 * x - 3.0 * x * x) for x in s]
    noisy = [5.0, 0.0, 1.0, 2.2]

    def hist(copies):
        return [(x, torch.tensor([a] + [b] * copies, dtype=torch.float64)) for x, a, b in zip(s, noisy, quad)]

    assert torch.equal(P.auto(hist(0), 0.2), P.taylor1(hist(0), 0.2))
    assert torch.equal(P.auto(hist(1), 0.2), P.taylor1(hist(1), 0.2))  # 2.6 vs 4.0
    assert torch.equal(P.auto(hist(3), 0.2), P.taylor2(hist(3), 0.2))  # 7.4 vs 6.4
    assert not torch.equal(P.taylor1(hist(3), 0.2), P.taylor2(hist(3), 0.2))


def test_get_unknown_predictor_is_config_error():
    with pytest.raises(ConfigError, match="predictor"):
        P.get("taylor3")
    assert [P.get(n) for n in P.PREDICTORS] == [P.taylor1, P.taylor2, P.newton2, P.momentum, P.auto]


# ----------------------------------------------------------------------------- stability verdict


@pytest.mark.parametrize(
    "delta_sq, ref_sq, nonfinite",
    [
        (1.0, 1.0, 1),  # a non-finite element somewhere
        (float("nan"), 1.0, 0),
        (float("inf"), 1.0, 0),
        (1.0, float("nan"), 0),  # v_k itself is broken: never accept
        (1.0, float("inf"), 0),
        (float("inf"), float("inf"), 0),
    ],
)
def test_stability_rejects_non_finite(delta_sq, ref_sq, nonfinite):
    accept, scale = Stability().verdict(delta_sq, ref_sq, nonfinite)
    assert accept is False and scale == 0.0


def test_stability_explode_clip_ok():
    st_ = Stability(clip=1.0, explode=4.0)
    # |delta| = 5 > 4 * |v_k| = 4: reject
    assert st_.verdict(25.0, 1.0, 0) == (False, 0.0)
    # |delta| = 2 in (1, 4]: accept, scaled to clip * |v_k| = 1
    ok, scale = st_.verdict(4.0, 1.0, 0)
    assert ok and scale == pytest.approx(0.5)
    # boundary: |delta| == explode * |v_k| is clipped, not rejected
    ok, scale = st_.verdict(16.0, 1.0, 0)
    assert ok and scale == pytest.approx(0.25)
    # |delta| = 0.5 <= clip: untouched
    assert st_.verdict(0.25, 1.0, 0) == (True, 1.0)
    assert st_.verdict(1.0, 1.0, 0) == (True, 1.0)
    # the scale brings |delta| to exactly clip * |v_k|
    s2 = Stability(clip=0.3, explode=10.0)
    ok, scale = s2.verdict(9.0, 4.0, 0)
    assert ok and math.isclose(scale * 3.0, 0.3 * 2.0)


def test_stability_zero_reference():
    assert Stability().verdict(0.0, 0.0, 0)[0] is True
    assert Stability().verdict(1e-6, 0.0, 0)[0] is False


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(clip=0.0), "clip"),
        (dict(clip=-1.0), "clip"),  # a negative scale would flip the prediction's change
        (dict(clip=float("nan")), "clip"),
        (dict(explode=0.0), "explode"),
        (dict(explode=float("inf")), "explode"),
    ],
)
def test_stability_bad_bounds_are_config_errors(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        Stability(**kwargs)
