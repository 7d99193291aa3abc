"""Detector scores of what `scopevid generate` really produces on the bundled model.

`evaluate` scores the training-time samplers (joint clips, chunk-causal rollouts). Users run the
engine instead: the asynchronous diffusion-forcing schedule of configs/tiny.yaml under Original or a
SCOPE preset. Scoring those frames per 16-frame window shows whether the video stays recognizable
and whether SCOPE's speedup costs recognizability, not only PSNR against Original.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from scopevid import adapters
from scopevid import config as config_lib
from scopevid.adapters.tiny.adapter import weights_path
from scopevid.engine.runner import DTYPES, reference_config, run_once
from scopevid.engine.sinks import FrameStore
from scopevid.train import detector as D
from scopevid.train import world as W

PROMPTS = ("red square moving right", "green square moving up", "blue square moving left", "yellow square moving down")


def read_frames(store: FrameStore) -> torch.Tensor:
    """FrameStore pixels [F, H, W, 3] in [0, 1] -> the detector's [F, 3, H, W] in [-1, 1]."""
    x = torch.cat(list(store.read()))
    return x.permute(0, 3, 1, 2) * 2 - 1


def engine_scores(config: str, policies: list[str], frames: int, prompts=PROMPTS, seed: int = 0, window: int = 16) -> dict:
    """{policy: {prompt: scores}}: per-window object/motion/ok means over `frames` engine frames, the
    strict clip score of the first window (prompt direction), and the run's FLOPs and wall time."""
    cfg = config_lib.load(config)
    if cfg.model.get("weights", "bundled") == "random":
        raise ValueError("engine_scores: the detector needs trained weights with their world (model.weights: random)")
    wcfg = W.WorldConfig.from_dict(json.loads(weights_path(cfg.model).with_suffix(".json").read_text())["world"])
    adapter = adapters.load(cfg.model, cfg.device, DTYPES[cfg.dtype])
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for policy in policies:
            out[policy] = {}
            for i, prompt in enumerate(prompts):
                run_cfg = replace(cfg, prompt=prompt, frames=frames, seed=seed)
                if policy == "original":  # the official pipeline: the whole valid interval every iteration
                    run_cfg = reference_config(run_cfg)
                store = FrameStore(Path(tmp) / f"{policy}_{i}")
                res = run_once(run_cfg, adapter, policy, frames_to=store, keep_records=False)
                x = read_frames(store)
                ws = D.window_scores(x, prompt, window, wcfg)
                first = D.score_clip(x[:window], prompt, wcfg)
                out[policy][prompt] = {
                    "windows": len(ws),
                    "object": float(np.mean([w["object"] for w in ws])),
                    "motion": float(np.mean([w["motion"] for w in ws])),
                    "ok": float(np.mean([w["ok"] for w in ws])),
                    "ok_last4": float(np.mean([w["ok"] for w in ws[-4:]])),
                    "first_window": first,
                    "flops": res.summary.get("flops"),
                    "wall_seconds": res.summary.get("wall_seconds"),
                }
    return out
