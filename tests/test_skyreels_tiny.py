"""The shipped trained tiny SkyReels-V2 checkpoint (scopevid/weights/skyreels_v2_tiny, trained by
scopevid/train/skyreels.py): it loads through the SkyReels-V2 adapter, its config runs one short
`scopevid generate`, and its weights are trained (flow-matching loss on a world clip far below what
random weights of the same shape give)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

CKPT = ROOT / "scopevid" / "weights" / "skyreels_v2_tiny"
CONFIG = ROOT / "configs" / "skyreels_v2_tiny.yaml"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _flow_loss(transformer, x0: torch.Tensor, ctx: torch.Tensor, sigma: float, seed: int = 0) -> float:
    """MSE of the velocity against eps - x0 at one shared level (the training target)."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(x0.shape, generator=g)
    xs = (1 - sigma) * x0 + sigma * eps
    t = torch.full((1, x0.shape[2]), sigma * 1000)
    with torch.no_grad():
        v = transformer(xs, t, ctx, enable_diffusion_forcing=True, fps=[1], return_dict=False)[0]
    return float(((v - (eps - x0)) ** 2).mean())


def test_shipped_checkpoint_is_trained():
    from diffusers import SkyReelsV2Transformer3DModel

    from scopevid.adapters.skyreels_v2.adapter import SkyReelsV2Adapter
    from scopevid.train import skyreels as S
    from scopevid.train import world as W

    ad = SkyReelsV2Adapter.from_config({"kind": "skyreels_v2", "path": str(CKPT), "height": 64, "width": 64,
                                        "max_sequence_length": 16})
    assert ad.tokens_per_frame == 16 and ad.block_causal == 0  # 8x8 latents, patch 2; bidirectional window
    parts = ad.parts
    clip = W.sample_clip(np.random.default_rng(5), 57, S.WORLD)
    with torch.no_grad():
        z = S.encode_clips(parts.vae, clip.frames[None])  # [1, 16, 15, 8, 8] raw
    mean = torch.tensor(parts.vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(parts.vae.config.latents_std).view(1, 16, 1, 1, 1)
    x0 = (z - mean) / std
    assert 0.3 < float(x0.std()) < 3  # the config's latent statistics normalise the encoder's output
    ctx = ad.encode_prompt(clip.prompt).cond.embeds
    trained = _flow_loss(parts.transformer, x0, ctx, 0.5)
    torch.manual_seed(0)
    rand = SkyReelsV2Transformer3DModel.from_config(parts.transformer.config).eval()
    random_loss = _flow_loss(rand, x0, ctx, 0.5)
    assert trained < 0.5 * random_loss, (trained, random_loss)


def test_shipped_config_generates(tmp_path, monkeypatch):
    """configs/skyreels_v2_tiny.yaml as shipped (path relative to the repository root), shortened to one
    window and 4 steps."""
    from scopevid import cli

    monkeypatch.chdir(ROOT)
    raw = yaml.safe_load(CONFIG.read_text())
    assert raw["model"]["path"] == "scopevid/weights/skyreels_v2_tiny"
    raw.update(frames=57, policy="scope-fast")
    raw["schedule"]["steps"] = 4
    raw["policy_presets"] = str(CONFIG.parent / raw["policy_presets"])
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    assert cli.main(["generate", "--config", str(tmp_path / "run.yaml"), "--out", str(out), "--no-progress"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["frames"] == 57 and (out / "video.mp4").stat().st_size > 0
