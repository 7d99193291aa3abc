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


def one_and_two_ranks(suite: str, cases: list, timeout_s: float = 240) -> tuple[list, list]:
    """Every (config path, policy) case on one process, and on a 2-rank gloo group (one start-up) that
    runs `suite` ("module:function", called on every rank with (topology, cases))."""
    from scopevid.cluster.launch import spawn
    from scopevid.cluster.worker import collect_rollout
    from scopevid.engine.topology import LocalTopology

    one = [collect_rollout(LocalTopology(), p, policy, check_decisions=True) for p, policy in cases]
    two = spawn(suite, 2, args=(cases,), timeout_s=timeout_s, threads=1, dist_timeout_s=60,
                env={"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"})
    return one, two


def assert_two_ranks_match_one(ref: dict, r0: dict, r1: dict, tol: float = 1e-4) -> None:
    """Both ranks hold the same latents, within `tol` of one rank's, after identical decisions."""
    assert r0["frames"] == r1["frames"] == ref["frames"] == list(range(ref["latent_frames"]))
    assert torch.equal(r0["latents"], r1["latents"])  # velocities are gathered, the solver step replicated
    diff = float((r0["latents"] - ref["latents"]).abs().max())
    assert diff <= tol, f"2-rank video differs from 1-rank by {diff}"
    assert r0["records"] == r1["records"]  # also checked in-run at every iteration
    assert r0["modes"] == ref["modes"] and r0["digest"] == ref["digest"]
