"""`scopevid batch --config C --prompts FILE --out DIR`: many videos, the model loaded once.

DIR/NNNNN-<name>/ per video (what `generate` writes), DIR/manifest.parquet (prompt, seed, out,
status, seconds, frames/s, error per video), DIR/batch.json (what --resume must match).
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="model preset YAML, e.g. configs/tiny.yaml")
    p.add_argument("--prompts", required=True,
                   help="one prompt a line (.txt), or .jsonl / .parquet rows with prompt and optional seed, frames, policy, name")
    p.add_argument("--out", required=True, help="batch directory (must be new or empty)")
    p.add_argument("--frames", type=int, help="default pixel frames of a video")
    p.add_argument("--policy", help="default policy preset")
    p.add_argument("--seed", type=int, help="default seed")
    p.add_argument("--steps", type=int, help="denoising steps")
    p.add_argument("--selective", choices=("off", "paper", "causal"), help="selective computation mode")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    p.add_argument("--resume", action="store_true", help="finish the batch in --out: run what is not done")


def main(args: argparse.Namespace) -> int:
    from scopevid.commands.generate import load_with_overrides
    from scopevid.jobs import requests
    from scopevid.jobs.local import run_batch
    from scopevid.jobs.manifest import Status

    cfg = load_with_overrides(args)
    reqs = requests.read(args.prompts)
    manifest = run_batch(cfg, reqs, args.out, resume=args.resume, overwrite=args.overwrite,
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
