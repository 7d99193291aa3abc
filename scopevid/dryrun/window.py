"""One window of a run config, through the engine's real rollout, on the meta device.

The adapter is built at its configured size on meta (`adapters.load(spec, "meta")`), the prompt is
encoded by its real text encoder, and `runner.make_rollout` runs every iteration of the first
window (plan, admission, discrepancy, decision, forward with its shard layout, guidance, solver
step, history, K/V cache), then the first frames are decoded by the adapter's stream decoder. Under
`meta.MetaRun` nothing is allocated and every live byte is counted, phase by phase.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from scopevid.config import RunConfig
from scopevid.dryrun.meta import MetaRun
from scopevid.dryrun.rank import RankView
from scopevid.errors import CheckpointError
from scopevid.mesh import MeshLayout, implied_world


@dataclass
class WindowRun:
    iterations: int
    forwards: int  # forwards of the block stack this rank ran (both branches counted once)
    frames_done: int  # frames the window finished
    peak_frames: int  # the longest forward (padded, this rank's shard x sequence ranks)
    flops: float  # of this rank's video over the window, as the engine records them (both branches)
    text_peak_bytes: int  # activations of the prompt encoding
    rollout_peak_bytes: int  # live at the window's peak: latents, history, K/V, activations
    state_bytes: int  # still live after the window: what the rollout keeps (latents, history, K/V)
    kv_bytes: int  # of the state, the K/V cache
    decode_peak_bytes: int | None  # above the state, decoding the first frames (None: no decoder configured)
    scalar_reads: int  # value questions answered by a fixed choice
    seconds: float


def quick_steps(cfg: RunConfig) -> int:
    """The fewest denoising steps with the config's shapes: 2 for diffusion forcing, one per stage of a
    chunk-causal window (its steps split into window_size equal stages)."""
    return cfg.schedule.window_size if cfg.schedule.kind == "chunk_causal" else 2


def run_window(cfg: RunConfig, *, dtype: torch.dtype | None = None, mesh: MeshLayout | None = None,
               steps: int | None = None, policy: str = "original", decode: bool = True) -> tuple[object, WindowRun]:
    """(the meta adapter, what window 0 used on rank 0 of `mesh`). `steps`: fewer denoising steps
    than the config's (the same shapes in fewer iterations: quick checks)."""
    from scopevid import adapters
    from scopevid.engine import runner
    from scopevid.engine.rollout import Records
    from scopevid.scheduler import policies as policy_lib

    dtype = dtype or runner.DTYPES[cfg.dtype]
    if steps is not None:
        cfg = cfg.with_overrides(schedule=replace(cfg.schedule, steps=steps))
    mesh = mesh or MeshLayout.resolve(cfg.parallel, implied_world(cfg.parallel), batch=True)
    t0 = time.perf_counter()
    adapter = adapters.load(cfg.model, "meta", dtype)
    records = Records()
    with MetaRun() as m:
        plan = runner.build_plan(cfg, adapter)
        cond = adapter.encode_prompt(cfg.prompt, cfg.negative_prompt, cfg.guidance)
        text_peak = m.peak_bytes
        m.reset_peak()
        topo = RankView(mesh)
        ro = runner.make_rollout(cfg, adapter, plan, policy_lib.build(cfg.policy_spec(policy), policy), cond,
                                 predictor=cfg.policy_spec(policy).get("predictor", "taylor2"), device="meta", dtype=dtype,
                                 topology=topo, observers=[records])
        done = []
        for i, x in ro.run():
            done.append(x)
            if ro.state.window >= 1:
                break
        rollout_peak = m.peak_bytes
        state = m.live_bytes
        kv = ro.state.kv.nbytes() if ro.state.kv is not None else 0
        decode_peak: int | None = 0
        if decode and done and topo.rank == 0:
            try:
                dec = adapter.stream_decoder()
            except CheckpointError:  # no decoder configured (MAGI-1 without model.vae): not modelled, said so
                dec, decode_peak = None, None
            if dec is not None:
                m.reset_peak()
                for x in done:
                    dec.push(x)
                dec.flush()
                decode_peak = m.peak_bytes - state
        scalar_reads = m.scalar_reads
    forwards = sum(ro.runner.forwards.values())
    peak_frames = max((n for n, _, _ in ro.runner.forwards), default=0)
    return adapter, WindowRun(
        iterations=len(records.records), forwards=forwards, frames_done=len(done), peak_frames=peak_frames,
        flops=float(sum(r.flops for r in records.records)), text_peak_bytes=int(text_peak), rollout_peak_bytes=int(rollout_peak),
        state_bytes=int(state), kv_bytes=int(kv), decode_peak_bytes=None if decode_peak is None else int(max(decode_peak, 0)),
        scalar_reads=scalar_reads, seconds=time.perf_counter() - t0)
