"""Shared fixtures: small, fast configs of the tiny model (random weights, so tests never depend on
the shipped checkpoint's quality) and a single-thread torch for reproducible CPU timings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]

torch.set_num_threads(int(os.environ.get("SCOPEVID_TEST_THREADS", "1")))

TINY_ARCH = {
    "size": 16,
    "patch": 4,
    "dim": 32,
    "depth": 2,
    "heads": 2,
    "vocab": ["<null>", "red", "green", "blue", "square", "moving", "left", "right"],
}


def write_tiny_config(tmp: Path, **over) -> Path:
    """A tiny-model YAML in tmp; `over` updates top-level keys, `schedule` is merged."""
    sched = {
        "kind": "diffusion_forcing",
        "steps": 8,
        "base_num_frames": 8,
        "overlap_history": 2,
        "ar_step": 2,
        "causal_block_size": 1,
        "selective": "causal",
    }
    sched.update(over.pop("schedule", {}))
    cfg = {
        "model": {"kind": "tiny", "weights": "random", "init_seed": 0, "shift": 3.0, "arch": TINY_ARCH},
        "prompt": "red square moving right",
        "guidance": 2.0,
        "frames": 20,
        "fps": 8,
        "seed": 0,
        "schedule": sched,
        "policy": "original",
        "policy_presets": str(ROOT / "configs" / "policies" / "tiny.yaml"),
    }
    cfg.update(over)
    path = tmp / "tiny_test.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def tiny_config(tmp_path):
    return lambda **over: write_tiny_config(tmp_path, **over)
