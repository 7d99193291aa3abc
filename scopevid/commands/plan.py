"""`scopevid plan --config C [--frames N] [--parallel cfg=2,ulysses=4] [--json]`: will it fit?

Builds the config's model at full size on torch's meta device (no weights read, nothing
allocated), runs its first window through the engine there (`scopevid.dryrun`), and prints per
rank: weights, text-encoder activations, the rollout's peak (activations, latents, history, K/V),
the K/V cache, VAE decode, the total; FLOPs per video under Original and the SCOPE presets at their
measured share (configs/bench/plan.yaml); bytes per iteration on every mesh axis; and a verdict for
24 / 48 / 80 / 141 GB GPUs. Model paths need only the checkpoint's configs (configs/arch/ has the
official layouts; a shipped model preset whose checkpoint is not downloaded is planned with the
official layout of its model there, and the first line says so). `--steps N` runs the dry run with fewer denoising steps (same shapes, faster);
FLOPs always use the config's steps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from scopevid.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SHARES = ROOT / "configs" / "bench" / "plan.yaml"
LAYOUTS = ROOT / "configs" / "arch" / "checkpoints.yaml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run config YAML (its model section may point at configs/arch/)")
    p.add_argument("--frames", type=int, help="pixel frames (default: the config's)")
    p.add_argument("--parallel", help="the mesh of one video's ranks, e.g. cfg=2,ulysses=4 (default: the config's)")
    p.add_argument("--steps", type=int, help="denoising steps of the dry run only (same shapes, fewer iterations)")
    p.add_argument("--text-on-device", choices=("auto", "yes", "no"), default="auto",
                   help="count the text encoder on the GPU (auto: unless model.text_encoder_device is cpu)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def main(args: argparse.Namespace) -> int:
    from scopevid import config as config_lib
    from scopevid.dryrun.planner import plan
    from scopevid.mesh import parse

    cfg = config_lib.load(args.config)
    cfg, note = official_layout(cfg)
    if args.frames is not None:
        if args.frames < 1:
            raise ConfigError(f"--frames: must be >= 1, got {args.frames}")
        cfg = cfg.with_overrides(frames=args.frames)
    mesh = parse(args.parallel) if args.parallel else None
    if mesh is not None and mesh.dp != 1:
        raise ConfigError("--parallel: dp groups each hold a whole copy; plan one group (cfg, ulysses, ring)")
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps: must be >= 1, got {args.steps}")
    shares = (yaml.safe_load(SHARES.read_text()) or {}).get("scope_flops_share", {}).get(cfg.model.get("kind"), {})
    text = None if args.text_on_device == "auto" else args.text_on_device == "yes"
    p = plan(cfg, config_name=args.config, mesh=mesh, steps=args.steps, shares=shares, text_on_device=text)
    d = p.to_dict()
    if args.json:
        if note:
            print(f"scopevid plan: {note}", file=sys.stderr, flush=True)
        print(json.dumps({**({"layout_note": note} if note else {}), **d}, indent=2))
        return 0
    gib = lambda v: f"{v:.2f} GiB"  # noqa: E731
    if note:
        print(note)
    print(f"{args.config}: {d['model']}, {d['frames']} frames, {d['dtype']}, mesh {d['mesh']} (per rank)")
    for k, v in d["weights_gib"].items():
        off = "" if d["text_on_device"] or k != "text_encoder" else " (off the GPU)"
        print(f"  weights {k:<13} {gib(v)}{off}")
    print(f"  text encoding    {gib(d['text_activations_gib'])}" + ("" if d["text_on_device"] else " (off the GPU)"))
    print(f"  rollout peak     {gib(d['rollout_peak_gib'])} (of it K/V cache {gib(d['kv_cache_gib'])})")
    print("  VAE decode       " + ("not counted (no model.vae configured)" if d["decode_gib"] is None else gib(d["decode_gib"])))
    print(f"  peak             {gib(d['peak_gib'])}")
    print(f"  FLOPs per video  Original {d['flops_original_pflops']:.2f} PFLOPs"
          + "".join(f", {k} {v:.2f}" for k, v in d["flops_scope_pflops"].items()))
    if d["comm_mib_per_iteration"]:
        print("  bytes/iteration  " + ", ".join(f"{k} {v:.0f} MiB" for k, v in d["comm_mib_per_iteration"].items()))
    print("  verdict          " + "; ".join(f"{k}: {v}" for k, v in d["verdicts"].items()))
    return 0


def official_layout(cfg):
    """(cfg, None), or, when the model's checkpoint directory is absent and configs/arch/checkpoints.yaml
    knows its released name, (cfg planned with that configuration-only layout, the line saying so)."""
    kind, path = cfg.model.get("kind"), cfg.model.get("path")
    if kind != "skyreels_v2" or not path or Path(path).expanduser().is_dir():
        return cfg, None
    known = (yaml.safe_load(LAYOUTS.read_text()) or {}).get(kind, {})
    name = known.get(Path(path).name)
    if name is None:
        return cfg, None  # the loader names the missing directory
    arch = ROOT / "configs" / "arch" / name
    note = (f"{path} is not a directory: planning with the official layout configs/arch/{name} "
            "(configuration only; a plan needs no weights)")
    return cfg.with_overrides(model={**cfg.model, "path": str(arch)}), note
