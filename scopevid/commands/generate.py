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
    p.add_argument("--compare", action="store_true", help="also run Original and report speedup, PSNR, SSIM")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    p.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    from scopevid.engine.runner import generate

    cfg = load_with_overrides(args)
    summary = generate(cfg, args.out, compare=args.compare, overwrite=args.overwrite, progress=not args.no_progress)
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
    return cfg.with_overrides(frames=args.frames, policy=args.policy, seed=args.seed,
                              prompt=getattr(args, "prompt", None), schedule=sched)


def brief(s: dict) -> dict:
    keys = ["policy", "frames", "wall_seconds", "full_forwards", "counts", "mean_compute_interval",
            "mean_valid_interval", "speedup_wall", "speedup_flops", "psnr", "ssim"]
    return {k: s[k] for k in keys if k in s}
