"""SkyReels-V2 diffusion forcing on a real (tiny, random) diffusers checkpoint, matched against
diffusers' own `SkyReelsV2DiffusionForcingPipeline`.

The checkpoint is built with diffusers' and transformers' own classes (tiny transformer and Wan VAE
as in diffusers' tests, a tiny UMT5 encoder and a WordLevel tokenizer built locally since the hub is
out of reach), saved with `save_pretrained`, and loaded back through our loader. The pipeline's
generator draws are replayed through the rollout's `noise=` hook and its global-RNG draws
(addnoise_condition) by seeding torch identically before both runs.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT

from scopevid.adapters.base import ForwardSpec, NoiseSchedule, VideoFacts, local_attention
from scopevid.errors import CheckpointError, ConfigError
from scopevid.scheduler.schedules import DiffusionForcingPlan

PLAN_DF = DiffusionForcingPlan(latent_frames=8, window=8, num_steps=4)

PROMPT, NEGATIVE = "a red fox runs in the snow", "blue sky"
H = W = 32  # pixels -> 4x4 latents -> 2x2 tokens per frame
TEXT_LEN = 16

# SkyReels-V2 is the `skyreels` extra: on a stack without it this module (and every test that builds its
# checkpoint through `importorskip("test_skyreels_v2")`) is skipped
pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: thread hand-offs cost more than the math on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build_tiny_checkpoint(path: Path) -> Path:
    from scopevid.adapters.skyreels_v2.fixture import build_checkpoint

    return build_checkpoint(path)  # 2 heads x 12, 2 layers; UMT5 d_model 32, 2 layers; the WordLevel WORDS


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("skyreels") / "SkyReels-V2-DF-tiny")


@pytest.fixture(scope="module")
def pipe(ckpt):
    from diffusers import SkyReelsV2DiffusionForcingPipeline

    p = SkyReelsV2DiffusionForcingPipeline.from_pretrained(str(ckpt), local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


def make_adapter(ckpt, **spec):
    from scopevid.adapters.skyreels_v2 import SkyReelsV2Adapter

    return SkyReelsV2Adapter.from_config({"kind": "skyreels_v2", "path": str(ckpt), "height": H, "width": W,
                                          "max_sequence_length": TEXT_LEN, **spec})


# ----------------------------------------------------------------------------- model pieces
def prepare(ad, steps: int) -> NoiseSchedule:
    """The adapter prepared for a short diffusion forcing video of `steps` steps."""
    return ad.prepare(VideoFacts(num_steps=steps, latent_frames=16, unit=1, chunked=False))



def test_forward_equals_diffusers_and_keeps_absolute_positions(ckpt):
    ad = make_adapter(ckpt)
    tr = ad.parts.transformer
    cond = ad.encode_prompt(PROMPT, NEGATIVE, 5.0)
    sched = prepare(ad, 6)
    sig = sched.sigmas
    x = torch.randn(4, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    s = torch.tensor([sched.clean, sig[1], sig[3], sched.noise], dtype=torch.float32)
    t = ad._timesteps(s)
    assert t.tolist()[0] == 0 and t.tolist()[-1] == 999

    def ref(xx, tt):
        out = tr(hidden_states=xx.permute(1, 0, 2, 3)[None], timestep=tt[None], encoder_hidden_states=cond.cond.embeds,
                 enable_diffusion_forcing=True, fps=[ad.fps_id], return_dict=False)[0]
        return out[0].permute(1, 0, 2, 3)

    for block in (0, 2):  # bidirectional; block-causal as diffusers does with causal_block_size=2
        tr.register_to_config(num_frame_per_block=max(block, 1))
        ad.block_causal = block
        for origin in (0, 7):  # frames 7..10 of a window starting at 7 are positions 0..3
            spec = ForwardSpec(frames=list(range(origin, origin + 4)), origin=origin, causal=False)
            ours = ad.net.forward(x, t, cond.cond.embeds, cond.cond.context, spec.local_positions(),
                                  ad._attention_spec(spec, "cond"), local_attention, ad.fps_id)
            torch.testing.assert_close(ours, ref(x, t), rtol=0, atol=1e-6)
    tr.register_to_config(num_frame_per_block=1)
    # a cropped forward keeps absolute positions: frames 2..3 of a window use RoPE rows 2..3
    cos, sin = ad.net.rope([2, 3], 2, 2, x.device)
    full_cos, full_sin = tr.rope(x.permute(1, 0, 2, 3)[None])
    assert torch.equal(cos, full_cos[:, 8:16]) and torch.equal(sin, full_sin[:, 8:16])
    feat = ad.host_feature(x, s, cond, ForwardSpec(frames=[0, 1, 2, 3], causal=False))
    assert feat.shape == (4, ad.tokens_per_frame, ad.net.dim)


@pytest.mark.parametrize("compat", [True, False])
def test_unipc_solver_equals_diffusers_scheduler(compat):
    from diffusers import UniPCMultistepScheduler

    from scopevid.engine.unipc import UniPC

    sch = UniPCMultistepScheduler(flow_shift=8.0, use_flow_sigmas=True, prediction_type="flow_prediction")
    sch.set_timesteps(7)
    ours = UniPC([float(s) for s in sch.sigmas], pipeline_compat=compat)
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(1, 4, 2, 3, 3, generator=g)
    mine, fresh, s2 = lat[0, :, 0].clone(), lat[:, :, 0].clone(), copy.deepcopy(sch)
    for k, t in enumerate(sch.timesteps):
        v = torch.randn(1, 4, 3, 3, generator=g)
        if compat:  # the pipelines' pattern: step on a view of the latents, assign the result to it
            lat[:, :, 0] = s2.step(v, t, lat[:, :, 0], return_dict=False)[0]
            ref = lat[0, :, 0]
        else:
            fresh = s2.step(v, t, fresh, return_dict=False)[0]
            ref = fresh[0]
        mine = ours.step(5, mine, v[0], float(sch.sigmas[k]), float(sch.sigmas[k + 1]), k)
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-6)
    assert ours.state_dict() == {}  # a frame's state is dropped after its last step


# ----------------------------------------------------------------------------- parity with diffusers

CASES = {
    "sync": dict(num_frames=9, base_num_frames=9, ar_step=0, causal_block_size=1),
    "async": dict(num_frames=13, base_num_frames=13, ar_step=2, causal_block_size=2),
    "long": dict(num_frames=29, base_num_frames=13, overlap_history=5, ar_step=1, causal_block_size=2, addnoise_condition=20),
}


@pytest.mark.parametrize("case", list(CASES))
def test_original_rollout_equals_diffusers_pipeline(case, ckpt, pipe):
    from scopevid.engine.rollout import DiffusersNoise, Rollout, video_facts
    from scopevid.engine.runner import latent_count
    from scopevid.engine.unipc import UniPC
    from scopevid.scheduler.policies import Original
    from scopevid.scheduler.schedules import DiffusionForcingPlan

    kw, steps, guidance, seed = dict(CASES[case]), 6, 5.0, 3
    cbs = kw["causal_block_size"]
    call = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=H, width=W, num_inference_steps=steps, guidance_scale=guidance,
                max_sequence_length=TEXT_LEN, **kw)
    torch.manual_seed(11)  # the pipeline's addnoise draws come from torch's global generator
    ref = pipe(generator=torch.Generator().manual_seed(seed), output_type="latent", **call).frames[0].permute(1, 0, 2, 3)

    ad = make_adapter(ckpt, causal_attention=cbs if cbs > 1 else 0, addnoise_condition=kw.get("addnoise_condition", 0),
                      addnoise_rng="global", addnoise_seed=11)
    overlap = latent_count(kw["overlap_history"], 4) if "overlap_history" in kw else 0
    plan = DiffusionForcingPlan(latent_frames=latent_count(kw["num_frames"], 4), window=latent_count(kw["base_num_frames"], 4),
                                num_steps=steps, ar_step=kw["ar_step"], block=cbs, overlap=overlap)
    assert len(plan.windows()) == (3 if case == "long" else 1)
    cond = ad.encode_prompt(PROMPT, NEGATIVE, guidance)
    torch.manual_seed(11)
    sched = ad.prepare(video_facts(plan))
    rollout = Rollout(ad, plan, Original(), cond, seed=seed, solver=UniPC.for_adapter(ad, sched), schedule=sched,
                      noise=DiffusersNoise(seed, overlap))
    decoder = ad.stream_decoder()
    latents, pixels = [], []
    for i, (frame, z) in enumerate(rollout.run()):
        assert frame == i
        latents.append(z)
        pixels.append(decoder.push(z))
    ours = torch.stack(latents)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert [p.shape[0] for p in pixels] == [1] + [4] * (len(latents) - 1)  # streamed: 1 + 4 per latent
    if case == "long":  # decoded frames of a multi-window video, streamed frame by frame
        torch.manual_seed(11)
        ref_px = pipe(generator=torch.Generator().manual_seed(seed), output_type="np", **call).frames[0]
        torch.testing.assert_close(torch.cat(pixels), torch.from_numpy(ref_px).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["async", "long"])
def test_generate_with_diffusers_noise_equals_the_pipeline_through_the_cli(case, ckpt, pipe, tmp_path):
    """The parity route for users: `noise: diffusers` (+ `addnoise_rng: global` with the seed the
    pipeline's caller gave torch) makes `scopevid generate` reproduce the pipeline; its lossless
    latents.safetensors equal the pipeline's latents."""
    from safetensors.torch import load_file

    from scopevid import cli

    kw, steps, guidance, seed = dict(CASES[case]), 6, 5.0, 3
    cbs = kw["causal_block_size"]
    torch.manual_seed(11)
    ref = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=H, width=W, num_inference_steps=steps, guidance_scale=guidance,
               max_sequence_length=TEXT_LEN, generator=torch.Generator().manual_seed(seed), output_type="latent",
               **kw).frames[0].permute(1, 0, 2, 3)
    raw = {
        "model": {"kind": "skyreels_v2", "path": str(ckpt), "height": H, "width": W, "max_sequence_length": TEXT_LEN,
                  "causal_attention": cbs if cbs > 1 else 0, "addnoise_condition": kw.get("addnoise_condition", 0),
                  "addnoise_rng": "global", "addnoise_seed": 11},
        "prompt": PROMPT, "negative_prompt": NEGATIVE, "guidance": guidance, "frames": kw["num_frames"], "seed": seed,
        "solver": "unipc", "noise": "diffusers",
        "schedule": {"kind": "diffusion_forcing", "steps": steps, "base_num_frames": kw["base_num_frames"],
                     "overlap_history": kw.get("overlap_history", 1), "ar_step": kw["ar_step"], "causal_block_size": cbs,
                     "selective": "off"},
        "policy": "original", "policy_presets": str(ROOT / "configs" / "policies" / "skyreels_v2.yaml"),
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    assert cli.main(["generate", "--config", str(tmp_path / "run.yaml"), "--out", str(out), "--no-progress"]) == 0
    ours = load_file(str(out / "latents.safetensors"))["latents"]
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # the default per-frame noise is another video (the difference the parity route removes)
    raw["noise"] = "per_frame"
    (tmp_path / "pf.yaml").write_text(yaml.safe_dump(raw))
    assert cli.main(["generate", "--config", str(tmp_path / "pf.yaml"), "--out", str(tmp_path / "pf"), "--no-progress"]) == 0
    assert float((load_file(str(tmp_path / "pf" / "latents.safetensors"))["latents"] - ref).abs().max()) > 0.05


# ----------------------------------------------------------------------------- SCOPE through the runner


def test_scope_runner_modes_intervals_compare(ckpt, tmp_path, capsys):
    """`scopevid generate --compare` on the checkpoint: the run log shows all three modes and compute
    intervals shorter than the window; the summary has speedups and PSNR/SSIM against Original."""
    import pyarrow.parquet as pq

    from scopevid import cli

    raw = {
        "model": {"kind": "skyreels_v2", "path": str(ckpt), "height": H, "width": W, "max_sequence_length": TEXT_LEN,
                  "addnoise_condition": 20},
        "prompt": PROMPT, "negative_prompt": NEGATIVE, "guidance": 5.0, "frames": 29, "fps": 16, "seed": 0, "solver": "unipc",
        "schedule": {"kind": "diffusion_forcing", "steps": 10, "base_num_frames": 13, "overlap_history": 5, "ar_step": 2,
                     "causal_block_size": 2, "selective": "paper"},
        "policy": "scope-test",
        "policies": {"scope-test": {"kind": "scope", "tau_c": 0.05, "tau_p": 0.5, "decay": 0.75, "horizon": 5, "warmup": 2,
                                    "predictor": "taylor2"}},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    assert cli.main(["generate", "--config", str(tmp_path / "run.yaml"), "--compare", "--out", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().err == ""  # diffusers' and transformers' loading bars stay off stderr
    s = json.loads((out / "summary.json").read_text())
    rows = pq.read_table(out / "steps.parquet").to_pylist()
    assert {r["mode"] for r in rows} == {"cache", "predict", "recompute"}, s["counts"]
    assert any(r["compute_hi"] - r["compute_lo"] < r["valid_hi"] - r["valid_lo"] for r in rows)
    assert s["mean_compute_interval"] < s["mean_valid_interval"]
    assert s["frames"] == 29 and (out / "video.mp4").stat().st_size > 0 and (out / "original.mp4").stat().st_size > 0
    assert s["speedup_flops"] > 1.5 and s["speedup_forwards"] > 1.5 and s["speedup_wall"] > 0
    assert s["psnr"] > 20 and 0.5 < s["ssim"] <= 1.0
    assert s["model"] == "skyreels_v2" and s["original"]["counts"]["recompute"] == len(rows)
    # a checkpoint that is not there: one line naming it, exit status 2, no traceback
    raw["model"]["path"] = str(tmp_path / "missing-ckpt")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert cli.main(["generate", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "o2"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "missing-ckpt" in err and "not found" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- checkpoint errors


def _copy(ckpt, tmp_path) -> Path:
    return Path(shutil.copytree(ckpt, tmp_path / "copy"))


def _error(path) -> str:
    from scopevid.adapters.skyreels_v2 import check_checkpoint

    with pytest.raises(CheckpointError) as e:
        check_checkpoint(Path(path))
    return str(e.value)


def test_missing_or_partial_checkpoint(ckpt, tmp_path):
    assert "not found" in _error(tmp_path / "nowhere")
    d = _copy(ckpt, tmp_path)
    shutil.rmtree(d / "vae")
    shutil.rmtree(d / "tokenizer")
    msg = _error(d)
    assert "missing component folder(s) vae/, tokenizer/ (" in msg
    d2 = Path(shutil.copytree(ckpt, tmp_path / "copy2"))
    (d2 / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    assert "diffusion_pytorch_model.safetensors" in _error(d2) and "transformer" in _error(d2)
    d3 = Path(shutil.copytree(ckpt, tmp_path / "copy3"))
    (d3 / "text_encoder" / "config.json").unlink()
    assert "text_encoder/config.json" in _error(d3)
    with pytest.raises(ConfigError, match="model.path"):
        make_adapter(ckpt, path=None)
    with pytest.raises(ConfigError, match="model.colour"):
        make_adapter(ckpt, colour=1)


def test_corrupt_checkpoint(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(ckpt, tmp_path)
    w = d / "transformer" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])  # truncated download
    assert "corrupt or truncated" in _error(d) and str(w) in _error(d)
    w.write_bytes((ckpt / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes())
    v = d / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(v))
    name = sorted(state)[3]
    del state[name]
    save_file(state, str(v))
    assert name in _error(d)
    v.write_bytes((ckpt / "vae" / "diffusion_pytorch_model.safetensors").read_bytes())
    (d / "scheduler" / "scheduler_config.json").write_text("{not json")
    assert "scheduler_config.json" in _error(d) and "JSON" in _error(d)


# ----------------------------------------------------------------------------- dtypes and the preset


def test_bf16_load_and_velocity(ckpt):
    ad = make_adapter(ckpt, causal_attention=2)
    from scopevid.adapters.skyreels_v2 import SkyReelsV2Adapter
    from scopevid.adapters.skyreels_v2.loader import load_checkpoint

    bf = SkyReelsV2Adapter(load_checkpoint(ckpt, dtype=torch.bfloat16), height=H, width=W, max_sequence_length=TEXT_LEN,
                           causal_attention=2)
    assert bf.dtype == torch.bfloat16 and bf.vae.dtype == torch.float32
    sig = prepare(ad, 4).sigmas
    prepare(bf, 4)
    x = torch.randn(4, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    s = torch.tensor([sig[0], sig[1], sig[2], 1.0])
    spec = ForwardSpec(frames=[3, 4, 5, 6], origin=3, causal=False)
    v32 = ad.velocity(x, s, ad.encode_prompt(PROMPT, NEGATIVE, 5.0), spec)
    v16 = bf.velocity(x, s, bf.encode_prompt(PROMPT, NEGATIVE, 5.0), spec)
    assert v16.dtype == torch.float32 and torch.isfinite(v16).all()
    assert (v16 - v32).abs().max() < 0.1 * v32.abs().max()


def test_paper_preset_loads():
    from scopevid import config
    from scopevid.engine.runner import latent_count
    from scopevid.scheduler.schedules import DiffusionForcingPlan

    cfg = config.load(Path(__file__).resolve().parents[1] / "configs" / "skyreels_v2_df_1.3b_540p.yaml")
    s = cfg.schedule
    assert (cfg.frames, s.base_num_frames, s.steps, s.overlap_history, s.ar_step, s.causal_block_size) == (257, 97, 50, 17, 5, 5)
    assert (cfg.guidance, cfg.model["shift"], cfg.model["addnoise_condition"], s.selective, cfg.solver) == (6.0, 8.0, 20, "paper", "unipc")
    fast, slow = cfg.policy_spec("scope-fast"), cfg.policy_spec("scope-slow")
    assert (fast["tau_c"], fast["tau_p"], fast["decay"], fast["horizon"], fast["predictor"]) == (0.18, 0.42, 0.75, 5, "taylor2")
    assert (slow["tau_c"], slow["tau_p"]) == (0.12, 0.30)
    plan = DiffusionForcingPlan(latent_frames=latent_count(257, 4), window=latent_count(97, 4), num_steps=50, ar_step=5, block=5,
                                overlap=latent_count(17, 4), selective="paper")
    assert [(w.start, w.length, w.prefix) for w in plan.windows()] == [(0, 25, 0), (20, 25, 5), (40, 25, 5)]


# ----------------------------------------------------------------------------- baselines' hooks


def _hooked(ad, cond, x, s, spec, hooks):
    return ad.velocity(x, s, cond, spec, **({} if hooks is None else {"hooks": hooks}))


def test_forward_hooks_are_exact(ckpt):
    """The hook points change nothing when they only record, and each reuse rule reproduces the
    forward from what it recorded at the same input (cross-attention included for TaylorSeer)."""
    from scopevid.adapters.base import ForwardHooks
    from scopevid.engine import reuse

    ad = make_adapter(ckpt, causal_attention=2)
    cond = ad.encode_prompt(PROMPT, NEGATIVE, 5.0)
    x = torch.randn(4, 16, 4, 4, generator=torch.Generator().manual_seed(3))
    sig = prepare(ad, 6).sigmas
    s = torch.tensor([sig[1], sig[2], sig[3], sig[4]], dtype=torch.float32)
    spec = ForwardSpec(frames=[5, 6, 7, 8], origin=5, causal=False)
    plain = _hooked(ad, cond, x, s, spec, None)
    assert torch.equal(_hooked(ad, cond, x, s, spec, ForwardHooks()), plain)
    store: dict = {}
    assert torch.equal(_hooked(ad, cond, x, s, spec, reuse.ResidualHooks(store, reuse=False)), plain)
    assert set(store) == {(b, f) for b in ("cond", "uncond") for f in (5, 6, 7, 8)}
    torch.testing.assert_close(_hooked(ad, cond, x, s, spec, reuse.ResidualHooks(store, reuse=True)), plain, rtol=1e-5, atol=1e-5)
    for level in ("modules", "stack"):
        store = {}
        rec = reuse.TaylorHooks(store, 4, order=1, forecast=False, level=level)
        assert torch.equal(_hooked(ad, cond, x, s, spec, rec), plain)
        if level == "modules":
            assert set(store[("cond", 5)]["factors"]) == {(layer, m) for layer in range(2) for m in ("attn", "cross", "mlp")}
        fc = _hooked(ad, cond, x, s, spec, reuse.TaylorHooks(store, 4, order=1, forecast=True, level=level))
        torch.testing.assert_close(fc, plain, rtol=1e-5, atol=1e-5)
    for which in ("front", "rear"):
        store = {}
        _hooked(ad, cond, x, s, spec, reuse.DeltaHooks(store, 0.5, None))
        skip = reuse.DeltaHooks(store, 0.5, which)
        torch.testing.assert_close(_hooked(ad, cond, x, s, spec, skip), plain, rtol=1e-5, atol=1e-5)
        assert skip.blocks_run == 1 and ad.flops(4, 0, blocks=1) < ad.flops(4, 0)
    for kind, shape in (("temb", (4, ad.net.dim)), ("temb_mod", (4, 6, ad.net.dim))):
        assert ad.named_feature(kind, x, s, cond, spec).shape == shape
    with pytest.raises(ConfigError, match="embed"):
        ad.named_feature("embed", x, s, cond, spec)


@pytest.mark.parametrize("spec", [
    {"kind": "teacache", "thresh": 0.5, "ret_steps": 2, "feature": "temb_mod", "coefficients": [1.0, 0.0]},
    {"kind": "taylorseer", "interval": 2, "order": 1, "first_enhance": 1},
    {"kind": "deltadit", "interval": 2, "fraction": 0.5, "boundary": 0.5, "warmup": 1},
])
def test_baselines_run_on_skyreels(ckpt, tmp_path, spec):
    """TeaCache, TaylorSeer and Delta-DiT in the same harness as SCOPE on a SkyReels-V2 checkpoint:
    fewer FLOPs than Original, every iteration accounted for, and the video stays close."""
    from scopevid import adapters, config
    from scopevid.engine.runner import run_once

    raw = {
        "model": {"kind": "skyreels_v2", "path": str(ckpt), "height": H, "width": W, "max_sequence_length": TEXT_LEN},
        "prompt": PROMPT, "negative_prompt": NEGATIVE, "guidance": 5.0, "frames": 21, "seed": 0, "solver": "unipc",
        "schedule": {"kind": "diffusion_forcing", "steps": 8, "base_num_frames": 13, "overlap_history": 5, "ar_step": 1,
                     "causal_block_size": 2, "selective": "paper"},
        "policy": "b", "policies": {"b": spec},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    cfg = config.load(tmp_path / "run.yaml")
    ad = adapters.load(cfg.model)
    pixels: dict[str, list] = {"original": [], "b": []}
    runs = {}
    for name, out in pixels.items():
        class Sink:
            def write(self, px, out=out):
                out.append(px.clone())

        runs[name] = run_once(cfg, ad, name, frames_to=Sink()).summary
    ref, res = runs["original"], runs["b"]
    assert res["flops"] < ref["flops"]
    assert sum(res["counts"].values()) == ref["iterations"]
    assert res["counts"]["recompute"] < ref["iterations"]
    a, b = torch.cat(pixels["original"]), torch.cat(pixels["b"])
    assert a.shape == b.shape and a.shape[0] == 21
    assert 0 < (a - b).abs().mean() < 0.25  # reuse changed the video, and did not wreck it


def test_shipped_baseline_presets_fit_the_adapter(ckpt):
    """Every baseline preset of configs/policies/skyreels_v2.yaml finds its hooks and signal on the
    adapter. FlowCache needs block-causal attention (causal_attention N > 1: its per-chunk K/V
    buffers); with the official bidirectional default it stops with a line naming what it lacks."""
    from scopevid.engine import reuse
    from scopevid.scheduler.policies import build

    bidirectional, block_causal = make_adapter(ckpt), make_adapter(ckpt, causal_attention=2)
    presets = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "policies" / "skyreels_v2.yaml").read_text())
    for name, spec in presets.items():
        if spec["kind"] in ("original", "scope"):
            continue
        assert reuse.for_policy(build(spec, name), block_causal, PLAN_DF) is not None
        if spec["kind"] == "flowcache":
            with pytest.raises(ConfigError, match="serves no K/V context"):
                reuse.for_policy(build(spec, name), bidirectional, PLAN_DF)
        else:
            assert reuse.for_policy(build(spec, name), bidirectional, PLAN_DF) is not None


# ----------------------------------------------------------------------------- sequence parallelism


def _two_rank_suite(topo, cases):
    """Runs on every rank of a 2-rank gloo group (Ulysses attention through DeepSpeed)."""
    from scopevid.cluster.worker import collect_rollout

    return [collect_rollout(topo, path, policy, check_decisions=True) for path, policy in cases]


@pytest.mark.integration
def test_two_ranks_match_one_rank(ckpt, tmp_path):
    """Frames sharded over 2 processes, self-attention through Ulysses all-to-all: the same latents
    and the same decisions as one process (2 heads, 1 per rank; padding with 5 frames on 2 ranks)."""
    from scopevid.cluster.launch import spawn
    from scopevid.cluster.worker import collect_rollout
    from scopevid.engine.topology import LocalTopology

    root = Path(__file__).resolve().parents[1]
    raw = {
        "model": {"kind": "skyreels_v2", "path": str(ckpt), "height": H, "width": W, "max_sequence_length": TEXT_LEN,
                  "addnoise_condition": 20, "causal_attention": 2},
        "prompt": PROMPT, "guidance": 5.0, "frames": 29, "seed": 0, "solver": "unipc",
        "schedule": {"kind": "diffusion_forcing", "steps": 6, "base_num_frames": 13, "overlap_history": 5, "ar_step": 1,
                     "causal_block_size": 2, "selective": "paper"},
        "policy": "scope-test",
        "policies": {"scope-test": {"kind": "scope", "tau_c": 0.05, "tau_p": 0.5, "decay": 0.75, "horizon": 5, "warmup": 2}},
    }
    path = tmp_path / "sp.yaml"
    path.write_text(yaml.safe_dump(raw))
    cases = [(str(path), "scope-test")]
    one = [collect_rollout(LocalTopology(), p, pol) for p, pol in cases]
    two = spawn("test_skyreels_v2:_two_rank_suite", 2, args=(cases,), timeout_s=240, threads=1, dist_timeout_s=60,
                env={"PYTHONPATH": f"{root}:{root / 'tests'}"})
    for rank in two:
        for a, b in zip(one, rank):
            assert a["digest"] == b["digest"] and a["frames"] == b["frames"]
            torch.testing.assert_close(b["latents"], a["latents"], rtol=1e-4, atol=1e-4)
    assert set(one[0]["modes"]) >= {"cache", "recompute"}


def test_model_spec_is_typed_and_strict_before_any_file_is_read(tmp_path):
    from scopevid.adapters import check_spec
    from scopevid.adapters.skyreels_v2 import SkyReelsV2Adapter

    base = {"kind": "skyreels_v2", "path": str(tmp_path / "nowhere")}
    for over, msg in [({"heigth": 544}, r"^model.heigth: unknown field for skyreels_v2; allowed: kind, path, height"),
                      ({"height": 540}, r"^model.height: Input should be a multiple of 16 \(got 540\)"),
                      ({"shift": "8"}, r"^model.shift: Input should be a valid number \(got '8'\)"),
                      ({"addnoise_rng": "local"}, r"^model.addnoise_rng: Input should be 'frame' or 'global'"),
                      ({"vae_dtype": "fp16"}, r"^model.vae_dtype: Input should be 'float32', 'bfloat16' or 'float16'"),
                      ({"path": None}, r"^model.path: Input should be a valid string")]:
        with pytest.raises(ConfigError, match=msg):
            check_spec({**base, **over})
        with pytest.raises(ConfigError, match=msg):
            SkyReelsV2Adapter.from_config({**base, **over})  # the load refuses it before looking for the directory
    with pytest.raises(ConfigError, match=r"^model.path: required: the SkyReels-V2 checkpoint directory"):
        SkyReelsV2Adapter.from_config({"kind": "skyreels_v2"})
    check_spec(base)  # valid: the missing directory is the load's business


# ----------------------------------------------------------------------------- hostile checkpoints
def _run_yaml(tmp_path, path: Path, name: str = "run.yaml", **top) -> Path:
    raw = {"model": {"kind": "skyreels_v2", "path": str(path), "height": H, "width": W, "max_sequence_length": TEXT_LEN},
           "prompt": PROMPT, "negative_prompt": NEGATIVE, "guidance": 5.0, "frames": 29, "fps": 16, "seed": 0, "solver": "unipc",
           "schedule": {"kind": "diffusion_forcing", "steps": 6, "base_num_frames": 13, "overlap_history": 5, "ar_step": 2,
                        "causal_block_size": 2, "selective": "off"},
           "policy": "original", "policy_presets": str(ROOT / "configs" / "policies" / "skyreels_v2.yaml"), **top}
    (tmp_path / name).write_text(yaml.safe_dump(raw))
    return tmp_path / name


def _flip_bytes(ckpt, tmp_path, count: int = 4000, seed: int = 1) -> Path:
    """A copy of the checkpoint with `count` bytes of the DiT's tensor data inverted. The red team's
    draw (seed 1) leaves every value finite but some absurd: velocities near 1e9, latents near 1e8."""
    import random
    import struct

    d = Path(shutil.copytree(ckpt, tmp_path / "flipped"))
    w = d / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(w.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]  # past the JSON header
    for i in random.Random(seed).sample(range(start, len(data)), count):
        data[i] ^= 0xFF
    w.write_bytes(bytes(data))
    return d


def test_flipped_weight_bytes_stop_the_run_in_one_line(ckpt, tmp_path):
    """4,000 flipped bytes used to run to exit 0 with latents around 1e5: the velocity bound ends the
    run at the first forward, exit 1, one line, no summary."""
    import subprocess
    import sys

    cfg = _run_yaml(tmp_path, _flip_bytes(ckpt, tmp_path))
    p = subprocess.run([sys.executable, "-m", "scopevid", "generate", "--config", str(cfg), "--out", str(tmp_path / "o"),
                        "--no-progress"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, p.stderr[-2000:]
    assert lines[0].startswith("scopevid generate: error: the model returned a velocity of ") and \
        "over the bound 5000 (stability.max_velocity x guidance" in lines[0], lines[0]
    assert not (tmp_path / "o" / "summary.json").exists()


def test_the_fixture_stays_far_below_the_velocity_bound(ckpt, tmp_path):
    """The healthy fixture (random weights, guidance 5; peak |v| ~2.6) passes a bound 50x tighter
    than the default: the default cannot trip on it."""
    from scopevid.config import load
    from scopevid.engine.runner import generate

    cfg = load(_run_yaml(tmp_path, ckpt, stability={"max_velocity": 20.0}))
    assert generate(cfg, tmp_path / "o", progress=False)["frames"] == 29


def test_flow_shift_must_be_positive(ckpt, tmp_path):
    """A scheduler config with flow_shift -1 used to end in a traceback from the solver's table; it is
    refused naming the file (or, for a direct override, model.shift)."""
    from scopevid.adapters.skyreels_v2 import SkyReelsV2Adapter

    d = _copy(ckpt, tmp_path)
    f = d / "scheduler" / "scheduler_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "flow_shift": -1.0}))
    with pytest.raises(CheckpointError, match=rf"^{f}: flow_shift: must be a number > 0 and at most 1000 .*got -1.0$"):
        make_adapter(d)
    ad = make_adapter(d, shift=8.0)  # a valid override wins over the file
    assert ad.shift == 8.0
    with pytest.raises(ConfigError, match=r"^model.shift: must be a number > 0 and at most 1000 .*got 0.0$"):
        SkyReelsV2Adapter(ad.parts, height=H, width=W, shift=0.0)
    with pytest.raises(ConfigError, match=r"^model.shift: Input should be greater than 0 \(got -1.0\)$"):
        make_adapter(ckpt, shift=-1.0)
