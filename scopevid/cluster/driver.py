"""The Ray job entrypoint: one generation job over N ranks, resumable.

    ray job submit --working-dir . -- python -m scopevid.cluster.driver \\
        --config configs/tiny.yaml --frames 737 --world-size 2 --out /shared/runs/long
    python -m scopevid.cluster.driver --resume /shared/runs/long        # after a kill

What happens:
1. The driver resolves the config (YAML + overrides, validated), prepares the output directory and
   writes DIR/config.yaml (the resolved config, what --resume reloads) and DIR/job.json (status,
   ranks, timings; kept up to date).
2. It connects to Ray (RAY_ADDRESS / --address; without either it starts a local instance), reserves
   a placement group with one bundle per rank ({"CPU": c} or {"CPU": c, "GPU": 1} when the cluster has
   a GPU per rank) and starts one actor per rank in its bundle.
3. Rank 0 publishes its node address and a free port; every actor joins the torch.distributed group
   there (cluster.worker.start: gloo on CPU, nccl on GPU, with a collective timeout) and runs the same
   rollout under the UlyssesTopology (engine.runner.generate). Rank 0 streams the outputs: video.mp4,
   frames/ and latents/ Parquet shards, steps.parquet (run log), summary.json.
4. Every rank checkpoints its rollout state at window boundaries (engine.checkpoint); rank 0 reports
   progress to a zero-CPU board actor, the driver prints frames done, iteration rate and ETA.
5. When an actor dies, the driver names the rank (and its pid and node) in one error, stops the other
   ranks after a short grace (the writer closes its files), and keeps everything finished on disk;
   `--resume DIR` continues from the last checkpoint and the finished video equals an uninterrupted run.

The output directory must be visible from every node (a shared filesystem), as checkpoints are
written by every rank.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from scopevid.cluster.rayjob import (JOB_FILE, NAMESPACE, actor_name, cause, clip, connect, no_other_job, release,
                                     say, stop_on_signals, stop_point, wait_for_placement)
from scopevid.cluster.rayjob import update_job as _update_job
from scopevid.errors import CheckpointError, ConfigError, DistributedError, ScopevidError, Stopped

CONFIG_FILE = "config.yaml"


# --- the job description ----------------------------------------------------------------------------
@dataclass
class JobSpec:
    out: Path
    config: str | None = None
    frames: int | None = None
    world_size: int | None = None
    policy: str | None = None
    seed: int | None = None
    steps: int | None = None
    prompt: str | None = None
    parallel: str | None = None  # --parallel cfg=2,ulysses=2 (the mesh over --world-size ranks)
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"  # auto | cpu | cuda
    cpus_per_rank: float = 1.0
    placement: str = "PACK"
    placement_timeout_s: float = 120.0
    stop_grace_s: float = 2.5  # on SIGTERM, how long the ranks get to stop and close their outputs (`ray job stop` kills after 3 s)
    dist_timeout_s: float = 300.0
    checkpoint_every: int = 1
    checkpoint_seconds: float = 0.0
    progress_every_s: float = 2.0
    grace_s: float = 15.0
    address: str | None = None
    quiet: bool = False
    extra: dict = field(default_factory=dict)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="model preset YAML, e.g. configs/tiny.yaml (not needed with --resume)")
    p.add_argument("--out", help="output directory (new or empty; on a filesystem every node sees)")
    p.add_argument("--resume", metavar="DIR", help="continue the killed job whose outputs are in DIR")
    p.add_argument("--batch", metavar="FILE", help="many videos: a prompt file (text, .jsonl, .parquet) as in `scopevid batch`, "
                                                   "on --parallel dp=D rank groups")
    p.add_argument("--frames", type=int, help="pixel frames to generate")
    p.add_argument("--world-size", type=int, help="ranks (one Ray actor each); default 1")
    p.add_argument("--policy", help="policy preset name, e.g. original, scope-fast")
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int, help="denoising steps")
    p.add_argument("--prompt")
    p.add_argument("--parallel", help="the mesh over --world-size ranks, e.g. cfg=2,ulysses=2 (default: ulysses over all)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: one GPU per rank when the cluster has them, else CPU")
    p.add_argument("--cpus-per-rank", type=float, default=1.0, help="CPUs in each rank's bundle (= torch threads)")
    p.add_argument("--placement", default="PACK", choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    p.add_argument("--placement-timeout", type=float, default=120.0, help="seconds to wait for the bundles (0: no limit)")
    p.add_argument("--dist-timeout", type=float, default=300.0, help="collective timeout in seconds")
    p.add_argument("--checkpoint-every", type=int, default=1,
                   help="checkpoint at every N-th window boundary (0: never)")
    p.add_argument("--checkpoint-seconds", type=float, default=0.0,
                   help="and at most once per this many seconds (0: no limit)")
    p.add_argument("--progress-every", type=float, default=2.0, help="seconds between progress lines")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def spec_from_args(args: argparse.Namespace) -> JobSpec:
    if not args.out and not args.resume:
        raise ConfigError("out: give --out DIR (or --resume DIR to continue a job)")
    if args.resume and args.out and Path(args.out).resolve() != Path(args.resume).resolve():
        raise ConfigError("out: a job resumes in place; --out must be omitted or equal --resume")
    if not args.resume and not args.config:
        raise ConfigError("config: --config is required for a new job")
    if getattr(args, "batch", None) and args.resume and not args.config:
        raise ConfigError("config: --batch --resume needs the batch's --config too")
    for name in ("world_size", "frames", "cpus_per_rank", "checkpoint_every"):
        v = getattr(args, name)
        if v is not None and v < (0 if name == "checkpoint_every" else 1):
            raise ConfigError(f"{name.replace('_', '-')}: must be >= {0 if name == 'checkpoint_every' else 1}, got {v}")
    return JobSpec(
        out=Path(args.resume or args.out).resolve(), config=args.config, frames=args.frames, world_size=args.world_size,
        policy=args.policy, seed=args.seed, steps=args.steps, prompt=args.prompt, parallel=args.parallel,
        resume=bool(args.resume),
        overwrite=args.overwrite, device=args.device, cpus_per_rank=args.cpus_per_rank, placement=args.placement,
        placement_timeout_s=args.placement_timeout, dist_timeout_s=args.dist_timeout,
        checkpoint_every=args.checkpoint_every, checkpoint_seconds=args.checkpoint_seconds,
        progress_every_s=args.progress_every, address=args.address, quiet=args.quiet,
    )


def _resolve_config(spec: JobSpec):
    """The RunConfig of the job: YAML + overrides (new job) or DIR/config.yaml (resume)."""
    from scopevid import config as config_lib

    def overridden(cfg):
        return with_overrides(spec, cfg)

    if not spec.resume:
        return overridden(config_lib.load(spec.config))
    saved_path = spec.out / CONFIG_FILE
    if not saved_path.is_file():
        raise CheckpointError(f"resume: {saved_path} not found: {spec.out} is not the output directory of a driver job")
    saved = config_lib.load(saved_path)
    if spec.config is not None or any(v is not None for v in (spec.frames, spec.policy, spec.seed, spec.steps, spec.prompt,
                                                               spec.parallel)):
        given = overridden(config_lib.load(spec.config) if spec.config else saved)
        a, b = _comparable(saved.to_dict()), _comparable(given.to_dict())
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            raise ConfigError(f"resume: {', '.join(diff)} differ(s) from the job in {spec.out}; a job resumes with its own "
                              "config (omit --config and overrides)")
    return saved


def with_overrides(spec: JobSpec, cfg):
    """The config with the job's command-line overrides."""
    from scopevid import config as config_lib

    sched = cfg.schedule if spec.steps is None else replace(cfg.schedule, steps=spec.steps)
    parallel = config_lib.parse_parallel(spec.parallel) if spec.parallel else None
    return cfg.with_overrides(frames=spec.frames, policy=spec.policy, seed=spec.seed, prompt=spec.prompt,
                              schedule=sched, parallel=parallel)


def run_batch_job(spec: JobSpec, prompts: str) -> int:
    """`--batch FILE`: the videos of a prompt file on rank groups (cluster.batch); exit code."""
    from scopevid import config as config_lib
    from scopevid.cluster import batch
    from scopevid.jobs import requests
    from scopevid.jobs.manifest import Status

    if not spec.config:
        raise ConfigError("config: --batch needs --config (also with --resume: the batch checks it against batch.json)")
    cfg = with_overrides(spec, config_lib.load(spec.config))
    reqs = requests.read(prompts)
    world = spec.world_size or cfg.parallel.dp
    try:
        started = connect(spec.address, cpus=world * spec.cpus_per_rank)
    except Exception as e:
        raise DistributedError(f"ray: cannot connect to {spec.address or os.environ.get('RAY_ADDRESS') or 'a local instance'}: "
                               f"{clip(str(e))}") from None
    try:
        import ray

        manifest = batch.run(spec, cfg, reqs, spec.out, world)
    finally:
        if started:
            ray.shutdown()
    c = manifest.counts()
    failed = c.get(Status.FAILED.value, 0)
    say(spec, f"{c.get(Status.OK.value, 0)} of {len(manifest.entries)} videos done, {failed} failed; manifest: {manifest.path}")
    if failed:
        print(f"scopevid driver: error: {failed} video(s) failed (see the error column of {manifest.path}); "
              "retry them with --resume", file=sys.stderr, flush=True)
        return 1
    return 0


def _comparable(d: dict) -> dict:
    d = {k: v for k, v in d.items() if k != "source"}
    return json.loads(json.dumps(d, default=str))


def _write_config(cfg, path: Path) -> None:
    import yaml

    d = {k: v for k, v in cfg.to_dict().items() if k != "source"}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(json.loads(json.dumps(d, default=str)), sort_keys=False))
    tmp.replace(path)


# --- one rank ---------------------------------------------------------------------------------------
class RankWorker:
    """One rank: a Ray actor (the driver wraps this class with ray.remote)."""

    def __init__(self, rank: int, world: int, threads: int, device: str):
        import torch

        self.rank, self.world, self.device = rank, world, device
        torch.set_num_threads(max(1, int(threads)))
        self.threads = torch.get_num_threads()

    def info(self) -> dict:
        import ray

        return {"rank": self.rank, "pid": os.getpid(), "node": ray.util.get_node_ip_address(),
                "hostname": socket.gethostname(), "threads": self.threads,
                "gpus": [str(g) for g in ray.get_gpu_ids()]}

    def endpoint(self) -> tuple[str, int]:
        """Rank 0: the address the others reach it at and a port free right now."""
        import ray

        from scopevid.cluster.groups import free_port

        ip = ray.util.get_node_ip_address()
        return ip, free_port(ip)

    def run(self, cfg, out: str, master: tuple[str, int], *, resume: bool, checkpoint_every: int,
            checkpoint_seconds: float, dist_timeout_s: float, board=None) -> dict:
        import resource

        import torch

        import ray

        from scopevid.cluster.progress import Reporter, StopPoll
        from scopevid.cluster.worker import run_rank
        from scopevid.engine.checkpoint import Checkpointer

        t0 = time.perf_counter()
        reporter = Reporter(board.report.remote, cfg.frames) if (self.rank == 0 and board is not None) else None
        stop = None
        if board is not None:
            stop = StopPoll(board.stop_requested.remote,
                            lambda ref: ray.get(ref) if ray.wait([ref], timeout=0)[0] else None)
        ckpt = Checkpointer(out, resume=resume, every=checkpoint_every, min_seconds=checkpoint_seconds,
                            on_iteration=reporter, stop_requested=stop)
        # the driver prepared the output directory; the checkpointer owns it from here (overwrite=True)
        summary = run_rank(cfg, out, self.rank, self.world, master[0], int(master[1]),
                           local_rank=0 if self.device == "cuda" else self.rank,  # Ray shows a GPU actor its GPU as 0
                           timeout_s=dist_timeout_s, threads=self.threads, overwrite=True, progress=False,
                           checkpoint=ckpt)
        res = {
            "rank": self.rank,
            "pid": os.getpid(),
            "seconds": time.perf_counter() - t0,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "resumed_from": ckpt.restored_serial if resume else None,
            "checkpoints": ckpt.saves,
        }
        if torch.cuda.is_available() and self.device == "cuda":
            res["gpu_peak_bytes"] = int(torch.cuda.max_memory_allocated())
        if self.rank == 0:
            res["summary"] = summary
        return res


# --- the driver -------------------------------------------------------------------------------------


def _frames_on_disk(out: Path) -> int:
    import pyarrow.parquet as pq

    n = 0
    for p in sorted((out / "frames").glob("part-*.parquet")):
        try:
            n += pq.ParquetFile(str(p)).metadata.num_rows
        except Exception:  # a part being written when the job died
            pass
    return n


def run_job(spec: JobSpec) -> dict:
    """Run (or resume) one job to completion; returns job.json's content. Raises ScopevidError."""
    import ray  # noqa: F401  (fail early when Ray is missing)

    from scopevid.engine.checkpoint import checkpoint_info
    from scopevid.engine.sinks import prepare_out_dir

    out = spec.out
    cfg = _resolve_config(spec)
    if spec.resume:
        job_path = out / JOB_FILE
        if not job_path.is_file():
            raise CheckpointError(f"resume: {job_path} not found: {out} is not the output directory of a driver job")
        job = json.loads(job_path.read_text())
        if job.get("status") == "complete":
            say(spec, f"job in {out} is already complete ({job.get('frames')} frames); nothing to do")
            return job
        world = spec.world_size or int(job["world_size"])
        if world != int(job["world_size"]):
            raise ConfigError(f"world-size: the job in {out} runs on {job['world_size']} ranks (checkpoints are per rank); "
                              f"resume it with --world-size {job['world_size']}")
        info = checkpoint_info(out)
        attempts = int(job.get("attempts", 1)) + 1
        seconds = list(job.get("attempt_seconds", []))
        if len(seconds) < attempts - 1 and "attempt_started" in job:  # the last driver was SIGKILLed:
            seconds.append(max(0.0, job_path.stat().st_mtime - job["attempt_started"]))  # up to its last write
            _update_job(out, attempt_seconds=seconds)
        say(spec, f"resuming {out}: " + (f"checkpoint at iteration {info['serial']}/{info['total_iterations']}, "
                                         f"{info['pixel_frames']} frames done" if info else "no checkpoint yet, starting over"))
    else:
        world = spec.world_size or 1
        from scopevid import adapters

        mesh = cfg.parallel.shape(world)  # the mesh and the heads, before the directory, the placement and any load
        adapters.preflight(cfg.model, cfg.prompt, mesh.ulysses, world)
        prepare_out_dir(out, spec.overwrite)
        (out / JOB_FILE).unlink(missing_ok=True)  # --overwrite: a new job, a new record
        _write_config(cfg, out / CONFIG_FILE)
        attempts = 1
        _update_job(out, status="starting", config=spec.config, frames=cfg.frames, world_size=world,
                    policy=cfg.policy, seed=cfg.seed, model=cfg.model.get("kind"), created=time.time())
    _update_job(out, status="starting", attempts=attempts, argv=sys.argv, error=None, attempt_started=time.time())

    try:
        started_ray = connect(spec.address, cpus=world * spec.cpus_per_rank)
    except Exception as e:  # no cluster at the address, auth refused, ...
        msg = f"ray: cannot connect to {spec.address or os.environ.get('RAY_ADDRESS') or 'a local instance'}: {clip(str(e))}"
        _update_job(out, status="failed", error=msg)
        raise DistributedError(msg) from None
    try:
        return _run_on_ray(spec, cfg, world, out)
    finally:
        if started_ray:
            ray.shutdown()


def _run_on_ray(spec: JobSpec, cfg, world: int, out: Path) -> dict:
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from scopevid.cluster.progress import ProgressBoard

    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    if spec.device == "cuda" or (spec.device == "auto" and str(cfg.device).startswith("cuda")):
        if gpus < world:
            msg = f"device: {world} ranks need {world} GPUs, the Ray cluster has {gpus:g}"
            _update_job(out, status="failed", error=msg)
            raise ConfigError(msg)
        device = "cuda"
    elif spec.device == "auto" and gpus >= world:
        device = "cuda"
    else:
        device = "cpu"
    if device == "cuda" and not str(cfg.device).startswith("cuda"):
        cfg = cfg.with_overrides(device="cuda")
    if device == "cpu" and str(cfg.device).startswith("cuda"):
        cfg = cfg.with_overrides(device="cpu")
    bundle = {"CPU": spec.cpus_per_rank, **({"GPU": 1} if device == "cuda" else {})}

    pg = placement_group([dict(bundle) for _ in range(world)], strategy=spec.placement, name=f"scopevid-{out.name}")
    actors, board, refs = [], None, []
    t_start = time.perf_counter()

    restore = stop_on_signals()
    status = "failed"
    try:
        wait_for_placement(spec, pg, world, bundle, out)
        no_other_job(out, world)
        Worker = ray.remote(RankWorker)
        Board = ray.remote(ProgressBoard)
        board = Board.options(num_cpus=0).remote()
        for r in range(world):
            actors.append(Worker.options(
                name=actor_name(out, r), namespace=NAMESPACE,
                num_cpus=spec.cpus_per_rank, num_gpus=1 if device == "cuda" else 0, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r),
            ).remote(r, world, max(1, int(spec.cpus_per_rank)), device))
        ranks = _gather_named([a.info.remote() for a in actors], "start", timeout=spec.placement_timeout_s + 60)
        _update_job(out, status="running", device=device, ranks=ranks, started=time.time())
        say(spec, f"{world} rank(s) on {device}: " + ", ".join(f"rank {i['rank']} pid {i['pid']} @ {i['node']}" for i in ranks))
        master = _gather_named([actors[0].endpoint.remote()], "report its address", timeout=60)[0]
        refs = [a.run.remote(cfg, str(out), master, resume=spec.resume, checkpoint_every=spec.checkpoint_every,
                             checkpoint_seconds=spec.checkpoint_seconds, dist_timeout_s=spec.dist_timeout_s, board=board)
                for a in actors]
        results = _wait(spec, refs, ranks, board, out)
        wall = time.perf_counter() - t_start
        summary = results[0]["summary"]
        frames = summary.get("frames") or cfg.frames
        per_rank = [{"rank": r["rank"], "pid": r["pid"], "peak_rss_mb": r["peak_rss_bytes"] / 2**20,
                     **({"gpu_peak_mb": r["gpu_peak_bytes"] / 2**20} if "gpu_peak_bytes" in r else {}),
                     "seconds": r["seconds"], "checkpoints": r["checkpoints"]} for r in results]
        status = "complete"
        job_seconds = _attempts_seconds(out) + wall
        rollout = summary.get("wall_seconds") or wall  # the rollout's own clock runs on across resumes
        job = _update_job(
            out, status="complete", finished=time.time(), wall_seconds=wall, job_seconds=job_seconds,
            attempt_seconds=[*_job(out).get("attempt_seconds", []), wall], frames=frames,
            frames_per_second=frames / max(rollout, 1e-9), rollout_seconds=rollout,
            iterations=summary.get("iterations"), resumed_from=results[0].get("resumed_from"), per_rank=per_rank,
            counts=summary.get("counts"), decision_digest=summary.get("decision_digest"),
            sequence_parallel=summary.get("sequence_parallel"),
        )
        attempts = int(job.get("attempts", 1))
        say(spec, f"done: {frames} frames, {frames / max(rollout, 1e-9):.2f} frames/s of rollout; "
                   + (f"{job_seconds:.1f} s end to end over {attempts} attempts (this one {wall:.1f} s)" if attempts > 1
                      else f"{wall:.1f} s end to end")
                   + ", peak RSS per rank " + ", ".join(f"{p['peak_rss_mb']:.0f} MiB" for p in per_rank)
                   + f"; outputs in {out}")
        return job
    except Stopped as e:
        status = "stopped"
        if board is not None and refs:  # the ranks stop together at their next iteration and close their outputs
            board.request_stop.remote()
            ray.wait(refs, num_returns=len(refs), timeout=spec.stop_grace_s)
        msg = f"stopped by {e}; " + _kept(out)
        _update_job(out, error=msg)
        raise Stopped(msg) from None
    finally:
        if status != "complete":
            _update_job(out, status=status, finished=time.time(),
                        attempt_seconds=[*_job(out).get("attempt_seconds", []), time.perf_counter() - t_start])
        release(actors + ([board] if board is not None else []), pg)
        restore()


def _kept(out: Path) -> str:
    """What a job that ended early leaves, and the command that continues it."""
    from scopevid.engine.checkpoint import checkpoint_info

    ck = checkpoint_info(out)
    return (f"Kept in {out}: {_frames_on_disk(out)} finished frame(s) (video.mp4, frames/, latents/, steps.parquet)"
            + (f", checkpoint at iteration {ck['serial']}/{ck['total_iterations']} ({ck['pixel_frames']} frames)" if ck
               else ", no checkpoint yet")
            + f". Resume with: python -m scopevid.cluster.driver --resume {out}")


def _job(out: Path) -> dict:
    path = out / JOB_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _attempts_seconds(out: Path) -> float:
    """Seconds of the job's earlier attempts (a resumed job reports the whole job)."""
    return float(sum(_job(out).get("attempt_seconds", [])))


def _gather_named(refs: list, what: str, timeout: float) -> list:
    import ray

    out = []
    for r, ref in enumerate(refs):
        deadline = time.monotonic() + timeout
        while True:
            stop_point()
            if ray.wait([ref], timeout=1.0)[0]:
                break
            if time.monotonic() > deadline:
                raise DistributedError(f"rank {r}: actor did not {what} within {timeout:g} s")
        try:
            out.append(ray.get(ref))
        except ray.exceptions.RayError as e:
            why, _ = cause(e)
            raise DistributedError(f"rank {r}: actor failed to {what}: {why}") from None
    return out


def _wait(spec: JobSpec, refs: list, ranks: list, board, out: Path) -> list:
    """Wait for every rank, printing progress; on the first failure name the rank and stop the job."""
    import ray

    from scopevid.cluster.progress import ProgressTracker

    tracker = ProgressTracker()
    rank_of = {ref: r for r, ref in enumerate(refs)}
    results: dict[int, dict] = {}
    failures: dict[int, tuple[str, bool]] = {}
    pending = list(refs)
    last_print = time.monotonic()
    deadline = None  # after a failure: how long the others get to end on their own
    while pending:
        stop_point()
        done, pending = ray.wait(pending, num_returns=1, timeout=min(1.0, spec.progress_every_s))
        for ref in done:
            r = rank_of[ref]
            try:
                results[r] = ray.get(ref)
            except ray.exceptions.RayError as e:
                failures[r] = cause(e)
                if deadline is None:
                    deadline = time.monotonic() + spec.grace_s
        if deadline is not None and time.monotonic() > deadline:
            break  # the survivors usually fail within a second (peer gone); the rest are stopped
        if time.monotonic() - last_print >= spec.progress_every_s:
            last_print = time.monotonic()
            try:
                tracker.extend(ray.get(board.since.remote(tracker.last_time), timeout=5))
            except ray.exceptions.RayError:
                pass
            if tracker.latest is not None:
                say(spec, tracker.line())
                _update_job(out, progress=tracker.as_dict())
    if not failures:
        return [results[r] for r in range(len(refs))]
    # the rank whose process died is the cause; the others failed in a collective because of it
    dead = sorted(r for r, (_, died) in failures.items() if died)
    first = dead[0] if dead else min(failures)
    why, died = failures[first]
    info = ranks[first] if first < len(ranks) else {}
    where = f" (pid {info.get('pid')} on {info.get('node')})" if info else ""
    others = [f"rank {r}: {clip(w)}" for r, (w, _) in sorted(failures.items()) if r != first]
    msg = f"rank {first}{where} {'died' if died else 'failed'}: {why}. " + _kept(out)
    if others:
        msg += " [then " + "; ".join(others) + "]"
    _update_job(out, error=msg, failed_rank=first)
    raise DistributedError(msg)


def main(argv: list[str] | None = None) -> int:
    from scopevid.cli import OneLineParser

    p = OneLineParser(prog="python -m scopevid.cluster.driver", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        spec = spec_from_args(args)
        if args.batch:
            return run_batch_job(spec, args.batch)
        job = run_job(spec)
    except ScopevidError as e:
        print(f"scopevid driver: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    print(json.dumps({k: job.get(k) for k in ("status", "frames", "world_size", "wall_seconds", "job_seconds", "frames_per_second",
                                              "per_rank", "resumed_from")}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
