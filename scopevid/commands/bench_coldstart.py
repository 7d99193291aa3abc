"""`scopevid bench coldstart`: bytes of checkpoint read per rank and wall time to the first denoising step,
every rank reading its own copy against one rank per node reading for its peers (cluster.weights).

    scopevid bench coldstart --config A.yaml[,B.yaml] --ranks 1,2,4 [--nodes 1] [--frames 9] [--steps 2] --out DIR

For each config, rank count and mode (`rank`: every rank reads the files, what every loader did before;
`node`: one rank per node reads), N local gloo ranks (1 thread each) load the adapter and run a short
rollout. Per rank: checkpoint bytes read (the weight files its loads read whole), bytes received from a
node peer, seconds in the loads, seconds from the rank's start (group up) to the end of its first
denoising iteration, and a digest of the finished latents (the same video in both modes). DIR/coldstart.parquet
holds every rank's row; DIR/coldstart.md the table by config, ranks and mode. `--nodes K` splits the ranks
into K simulated nodes (SCOPEVID_NODE). Wall times on a shared CPU are what they are; the bytes are exact.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

from scopevid.engine.rollout import RolloutObserver
from scopevid.errors import ConfigError

MODES = ("rank", "node")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="comma-separated run configs (models with checkpoints on disk)")
    p.add_argument("--ranks", default="1,2,4", help="comma-separated rank counts")
    p.add_argument("--nodes", type=int, default=1, help="simulated nodes the ranks are split over (default 1)")
    p.add_argument("--frames", type=int, help="pixel frames of the short rollout (default: the config's)")
    p.add_argument("--steps", type=int, help="denoising steps of the short rollout (default: the config's)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per launch")
    p.add_argument("--out", required=True)


class _FirstStep(RolloutObserver):
    """The wall clock at the end of the first iteration."""

    def __init__(self) -> None:
        self.at: float | None = None

    def after_iteration(self, record) -> None:
        if self.at is None:
            self.at = time.perf_counter()


def _rank(topo, cfg_path: str, mode: str, frames: int | None, steps: int | None) -> dict:
    """Runs on every rank: load through `mode`'s weight source, roll out, time and count."""
    from dataclasses import replace

    from scopevid import adapters
    from scopevid import config as config_lib
    from scopevid.adapters.weights import Files
    from scopevid.engine import runner
    from scopevid.scheduler import policies as policy_lib

    t0 = time.perf_counter()
    cfg = config_lib.load(cfg_path)
    if steps:
        cfg = cfg.with_overrides(schedule=replace(cfg.schedule, steps=steps))
    if frames:
        cfg = cfg.with_overrides(frames=frames)
    source = topo.weights if mode == "node" else Files()
    adapter = adapters.load(cfg.model, cfg.device, runner.DTYPES[cfg.dtype], weights=source)
    loaded = time.perf_counter()
    plan = runner.build_plan(cfg, adapter)
    cond = adapter.encode_prompt(cfg.prompt, cfg.negative_prompt, cfg.guidance)
    first = _FirstStep()
    ro = runner.make_rollout(cfg, adapter, plan, policy_lib.build(cfg.policy_spec("original"), "original"), cond,
                             topology=topo, observers=[first])
    latents = [x.float().cpu() for _, x in ro.run()]
    digest = hashlib.sha256(b"".join(x.numpy().tobytes() for x in latents)).hexdigest()[:16]
    return {**source.stats.to_dict(),
            "load_s": loaded - t0, "first_step_s": (first.at or time.perf_counter()) - t0,
            "total_s": time.perf_counter() - t0, "video": digest}


def main(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from scopevid import config as config_lib
    from scopevid.cluster.launch import spawn
    from scopevid.engine.sinks import prepare_out_dir

    configs = [c.strip() for c in args.config.split(",") if c.strip()]
    try:
        ranks = [int(x) for x in args.ranks.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--ranks: comma-separated integers, got {args.ranks!r}") from None
    if not ranks or min(ranks) < 1 or args.nodes < 1 or (args.steps is not None and args.steps < 1):
        raise ConfigError("--ranks, --nodes and --steps must be >= 1")
    for c in configs:
        if not Path(c).is_file():
            raise ConfigError(f"--config: {c} is not a file")
    out = prepare_out_dir(args.out, True)
    rows = []
    for c in configs:
        cfg = config_lib.load(c)
        for n in ranks:
            mesh = _mesh(cfg, n)
            for mode in MODES:
                res = spawn("scopevid.commands.bench_coldstart:_rank", n, args=(str(Path(c).resolve()), mode, args.frames, args.steps),
                            timeout_s=args.timeout, threads=1, nodes=min(args.nodes, n), mesh=mesh.parallel)
                for r, x in enumerate(res):
                    rows.append({"config": Path(c).name, "ranks": n, "nodes": min(args.nodes, n), "mode": mode,
                                 "mesh": mesh.label if n > 1 else "1", **x, "rank": r})
                pq.write_table(pa.Table.from_pylist(rows), out / "coldstart.parquet")  # what ran so far survives a failure
                print(f"{Path(c).name} ranks={n} mode={mode}: read {sum(x['bytes_read'] for x in res) / 2**20:.1f} MiB in all, "
                      f"first step {max(x['first_step_s'] for x in res):.2f} s", flush=True)
    table = summarize(rows)
    (out / "coldstart.md").write_text(table)
    print(table, end="")
    return 0


def _mesh(cfg, n: int):
    """Ulysses over the n ranks where the model's heads allow it, else the largest Ulysses degree that
    divides them with a ring over the rest (the tiny MAGI-1 fixture has 2 K/V heads)."""
    from scopevid import adapters
    from scopevid.config import ParallelConfig

    for u in range(n, 0, -1):
        if n % u == 0:
            try:
                return adapters.preflight(cfg, n, parallel=ParallelConfig(ulysses=u, ring=n // u))
            except ConfigError:
                continue
    raise ConfigError(f"--ranks: no mesh of {n} ranks fits {cfg.model.get('kind')}'s heads")


def summarize(rows: list[dict]) -> str:
    """One line per (config, ranks, mode): copies read, MiB read per rank (max, total), received, load and
    first-step seconds (max over ranks), and whether both modes at that rank count made the same video, bit
    for bit, on every rank (rank counts differ among themselves by float rounding of the sharded attention)."""
    lines = ["| model | ranks | mesh | nodes | mode | ranks that read | MiB read per rank (max) | MiB read in all "
             "| MiB received per rank (max) | load s (max) | first step s (max) | same video in both modes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["config"], r["ranks"], r["nodes"], r["mode"]) for r in rows}, key=lambda k: (k[0], k[1], MODES.index(k[3])))
    for cfg, n, nodes, mode in keys:
        g = [r for r in rows if (r["config"], r["ranks"], r["nodes"], r["mode"]) == (cfg, n, nodes, mode)]
        videos = {r["video"] for r in rows if (r["config"], r["ranks"], r["nodes"]) == (cfg, n, nodes)}
        mib = 2**20
        lines.append(f"| {cfg} | {n} | {g[0]['mesh']} | {nodes} | {mode} | {sum(r['bytes_read'] > 0 for r in g)} | "
                     f"{max(r['bytes_read'] for r in g) / mib:.2f} | {sum(r['bytes_read'] for r in g) / mib:.2f} | "
                     f"{max(r['bytes_received'] for r in g) / mib:.2f} | {max(r['load_s'] for r in g):.2f} | "
                     f"{max(r['first_step_s'] for r in g):.2f} | {'yes' if len(videos) == 1 else 'NO'} |")
    return "\n".join(lines) + "\n"
