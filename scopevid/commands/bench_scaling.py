"""`scopevid bench scaling --world-sizes 1,2 --frames N --out DIR`: throughput scaling of whole jobs.

Every (policy, world size, repeat) is one complete driver job on Ray (cluster.driver.run_job: placement
group, one actor per rank, process group, rollout, MP4 + shards + run log, checkpoints), exactly what a
user submits, so the numbers include start-up and output costs. One Ray instance serves all runs
(`--address` or RAY_ADDRESS to use a cluster; otherwise a local one is started and stopped).

DIR/scaling.parquet, one row per job: world size, frames, policy, repeat, wall seconds (driver, end to
end), frames/s, speedup and parallel efficiency against world size 1 of the same policy (efficiency =
speedup / W, from the best repeat of W = 1), the same from the rollout time alone, peak resident
memory of every rank (list) and the largest, GPU peak when on GPUs, iterations, load average.
DIR/scaling.png: frames/s and parallel efficiency against world size, peak memory per rank.
Each job's outputs stay in DIR/runs/<policy>-w<W>-r<k>/ (video, run log, job.json).

On a shared CPU machine, W * --cpus-per-rank should not exceed the free cores, or efficiency
measures contention, not the engine (the 1-minute load average of each run is recorded).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from scopevid.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/tiny.yaml", help="model preset YAML (default configs/tiny.yaml)")
    p.add_argument("--out", required=True, help="output directory (must be new or empty)")
    p.add_argument("--world-sizes", default="1,2", help="comma-separated rank counts; 1 is added as the baseline")
    p.add_argument("--frames", type=int, help="pixel frames per job (default: the config's)")
    p.add_argument("--policies", help="comma-separated policy presets (default: the config's policy)")
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int, help="denoising steps (default: the config's)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--cpus-per-rank", type=float, default=1.0, help="CPUs per rank bundle (= torch threads)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--checkpoint-every", type=int, default=1, help="as the driver's (0: no checkpoints)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    p.add_argument("--no-plot", action="store_true")


def _ints(text: str, name: str) -> list[int]:
    try:
        vals = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"{name}: comma-separated integers expected, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise ConfigError(f"{name}: positive integers expected, got {text!r}")
    return vals


def main(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from scopevid import config as config_lib
    from scopevid.cluster import driver
    from scopevid.engine.sinks import prepare_out_dir, write_json

    worlds = sorted({1, *_ints(args.world_sizes, "--world-sizes")})
    if args.repeats < 1:
        raise ConfigError(f"--repeats: must be >= 1, got {args.repeats}")
    cfg = config_lib.load(args.config)
    policies = [p.strip() for p in (args.policies or cfg.policy).split(",") if p.strip()]
    for p in policies:
        cfg.policy_spec(p)  # unknown preset: a ConfigError naming it, before anything runs
    out = prepare_out_dir(args.out, args.overwrite)
    started = driver.connect(args.address, cpus=max(worlds) * args.cpus_per_rank)
    rows = []
    try:
        for policy in policies:
            for world in worlds:
                for rep in range(args.repeats):
                    run_dir = out / "runs" / f"{policy}-w{world}-r{rep}"
                    load = os.getloadavg()[0]
                    spec = driver.JobSpec(
                        out=run_dir.resolve(), config=args.config, frames=args.frames, world_size=world, policy=policy,
                        seed=args.seed, steps=args.steps, overwrite=True, device=args.device,
                        cpus_per_rank=args.cpus_per_rank, checkpoint_every=args.checkpoint_every, quiet=True,
                        address=args.address,
                    )
                    job = driver.run_job(spec)
                    per = job["per_rank"]
                    rss = [p["peak_rss_mb"] for p in per]
                    rows.append({
                        "world_size": world,
                        "frames": int(job["frames"]),
                        "policy": policy,
                        "repeat": rep,
                        "wall_seconds": float(job["wall_seconds"]),
                        "frames_per_second": job["frames"] / job["wall_seconds"],
                        "rollout_seconds": float(job["rollout_seconds"]),
                        "rollout_frames_per_second": job["frames"] / job["rollout_seconds"],
                        "peak_rss_mb_per_rank": rss,
                        "peak_rss_mb_max": max(rss),
                        "gpu_peak_mb_per_rank": [p.get("gpu_peak_mb") for p in per] if any("gpu_peak_mb" in p for p in per) else None,
                        "device": job.get("device"),
                        "cpus_per_rank": args.cpus_per_rank,
                        "iterations": job.get("iterations"),
                        "counts": json.dumps(job.get("counts")),
                        "load_avg_1min": load,
                        "host_cpus": os.cpu_count(),
                        "run_dir": str(run_dir),
                    })
                    r = rows[-1]
                    print(f"{policy} world {world} repeat {rep}: {r['wall_seconds']:.1f} s, {r['frames_per_second']:.2f} "
                          f"frames/s (rollout {r['rollout_seconds']:.1f} s), peak RSS/rank "
                          + ", ".join(f"{m:.0f}" for m in rss) + f" MiB, load {load:.1f}", flush=True)
    finally:
        if started:
            import ray

            ray.shutdown()
    for policy in policies:
        mine = [r for r in rows if r["policy"] == policy]
        base = max(r["frames_per_second"] for r in mine if r["world_size"] == 1)
        base_ro = max(r["rollout_frames_per_second"] for r in mine if r["world_size"] == 1)
        for r in mine:
            r["speedup"] = r["frames_per_second"] / base
            r["parallel_efficiency"] = r["speedup"] / r["world_size"]
            r["rollout_speedup"] = r["rollout_frames_per_second"] / base_ro
            r["rollout_parallel_efficiency"] = r["rollout_speedup"] / r["world_size"]
    pq.write_table(pa.Table.from_pylist(rows), out / "scaling.parquet")
    summary = {
        policy: {str(w): {k: max(r[k] for r in rows if r["policy"] == policy and r["world_size"] == w)
                          for k in ("frames_per_second", "parallel_efficiency", "rollout_parallel_efficiency",
                                    "peak_rss_mb_max")}
                 for w in worlds}
        for policy in policies
    }
    write_json(out / "scaling.json", {"config": str(args.config), "frames": rows[0]["frames"], "world_sizes": worlds,
                                      "policies": policies, "best": summary})
    if not args.no_plot:
        plot(rows, out / "scaling.png")
    print(json.dumps(summary, indent=2))
    return 0


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = sorted({r["policy"] for r in rows})
    worlds = sorted({r["world_size"] for r in rows})
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    for i, policy in enumerate(policies):
        c = f"C{i}"
        best = {w: max((r for r in rows if r["policy"] == policy and r["world_size"] == w),
                       key=lambda r: r["frames_per_second"]) for w in worlds}
        ax[0].plot(worlds, [best[w]["frames_per_second"] for w in worlds], "o-", color=c, label=f"{policy} (end to end)")
        ax[0].plot(worlds, [best[w]["rollout_frames_per_second"] for w in worlds], "s--", color=c, alpha=0.6,
                   label=f"{policy} (rollout)")
        ax[1].plot(worlds, [best[w]["parallel_efficiency"] for w in worlds], "o-", color=c, label=f"{policy} (end to end)")
        ax[1].plot(worlds, [best[w]["rollout_parallel_efficiency"] for w in worlds], "s--", color=c, alpha=0.6,
                   label=f"{policy} (rollout)")
        for w in worlds:
            rss = best[w]["peak_rss_mb_per_rank"]
            ax[2].scatter([w + 0.08 * (i - (len(rss) - 1) / 2) for i in range(len(rss))], rss, s=18, color=c,
                          label=policy if w == worlds[0] else None)
    ax[1].axhline(1.0, color="grey", lw=0.8, ls=":")
    frames = rows[0]["frames"]
    ax[0].set(title=f"throughput ({frames} frames)", xlabel="world size (ranks)", ylabel="frames / s")
    ax[1].set(title="parallel efficiency (speedup / W)", xlabel="world size (ranks)", ylim=(0, 1.2))
    ax[2].set(title="peak memory per rank", xlabel="world size (ranks)", ylabel="peak RSS (MiB)")
    for a in ax:
        a.set_xticks(worlds)
        a.grid(alpha=0.3)
    for a in ax:
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
