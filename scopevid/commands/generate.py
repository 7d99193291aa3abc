"""`scopevid generate --config CONFIG [--frames N] [--policy NAME] [--seed S] [--compare] --out DIR`."""

from __future__ import annotations

import argparse
import json

from scopevid import config as config_lib


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="model preset YAML, e.g. configs/tiny.yaml")
    p.add_argument("--out", required=True, help="output directory (must be new or empty)")
    p.add_argument("--frames", type=int, help="pixel frames to generate")
    p.add_argument("--policy", help="policy preset name, e.g. original, scope-slow, scope-fast")
    p.add_argument("--seed", type=int)
    p.add_argument("--prompt")
    p.add_argument("--steps", type=int, help="denoising steps")
    p.add_argument("--selective", choices=config_lib.SELECTIVE, help="selective computation mode")
    p.add_argument("--parallel", help="the mesh of a multi-rank run, e.g. cfg=2,ulysses=2 (default: ulysses over every rank)")
    p.add_argument("--compare", action="store_true", help="also run Original and report speedup, PSNR, SSIM")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    p.add_argument("--checkpoint", action="store_true",
                   help="resumable: checkpoints at window boundaries, lossless frame and latent shards in --out")
    p.add_argument("--resume", action="store_true",
                   help="continue the --checkpoint run in --out after a kill (same config and overrides)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--check-decisions", action="store_true",
                   help="multi-rank debug: cross-check every iteration's decision across ranks, fail on divergence")


def main(args: argparse.Namespace) -> int:
    from scopevid.engine.runner import generate

    cfg = load_with_overrides(args)
    from scopevid.cluster.groups import DistEnv

    env = DistEnv.from_env()  # torchrun / srun: WORLD_SIZE > 1 runs sequence parallel, rank 0 writes
    checkpoint = None
    if args.checkpoint or args.resume:  # every rank checkpoints its own state; rank 0 the outputs
        from scopevid.engine.checkpoint import Checkpointer

        checkpoint = Checkpointer(args.out, resume=args.resume)
    if env is not None and env.world > 1:
        from scopevid.cluster.worker import run_from_env

        summary = run_from_env(cfg, args.out, compare=args.compare, overwrite=args.overwrite,
                               progress=not args.no_progress and env.rank == 0, check_decisions=args.check_decisions,
                               checkpoint=checkpoint)
        if env.rank != 0:
            return 0
    else:
        summary = generate(cfg, args.out, compare=args.compare, overwrite=args.overwrite or args.resume,
                           progress=not args.no_progress, check_decisions=args.check_decisions, checkpoint=checkpoint)
    print(json.dumps(brief(summary), indent=2))
    return 0


def load_with_overrides(args: argparse.Namespace) -> config_lib.RunConfig:
    from dataclasses import replace

    cfg = config_lib.load(args.config)
    sched = cfg.schedule
    if getattr(args, "steps", None) is not None:
        sched = replace(sched, steps=args.steps)
    if getattr(args, "selective", None) is not None:
        sched = replace(sched, selective=args.selective)
    from scopevid.mesh import parse

    parallel = parse(args.parallel) if getattr(args, "parallel", None) else None
    return cfg.with_overrides(frames=args.frames, policy=args.policy, seed=args.seed,
                              prompt=getattr(args, "prompt", None), schedule=sched, parallel=parallel)


def brief(s: dict) -> dict:
    keys = ["policy", "frames", "wall_seconds", "full_forwards", "counts", "mean_compute_interval",
            "mean_valid_interval", "speedup_wall", "speedup_flops", "psnr", "ssim"]
    return {k: s[k] for k in keys if k in s}
