"""`scopevid batch --config C --prompts FILE --out DIR`: many videos, the model loaded once.

DIR/NNNNN-<name>/ per video (what `generate` writes), DIR/manifest.parquet (prompt, seed, out,
status, seconds, frames/s, error per video), DIR/batch.json, config.yaml and prompts.jsonl (the
batch's own record): `scopevid batch --resume --out DIR` continues a stopped batch as it started.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="model preset YAML, e.g. configs/tiny.yaml (with --resume: the batch's own)")
    p.add_argument("--prompts",
                   help="one prompt a line (.txt), or .jsonl / .parquet rows with prompt and optional seed, frames, policy, "
                        "name (with --resume: the batch's own)")
    p.add_argument("--out", required=True, help="batch directory (must be new or empty)")
    p.add_argument("--frames", type=int, help="default pixel frames of a video")
    p.add_argument("--policy", help="default policy preset")
    p.add_argument("--seed", type=int, help="default seed")
    p.add_argument("--steps", type=int, help="denoising steps")
    p.add_argument("--selective", choices=("off", "paper", "causal"), help="selective computation mode")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    p.add_argument("--resume", action="store_true", help="finish the batch in --out: run what is not done")


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from scopevid.cluster.groups import DistEnv
    from scopevid.commands.generate import load_with_overrides
    from scopevid.errors import ConfigError
    from scopevid.jobs import requests
    from scopevid.jobs.local import BatchRecord, resumed, run_batch
    from scopevid.jobs.manifest import Status

    env = DistEnv.from_env()
    if env is not None and env.world > 1:  # torchrun -m scopevid batch: every rank would make every video
        raise ConfigError(f"batch: `scopevid batch` runs on one process (this is rank {env.rank} of {env.world}); for "
                          "many ranks run python -m scopevid.cluster.driver --batch FILE --world-size W --parallel dp=D")
    overrides = any(getattr(args, k) is not None for k in ("frames", "policy", "seed", "steps", "selective"))
    if args.resume:
        if args.config is None and overrides:
            raise ConfigError("resume: a batch resumes with its own config and options; omit --frames/--policy/--seed/"
                              "--steps/--selective (or give --config to check them against the batch)")
        cfg = load_with_overrides(args) if args.config else None
        reqs = requests.read(args.prompts) if args.prompts else None
        record = resumed(Path(args.out), cfg, reqs)
    else:
        missing = [f"--{k}" for k in ("config", "prompts") if getattr(args, k) is None]
        if missing:
            raise ConfigError(f"batch: {' and '.join(missing)} required for a new batch (only --resume reuses the batch's own)")
        record = BatchRecord(load_with_overrides(args), requests.read(args.prompts))
    manifest = run_batch(record, args.out, resume=args.resume, overwrite=args.overwrite,
                         say=lambda m: print(f"[scopevid batch] {m}", flush=True))
    c = manifest.counts()
    failed = c.get(Status.FAILED.value, 0)
    print(f"[scopevid batch] {c.get(Status.OK.value, 0)} of {len(manifest.entries)} videos done, {failed} failed; "
          f"manifest: {manifest.path}", flush=True)
    if failed:
        print(f"scopevid batch: error: {failed} video(s) failed (see the error column of {manifest.path}); "
              "retry them with --resume (a bad row fails again: fix the prompt file and start a new batch)", file=sys.stderr)
        return 1
    return 0
