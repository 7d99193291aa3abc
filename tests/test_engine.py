"""Engine: determinism, exactness of selective computation on a block-causal model, SCOPE accounting,
streaming bounds, and the run log / summary contract."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from scopevid import adapters
from scopevid import config as config_lib
from scopevid.engine import runner
from scopevid.engine.rollout import Records, Rollout
from scopevid.scheduler.policies import Original


def _latents(cfg) -> tuple[torch.Tensor, list]:
    """Run the rollout and return every clean latent in order, plus the step records."""
    adapter = adapters.load(cfg.model)
    plan = runner.build_plan(cfg, adapter)
    cond = adapter.encode_prompt(cfg.prompt, None, cfg.guidance)
    watch = Records()
    ro = Rollout(adapter, plan, Original(), cond, seed=cfg.seed, observers=[watch])
    out = list(ro.run())
    assert [i for i, _ in out] == list(range(plan.latent_frames)), "frames must leave in order, each once"
    return torch.stack([x for _, x in out]), watch.records


def test_original_twice_is_byte_identical(tiny_config, tmp_path):
    cfg = config_lib.load(tiny_config())
    a = runner.generate(cfg, tmp_path / "a", progress=False)
    b = runner.generate(cfg, tmp_path / "b", progress=False)
    assert (tmp_path / "a" / "video.mp4").read_bytes() == (tmp_path / "b" / "video.mp4").read_bytes()
    la, _ = _latents(cfg)
    lb, _ = _latents(cfg)
    assert la.numpy().tobytes() == lb.numpy().tobytes()
    assert a["decision_digest"] == b["decision_digest"]
    assert a["frames"] == cfg.frames


@pytest.mark.parametrize("kind", ["diffusion_forcing", "chunk_causal"])
def test_selective_is_exact_for_causal_model(tiny_config, kind):
    """Frames outside the compute interval are either clean (served as cached K/V) or not yet started
    (unseen by a block-causal model), so cropping must not change the video."""
    sched = {"kind": kind, "chunk_width": 2, "window_size": 4, "context_chunks": 2}
    full = config_lib.load(tiny_config(schedule={**sched, "selective": "off"}, frames=24))
    crop = config_lib.load(tiny_config(schedule={**sched, "selective": "causal"}, frames=24))
    a, ra = _latents(full)
    b, rb = _latents(crop)
    assert torch.allclose(a, b, atol=2e-5), float((a - b).abs().max())
    if kind == "diffusion_forcing":
        # and it really computed less
        assert sum(r.compute_hi - r.compute_lo for r in rb) < sum(r.compute_hi - r.compute_lo for r in ra)


def test_chunk_causal_context_changes_output(tiny_config):
    """The KV context is really attended: dropping it (context_chunks 0) changes later chunks."""
    sched = {"kind": "chunk_causal", "chunk_width": 2, "window_size": 2}
    a, _ = _latents(config_lib.load(tiny_config(schedule={**sched, "context_chunks": 2}, frames=12)))
    b, _ = _latents(config_lib.load(tiny_config(schedule={**sched, "context_chunks": 0}, frames=12)))
    assert torch.allclose(a[:2], b[:2], atol=1e-6)  # the first chunk never has clean context
    assert (a[2:] - b[2:]).abs().max() > 1e-4


def test_scope_compare_summary_and_run_log(tiny_config, tmp_path):
    cfg = config_lib.load(tiny_config(policy="scope-fast", frames=32))
    s = runner.generate(cfg, tmp_path / "run", compare=True, progress=False)
    counts = s["counts"]
    assert set(counts) == {"recompute", "cache", "predict"}
    assert sum(counts.values()) == s["iterations"]
    assert counts["cache"] + counts["predict"] > 0
    assert s["full_forwards"] < s["original"]["full_forwards"]
    assert s["mean_compute_interval"] < s["mean_valid_interval"]
    assert s["psnr"] is not None and s["ssim"] is not None and s["frames_compared"] == 32
    assert s["speedup_flops"] > 1.0
    steps = pq.read_table(tmp_path / "run" / "steps.parquet").to_pandas() if _has_pandas() else None
    table = pq.read_table(tmp_path / "run" / "steps.parquet")
    assert table.num_rows == s["iterations"]
    assert set(table.column("mode").to_pylist()) <= {"recompute", "cache", "predict"}
    for col in ["window", "iteration", "mode", "d", "r", "compute_lo", "compute_hi", "frames_computed", "seconds"]:
        assert col in table.column_names
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["counts"] == counts and on_disk["config"]["policy"] == "scope-fast"
    del steps


def _has_pandas() -> bool:
    try:
        import pandas  # noqa: F401

        return True
    except ImportError:
        return False


def test_scope_identical_to_original_when_thresholds_zero(tiny_config, tmp_path):
    """tau_c = tau_p = 0 never skips: SCOPE must then reproduce Original exactly."""
    presets = tmp_path / "p.yaml"
    presets.write_text("never: {kind: scope, tau_c: 0.0, tau_p: 0.0, decay: 0.75, horizon: 5, warmup: 0}\n")
    cfg = config_lib.load(tiny_config(policy="never", policy_presets=str(presets)))
    adapter = adapters.load(cfg.model)
    ref = runner.run_once(cfg, adapter, "original", video=None)
    got = runner.run_once(cfg, adapter, "never", video=None)
    assert got.summary["counts"]["recompute"] == got.summary["iterations"]
    assert ref.summary["decision_digest"] == got.summary["decision_digest"]


def test_memory_bounded_by_window(tiny_config):
    """Long videos stream: clean latents are released once emitted and not needed as prefix."""
    cfg = config_lib.load(tiny_config(frames=60))
    adapter = adapters.load(cfg.model)
    plan = runner.build_plan(cfg, adapter)
    cond = adapter.encode_prompt(cfg.prompt, None, cfg.guidance)
    ro = Rollout(adapter, plan, Original(), cond, seed=0)
    peak = 0
    for _ in ro.run():
        peak = max(peak, len(ro.state.final) + len(ro.state.latents))
    assert peak <= 2 * plan.window, (peak, plan.window)


def test_existing_output_never_overwritten(tiny_config, tmp_path):
    cfg = config_lib.load(tiny_config())
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("finished work")
    from scopevid.errors import OutputExistsError

    with pytest.raises(OutputExistsError, match="not empty"):
        runner.generate(cfg, out, progress=False)
    assert (out / "keep.txt").read_text() == "finished work"


def test_video_has_requested_frames(tiny_config, tmp_path):
    import imageio.v3 as iio

    cfg = config_lib.load(tiny_config(frames=21))
    runner.generate(cfg, tmp_path / "v", progress=False)
    frames = iio.imread(tmp_path / "v" / "video.mp4")
    assert frames.shape[0] == 21 and frames.shape[-1] == 3
    assert np.isfinite(frames).all()
