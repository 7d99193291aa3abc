"""The tables of docs/PLAN.md: `scopevid plan` for every published configuration in
configs/bench/plan/ on 1, 2, 4 and 8 GPUs (the mesh docs/COMM_MODEL.md finds best for one video),
and FLOPs per video at 257 and 737 frames. Run from the repository root:
    .venv/bin/python scripts/plan_tables.py > out/plan_tables.md
The dry runs use 2 denoising steps (the same shapes as 50 or 64, far fewer iterations); FLOPs use
the configs' own steps."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scopevid import adapters, config as config_lib  # noqa: E402
from scopevid.config import ParallelConfig  # noqa: E402
from scopevid.dryrun.planner import plan, video_flops  # noqa: E402
from scopevid.dryrun.window import quick_steps  # noqa: E402
from scopevid.mesh import implied_world  # noqa: E402

MESHES = {True: [ParallelConfig(), ParallelConfig(cfg=2), ParallelConfig(cfg=2, ulysses=2), ParallelConfig(cfg=2, ulysses=4)],
          False: [ParallelConfig(), ParallelConfig(ulysses=2), ParallelConfig(ulysses=4), ParallelConfig(ulysses=8)]}
SHARES = yaml.safe_load((ROOT / "configs" / "bench" / "plan.yaml").read_text())


def main() -> None:
    print("| configuration | GPUs | mesh | DiT weights | text encoder | rollout peak | of it K/V | VAE decode | peak per rank "
          "| 24 GB | 48 GB | 80 GB | 141 GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    flops_rows = []
    for path in sorted((ROOT / "configs" / "bench" / "plan").glob("*.yaml")):
        cfg = config_lib.load(path).with_overrides(frames=257)
        guided = cfg.guidance > 1.0
        shares = SHARES["scope_flops_share"].get(cfg.model["kind"], {})
        for mesh in MESHES[guided]:
            t0 = time.perf_counter()
            p = plan(cfg, mesh=mesh, steps=quick_steps(cfg), shares=shares)
            d = p.to_dict()
            te = d["weights_gib"].get("text_encoder")
            dec = "n/a" if d["decode_gib"] is None else f"{d['decode_gib']:.1f} GiB"
            v = [d["verdicts"][f"{g} GB"].split(" (")[0].replace("does not fit", "no").replace("fits", "yes")
                 for g in (24, 48, 80, 141)]
            print(f"| {path.stem} | {implied_world(mesh)} | {d['mesh']} | {d['weights_gib']['dit']:.1f} GiB | "
                  f"{'-' if te is None else f'{te:.1f} GiB'} | {d['rollout_peak_gib']:.1f} GiB | {d['kv_cache_gib']:.2f} GiB | "
                  f"{dec} | {d['peak_gib']:.1f} GiB | " + " | ".join(v) + " |", flush=True)
            print(f"  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        ad = adapters.load(cfg.model, "meta", torch.bfloat16)
        for frames in (257, 737):
            f = video_flops(cfg.with_overrides(frames=frames), ad)
            flops_rows.append((path.stem, frames, f, {k: f * s for k, s in shares.items()}))
    print()
    print("| configuration | frames | Original PFLOPs | SCOPE-slow | SCOPE-fast |")
    print("|---|---|---|---|---|")
    for name, frames, f, sc in flops_rows:
        print(f"| {name} | {frames} | {f / 1e15:.1f} | {sc.get('scope-slow', 0) / 1e15:.1f} | {sc.get('scope-fast', 0) / 1e15:.1f} |")


if __name__ == "__main__":
    main()
