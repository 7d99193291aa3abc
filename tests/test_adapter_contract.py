"""The adapter contract (adapters/base.py), checked the same way for every adapter: tiny, SkyReels-V2
(a tiny checkpoint built with diffusers' own classes; bidirectional, and block-causal with K/V context)
and MAGI-1 (the tiny official-layout fixture).

What the engine relies on, and nothing else: the declared capabilities, `prepare` giving the
video's noise levels, a pure `encode_prompt`, velocities and features of exactly the frames given,
hooks called where declared (and nowhere else), FLOPs that scale, a stream decoder that resumes,
and, for causal adapters, K/V context that reproduces a joint forward.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import pytest
import torch

from conftest import TINY_ARCH
from scopevid.adapters.base import (Adapter, Capabilities, Conditioning, Feature, ForwardHooks, ForwardSpec, HookPoint,
                                    NoiseSchedule, StreamDecoder, VideoFacts, local_attention)
from scopevid.engine.kvcache import KVCache
from scopevid.errors import ConfigError


@dataclass
class Case:
    name: str
    make: Callable[[], Adapter]
    prompt: str
    other_prompt: str
    guidance: float
    facts: VideoFacts
    frames: list[int]  # frames of the probe forwards (chunk-aligned for MAGI-1)


def _tiny() -> Adapter:
    from scopevid.adapters.tiny.adapter import TinyAdapter

    return TinyAdapter.from_config({"kind": "tiny", "weights": "random", "init_seed": 0, "arch": TINY_ARCH})


@pytest.fixture(scope="module")
def skyreels_ckpt(tmp_path_factory):
    from test_skyreels_v2 import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("contract") / "SkyReels-V2-DF-tiny")


def _cases(skyreels_ckpt) -> dict[str, Case]:
    from test_magi1 import FX, fixture_adapter
    from test_skyreels_v2 import NEGATIVE, PROMPT, make_adapter

    df = VideoFacts(num_steps=6, latent_frames=12, unit=1, chunked=False, prefixes={0: 0, 4: 2})
    return {
        "tiny": Case("tiny", _tiny, "red square moving right", "blue square moving left", 2.0, df, [4, 5, 6, 7]),
        "skyreels_v2": Case("skyreels_v2", lambda: make_adapter(skyreels_ckpt, addnoise_condition=20), PROMPT, NEGATIVE, 5.0,
                            df, [4, 5, 6, 7]),
        "skyreels_v2_block_causal": Case("skyreels_v2_block_causal", lambda: make_adapter(skyreels_ckpt, causal_attention=2),
                                         PROMPT, NEGATIVE, 5.0, replace(df, unit=2), [4, 5, 6, 7]),
        "magi1": Case("magi1", lambda: fixture_adapter(vae=str(FX / "vae")), "a fox runs", "a red car", 1.0,
                      VideoFacts(num_steps=8, latent_frames=10, unit=2, chunked=True), [2, 3, 4, 5]),
    }


@pytest.fixture(scope="module", params=["tiny", "skyreels_v2", "skyreels_v2_block_causal", "magi1"])
def case(request, skyreels_ckpt) -> Case:
    return _cases(skyreels_ckpt)[request.param]


@pytest.fixture(scope="module")
def ad(case) -> Adapter:
    a = case.make()
    a.prepare(case.facts)
    return a


def _inputs(ad: Adapter, sched: NoiseSchedule, frames: list[int], seed: int = 0):
    c, (h, w) = ad.latent_channels, ad.latent_hw
    x = torch.randn(len(frames), c, h, w, generator=torch.Generator().manual_seed(seed))
    s = torch.tensor([sched.sigmas[1 + i % (len(sched.sigmas) - 2)] for i in range(len(frames))], dtype=torch.float32)
    return x, s


def _spec(frames: list[int], origin: int, s: torch.Tensor, **kw) -> ForwardSpec:
    return ForwardSpec(frames=frames, origin=origin, sigmas=tuple(float(v) for v in s), causal=True, **kw)


def _velocity(ad, cond, x, s, spec, hooks=None):
    kv = spec.kv if spec.kv is not None else KVCache()
    return ad.velocity(x, s, cond, replace(spec, kv=kv), local_attention, hooks)


# --- declared, not probed ------------------------------------------------------------------------
def test_declares_the_contract(ad):
    assert isinstance(ad, Adapter)
    caps = ad.capabilities
    assert isinstance(caps, Capabilities) and isinstance(caps.causal, bool)
    assert all(isinstance(p, HookPoint) for p in caps.hook_points)
    assert all(isinstance(f, Feature) and f != Feature.HOST for f in caps.features)
    assert isinstance(ad.name, str) and ad.latent_channels >= 1 and len(ad.latent_hw) == 2 and ad.temporal_compression >= 1
    assert ad.solver_options() is None or isinstance(ad.solver_options(), dict)


def test_prepare_gives_the_noise_levels_and_is_repeatable(case):
    ad = case.make()
    a = ad.prepare(case.facts)
    b = ad.prepare(case.facts)
    assert isinstance(a, NoiseSchedule) and a == b
    sig = a.sigmas
    assert len(sig) == case.facts.num_steps + 1
    assert all(x > y for x, y in zip(sig, sig[1:])), "noise levels decrease from noise to clean"
    assert a.noise >= sig[0] and 0.0 <= a.clean < sig[-2] and abs(sig[-1]) < 1e-6


# --- no hidden call order ------------------------------------------------------------------------
def test_encode_prompt_is_pure(case, ad):
    """A prompt encoded after another gives the same conditioning, and the same velocity, as alone."""
    sched = ad.prepare(case.facts)
    x, s = _inputs(ad, sched, case.frames)
    spec = _spec(case.frames, case.frames[0], s)
    alone = _velocity(ad, ad.encode_prompt(case.prompt, None, case.guidance), x, s, spec)
    ad.encode_prompt(case.other_prompt, None, 1.0)  # a different prompt and guidance in between
    cond = ad.encode_prompt(case.prompt, None, case.guidance)
    assert torch.equal(_velocity(ad, cond, x, s, spec), alone)
    assert isinstance(cond, Conditioning) and cond.branches == (2 if case.guidance != 1.0 else 1)


def test_velocity_is_of_exactly_the_frames_given(case, ad):
    sched = ad.prepare(case.facts)
    cond = ad.encode_prompt(case.prompt, None, case.guidance)
    x, s = _inputs(ad, sched, case.frames)
    v = _velocity(ad, cond, x, s, _spec(case.frames, case.frames[0], s))
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    assert torch.equal(v, _velocity(ad, cond, x, s, _spec(case.frames, case.frames[0], s))), "deterministic"
    assert float(v.detach().abs().sum()) > 0


def test_features_per_frame_and_undeclared_ones_refused(case, ad):
    sched = ad.prepare(case.facts)
    cond = ad.encode_prompt(case.prompt, None, case.guidance)
    x, s = _inputs(ad, sched, case.frames)
    spec = _spec(case.frames, case.frames[0], s)
    phi = ad.host_feature(x, s, cond, spec)
    assert phi.shape[0] == len(case.frames) and torch.isfinite(phi).all()
    for kind in Feature:
        if kind == Feature.HOST:
            continue
        if kind in ad.capabilities.features:
            f = ad.named_feature(kind, x, s, cond, spec)
            assert f.shape[0] == len(case.frames) and torch.isfinite(f).all(), kind
        else:
            with pytest.raises(ConfigError, match=kind.value):
                ad.named_feature(kind, x, s, cond, spec)


class _Counting(ForwardHooks):
    """Identity hooks that count where they are called."""

    def __init__(self):
        self.calls = {HookPoint.STACK: 0, HookPoint.BLOCK: 0}
        self.frames: set = set()

    def stack(self, ctx, h, run):
        self.calls[HookPoint.STACK] += 1
        self.frames |= set(ctx.frames)
        return run(h)

    def block(self, ctx, layer, h, run, apply):
        self.calls[HookPoint.BLOCK] += 1
        assert 0 <= layer < ctx.depth
        return run(h)[0]


def test_hooks_called_where_declared_and_change_nothing(case, ad):
    sched = ad.prepare(case.facts)
    cond = ad.encode_prompt(case.prompt, None, case.guidance)
    x, s = _inputs(ad, sched, case.frames)
    spec = _spec(case.frames, case.frames[0], s)
    plain = _velocity(ad, cond, x, s, spec)
    hooks = _Counting()
    assert torch.equal(_velocity(ad, cond, x, s, spec, hooks), plain)
    for point in HookPoint:
        if point in ad.capabilities.hook_points:
            assert hooks.calls[point] >= cond.branches, point
        else:
            assert hooks.calls[point] == 0, point
    if HookPoint.STACK in ad.capabilities.hook_points:
        assert hooks.frames == set(case.frames), "hooks see absolute frame indices"


def test_flops_scale(ad):
    f1, f2 = ad.flops(2, 0), ad.flops(4, 0)
    assert 0 < f1 < f2
    assert ad.flops(4, 0, branches=2) == 2 * f2
    assert ad.flops(4, 0, blocks=1) < f2
    if ad.capabilities.causal:
        assert ad.flops(4, 4) > f2, "attending cached context costs"


def test_stream_decoder_resumes_where_it_stopped(case, ad):
    """Pixels in [0, 1] as RGB; a decoder restored from its state_dict continues like the original."""
    c, (h, w) = ad.latent_channels, ad.latent_hw
    z = 0.5 * torch.randn(6, c, h, w, generator=torch.Generator().manual_seed(4))
    dec: StreamDecoder = ad.stream_decoder()
    whole = [p for p in (dec.push(zi) for zi in z) if p is not None] + [dec.flush()]
    whole = torch.cat([p for p in whole if p is not None])
    assert whole.shape[-1] == 3 and float(whole.min()) >= 0.0 and float(whole.max()) <= 1.0
    first = ad.stream_decoder()
    out = [first.push(zi) for zi in z[:3]]
    again = ad.stream_decoder()
    again.load_state_dict(first.state_dict())
    out += [again.push(zi) for zi in z[3:]] + [again.flush()]
    torch.testing.assert_close(torch.cat([p for p in out if p is not None]), whole, rtol=1e-5, atol=1e-5)


def test_causal_adapters_serve_kv_context_exactly(case, ad):
    """A causal adapter's clean frames attended as cached K/V give the later frames the velocity of
    one joint forward: what makes selective computation and the lazy clean re-forward exact."""
    if not ad.capabilities.causal:
        pytest.skip("bidirectional within the window: the engine never serves K/V context to it")
    sched = ad.prepare(case.facts)
    cond = ad.encode_prompt(case.prompt, None, case.guidance)
    ctx, cur = case.frames[:2], case.frames[2:]
    x, s = _inputs(ad, sched, case.frames)
    s[:2] = sched.clean
    kv = KVCache()
    joint = ad.velocity(x, s, cond, _spec(case.frames, 0, s, store=frozenset(ctx), kv=kv), local_attention)
    assert kv.frames() == set(ctx), "the clean frames' K/V were stored"
    apart = ad.velocity(x[2:], s[2:], cond, _spec(cur, 0, s[2:], context=ctx, kv=kv), local_attention)
    torch.testing.assert_close(apart, joint[2:], rtol=1e-5, atol=1e-5)
