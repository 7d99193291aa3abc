"""`scopevid bench sp --world-sizes 1,2 | --meshes 'ulysses=2;cfg=2' --frames N --out DIR`: parallel
scaling, a benchmark.

For each mesh (a world size W alone means Ulysses over W ranks), W fresh local ranks (gloo on 127.0.0.1, `--threads` intra-op threads each) run
the same rollout of a compute-bound model (the tiny DiT architecture at a larger width / depth, random
weights: no checkpoint needed), after a short warm-up rollout. Per run: wall time of the rollout (the
slowest rank), latent frames per second, speedup and parallel efficiency against W = 1
(efficiency = speedup / W), time spent in communication (all-to-alls, gathers, hand-overs, waiting;
attention compute excluded), CPU seconds of the busiest rank and `cpu_efficiency` =
cpu(W=1) / (W * cpu(busiest rank)) (the efficiency dedicated cores would give, communication latency
aside: it measures padding, replicated work and communication CPU, not contention from other
processes), and the max abs difference of the W-rank latents from the 1-rank ones.
Rows go to DIR/bench_sp.parquet, the configuration to DIR/bench_config.yaml, a digest to stdout.

On a shared CPU machine, give every rank its own core (W * threads <= free cores) or the efficiency
measures contention, not the engine; the load average at each run is recorded for that reason.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

SCHEDULES = {
    # every frame of a 16-frame window denoised together: long sequences, compute-bound forwards
    "sync": {"kind": "diffusion_forcing", "base_num_frames": 16, "overlap_history": 4, "ar_step": 0,
             "causal_block_size": 1, "selective": "off"},
    # the asynchronous staircase with selective computation (our default): short compute intervals
    "async": {"kind": "diffusion_forcing", "base_num_frames": 16, "overlap_history": 4, "ar_step": 2,
              "causal_block_size": 1, "selective": "causal"},
    "chunk": {"kind": "chunk_causal", "chunk_width": 4, "window_size": 4, "context_chunks": 2},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output directory (must be new or empty)")
    p.add_argument("--world-sizes", default="1,2", help="comma-separated rank counts (Ulysses over all); 1 is added as the baseline")
    p.add_argument("--meshes", help="instead of --world-sizes: semicolon-separated meshes, e.g. 'ulysses=2;cfg=2;cfg=2,ulysses=2' "
                                    "(the 1-process baseline is added)")
    p.add_argument("--frames", type=int, default=48, help="latent frames per rollout (= pixel frames for tiny)")
    p.add_argument("--schedule", choices=sorted(SCHEDULES), default="sync")
    p.add_argument("--policy", default="original", help="policy preset (original measures pure forward scaling)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", type=int, default=32, help="frame side in pixels")
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4, help="must be divisible by every world size")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--timeout", type=float, default=600, help="seconds allowed per launch")
    p.add_argument("--overwrite", action="store_true")


def bench_config(args) -> dict:
    root = Path(__file__).resolve().parents[2]
    return {
        "model": {"kind": "tiny", "weights": "random", "init_seed": 0, "shift": 3.0,
                  "arch": {"size": args.size, "patch": args.patch, "dim": args.dim, "depth": args.depth,
                           "heads": args.heads, "vocab": ["<null>", "red", "square", "moving", "right"]}},
        "prompt": "red square moving right",
        "guidance": 2.0,
        "frames": args.frames,
        "fps": 16,
        "seed": 0,
        "schedule": {**SCHEDULES[args.schedule], "steps": args.steps},
        "policy": args.policy,
        "policy_presets": str(root / "configs" / "policies" / "tiny.yaml"),
    }


def _rank(topo, cfg_path: str, policy: str, cfg_mode: str = "sequential") -> dict:
    """One rank of one measured launch: warm-up rollout, then the timed one."""
    from dataclasses import replace

    from scopevid import config as config_lib
    from scopevid.cluster.worker import collect_rollout

    cfg = config_lib.load(cfg_path)
    cfg = cfg.with_overrides(parallel=replace(cfg.parallel, cfg_mode=cfg_mode))
    warm = cfg.with_overrides(frames=min(cfg.frames, 4))
    collect_rollout(topo, warm, policy, check_decisions=False)
    comm0 = topo.comm_seconds
    res = collect_rollout(topo, cfg, policy, check_decisions=False)
    res["comm_seconds"] = (topo.comm_seconds) - comm0
    if topo.rank != 0:
        res.pop("latents")
    return res


def main(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from scopevid.cluster.launch import spawn
    from scopevid.engine.sinks import prepare_out_dir, write_json
    from scopevid.errors import ConfigError

    from scopevid.config import ParallelConfig
    from scopevid.mesh import MeshLayout, implied_world, parse

    if args.meshes:
        given = [parse(m) for m in str(args.meshes).split(";") if m.strip()]
    else:
        try:
            worlds = sorted({int(w) for w in str(args.world_sizes).split(",") if w.strip()})
        except ValueError:
            raise ConfigError(f"--world-sizes: comma-separated integers expected, got {args.world_sizes!r}") from None
        if not worlds or min(worlds) < 1:
            raise ConfigError(f"--world-sizes: positive integers expected, got {args.world_sizes!r}")
        given = [ParallelConfig(ulysses=w) for w in worlds]
    meshes = [MeshLayout()]  # one process first: the reference
    for p in given:  # each checked as every entry point checks a mesh (the bench model's heads, guidance on)
        m = MeshLayout.resolve(p, implied_world(p), heads=(args.heads,), guided=True)
        if m.label not in {x.label for x in meshes}:
            meshes.append(m)
    out = prepare_out_dir(args.out, args.overwrite)
    cfg = bench_config(args)
    cfg_path = out / "bench_config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))

    rows, ref = [], None
    for mesh in meshes:
        world, name = mesh.world, mesh.label
        for rep in range(args.repeats):
            load = os.getloadavg()[0]
            res = spawn("scopevid.commands.bench_sp:_rank", world, args=(str(cfg_path), args.policy, mesh.cfg_mode),
                        timeout_s=args.timeout, threads=args.threads, dist_timeout_s=max(60.0, args.timeout / 2),
                        mesh=mesh.parallel)
            r0 = res[0]
            wall = max(r["wall_seconds"] for r in res)
            if ref is None:
                ref = r0["latents"]
            rows.append({
                "mesh": name, "world_size": world, "threads_per_rank": args.threads, "repeat": rep, "schedule": args.schedule,
                "policy": args.policy, "latent_frames": r0["latent_frames"], "iterations": len(r0["modes"]),
                "frame_forwards": r0["frame_forwards"], "wall_seconds": wall,
                "frames_per_second": r0["latent_frames"] / wall,
                "comm_seconds": max(r["comm_seconds"] for r in res),
                "cpu_seconds_max_rank": max(r["cpu_seconds"] for r in res),
                "cpu_seconds_total": sum(r["cpu_seconds"] for r in res),
                "max_abs_diff_vs_1rank": float((r0["latents"] - ref).abs().max()),
                "same_decisions_as_1rank": None,  # filled below
                "digest": r0["digest"],
                "dim": args.dim, "depth": args.depth, "heads": args.heads,
                "tokens_per_frame": (args.size // args.patch) ** 2, "load_avg_1min": load, "host_cpus": os.cpu_count(),
            })
            print(f"{name} ({world} rank(s)) repeat {rep}: {wall:.2f} s, {rows[-1]['frames_per_second']:.2f} frames/s, "
                  f"busiest rank cpu {rows[-1]['cpu_seconds_max_rank']:.2f} s (comm {rows[-1]['comm_seconds']:.2f} s, "
                  f"load {load:.1f})", flush=True)
    names = [m.label for m in meshes]
    best = {n: max(r["frames_per_second"] for r in rows if r["mesh"] == n) for n in names}
    base = names[0]
    cpu1 = min(r["cpu_seconds_max_rank"] for r in rows if r["mesh"] == base)
    base_digest = next(r["digest"] for r in rows if r["mesh"] == base)
    for r in rows:
        r["speedup"] = r["frames_per_second"] / best[base]
        r["parallel_efficiency"] = r["speedup"] / r["world_size"]
        r["comm_fraction"] = r["comm_seconds"] / r["wall_seconds"]
        # contention-free view: the busiest rank's CPU time bounds the wall time on dedicated cores
        r["cpu_efficiency"] = cpu1 / (r["world_size"] * r["cpu_seconds_max_rank"])
        r["same_decisions_as_1rank"] = r["digest"] == base_digest
    pq.write_table(pa.Table.from_pylist(rows), out / "bench_sp.parquet")
    summary = {}
    for m, n in zip(meshes, names):
        mine = [r for r in rows if r["mesh"] == n]
        summary[n] = {"world_size": m.world, "frames_per_second": best[n], "speedup": best[n] / best[base],
                      "parallel_efficiency": best[n] / best[base] / m.world,
                      "cpu_efficiency": max(r["cpu_efficiency"] for r in mine),
                      "comm_fraction": min(r["comm_fraction"] for r in mine),
                      "load_avg_1min": max(r["load_avg_1min"] for r in mine)}
    write_json(out / "bench_sp.json", {"config": cfg, "best": summary})
    print(json.dumps(summary, indent=2))
    return 0


