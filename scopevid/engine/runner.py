"""One generation job end to end: config -> adapter, plan, policy -> rollout -> streamed outputs.

Used by `scopevid generate`, torchrun workers and the Ray driver alike; only the process that
`writes` produces files (rank 0), every process runs the same rollout.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scopevid import adapters, interrupts
from scopevid.config import RunConfig
from scopevid.engine.outputs import OutputPipeline, open_watch, summarize
from scopevid.engine.rollout import Rollout, StepRecord, video_facts
from scopevid.engine.sinks import FrameStore, RunLock, prepare_out_dir, write_json
from scopevid.engine.solvers import SOLVERS
from scopevid.engine.topology import LocalTopology, Topology
from scopevid.errors import ConfigError, OutputWriteError
from scopevid.scheduler import policies as policy_lib
from scopevid.scheduler.predictors import Stability
from scopevid.scheduler.schedules import ChunkCausalPlan, DiffusionForcingPlan

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def latent_count(pixel_frames: int, tc: int) -> int:
    return (pixel_frames - 1) // tc + 1


def build_plan(cfg: RunConfig, adapter):
    s, tc = cfg.schedule, adapter.temporal_compression
    latents = latent_count(cfg.frames, tc)
    if s.kind == "diffusion_forcing":
        return DiffusionForcingPlan(
            latent_frames=latents,
            window=latent_count(s.base_num_frames, tc),
            num_steps=s.steps,
            ar_step=s.ar_step,
            block=s.causal_block_size,
            overlap=latent_count(s.overlap_history, tc) if s.overlap_history > 0 else 0,
            selective=s.selective,
            interval=s.interval,
        )
    return ChunkCausalPlan(
        latent_frames=latents,
        chunk=s.chunk_width,
        window_chunks=s.window_size,
        num_steps=s.steps,
        context_chunks=s.context_chunks,
    )


def build_solver(cfg: RunConfig, adapter, schedule):
    """The solver a config names, on the model's noise levels for this video (`adapter.prepare`)."""
    if cfg.solver == "euler":
        return SOLVERS["euler"]()
    if cfg.solver == "unipc":  # per-frame UniPC on the adapter's own sigma table (SkyReels-V2's solver)
        from scopevid.engine.unipc import UniPC

        return UniPC.for_adapter(adapter, schedule)
    raise ConfigError(f"solver: {cfg.solver!r} is not available for model {adapter.name}; allowed: euler, unipc")


def make_rollout(cfg: RunConfig, adapter, plan, policy, cond, *, predictor: str = "taylor2", device: str | None = None,
                 dtype: torch.dtype | None = None, **kw) -> Rollout:
    """The Rollout a config describes: the model prepared for this video, its solver on the model's
    noise levels, the config's stability check, device and dtype (`device`, `dtype`: instead of the
    config's, e.g. the dry run's meta device). `kw` goes to Rollout."""
    from scopevid.adapters import attention

    attention.check(cfg.attention, device or cfg.device, dtype or DTYPES[cfg.dtype])
    schedule = adapter.prepare(video_facts(plan))
    if cfg.noise == "diffusers" and "noise" not in kw:
        from scopevid.engine.rollout import DiffusersNoise

        kw["noise"] = DiffusersNoise(cfg.seed, plan.overlap)  # validated: a diffusion forcing plan
    return Rollout(adapter, plan, policy, cond, seed=cfg.seed, solver=build_solver(cfg, adapter, schedule), schedule=schedule,
                   predictor=predictor, stability=Stability(**cfg.stability), device=device or cfg.device,
                   dtype=dtype or DTYPES[cfg.dtype], batched_branches=cfg.parallel.cfg_mode == "batched",
                   kernel=cfg.attention, **kw)


@dataclass
class RunResult:
    summary: dict
    records: list[StepRecord] = field(default_factory=list)  # only with keep_records


def run_once(
    cfg: RunConfig,
    adapter,
    policy_name: str,
    *,
    video: Path | None = None,
    frames_to: FrameStore | None = None,
    reference: FrameStore | None = None,
    steps_log: Path | None = None,
    topology: Topology | None = None,
    progress: bool = False,
    check_decisions: bool = False,
    keep_records: bool = False,
    checkpoint=None,
    latents_to: Path | None = None,
    observers: list | tuple = (),
) -> RunResult:
    """One rollout under one policy. Writes what it is given paths for, as frames finish.

    checkpoint: an engine.checkpoint.Checkpointer makes the rollout resumable (state saved at window
    boundaries, frame / latent shards; when resuming, restores rollout, decoder, video and run log).
    latents_to: every clean latent, exact (float32, or the run's dtype when wider), as one
    safetensors tensor "latents" [frames, C, h, w], written atomically at the end (rank 0)."""
    topo = topology or LocalTopology()
    writes = topo.rank == 0
    plan = build_plan(cfg, adapter)
    spec = cfg.policy_spec(policy_name)
    cond = adapter.encode_prompt(cfg.prompt, cfg.negative_prompt, cfg.guidance)
    if checkpoint is not None:  # a refused resume must leave the killed run's files as they were
        checkpoint.verify(topo.world, topo.rank, writes)
    watch = open_watch(steps_log, writes, progress, plan.num_iterations(), policy_name, keep_records)
    rollout = make_rollout(cfg, adapter, plan, policy_lib.build(spec, policy_name), cond,
                           predictor=spec.get("predictor", "taylor2"), topology=topo, observers=[watch, *observers],
                           check_decisions=check_decisions)
    outputs = OutputPipeline(adapter.stream_decoder(), frames=cfg.frames, fps=cfg.fps, writes=writes, video=video,
                             frames_to=frames_to, reference=reference, latents_to=latents_to, checkpoint=checkpoint)
    wall_before = outputs.attach(rollout)
    closing = [outputs.sink, watch.log, watch.bar, checkpoint]  # MP4 trailer, last log part, progress, shards
    t0 = time.perf_counter()
    try:
        for idx, latent in rollout.run():
            outputs.latent(idx, latent)
        outputs.finish()
    except OutputWriteError as e:
        _close(closing, quiet=True)  # the first error is the one to report ...
        raise OutputWriteError(str(e) + outputs.salvage()) from None  # ... and whether any of the video plays
    except BaseException:
        _close(closing, quiet=True)  # the first error is the one to report
        raise
    _close(closing)
    outputs.write_latents()
    summary = summarize(policy_name, spec, rollout, watch.totals, outputs, time.perf_counter() - t0 + wall_before)
    return RunResult(summary, watch.records or [])


def reference_config(cfg: RunConfig) -> RunConfig:
    """Original as the paper measures it: policy original, selective computation off."""
    from dataclasses import replace

    return replace(cfg, policy="original", schedule=replace(cfg.schedule, selective="off"))


def generate(
    cfg: RunConfig,
    out: str | Path,
    *,
    compare: bool = False,
    overwrite: bool = False,
    topology: Topology | None = None,
    progress: bool = True,
    check_decisions: bool = False,
    checkpoint=None,
    adapter=None,
    observers: list | tuple = (),
) -> dict:
    """`scopevid generate`: DIR/video.mp4, DIR/steps.parquet, DIR/summary.json (+ --compare).

    adapter: one already loaded from `cfg.model` (a batch loads the model once for all its videos);
    None loads it here. observers: more RolloutObservers of the run (a rank's progress log)."""
    if checkpoint is not None and compare:
        raise ConfigError("compare: a resumable (checkpointed) run cannot also run the Original reference")
    topo = topology or LocalTopology()
    from scopevid.adapters import attention

    attention.check(cfg.attention, cfg.device, DTYPES[cfg.dtype])  # a backend that cannot run here: before anything
    adapters.preflight(cfg, topo.world)  # the model section, the prompt and the mesh: before any weights load or output
    if topo.rank != 0:  # only rank 0 writes
        return _generate(cfg, Path(out), compare, topo, progress, check_decisions, checkpoint, adapter, observers)
    out = prepare_out_dir(out, overwrite)  # refuse before touching anything
    with RunLock(out):
        prepare_out_dir(out, overwrite)  # again under the lock: a run that finished meanwhile left results
        if checkpoint is not None:  # what a resume must find unchanged: the config, and the weights it reads
            from scopevid.adapters.fingerprint import fingerprint

            checkpoint.bind_settings({**{k: v for k, v in cfg.to_dict().items() if k != "source"},
                                      "weights": fingerprint(cfg.model)})
        return _generate(cfg, out, compare, topo, progress, check_decisions, checkpoint, adapter, observers)


def _generate(cfg: RunConfig, out: Path, compare: bool, topo: Topology, progress: bool, check_decisions: bool,
              checkpoint, adapter=None, observers=()) -> dict:
    writes = topo.rank == 0
    if adapter is None:
        with interrupts.interruptible():  # loading writes nothing: a signal may end it at once
            adapter = adapters.load(cfg.model, cfg.device, DTYPES[cfg.dtype], weights=topo.weights)
    summary = {"config": cfg.to_dict(), "model": adapter.name, "world_size": topo.world, "weights": topo.weights.stats.to_dict()}
    reference = None
    if compare:
        # the reference is the official pipeline: every iteration forwards the whole valid interval
        ref_cfg = reference_config(cfg)
        reference = FrameStore(out / "original_frames") if writes else None
        ref = run_once(ref_cfg, adapter, "original", video=out / "original.mp4", frames_to=reference,
                       steps_log=out / "original_steps.parquet", topology=topo, progress=progress,
                       latents_to=out / "original_latents.safetensors")
        summary["original"] = ref.summary
    res = run_once(cfg, adapter, cfg.policy, video=out / "video.mp4", reference=reference,
                   steps_log=out / "steps.parquet", topology=topo, progress=progress, check_decisions=check_decisions,
                   checkpoint=checkpoint, latents_to=out / "latents.safetensors", observers=observers)
    summary.update(res.summary)
    if "original" in summary:
        o = summary["original"]
        summary["speedup_wall"] = o["wall_seconds"] / max(res.summary["wall_seconds"], 1e-9)
        summary["speedup_flops"] = o["flops"] / max(res.summary["flops"], 1e-9)
        summary["speedup_forwards"] = o["full_forwards"] / max(res.summary["full_forwards"], 1e-9)
    if writes:
        write_json(out / "summary.json", summary)
        if reference is not None:  # the lossless reference frames were only for the comparison
            shutil.rmtree(reference.path, ignore_errors=True)
        if checkpoint is not None:  # last: until summary.json exists, a stopped run can still resume
            checkpoint.discard()
    return summary


def _close(outputs: list, quiet: bool = False) -> None:
    """Close every output (MP4 trailer, last log part, checkpoint) in order. `quiet` (a run already
    failing): each is still tried, and an error closing one (the same full disk) is dropped so that it
    cannot replace the error that ended the run."""
    for o in outputs:
        if o is None:
            continue
        if not quiet:
            o.close()
            continue
        try:
            o.close()
        except Exception:
            pass

