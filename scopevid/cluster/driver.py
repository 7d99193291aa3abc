"""The Ray job entrypoint: one generation job over N ranks, resumable.

    ray job submit --working-dir . -- python -m scopevid.cluster.driver \\
        --config configs/tiny.yaml --frames 737 --world-size 2 --out /shared/runs/long
    python -m scopevid.cluster.driver --resume /shared/runs/long        # after a kill

What happens:
This module is the command line; the job itself is cluster.video_job (one video), cluster.batch (a
batch on rank groups), with cluster.rank_actor (one rank) and cluster.rayjob (the Ray plumbing both share).

1. The driver resolves the config (YAML + overrides, validated), prepares the output directory and
   writes DIR/config.yaml (the resolved config, what --resume reloads) and DIR/job.json (status,
   ranks, timings; kept up to date).
2. It connects to Ray (RAY_ADDRESS / --address; without either it starts a local instance), reserves
   a placement group with one bundle per rank ({"CPU": c} or {"CPU": c, "GPU": 1} when the cluster has
   a GPU per rank) and starts one actor per rank in its bundle.
3. Rank 0 publishes its node address and a free port; every actor joins the torch.distributed group
   there (cluster.worker.start: gloo on CPU, nccl on GPU, with a collective timeout) and runs the same
   rollout under the MeshTopology (engine.runner.generate). Rank 0 streams the outputs: video.mp4,
   frames/ and latents/ Parquet shards, steps.parquet (run log), summary.json.
4. Every rank checkpoints its rollout state at window boundaries (engine.checkpoint); rank 0 reports
   progress to a zero-CPU board actor, the driver prints frames done, iteration rate and ETA.
5. When an actor dies, the driver names the rank (and its pid and node) in one error, stops the other
   ranks after a short grace (the writer closes its files), and keeps everything finished on disk;
   `--resume DIR` continues from the last checkpoint and the finished video equals an uninterrupted run.

The output directory must be visible from every node (a shared filesystem), as checkpoints are
written by every rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from scopevid.cluster.jobspec import JobSpec, with_overrides
from scopevid.cluster.rayjob import clip, connect, report, say
from scopevid.errors import ConfigError, DistributedError, ScopevidError, Stopped




# options a batch records and a resumed batch reuses unless given again (JobSpec field: its flag)
BATCH_OPTIONS = {"world_size": "--world-size", "cpus_per_rank": "--cpus-per-rank", "placement": "--placement",
                 "device": "--device", "dist_timeout_s": "--dist-timeout"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="model preset YAML, e.g. configs/tiny.yaml (not needed with --resume)")
    p.add_argument("--out", help="output directory (new or empty; on a filesystem every node sees)")
    p.add_argument("--resume", metavar="DIR", help="continue the stopped or killed job (one video or a batch) in DIR, "
                                                   "with its own config and options")
    p.add_argument("--batch", metavar="FILE", help="many videos: a prompt file (text, .jsonl, .parquet) as in `scopevid batch`, "
                                                   "on --parallel dp=D rank groups")
    p.add_argument("--frames", type=int, help="pixel frames to generate")
    p.add_argument("--world-size", type=int, help="ranks (one Ray actor each); default 1")
    p.add_argument("--policy", help="policy preset name, e.g. original, scope-fast")
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int, help="denoising steps")
    p.add_argument("--prompt")
    p.add_argument("--parallel", help="the mesh over --world-size ranks, e.g. cfg=2,ulysses=2 (default: ulysses over all)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"),
                   help="auto (default): one GPU per rank when the cluster has them, else CPU")
    p.add_argument("--cpus-per-rank", type=float,
                   help="CPUs in each rank's bundle (default 1; 0.5 puts two ranks on a CPU); torch threads: at least 1")
    p.add_argument("--placement", choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"), help="default PACK")
    p.add_argument("--placement-timeout", type=float, default=120.0,
                   help="seconds to wait for the bundles while other work holds them (0: no limit, and no check that "
                        "the cluster can ever hold the job, e.g. for an autoscaler)")
    p.add_argument("--dist-timeout", type=float, help="collective timeout in seconds (default 300)")
    p.add_argument("--checkpoint-every", type=int, default=1,
                   help="checkpoint at every N-th window boundary (0: never)")
    p.add_argument("--checkpoint-seconds", type=float, default=0.0,
                   help="and at most once per this many seconds (0: no limit)")
    p.add_argument("--progress-every", type=float, default=2.0, help="seconds between progress lines")
    p.add_argument("--stop-grace", type=float, default=2.5,
                   help="on SIGTERM / Ctrl-C, seconds the ranks get to stop and close their outputs (`ray job stop` "
                        "kills the driver after 3 s; launch.sh gives 0.5)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a private local Ray)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    if not args.out and not args.resume:
        raise ConfigError("out: give --out DIR (or --resume DIR to continue a job)")
    if args.resume and args.out and Path(args.out).resolve() != Path(args.resume).resolve():
        raise ConfigError("out: a job resumes in place; --out must be omitted or equal --resume")
    if not args.resume and not args.config:
        raise ConfigError("config: --config is required for a new job")
    for name, floor in (("world_size", 1), ("frames", 1), ("checkpoint_every", 0)):
        v = getattr(args, name)
        if v is not None and v < floor:
            raise ConfigError(f"{name.replace('_', '-')}: must be >= {floor}, got {v}")
    if args.cpus_per_rank is not None and not args.cpus_per_rank > 0:
        raise ConfigError(f"cpus-per-rank: must be > 0 (0.5 puts two ranks on one CPU), got {args.cpus_per_rank}")
    given = {k: getattr(args, k) for k in ("world_size", "cpus_per_rank", "placement", "device", "dist_timeout")
             if getattr(args, k) is not None}
    defaults = JobSpec(out=Path("."))
    return JobSpec(
        out=Path(args.resume or args.out).resolve(), config=args.config, frames=args.frames, world_size=args.world_size,
        policy=args.policy, seed=args.seed, steps=args.steps, prompt=args.prompt, parallel=args.parallel,
        resume=bool(args.resume), overwrite=args.overwrite, device=args.device or defaults.device,
        cpus_per_rank=args.cpus_per_rank or defaults.cpus_per_rank, placement=args.placement or defaults.placement,
        placement_timeout_s=args.placement_timeout, dist_timeout_s=args.dist_timeout or defaults.dist_timeout_s,
        checkpoint_every=args.checkpoint_every, checkpoint_seconds=args.checkpoint_seconds,
        progress_every_s=args.progress_every, address=args.address, quiet=args.quiet,
        stop_grace_s=max(0.1, args.stop_grace),
        extra={"given": {("dist_timeout_s" if k == "dist_timeout" else k) for k in given}},
    )


def run_batch_job(spec: JobSpec, prompts: str | None) -> int:
    """`--batch FILE` (or `--resume DIR` of a batch): the videos on rank groups (cluster.batch); exit code."""
    from dataclasses import replace

    from scopevid import adapters
    from scopevid import config as config_lib
    from scopevid.cluster import batch
    from scopevid.jobs import local, requests
    from scopevid.jobs.manifest import Status

    if spec.resume:
        cfg = with_overrides(spec, config_lib.load(spec.config)) if spec.config else None
        if cfg is None and any(v is not None for v in (spec.frames, spec.policy, spec.seed, spec.steps, spec.prompt)):
            raise ConfigError("resume: a batch resumes with its own config and options; omit --frames/--policy/--seed/"
                              "--steps/--prompt (or give --config to check them against the batch)")
        record = local.resumed(spec.out, cfg, requests.read(prompts) if prompts else None)
        recorded = {k: v for k, v in record.options.items() if k in BATCH_OPTIONS and k not in spec.extra.get("given", ())}
        spec = replace(spec, **recorded)
        if spec.parallel:  # a new mesh for the rest of the batch (a video does not depend on it)
            record.cfg = with_overrides(replace(spec, frames=None, policy=None, seed=None, steps=None, prompt=None), record.cfg)
    else:
        if not prompts:
            raise ConfigError("batch: --batch FILE is required for a new batch")
        record = local.BatchRecord(with_overrides(spec, config_lib.load(spec.config)), requests.read(prompts))
    world = spec.world_size or record.cfg.parallel.dp
    spec = replace(spec, world_size=world)
    record.options = {k: getattr(spec, k) for k in BATCH_OPTIONS}
    cfg, reqs = record.cfg, record.requests
    adapters.preflight(cfg.with_overrides(prompt=cfg.prompt or reqs[0].prompt), world, batch=True)  # before Ray starts
    try:
        started = connect(spec.address, cpus=world * spec.cpus_per_rank, say=lambda m: say(spec, m))
    except Exception as e:
        raise DistributedError(f"ray: cannot connect to {spec.address or os.environ.get('RAY_ADDRESS') or 'a local instance'}: "
                               f"{clip(str(e))}") from None
    try:
        manifest = batch.run(spec, record, spec.out, world)
    finally:
        if started:
            import ray

            ray.shutdown()
    c = manifest.counts()
    failed = c.get(Status.FAILED.value, 0)
    say(spec, f"{c.get(Status.OK.value, 0)} of {len(manifest.entries)} videos done, {failed} failed; manifest: {manifest.path}")
    if failed:
        print(f"scopevid driver: error: {failed} video(s) failed (see the error column of {manifest.path}); "
              "retry them with --resume", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    from scopevid.cli import OneLineParser
    from scopevid.jobs.local import BATCH_FILE

    p = OneLineParser(prog="python -m scopevid.cluster.driver", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        from scopevid.extras import require

        require("ray", "ray", "python -m scopevid.cluster.driver (jobs on a Ray cluster)")
        spec = spec_from_args(args)
        if args.batch or (spec.resume and (spec.out / BATCH_FILE).is_file()):
            return run_batch_job(spec, args.batch)
        from scopevid.cluster.video_job import run_job

        job = run_job(spec)
    except Stopped as e:  # a user's stop is not an error: what was kept, and how to go on
        report(e)
        return e.exit_code
    except ScopevidError as e:
        print(f"scopevid driver: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    print(json.dumps({k: job.get(k) for k in ("status", "frames", "world_size", "wall_seconds", "job_seconds", "frames_per_second",
                                              "per_rank", "resumed_from")}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # leave without Ray's exit hooks: after scancel the cluster is going down with us and its
    # disconnect would block for tens of seconds (what was to be written is written)
    os._exit(code)
