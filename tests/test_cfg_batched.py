"""`parallel.cfg_mode: batched`: both guidance branches in one forward (the tiny model stacks them
along the frames; attention and the K/V cache stay per branch). The video equals the sequential one
within 1e-5 with identical decisions, on both schedules, under Original, SCOPE and a baseline
(whose in-forward hooks keep per-branch state, so it runs the branches one after the other)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from scopevid import adapters
from scopevid import config as config_lib
from scopevid.cluster.worker import collect_rollout
from scopevid.engine.topology import LocalTopology
from scopevid.errors import ConfigError

CHUNK = {"kind": "chunk_causal", "chunk_width": 2, "window_size": 4, "context_chunks": 2}


def _mode(cfg, mode: str):
    return cfg.with_overrides(parallel=replace(cfg.parallel, cfg_mode=mode))


@pytest.mark.parametrize("schedule", [{"selective": "causal"}, CHUNK], ids=["diffusion-forcing", "chunk-causal"])
@pytest.mark.parametrize("policy", ["original", "scope-fast", "teacache-slow"])
def test_batched_branches_equal_sequential(tiny_config, schedule, policy):
    cfg = config_lib.load(tiny_config(frames=20, guidance=2.5, schedule=schedule))
    if policy not in cfg.policies:
        pytest.skip(f"no {policy} preset")
    seq = collect_rollout(LocalTopology(), _mode(cfg, "sequential"), policy, check_decisions=True)
    bat = collect_rollout(LocalTopology(), _mode(cfg, "batched"), policy, check_decisions=True)
    assert bat["frames"] == seq["frames"]
    diff = float((bat["latents"] - seq["latents"]).abs().max())
    assert diff <= 1e-5, diff
    assert bat["modes"] == seq["modes"] and bat["digest"] == seq["digest"]
    assert bat["frame_forwards"] == seq["frame_forwards"]


def test_batched_forward_is_one_pass_of_both_branches(tiny_config):
    """Against the branches computed one by one: the same numbers from one call of the stack."""
    cfg = config_lib.load(tiny_config())
    ad = adapters.load(cfg.model)
    cond = ad.encode_prompt(cfg.prompt, None, 2.0)
    from scopevid.adapters.base import ForwardSpec

    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    s = torch.tensor([0.9, 0.6, 0.3])
    spec = ForwardSpec(frames=[4, 5, 6], origin=4)
    calls = []
    blocks = ad.model.blocks
    hook = blocks[0].register_forward_hook(lambda m, a, out: calls.append(a[0].shape[0]))
    try:
        with torch.no_grad():  # as the engine runs it
            v_c, v_u = ad.branches_velocity(x, s, cond, spec)
    finally:
        hook.remove()
    assert calls == [6]  # block 0 ran once, on both branches' 3 frames
    with torch.no_grad():
        ref_c = ad.branch_velocity(x, s, cond, "cond", spec)
        ref_u = ad.branch_velocity(x, s, cond, "uncond", spec)
    assert float((v_c - ref_c).abs().max()) <= 1e-6 and float((v_u - ref_u).abs().max()) <= 1e-6
    assert float((ref_c - ref_u).abs().max()) > 1e-4  # the branches really differ (far beyond the batching error)


def test_batched_mode_is_refused_where_the_model_cannot_batch():
    from scopevid.adapters.base import Adapter

    class NoBatch:
        name = "nobatch"

    with pytest.raises(ConfigError, match="cfg_mode: batched needs a model that batches"):
        Adapter.branches_velocity(NoBatch(), None, None, None, None, None)
    with pytest.raises(ConfigError, match="parallel.cfg_mode: must be one of sequential, batched"):
        config_lib.ParallelConfig(cfg_mode="parallel").check()
