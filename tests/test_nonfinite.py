"""Non-finite values never become output: a NaN in the model (a NaN weight, `guidance: inf`) stops
the run with one line and exit 1, keeping the frames finished before it, instead of writing a black
video with exit 0; so does a finite but absurd velocity (over `stability.max_velocity`); a
non-finite prediction is recomputed."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT, TINY_ARCH, write_tiny_config
from scopevid import adapters
from scopevid import config as config_lib
from scopevid.engine import runner
from scopevid.errors import AbsurdVelocityError, NonFiniteError


def _tiny_weights(tmp_path, poison: bool, scale_out: float = 1.0):
    """A tiny checkpoint in the bundled layout (safetensors + its JSON), one weight NaN if `poison`,
    the output layer's weights times `scale_out` (finite, absurd velocities)."""
    from scopevid.adapters.tiny.model import TinyDiT, TinyDiTConfig

    torch.manual_seed(0)
    cfg = TinyDiTConfig.from_dict(TINY_ARCH)
    model = TinyDiT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 0 and float(p.abs().sum()) == 0.0:
                torch.nn.init.normal_(p, std=0.02)
        if poison:
            next(iter(model.blocks[0].parameters())).view(-1)[0] = float("nan")
        model.out.weight.mul_(scale_out)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({"model": cfg.to_dict(), "shift": 3.0}))
    return path


def _cli(cfg_path, out):
    return subprocess.run([sys.executable, "-m", "scopevid", "generate", "--config", str(cfg_path), "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, timeout=120, cwd=ROOT)


@pytest.mark.parametrize("case", ["nan-weight", "guidance-inf", "guidance-1e30"])
def test_non_finite_model_output_is_one_line_and_exit_1(tmp_path, case):
    over = {}
    if case == "nan-weight":
        over["model"] = {"kind": "tiny", "weights": str(_tiny_weights(tmp_path, poison=True))}
    else:
        over["guidance"] = float("inf") if case == "guidance-inf" else 1e30
    cfg_path = write_tiny_config(tmp_path, **over)
    p = _cli(cfg_path, tmp_path / "out")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "NaN or inf" in lines[-1] and "window" in lines[-1], p.stderr[-2000:]
    assert not (tmp_path / "out" / "summary.json").exists()  # no summary claims a finished video


def test_the_same_checkpoint_without_the_nan_runs(tmp_path):
    """Negative control: the checkpoint writer is sound, only the NaN makes the run fail."""
    cfg_path = write_tiny_config(tmp_path, model={"kind": "tiny", "weights": str(_tiny_weights(tmp_path, poison=False))})
    p = _cli(cfg_path, tmp_path / "out")
    assert p.returncode == 0, p.stderr[-2000:]


def test_finite_but_absurd_velocities_stop_in_one_line_with_exit_1(tmp_path):
    """Output weights scaled by 1e6 (a corrupt checkpoint whose numbers stay finite) used to run to
    exit 0 with latents around 1e5; the bound on |v| ends the run at the first forward."""
    cfg_path = write_tiny_config(tmp_path, model={"kind": "tiny", "weights": str(_tiny_weights(tmp_path, False, 1e6))})
    p = _cli(cfg_path, tmp_path / "out")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, p.stderr[-2000:]
    assert lines[0].startswith("scopevid generate: error: the model returned a velocity of ") and \
        "at window 0, iteration 0 (serial 0)" in lines[0] and "over the bound 2000 (stability.max_velocity x guidance" in lines[0]
    assert not (tmp_path / "out" / "summary.json").exists()


@pytest.mark.parametrize("guidance", [1.0, 3.0, 7.5])
def test_the_bundled_model_stays_far_below_the_velocity_bound(tmp_path, guidance):
    """The trained model's velocities (peak |v| ~6 at guidance 3) pass a bound 50x tighter than the
    default, at the shipped guidance and well above it: the default cannot trip on a healthy run."""
    cfg = config_lib.load(ROOT / "configs" / "tiny.yaml").with_overrides(
        frames=17, guidance=guidance, policy="original", stability={"max_velocity": 20.0})
    summary = runner.generate(cfg, tmp_path / "out", progress=False)
    assert summary["frames"] == 17


def test_velocity_bound_scales_with_guidance():
    from scopevid.scheduler.predictors import Stability

    s = Stability()
    assert (s.max_velocity, s.velocity_bound(0.0), s.velocity_bound(1.0), s.velocity_bound(5.0)) == (1000.0, 1000.0, 1000.0, 5000.0)
    assert issubclass(AbsurdVelocityError, NonFiniteError)  # every rank stops together, as for a NaN


class _BitFlip:
    """Turns one real weight of the model into NaN after `after` forwards (a fault mid-run)."""

    def __init__(self, adapter, after: int):
        self.velocity, self.n, self.after, self.adapter = adapter.velocity, 0, after, adapter

    def __call__(self, *a, **kw):
        self.n += 1
        if self.n == self.after:
            with torch.no_grad():
                next(iter(self.adapter.model.blocks[0].parameters())).view(-1)[0] = float("nan")
        return self.velocity(*a, **kw)


def test_nan_mid_run_keeps_what_was_finished(tiny_config, tmp_path):
    """A NaN weight appearing after 60 forwards: the run stops naming window, iteration and frames;
    the MP4 holds the frames finished before it, readable, and the run log is readable up to there."""
    import imageio.v3 as iio

    cfg = config_lib.load(tiny_config(frames=40))
    ad = adapters.load(cfg.model)
    ad.velocity = _BitFlip(ad, after=60)
    (tmp_path / "run").mkdir()
    with pytest.raises(NonFiniteError, match=r"window \d+, iteration \d+ \(serial \d+\), frames \d+\.\.\d+") as e:
        runner.run_once(cfg, ad, "original", video=tmp_path / "run" / "video.mp4", steps_log=tmp_path / "run" / "steps.parquet")
    frames = iio.imread(tmp_path / "run" / "video.mp4")
    assert 0 < frames.shape[0] < cfg.frames and np.isfinite(frames).all()
    log = pq.read_table(tmp_path / "run" / "steps.parquet")
    assert log.num_rows > 0 and log.column("serial").to_pylist() == list(range(log.num_rows))
    serial = int(str(e.value).split("serial ")[1].split(")")[0])
    assert log.num_rows == serial  # every iteration before the failing one is logged, none after


def test_non_finite_prediction_is_recomputed(tiny_config):
    """The stability check rejects a NaN extrapolation: the iteration recomputes, the video is finite."""
    presets = {"pred": {"kind": "scope", "tau_c": 0.0, "tau_p": 100.0, "decay": 0.75, "horizon": 3, "warmup": 2}}
    cfg = config_lib.load(tiny_config(policy="pred", policies=presets))
    ad = adapters.load(cfg.model)
    from scopevid.scheduler import predictors

    good = predictors.get("taylor2")
    calls = {"n": 0}

    def poisoned(hist, target):
        calls["n"] += 1
        v = good(hist, target)
        return v * float("nan") if calls["n"] % 2 else v

    predictors._TABLE["taylor2"] = poisoned
    try:
        res = runner.run_once(cfg, ad, "pred", keep_records=True)
    finally:
        predictors._TABLE["taylor2"] = good
    reasons = [r.reason for r in res.records]
    assert "predict-unstable" in reasons and res.summary["predict_fallbacks"] > 0
    assert res.summary["counts"]["predict"] > 0  # the finite ones were taken
