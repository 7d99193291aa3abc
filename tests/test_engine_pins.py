"""What the engine does, pinned against hand-computed values (each test names the bug it catches).

- Predict is the predictor's extrapolation (Eq. 6 by hand), not the last velocity; Cache is the last
  *recomputed* velocity; Recompute is the forward.
- A prediction the stability check rejects is recomputed, and the log says so.
- The discrepancy sums of Eq. 4 are float64 (checked against numpy on the adapter's own features).
- Per-frame state (K/V, velocity history, features, latents) leaves with its frame on every schedule.
- A resume restores the policy state, the velocity history and the host features: the first
  iteration after the checkpoint is a Predict that depends on all three, and the resumed video
  equals the uninterrupted one byte for byte.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_ARCH, write_tiny_config
from scopevid.adapters.tiny.adapter import TinyAdapter
from scopevid.engine.rollout import Records, Rollout, RolloutObserver
from scopevid.scheduler.plan import Iteration
from scopevid.scheduler.policies import Decision, Mode, Policy, StepContext
from scopevid.scheduler.predictors import Stability
from scopevid.scheduler.schedules import ChunkCausalPlan, DiffusionForcingPlan


class SpyTiny(TinyAdapter):
    """The tiny adapter, recording every velocity it returns per absolute frame (in call order)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.outputs: list[dict[int, torch.Tensor]] = []

    def velocity(self, x, sigma, cond, spec, attention, hooks=None):
        v = super().velocity(x, sigma, cond, spec, attention, hooks)
        self.outputs.append({f: v[i].detach().clone() for i, f in enumerate(spec.local_frames()) if f >= 0})
        return v


def spy_adapter() -> SpyTiny:
    from scopevid.adapters.tiny.model import TinyDiT, TinyDiTConfig

    torch.manual_seed(0)
    model = TinyDiT(TinyDiTConfig.from_dict(TINY_ARCH))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 0 and float(p.abs().sum()) == 0.0:
                torch.nn.init.normal_(p, std=0.02)
    return SpyTiny(model, 3.0)


class Scripted(Policy):
    """Decides by serial from a script (default Recompute); needs no feature."""

    name = "scripted"

    def __init__(self, script: dict[int, Mode]):
        self.script, self.taken = script, {}

    def decide(self, ctx: StepContext, disc) -> Decision:
        return Decision(self.script.get(ctx.serial, Mode.RECOMPUTE), reason="script")

    def record(self, mode: Mode) -> None:
        self.taken[len(self.taken)] = mode


def _run(ad, plan, policy, **kw):
    """Run a rollout; return (latents before each serial, the step records, the rollout)."""
    cond = ad.encode_prompt("red square moving right", None, 2.0)
    before, watch = {}, Records()

    class Before(RolloutObserver):
        def before_iteration(self, it, next_emit):
            before[it.serial] = {f: x.clone() for f, x in ro.state.latents.items()}

    ro = Rollout(ad, plan, policy, cond, seed=0, observers=[watch, Before()], **kw)
    list(ro.run())
    return before, watch.records, ro


SYNC = DiffusionForcingPlan(latent_frames=4, window=4, num_steps=8, ar_step=0)  # every frame active every step


def _sigmas(ad, plan):
    from scopevid.engine.rollout import video_facts

    return ad.prepare(video_facts(plan)).sigmas


def test_predict_is_the_taylor1_extrapolation_and_cache_the_last_recomputed_velocity():
    """Iterations 0, 1 recompute; 2 predicts (Taylor-1, Eq. 6, by hand); 3 caches (the velocity of 1,
    not the prediction of 2); 4 recomputes. Solver: Euler, so x_{k+1} - x_k = v (sigma_{k+1} - sigma_k)."""
    ad = spy_adapter()
    sig = _sigmas(ad, SYNC)
    before, recs, _ = _run(ad, SYNC, Scripted({2: Mode.PREDICT, 3: Mode.CACHE}), predictor="taylor1",
                           stability=Stability(clip=1e6, explode=1e6))
    assert [r.mode for r in recs[:5]] == ["recompute", "recompute", "predict", "cache", "recompute"]
    assert [r.frames_computed for r in recs[2:4]] == [0, 0]
    v0, v1, v4 = ad.outputs[0], ad.outputs[1], ad.outputs[2]
    for f in range(4):
        # hand-computed Eq. 6 at sigma_2 from (sigma_0, v0), (sigma_1, v1)
        slope = (v1[f].double() - v0[f].double()) / (sig[1] - sig[0])
        v_hat = v1[f].double() + slope * (sig[2] - sig[1])
        step2 = before[3][f].double() - before[2][f].double()
        torch.testing.assert_close(step2, v_hat * (sig[3] - sig[2]), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(step2, v1[f].double() * (sig[3] - sig[2]), rtol=1e-3, atol=1e-5), "predict != cache"
        step3 = before[4][f].double() - before[3][f].double()
        torch.testing.assert_close(step3, v1[f].double() * (sig[4] - sig[3]), rtol=1e-5, atol=1e-6)
        step4 = before[5][f].double() - before[4][f].double()
        torch.testing.assert_close(step4, v4[f].double() * (sig[5] - sig[4]), rtol=1e-5, atol=1e-6)


def test_unstable_prediction_is_recomputed():
    """With a stability bound no extrapolation passes, a Predict decision becomes a forward: the log
    says recompute / predict-unstable, the fallback is counted, and the step uses the forward's velocity."""
    ad = spy_adapter()
    sig = _sigmas(ad, SYNC)
    policy = Scripted({2: Mode.PREDICT})
    before, recs, ro = _run(ad, SYNC, policy, predictor="taylor1", stability=Stability(clip=1e-9, explode=1e-9))
    assert (recs[2].mode, recs[2].reason) == ("recompute", "predict-unstable")
    assert policy.taken[2] == Mode.RECOMPUTE and ro.state.stats.fallbacks == 1 and recs[2].frames_computed == 4
    v2 = ad.outputs[2]
    for f in range(4):
        torch.testing.assert_close(before[3][f] - before[2][f], v2[f] * (sig[3] - sig[2]), rtol=1e-5, atol=1e-6)


def test_clipped_prediction_is_scaled_towards_the_last_velocity():
    """clip bounds |v_hat - v_k| to clip * |v_k| (summed over the active frames)."""
    ad = spy_adapter()
    sig = _sigmas(ad, SYNC)
    before, recs, _ = _run(ad, SYNC, Scripted({2: Mode.PREDICT}), predictor="taylor1", stability=Stability(clip=1e-3, explode=1e6))
    assert recs[2].mode == "predict"
    v0, v1 = ad.outputs[0], ad.outputs[1]
    delta = {f: (v1[f].double() - v0[f].double()) / (sig[1] - sig[0]) * (sig[2] - sig[1]) for f in range(4)}
    ratio = 1e-3 * float(sum((v1[f].double() ** 2).sum() for f in range(4))) ** 0.5 / float(sum((delta[f] ** 2).sum() for f in range(4))) ** 0.5
    assert ratio < 1.0
    for f in range(4):
        want = (v1[f].double() + ratio * delta[f]) * (sig[3] - sig[2])
        torch.testing.assert_close(before[3][f].double() - before[2][f].double(), want, rtol=1e-5, atol=1e-6)


def test_discrepancy_sums_are_float64_over_the_adapters_features():
    """Eq. 4 against numpy float64 on the adapter's own host features: float32 accumulation would be
    off by ~1e-7 relative, far outside this tolerance."""
    ad = spy_adapter()
    cond = ad.encode_prompt("red square moving right", None, 2.0)
    ro = Rollout(ad, SYNC, Scripted({}), cond, seed=0)
    it = next(iter(SYNC.iterations()))
    frames = list(it.frames)
    levels = ro._levels(it)
    g = torch.Generator().manual_seed(5)
    phis = []
    for k in range(2):
        for f in frames:
            ro.state.latents[f] = 100.0 * torch.randn(3, 16, 16, generator=g)  # large values: float32 sums round
        s = torch.tensor([levels[f][0] for f in frames], dtype=torch.float32)
        phis.append(ad.host_feature(torch.stack([ro.state.latents[f] for f in frames]), s, cond, None).detach().numpy().astype(np.float64))
        disc = ro.runner.discrepancy(it, frames, levels)
    num = float(np.abs(phis[1] - phis[0]).sum())
    den = float(np.abs(phis[0]).sum())
    assert disc.num == pytest.approx(num, rel=1e-12) and disc.den == pytest.approx(den, rel=1e-12)
    assert abs(disc.num - float(np.float32(np.abs(phis[1] - phis[0]).astype(np.float32).sum(dtype=np.float32)))) > 1e-12 * num


@pytest.mark.parametrize("plan", [
    DiffusionForcingPlan(latent_frames=60, window=8, num_steps=8, ar_step=2, overlap=2, selective="causal"),
    ChunkCausalPlan(latent_frames=60, chunk=2, window_chunks=4, num_steps=8, context_chunks=2),
], ids=["diffusion_forcing", "chunk_causal"])
def test_per_frame_state_leaves_with_its_frame(plan):
    """K/V, velocity history, host features and latents of frames that left the window and its
    context are gone after every iteration, on both schedules, so memory does not grow with length."""
    from scopevid.scheduler.policies import Scope, ScopeConfig

    ad = spy_adapter()
    cond = ad.encode_prompt("red square moving right", None, 2.0)
    policy = Scope(ScopeConfig(tau_c=0.05, tau_p=0.3, decay=0.75, horizon=3, warmup=2))
    ro = Rollout(ad, plan, policy, cond, seed=0)
    peak = {"kv": 0, "history": 0, "features": 0, "latents": 0}
    lo_of: dict[int, int] = {}
    its: dict[int, Iteration] = {}

    class Check(RolloutObserver):
        def before_iteration(self, it, next_emit):
            check(it)

    def check(it):
        its[it.serial] = it
        prev = its.get(it.serial - 1)
        if prev is None:
            return
        lo = prev.frames[0] if prev.context_start is None else min(prev.context_start, prev.frames[0])
        st = ro.state
        assert min(st.kv.frames(), default=lo) >= lo and min(st.history.frames(), default=lo) >= lo
        assert min(st.features.frames(), default=lo) >= lo and min(list(st.final) + list(st.latents), default=lo) >= lo
        peak["kv"] = max(peak["kv"], len(st.kv.frames()))
        peak["history"] = max(peak["history"], len(st.history))
        peak["features"] = max(peak["features"], len(st.features))
        peak["latents"] = max(peak["latents"], len(st.final) + len(st.latents))
        lo_of[it.serial] = lo

    ro.observers.append(Check())
    list(ro.run())
    span = plan.window if isinstance(plan, DiffusionForcingPlan) else (plan.window_chunks + plan.context_chunks) * plan.chunk
    assert 0 < peak["history"] <= span and 0 < peak["features"] <= span and peak["latents"] <= 2 * span
    assert peak["kv"] <= span
    if isinstance(plan, ChunkCausalPlan):
        assert peak["kv"] > 0  # context really cached (and really evicted: bounded by the span above)


# --- resume where the restored state decides --------------------------------------------------------
class Interrupted(Exception):
    pass


PREDICTING = {"kind": "scope", "tau_c": 0.05, "tau_p": 5.0, "decay": 0.75, "horizon": 8, "warmup": 2, "predictor": "taylor2"}


def test_resume_at_a_predict_that_depends_on_the_restored_state(tmp_path):
    """Chunk-causal plans checkpoint mid-stream. Pick a checkpoint whose first iteration is a Predict
    that follows a cheap iteration (so the restored r is not 0) and whose own d_k alone is below tau_c
    (so with r lost it would Cache); it needs the restored velocity history (>= 2 entries) and the
    restored features (for d_k). Resume there: same decisions, same latents, byte for byte."""
    from scopevid import config as config_lib
    from scopevid.engine import runner
    from scopevid.engine.checkpoint import Checkpointer, checkpoint_info

    class Recording(Checkpointer):
        def save(self, it, next_emit):
            self.saved.append(it.serial)
            super().save(it, next_emit)

    sched = {"kind": "chunk_causal", "chunk_width": 2, "window_size": 4, "context_chunks": 2}
    cfg = config_lib.load(write_tiny_config(tmp_path, frames=40, policy="predicting", policies={"predicting": PREDICTING},
                                            schedule=sched))
    ref_cp = Recording(tmp_path / "ref")
    ref_cp.saved = []
    runner.generate(cfg, tmp_path / "ref", progress=False, checkpoint=ref_cp)
    import pyarrow.parquet as pq

    log = pq.read_table(tmp_path / "ref" / "steps.parquet").to_pylist()
    mode = {r["serial"]: r["mode"] for r in log}
    d = {r["serial"]: r["d"] for r in log}
    picks = [b for b in ref_cp.saved if mode[b] == "predict" and mode[b - 1] != "recompute" and d[b] < PREDICTING["tau_c"]]
    assert picks, f"no checkpoint lands on a state-dependent Predict: saves {ref_cp.saved}, modes {[mode[b] for b in ref_cp.saved]}"
    b = picks[0]

    def stop(serial, total, next_emit, frames):
        if serial == b + 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        runner.generate(cfg, tmp_path / "job", progress=False, checkpoint=Checkpointer(tmp_path / "job", on_iteration=stop))
    assert checkpoint_info(tmp_path / "job")["serial"] == b
    runner.generate(cfg, tmp_path / "job", progress=False, overwrite=True, checkpoint=Checkpointer(tmp_path / "job", resume=True))
    got = pq.read_table(tmp_path / "job" / "steps.parquet").to_pylist()
    assert [r["mode"] for r in got] == [r["mode"] for r in log]
    assert [r["r"] for r in got] == [r["r"] for r in log]
    from safetensors.torch import load_file

    la = load_file(tmp_path / "ref" / "latents.safetensors")["latents"]
    lb = load_file(tmp_path / "job" / "latents.safetensors")["latents"]
    assert torch.equal(la, lb)
