"""`scopevid train`: train (or resume) the tiny DiT in a run directory, and export its EMA weights.

    scopevid train --out runs/tiny --steps 20000 --threads 2          # new run (or --resume)
    scopevid train --out runs/tiny2 --init-from scopevid/weights --seed 1 # warm start from exported weights
    scopevid train --out runs/tiny --export-only --weights-dir scopevid/weights --shift 1.0

Checkpoints (model + EMA + optimizer + step + RNG) go to RUN_DIR/ckpt.pt every --ckpt-minutes, the loss
to RUN_DIR/loss.parquet, and the EMA weights to RUN_DIR/export/tiny.{safetensors,json} at every
checkpoint (so a usable model exists at any time). SIGTERM/SIGINT save a checkpoint before exiting.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from scopevid.adapters.tiny.adapter import SHIFT_RANGE, load_tiny
from scopevid.adapters.tiny.model import TinyDiT, TinyDiTConfig
from scopevid.engine.files import atomic_save_safetensors
from scopevid.errors import CheckpointError, ConfigError
from scopevid.train import world as W
from scopevid.train.loop import Trainer, TrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run directory (checkpoint, loss log, exports)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/ckpt.pt")
    p.add_argument("--init-from", default=None, metavar="WEIGHTS_DIR",
                   help="new run whose model and EMA start from exported weights (their model and world config win)")
    p.add_argument("--steps", type=int, default=8000, help="train until this total step count")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--ckpt-minutes", type=float, default=3.0, help="checkpoint + export period")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=16, help="frames per training clip")
    p.add_argument("--batch", type=int, default=16, help="clips per step")
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--anneal-start", type=int, default=None, help="step where a linear lr anneal begins (may be set on --resume)")
    p.add_argument("--anneal-steps", type=int, default=None, help="length of the anneal, to 5%% of --lr (0: constant lr)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--size", type=int, default=16, help="frame side in pixels")
    p.add_argument("--patch", type=int, default=4, help="patch side; keep 3*patch^2 below --dim (docs/MODEL_CARD.md)")
    p.add_argument("--sprite", type=int, default=4, help="square side in pixels")
    p.add_argument("--shift", type=float, default=1.0, help="sigma shift to record for inference")
    p.add_argument("--export-only", action="store_true", help="only export the EMA weights of RUN_DIR")
    p.add_argument("--weights-dir", default=None, help="export target (default RUN_DIR/export)")


POSITIVE = ("steps", "threads", "batch", "dim", "depth", "heads", "size", "patch", "sprite")
SEED_LIMIT = 2**63  # numpy's generator takes no negative seed; torch's takes seed + 1 below 2^64


def check_args(args: argparse.Namespace) -> None:
    """Every numeric option in its range, and the model's shape rules, before any work: a negative
    --steps used to export untrained weights with exit 0, --dim 30 --heads 4 to fail deep in the
    first step. One ConfigError line names the option and what is allowed."""
    for name in POSITIVE:
        _need(args, name, getattr(args, name) >= 1, "must be a positive integer")
    _need(args, "frames", args.frames >= 2, "must be at least 2 (a clip may hold a clean prefix and a noisy rest)")
    for name in ("anneal_start", "anneal_steps"):
        _need(args, name, getattr(args, name) is None or getattr(args, name) >= 0, "must be an integer >= 0")
    _need(args, "seed", 0 <= args.seed < SEED_LIMIT, f"must be an integer from 0 to {SEED_LIMIT - 1}")
    for name in ("lr", "ckpt_minutes"):
        _need(args, name, 0 < getattr(args, name) < math.inf, "must be a finite number > 0")
    lo, hi = SHIFT_RANGE
    _need(args, "shift", lo <= args.shift <= hi, f"must be a number from {lo:g} to {hi:g}")
    fastest = max(W.WorldConfig().speeds)
    _need(args, "sprite", args.sprite <= args.size - fastest,
          f"must leave the square room to move: at most --size minus the fastest speed ({args.size} - {fastest})")
    problem = TinyDiTConfig(size=args.size, patch=args.patch, dim=args.dim, depth=args.depth, heads=args.heads).problem()
    if problem:
        raise ConfigError(f"--{problem[0]}: {problem[1]}")


def _need(args: argparse.Namespace, name: str, ok: bool, why: str) -> None:
    if not ok:
        raise ConfigError(f"--{name.replace('_', '-')}: {why}, got {getattr(args, name)!r}")


def export(trainer: Trainer, weights_dir: str, shift: float) -> str:
    """EMA weights -> weights_dir/tiny.safetensors (float32) + tiny.json (config, vocab, shift, world)."""
    os.makedirs(weights_dir, exist_ok=True)
    sd = {k: v.detach().float().contiguous().clone() for k, v in trainer.ema.state_dict().items()}
    path = os.path.join(weights_dir, "tiny.safetensors")
    atomic_save_safetensors(Path(path), sd, metadata={"format": "pt", "step": str(trainer.step)})
    os.chmod(path, 0o644)
    meta = {
        "model": trainer.mcfg.to_dict(),
        "shift": shift,
        "world": trainer.wcfg.to_dict(),
        "train": {
            **trainer.tcfg.to_dict(), "steps": trainer.step, "wall_seconds": round(trainer.wall, 1),
            "total_steps": trainer.step + trainer.tcfg.init.get("steps", 0),
            "total_wall_seconds": round(trainer.wall + trainer.tcfg.init.get("wall_seconds", 0.0), 1),
        },
        "weights": "EMA",
    }
    with open(os.path.join(weights_dir, "tiny.json"), "w") as fh:
        json.dump(meta, fh, indent=2)
    return path


def load_exported(weights_dir: str) -> tuple[TinyDiT, dict]:
    """Inverse of export: the model (eval mode) and the metadata dict."""
    with open(os.path.join(weights_dir, "tiny.json")) as fh:
        meta = json.load(fh)
    model = TinyDiT(TinyDiTConfig.from_dict(meta["model"]))
    model.load_state_dict(load_file(os.path.join(weights_dir, "tiny.safetensors")))
    return model.eval(), meta


def warm_start_source(weights_dir: str) -> tuple[TinyDiT, dict, dict]:
    """The exported model (shapes and dtypes checked), its metadata, and the record a warm-started
    run keeps of it: path, sha256 and the steps and seconds already spent on those weights."""
    path = Path(weights_dir) / "tiny.safetensors"
    model, meta = load_tiny(path)
    prior = meta.get("train", {})
    init = {
        "weights": str(path),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "steps": int(prior.get("total_steps", prior.get("steps", 0))),
        "wall_seconds": float(prior.get("total_wall_seconds", prior.get("wall_seconds", 0.0))),
    }
    return model, meta, init


def main(args: argparse.Namespace) -> int:
    check_args(args)
    torch.set_num_threads(args.threads)
    ckpt = os.path.join(args.out, "ckpt.pt")
    if args.init_from and (args.resume or args.export_only):
        print("scopevid train: --init-from starts a new run; it cannot be combined with --resume or --export-only", file=sys.stderr)
        return 2
    if args.resume or args.export_only:
        if not os.path.exists(ckpt):
            print(f"scopevid train: no checkpoint at {ckpt}", file=sys.stderr)
            return 2
        schedule = {k: v for k, v in (("anneal_start", args.anneal_start), ("anneal_steps", args.anneal_steps)) if v is not None}
        trainer = Trainer.resume(args.out, **({} if args.export_only else schedule))
    else:
        if os.path.exists(ckpt):
            print(f"scopevid train: {ckpt} exists; pass --resume to continue it", file=sys.stderr)
            return 2
        if args.init_from:
            try:
                start, meta, init = warm_start_source(args.init_from)
            except CheckpointError as e:
                print(f"scopevid train: --init-from: {e}", file=sys.stderr)
                return 2
            wcfg, mcfg = W.WorldConfig.from_dict(meta["world"]), TinyDiTConfig.from_dict(meta["model"])
        else:
            wcfg = W.WorldConfig(size=args.size, sprite=args.sprite)
            mcfg = TinyDiTConfig(size=args.size, patch=args.patch, dim=args.dim, depth=args.depth, heads=args.heads, vocab=W.vocabulary(wcfg))
        tcfg = TrainConfig(
            frames=args.frames, batch=args.batch, lr=args.lr, seed=args.seed, shift=args.shift,
            anneal_start=args.anneal_start or 0, anneal_steps=args.anneal_steps or 0,
        )
        trainer = Trainer(args.out, mcfg, tcfg, wcfg)
        if args.init_from:
            trainer.warm_start(start, init)
    weights_dir = args.weights_dir or os.path.join(args.out, "export")
    if args.export_only:
        print(export(trainer, weights_dir, args.shift))
        return 0

    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    last = time.monotonic()
    recent: list[float] = []
    print(f"scopevid train: {args.out} from step {trainer.step} to {args.steps}", flush=True)
    while trainer.step < args.steps and not stop["now"]:
        recent.append(trainer.train_step())
        if trainer.step % 50 == 0:
            print(f"step {trainer.step} loss {sum(recent) / len(recent):.4f} wall {trainer.wall:.0f}s", flush=True)
            recent = []
        if time.monotonic() - last > args.ckpt_minutes * 60:
            trainer.save()
            export(trainer, weights_dir, trainer.tcfg.shift)
            last = time.monotonic()
    trainer.save()
    export(trainer, weights_dir, trainer.tcfg.shift)
    print(f"scopevid train: saved step {trainer.step} ({trainer.wall:.0f}s of training)", flush=True)
    return 0
