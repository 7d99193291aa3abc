"""Fast tests of the training package: world, detector, loop, resume, export."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from scopevid.adapters.base import ForwardSpec
from scopevid.adapters.tiny.model import TinyDiT, TinyDiTConfig
from scopevid.errors import CheckpointError, ConfigError
from scopevid.train import command, detector, world
from scopevid.train.evaluate import sample_joint, sample_rollout, sigmas
from scopevid.train.loop import PackedAttention, Trainer, TrainConfig, packed_forward, prompt_vectors

WCFG = world.WorldConfig(size=16, sprite=4)
OPP = {"left": "right", "right": "left", "up": "down", "down": "up"}


def tiny_args(out, *extra):
    p = argparse.ArgumentParser()
    command.add_arguments(p)
    base = ["--out", str(out), "--dim", "32", "--depth", "1", "--heads", "2", "--frames", "4", "--batch", "2", "--size", "16", "--patch", "4", "--sprite", "4"]
    return p.parse_args(base + list(extra))


def test_world_is_deterministic_from_seed():
    a, b, c = world.clips(7, 4, 12, WCFG), world.clips(7, 4, 12, WCFG), world.clips(8, 4, 12, WCFG)
    for x, y in zip(a, b):
        assert torch.equal(x.frames, y.frames) and x.prompt == y.prompt
    assert any(not torch.equal(x.frames, z.frames) for x, z in zip(a, c))
    clip = a[0]
    assert clip.frames.shape == (12, 3, 16, 16) and clip.frames.min() >= -1 and clip.frames.max() <= 1
    colour, direction = world.parse_prompt(clip.prompt, WCFG)
    assert (colour, direction) == (clip.colour, clip.direction)
    dy, dx = world.DIRECTIONS[direction]
    (y0, x0), (y1, x1) = clip.positions[:2]
    assert (y1 - y0) * dy + (x1 - x0) * dx > 0  # the first step goes the named way
    assert world.tokenize(clip.prompt, world.vocabulary(WCFG)).gt(0).sum() == 4
    with pytest.raises(ValueError, match="purple"):
        world.tokenize("purple square", world.vocabulary(WCFG))


def test_detector_passes_real_clips_and_rejects_fakes():
    cs = world.clips(3, 24, 24, WCFG)
    real = detector.score_many([(c.frames, c.prompt) for c in cs], WCFG)
    assert real["ok"] == 1.0 and real["object"] == 1.0 and real["motion"] == 1.0
    wrong = detector.score_many([(c.frames, world.prompt_text(c.colour, OPP[c.direction])) for c in cs], WCFG)
    assert wrong["ok"] == 0.0 and wrong["start"] == 0.0
    frozen = detector.score_many([(c.frames[:1].repeat(24, 1, 1, 1), c.prompt) for c in cs], WCFG)
    assert frozen["ok"] == 0.0
    rng = np.random.default_rng(0)
    bg = torch.tensor(world.BACKGROUND) * 2 - 1
    speckled = []
    for c in cs:
        f = bg[None, :, None, None].expand_as(c.frames).clone()
        rgb = torch.tensor(world.COLOURS[c.colour]) * 2 - 1
        for i in range(f.shape[0]):
            m = torch.from_numpy(rng.random((16, 16)) < 0.08)  # about as many pixels as the sprite
            f[i][:, m] = rgb[:, None]
        speckled.append((f, c.prompt))
    sp = detector.score_many(speckled, WCFG)
    assert sp["ok"] == 0.0 and sp["object"] < 0.1
    noise = detector.score_many([(torch.rand_like(c.frames) * 2 - 1, c.prompt) for c in cs[:4]], WCFG)
    assert noise["ok"] == 0.0


def test_packed_forward_is_tinydit_forward_per_clip():
    torch.manual_seed(0)
    cfg = TinyDiTConfig(size=16, patch=4, dim=32, depth=2, heads=2, vocab=world.vocabulary(WCFG))
    m = TinyDiT(cfg)
    for p in m.parameters():  # leave adaLN-zero so that every path contributes
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 3, 3, 16, 16)
    sig = torch.rand(2, 3)
    tok = torch.stack([world.tokenize("red square moving left", cfg.vocab), torch.zeros(8, dtype=torch.long)])
    pv = prompt_vectors(m, tok)
    for b in range(2):
        assert torch.allclose(pv[b], m.prompt_vector(tok[b]), atol=1e-6)
    v = packed_forward(m, x, sig, pv, [5, 100], PackedAttention(2, 3))
    for b, off in enumerate([5, 100]):
        ref = m(x[b], sig[b], pv[b], ForwardSpec(frames=list(range(off, off + 3)), origin=0, causal=True))
        assert torch.allclose(v[b], ref, atol=1e-5)
    # block-causal: the first frame does not see the later ones
    x2 = x.clone()
    x2[:, 1:] += 1
    v2 = packed_forward(m, x2, sig, pv, [0, 0], PackedAttention(2, 3))
    v1 = packed_forward(m, x, sig, pv, [0, 0], PackedAttention(2, 3))
    assert torch.allclose(v1[:, 0], v2[:, 0], atol=1e-5) and not torch.allclose(v1[:, 1], v2[:, 1])


def test_train_step_resume_and_export(tmp_path):
    torch.set_num_threads(1)
    a = tiny_args(tmp_path / "a", "--steps", "3")
    assert command.main(a) == 0
    full = pq.read_table(tmp_path / "a" / "loss.parquet").to_pydict()
    assert full["step"] == [1, 2, 3] and all(math.isfinite(x) for x in full["loss"])
    # the same run in two legs: 2 steps, then --resume to 3
    assert command.main(tiny_args(tmp_path / "b", "--steps", "2")) == 0
    assert command.main(tiny_args(tmp_path / "b", "--steps", "2")) == 2  # refuses to overwrite
    t = Trainer.resume(str(tmp_path / "b"))
    assert t.step == 2
    assert command.main(tiny_args(tmp_path / "b", "--steps", "3", "--resume")) == 0
    legs = pq.read_table(tmp_path / "b" / "loss.parquet").to_pydict()
    assert legs["step"] == [1, 2, 3]
    assert np.allclose(legs["loss"], full["loss"], rtol=1e-5)
    # export round-trip
    ta = Trainer.resume(str(tmp_path / "a"))
    wd = tmp_path / "weights"
    command.export(ta, str(wd), shift=2.0)
    m, meta = command.load_exported(str(wd))
    assert meta["shift"] == 2.0 and meta["train"]["steps"] == 3
    assert meta["model"]["vocab"][0] == "<null>" and world.WorldConfig.from_dict(meta["world"]) == WCFG
    for k, v in ta.ema.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    assert (wd / "tiny.safetensors").stat().st_size < 20e6
    json.loads((wd / "tiny.json").read_text())
    # the sampler runs on the exported model
    x = sample_joint(m, "red square moving left", 3, steps=2)
    y = sample_rollout(m, "red square moving left", 6, chunk=2, window=4, steps=2)
    assert x.shape == (3, 3, 16, 16) and y.shape == (6, 3, 16, 16) and torch.isfinite(y).all()


BAD_OPTIONS = [
    (("--steps", "-5"), r"^--steps: must be a positive integer, got -5$"),
    (("--steps", "0"), r"^--steps: must be a positive integer"),
    (("--threads", "0"), r"^--threads: must be a positive integer"),
    (("--batch", "0"), r"^--batch: must be a positive integer"),
    (("--depth", "0"), r"^--depth: must be a positive integer"),
    (("--frames", "1"), r"^--frames: must be at least 2"),
    (("--lr", "nan"), r"^--lr: must be a finite number > 0, got nan$"),
    (("--lr=-1e-3",), r"^--lr: must be a finite number > 0"),
    (("--ckpt-minutes", "0"), r"^--ckpt-minutes: must be a finite number > 0"),
    (("--seed", "-1"), r"^--seed: must be an integer from 0 to 9223372036854775807, got -1$"),
    (("--anneal-start", "-1"), r"^--anneal-start: must be an integer >= 0"),
    (("--anneal-steps", "-2"), r"^--anneal-steps: must be an integer >= 0"),
    (("--shift", "0"), r"^--shift: must be a number from 0.001 to 1000"),
    (("--sprite", "15"), r"^--sprite: must leave the square room to move"),
    (("--size", "18"), r"^--patch: frame size 18 must be a multiple of patch 4$"),
    (("--dim", "30", "--heads", "4"), r"^--heads: dim 30 must divide by heads 4 "),
    (("--dim", "32", "--heads", "8"), r"^--heads: the head dim \(dim 32 / heads 8 = 4\) must be even and at least 6: the 3D RoPE"),
]


@pytest.mark.parametrize("extra, says", BAD_OPTIONS, ids=[" ".join(e) for e, _ in BAD_OPTIONS])
def test_bad_numeric_options_are_refused_before_any_work(tmp_path, extra, says):
    """Every numeric option is range-checked and the model's shape rules hold before a run starts (a
    negative --steps used to export untrained weights with exit 0): nothing is written."""
    with pytest.raises(ConfigError, match=says):
        command.main(tiny_args(tmp_path / "run", *extra))
    assert not (tmp_path / "run").exists()


def test_bad_option_through_the_cli_is_one_line_and_exit_2(tmp_path):
    p = subprocess.run([sys.executable, "-m", "scopevid", "train", "--out", str(tmp_path / "run"), "--steps", "-5"],
                       capture_output=True, text=True, timeout=120)
    assert (p.returncode, p.stderr) == (2, "scopevid train: error: --steps: must be a positive integer, got -5\n")


def test_resume_refuses_a_checkpoint_that_pickles_objects(tmp_path):
    """ckpt.pt is read as tensors and plain values only: a file that pickles an object is one short
    line saying what it is not (never torch's advice to load it with weights_only=False)."""
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": {}, "args": argparse.Namespace(lr=1.0)}, run / "ckpt.pt")
    with pytest.raises(CheckpointError) as e:
        command.main(tiny_args(run, "--resume"))
    msg = str(e.value)
    assert msg == f"{run / 'ckpt.pt'}: not a plain tensor checkpoint: it pickles an object of class argparse.Namespace " \
                  "(not unpickled, as that could run code)"
    torch.save({"model": {}}, run / "ckpt.pt")  # tensors and plain values, but not ours
    with pytest.raises(CheckpointError, match=r"ckpt.pt: not a checkpoint of `scopevid train` \('train_cfg'\)$"):
        command.main(tiny_args(run, "--resume"))


def test_warm_start_from_exported_weights(tmp_path, capsys):
    """A lost run directory is not lost training: --init-from starts a new run from exported weights
    (model and EMA), records their sha256 and prior steps, and the export counts the total."""
    torch.set_num_threads(1)
    assert command.main(tiny_args(tmp_path / "a", "--steps", "2")) == 0
    src = tmp_path / "a" / "export"
    prior = load_file(str(src / "tiny.safetensors"))
    b = tmp_path / "b"
    assert command.main(tiny_args(b, "--steps", "1", "--seed", "1", "--init-from", str(src))) == 0
    t = Trainer.resume(str(b))
    init = t.tcfg.init
    assert init["steps"] == 2 and init["sha256"] == hashlib.sha256((src / "tiny.safetensors").read_bytes()).hexdigest()
    meta = json.loads((b / "export" / "tiny.json").read_text())
    assert (meta["train"]["steps"], meta["train"]["total_steps"]) == (1, 3)
    # one step from the exported weights: the model moved away from them, but only by one small update
    moved = max((t.model.state_dict()[k] - v).abs().max().item() for k, v in prior.items())
    assert 0 < moved < 0.05
    m, _, _ = command.warm_start_source(str(src))
    fresh = Trainer(str(tmp_path / "c"), t.mcfg, TrainConfig(frames=4, batch=2, seed=5), t.wcfg)
    fresh.warm_start(m, init)
    for k, v in prior.items():
        assert torch.equal(fresh.model.state_dict()[k], v) and torch.equal(fresh.ema.state_dict()[k], v), k
    # bad combinations and bad weights are named, and nothing is started
    assert command.main(tiny_args(tmp_path / "d", "--resume", "--init-from", str(src))) == 2
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tiny.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "bad" / "tiny.json").write_text((src / "tiny.json").read_text())
    assert command.main(tiny_args(tmp_path / "e", "--init-from", str(tmp_path / "bad"))) == 2
    assert "cannot read safetensors" in capsys.readouterr().err and not (tmp_path / "e").exists()


def test_lr_anneal_set_on_resume(tmp_path):
    """The lr tail can be decided when the loss flattens: a resume may set it (and only it), the
    schedule is warm-up, constant, then linear to the floor, and the resumed run logs that lr."""
    torch.set_num_threads(1)
    assert command.main(tiny_args(tmp_path / "r", "--steps", "2", "--lr", "1e-3")) == 0
    t = Trainer.resume(str(tmp_path / "r"))
    assert (t.tcfg.anneal_steps, t.lr_at(5000)) == (0, 1e-3)
    assert command.main(tiny_args(tmp_path / "r", "--steps", "4", "--resume", "--anneal-start", "2", "--anneal-steps", "4")) == 0
    t = Trainer.resume(str(tmp_path / "r"))
    assert (t.tcfg.anneal_start, t.tcfg.anneal_steps) == (2, 4)  # kept in the checkpoint
    c = t.tcfg
    logged = pq.read_table(tmp_path / "r" / "loss.parquet").to_pydict()
    assert logged["step"] == [1, 2, 3, 4] and logged["lr"] == pytest.approx([t.lr_at(s) for s in range(4)])
    assert logged["lr"][3] < 1e-3 * 4 / c.warmup  # the anneal already pulls the lr below warm-up's
    assert t.lr_at(1) == pytest.approx(c.lr * 2 / c.warmup)  # still warming up
    assert t.lr_at(c.warmup + 10) == pytest.approx(c.lr * c.anneal_floor)  # past the tail: the floor
    t.tcfg.warmup = 1
    assert [t.lr_at(s) for s in (1, 2, 4, 6, 9)] == pytest.approx([1e-3, 1e-3, 1e-3 * (1 - 0.95 / 2), 5e-5, 5e-5])
    with pytest.raises(ValueError, match="only change the lr anneal"):
        Trainer.resume(str(tmp_path / "r"), lr=1.0)


def test_sigma_schedule():
    s = sigmas(4, 3.0)
    assert s[0] == 1.0 and s[-1] == 0.0 and torch.all(s[1:] < s[:-1])
    assert torch.allclose(sigmas(4, 1.0), torch.linspace(1, 0, 5))


def test_engine_output_of_the_bundled_model_is_scored(tmp_path):
    """The detector reads what `scopevid generate` writes: the shipped weights under the async
    diffusion-forcing schedule draw the prompt's square; a config without trained weights is refused."""
    from scopevid.train.engine_eval import engine_scores

    torch.set_num_threads(1)
    r = engine_scores("configs/tiny.yaml", ["original"], 17, prompts=("blue square moving left",))
    s = r["original"]["blue square moving left"]
    assert s["windows"] == 1 and s["object"] >= 0.8 and s["flops"] > 0
    cfg = tmp_path / "random.yaml"
    cfg.write_text("model: {kind: tiny, weights: random}\npolicy_presets: %s\n" % (Path("configs/policies/tiny.yaml").resolve()))
    with pytest.raises(ValueError, match="trained weights"):
        engine_scores(str(cfg), ["original"], 17)
