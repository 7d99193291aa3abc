"""`scopevid bench scaling --meshes '1;dp=2;cfg=2;ulysses=2' --policies original,scope-fast --videos 4 --out DIR`:
throughput of whole batch jobs per mesh shape, a benchmark.

Every (policy, mesh, repeat) is one complete batch job on Ray (cluster.batch.run, what
`python -m scopevid.cluster.driver --batch` runs: a placement group, one actor per rank, the mesh's
rank groups, the model loaded once per group, `--videos` videos pulled from the queue, MP4 + run log +
manifest per video), so the numbers include start-up, loading and output costs, as a user sees them.
The same videos (the config's prompt, seeds seed..seed+videos-1) run on every mesh, so throughput is
comparable: dp rank groups make several videos at once, cfg / ulysses / ring make one video faster.
One Ray instance serves all runs (`--address` or RAY_ADDRESS for a cluster; otherwise a local one).

DIR/scaling.parquet, one row per job: mesh, processes, its axes, policy, repeat, videos, frames,
wall seconds (start to the last video), frames/s, videos/hour, mean seconds per video (latency),
speedup against the 1-process mesh of the same policy (throughput ratio; its best repeat), parallel
efficiency = speedup / processes, the largest peak RSS of any rank, load average.
DIR/scaling.json: per policy and process count, the best mesh. DIR/scaling.png: videos/hour and
efficiency per mesh. Each job's outputs stay in DIR/runs/<policy>-<mesh>-r<k>/.

On a shared CPU machine, processes x --cpus-per-rank beyond the free cores measures contention,
not the engine: the 1-minute load average of each run is recorded, and `host_cpus` beside it.
`--world-sizes 1,2,4` (the older form) means Ulysses over W ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from scopevid.errors import ConfigError, DistributedError

BASELINE = "1"  # the label of the one-process mesh (scopevid.mesh.MeshLayout.label)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/bench/tiny_compute_bound.yaml",
                   help="model preset YAML (default configs/bench/tiny_compute_bound.yaml: compute-bound on a CPU core)")
    p.add_argument("--out", required=True, help="output directory (must be new or empty)")
    p.add_argument("--meshes", help="semicolon-separated meshes, e.g. 'dp=2;cfg=2;ulysses=2;dp=2,cfg=2' "
                                    "(the 1-process mesh is added as the baseline)")
    p.add_argument("--world-sizes", help="instead of --meshes: comma-separated rank counts, Ulysses over all")
    p.add_argument("--videos", type=int, help="videos per job (default: the largest dp, at least 2)")
    p.add_argument("--frames", type=int, help="pixel frames per video (default: the config's)")
    p.add_argument("--policies", help="comma-separated policy presets (default: the config's policy)")
    p.add_argument("--seed", type=int, help="seed of the first video (default: the config's); video k uses seed + k")
    p.add_argument("--steps", type=int, help="denoising steps (default: the config's)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--cpus-per-rank", type=float, default=1.0, help="CPUs per rank bundle (= torch threads)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    p.add_argument("--no-plot", action="store_true")


def _meshes(args) -> list:
    """The meshes to run, one process first, each as `MeshLayout` (scopevid.mesh); the model checks
    (heads, guidance) come with the config in main."""
    from scopevid.config import ParallelConfig
    from scopevid.mesh import MeshLayout, implied_world, parse

    if args.meshes and args.world_sizes:
        raise ConfigError("--meshes and --world-sizes: give one of them")
    if args.world_sizes:
        try:
            worlds = [int(t) for t in str(args.world_sizes).split(",") if t.strip()]
        except ValueError:
            raise ConfigError(f"--world-sizes: comma-separated integers expected, got {args.world_sizes!r}") from None
        if not worlds or min(worlds) < 1:
            raise ConfigError(f"--world-sizes: positive integers expected, got {args.world_sizes!r}")
        given = [ParallelConfig(ulysses=w) for w in worlds]
    else:
        given = [parse(m) for m in str(args.meshes or "").split(";") if m.strip()]
    out = [MeshLayout()]
    for p in given:
        m = MeshLayout.resolve(p, implied_world(p), batch=True)
        if m.label not in {x.label for x in out}:
            out.append(m)
    return sorted(out, key=lambda m: m.world)


def main(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from scopevid import adapters
    from scopevid import config as config_lib
    from scopevid.extras import require

    require("ray", "ray", "scopevid bench scaling (batches on a Ray cluster)")
    from scopevid.cluster import batch, jobspec, rayjob
    from scopevid.engine.sinks import prepare_out_dir, write_json
    from scopevid.jobs.manifest import Status
    from scopevid.jobs.local import BatchRecord
    from scopevid.jobs.requests import VideoRequest

    if args.repeats < 1:
        raise ConfigError(f"--repeats: must be >= 1, got {args.repeats}")
    meshes = _meshes(args)
    videos = args.videos if args.videos is not None else max(2, *(m.dp for m in meshes))
    if videos < 1:
        raise ConfigError(f"--videos: must be >= 1, got {videos}")
    base_spec = jobspec.JobSpec(out=Path(args.out), config=args.config, frames=args.frames, seed=args.seed,
                               steps=args.steps, overwrite=True, device=args.device, cpus_per_rank=args.cpus_per_rank,
                               quiet=True, address=args.address)
    cfg0 = jobspec.with_overrides(base_spec, config_lib.load(args.config))
    policies = [p.strip() for p in (args.policies or cfg0.policy).split(",") if p.strip()]
    for p in policies:
        cfg0.policy_spec(p)  # unknown preset: a ConfigError naming it, before anything runs
    for m in meshes:  # the one check of a mesh, with the model's heads and guidance: one line before any run
        adapters.preflight(cfg0, m.world, batch=True, parallel=m.parallel)
    reqs = [VideoRequest(index=k, prompt=cfg0.prompt, seed=cfg0.seed + k, name=f"seed{cfg0.seed + k}")
            for k in range(videos)]
    out = prepare_out_dir(args.out, args.overwrite)
    started = rayjob.connect(args.address, cpus=max(m.world for m in meshes) * args.cpus_per_rank,
                             say=lambda m: print(f"scopevid bench scaling: {m}", file=sys.stderr, flush=True))
    rows = []
    try:
        for policy in policies:
            for mesh in meshes:
                name = mesh.label
                for rep in range(args.repeats):
                    run_dir = (out / "runs" / f"{policy}-{name.replace(',', '-').replace(' ', '')}-r{rep}").resolve()
                    spec = replace(base_spec, out=run_dir, world_size=mesh.world, policy=policy)
                    cfg = cfg0.with_overrides(policy=policy, parallel=mesh.parallel)
                    load = os.getloadavg()[0]
                    t0 = time.perf_counter()
                    manifest = batch.run(spec, BatchRecord(cfg, reqs), run_dir, mesh.world)
                    wall = time.perf_counter() - t0
                    bad = [e for e in manifest.entries if e.status != Status.OK.value]
                    if bad:
                        raise DistributedError(f"bench scaling: {len(bad)} video(s) of {name} under {policy} did not finish "
                                               f"({bad[0].error}); see {manifest.path}")
                    frames = sum(e.frames for e in manifest.entries)
                    rows.append({
                        "mesh": name, "processes": mesh.world, "dp": mesh.dp, "cfg": mesh.cfg, "ulysses": mesh.ulysses,
                        "ring": mesh.ring, "cfg_mode": mesh.cfg_mode, "policy": policy, "repeat": rep, "videos": videos,
                        "frames_per_video": manifest.entries[0].frames, "frames": frames, "wall_seconds": wall,
                        "frames_per_second": frames / wall, "videos_per_hour": 3600 * videos / wall,
                        "video_seconds_mean": sum(e.seconds for e in manifest.entries) / videos,
                        "peak_rss_mb_max": max(e.peak_rss_mb for e in manifest.entries),
                        "device": cfg.device, "cpus_per_rank": args.cpus_per_rank, "load_avg_1min": load,
                        "host_cpus": os.cpu_count(), "run_dir": str(run_dir),
                    })
                    r = rows[-1]
                    print(f"{policy} {name} ({mesh.world} process(es)) repeat {rep}: {videos} videos in {wall:.1f} s, "
                          f"{r['videos_per_hour']:.0f} videos/h, {r['frames_per_second']:.2f} frames/s, "
                          f"{r['video_seconds_mean']:.1f} s per video, peak RSS {r['peak_rss_mb_max']:.0f} MiB, "
                          f"load {load:.1f}", flush=True)
    finally:
        if started:
            import ray

            ray.shutdown()
    summary = finish(rows)
    pq.write_table(pa.Table.from_pylist(rows), out / "scaling.parquet")
    write_json(out / "scaling.json", {"config": str(args.config), "videos": videos, "meshes": [m.label for m in meshes],
                                      "policies": policies, "best": summary})
    if not args.no_plot:
        plot(rows, out / "scaling.png")
    print(json.dumps(summary, indent=2))
    return 0


def finish(rows: list[dict]) -> dict:
    """Speedup and efficiency against the policy's best 1-process run; the best mesh per process count."""
    summary: dict = {}
    for policy in sorted({r["policy"] for r in rows}):
        mine = [r for r in rows if r["policy"] == policy]
        base = max(r["frames_per_second"] for r in mine if r["mesh"] == BASELINE)
        for r in mine:
            r["speedup"] = r["frames_per_second"] / base
            r["parallel_efficiency"] = r["speedup"] / r["processes"]
        summary[policy] = {}
        for n in sorted({r["processes"] for r in mine}):
            best = max((r for r in mine if r["processes"] == n), key=lambda r: r["frames_per_second"])
            summary[policy][str(n)] = {
                "best_mesh": best["mesh"], "frames_per_second": best["frames_per_second"],
                "videos_per_hour": best["videos_per_hour"], "speedup": best["speedup"],
                "parallel_efficiency": best["parallel_efficiency"],
                "meshes": {m: max(r["speedup"] for r in mine if r["mesh"] == m)
                           for m in sorted({r["mesh"] for r in mine if r["processes"] == n})},
            }
    return summary


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = sorted({r["policy"] for r in rows})
    names = sorted({r["mesh"] for r in rows}, key=lambda n: (next(r["processes"] for r in rows if r["mesh"] == n), n))
    fig, ax = plt.subplots(1, 2, figsize=(max(9, 1.2 * len(names) + 4), 4))
    width = 0.8 / len(policies)
    for i, policy in enumerate(policies):
        best = {n: max((r for r in rows if r["policy"] == policy and r["mesh"] == n), key=lambda r: r["frames_per_second"])
                for n in names}
        xs = [k + (i - (len(policies) - 1) / 2) * width for k in range(len(names))]
        ax[0].bar(xs, [best[n]["videos_per_hour"] for n in names], width, label=policy, color=f"C{i}")
        ax[1].bar(xs, [best[n]["parallel_efficiency"] for n in names], width, label=policy, color=f"C{i}")
    ax[1].axhline(1.0, color="grey", lw=0.8, ls=":")
    labels = [f"{n}\n({next(r['processes'] for r in rows if r['mesh'] == n)} proc)" for n in names]
    ax[0].set(title=f"throughput ({rows[0]['videos']} videos of {rows[0]['frames_per_video']} frames)", ylabel="videos / hour")
    ax[1].set(title="parallel efficiency (speedup / processes)", ylim=(0, 1.2))
    for a in ax:
        a.set_xticks(range(len(names)), labels, fontsize=7)
        a.grid(alpha=0.3, axis="y")
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
