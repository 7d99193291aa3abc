"""One video on a Ray cluster: `run_job(spec)` (what `python -m scopevid.cluster.driver --config ...`
runs). It resolves and checks the config, prepares DIR (config.yaml, job.json), places one rank
actor per bundle (cluster.rank_actor), waits for them with progress lines, names the rank that died
when one does (and writes the cause into that rank's log), stops every rank on SIGTERM / SIGINT
within seconds, and keeps job.json consistent however the job ends; `--resume DIR` continues from
the last checkpoint."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from scopevid.cluster import ranklog
from scopevid.cluster.jobspec import CONFIG_FILE, JobSpec, resolve_config, write_config
from scopevid.cluster.rayjob import (JOB_FILE, NAMESPACE, JobRecord, actor_name, cause, clip, connect, no_other_job,
                                     release, report, say, stop_on_signals, stop_point, wait_for_placement)
from scopevid.cluster.rayjob import update_job as _update_job
from scopevid.errors import CheckpointError, ConfigError, DistributedError, ScopevidError, Stopped


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

    from scopevid import adapters

    out = spec.out
    cfg = resolve_config(spec)
    if spec.resume:
        job = _resumable(spec, out)
        if job.get("status") == "complete":
            say(spec, f"job in {out} is already complete ({job.get('frames')} frames); nothing to do")
            return job
        world = int(job["world_size"])
        adapters.preflight(cfg, world)  # the same checks as a new job, before any placement
    else:
        from scopevid.engine.sinks import prepare_out_dir

        world = spec.world_size or 1
        layout = adapters.preflight(cfg, world)  # the model, the mesh, the heads: before the directory and any load
        prepare_out_dir(out, spec.overwrite)
        (out / JOB_FILE).unlink(missing_ok=True)  # --overwrite: a new job, a new record
        write_config(cfg, out)
        _update_job(out, kind="video", config=str(out / CONFIG_FILE), config_given=spec.config, frames=cfg.frames,
                    world_size=world, mesh=layout.label, policy=cfg.policy, seed=cfg.seed, model=cfg.model.get("kind"),
                    created=time.time())
    job = JobRecord(out)
    try:
        started_ray = connect(spec.address, cpus=world * spec.cpus_per_rank, say=lambda m: say(spec, m))
    except Exception as e:  # no cluster at the address, auth refused, ...
        msg = f"ray: cannot connect to {spec.address or os.environ.get('RAY_ADDRESS') or 'a local instance'}: {clip(str(e))}"
        job.finish("failed", error=msg)
        raise DistributedError(msg) from None
    try:
        return _run_on_ray(spec, cfg, world, out, job)
    finally:
        if started_ray:
            ray.shutdown()


def _resumable(spec: JobSpec, out: Path) -> dict:
    """The job record of a job to resume, checked: its world size is the one asked for."""
    from scopevid.engine.checkpoint import checkpoint_info

    job_path = out / JOB_FILE
    if not job_path.is_file():
        raise CheckpointError(f"resume: {job_path} not found: {out} is not the output directory of a driver job")
    try:
        job = json.loads(job_path.read_text())
        world = int(job["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"resume: {job_path} is damaged ({type(e).__name__}: {e}); start the job over") from None
    if spec.world_size is not None and spec.world_size != world:
        raise ConfigError(f"world-size: the job in {out} runs on {world} ranks (checkpoints are per rank); "
                          f"resume it with --world-size {world}")
    seconds = list(job.get("attempt_seconds", []))
    if len(seconds) < int(job.get("attempts", 1)) and "attempt_started" in job:  # the last driver was SIGKILLed:
        seconds.append(max(0.0, job_path.stat().st_mtime - job["attempt_started"]))  # up to its last write
        job = _update_job(out, attempt_seconds=seconds)
    info = checkpoint_info(out)
    say(spec, f"resuming {out}: " + (f"checkpoint at iteration {info['serial']}/{info['total_iterations']}, "
                                     f"{info['pixel_frames']} frames done" if info else "no checkpoint yet, starting over"))
    return job


def _device(spec: JobSpec, cfg, world: int):
    """(cpu | cuda, the config on that device): one GPU per rank when asked for or when the cluster has them."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if spec.device == "cuda" or (spec.device == "auto" and str(cfg.device).startswith("cuda")):
        if gpus < world:
            raise ConfigError(f"device: {world} ranks need {world} GPUs, the Ray cluster has {gpus:g}")
        device = "cuda"
    else:
        device = "cuda" if spec.device == "auto" and gpus >= world else "cpu"
    if device == "cuda" and not str(cfg.device).startswith("cuda"):
        cfg = cfg.with_overrides(device="cuda")
    if device == "cpu" and str(cfg.device).startswith("cuda"):
        cfg = cfg.with_overrides(device="cpu")
    return device, cfg


def _start_ranks(spec: JobSpec, pg, layout, device: str, out: Path, actors: list):
    """One rank actor per bundle (appended to `actors` as they start, so a failure still releases them)
    and the zero-CPU progress board; returns (board, the ranks' info)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from scopevid.cluster.progress import ProgressBoard
    from scopevid.cluster.rank_actor import RankWorker

    Worker = ray.remote(RankWorker)
    board = ray.remote(ProgressBoard).options(num_cpus=0).remote()
    for r in range(layout.world):
        actors.append(Worker.options(
            name=actor_name(out, r, layout), namespace=NAMESPACE,
            num_cpus=spec.cpus_per_rank, num_gpus=1 if device == "cuda" else 0, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r),
        ).remote(r, layout.world, max(1, int(spec.cpus_per_rank)), device))
    ranks = _gather_named([a.info.remote() for a in actors], "start", timeout=spec.placement_timeout_s + 60)
    return board, ranks


def _run_on_ray(spec: JobSpec, cfg, world: int, out: Path, job: JobRecord) -> dict:
    from ray.util.placement_group import placement_group

    from scopevid import adapters

    actors, board, refs, pg = [], None, [], None
    t_start = time.perf_counter()
    restore = stop_on_signals()
    try:
        layout = adapters.preflight(cfg, world)
        device, cfg = _device(spec, cfg, world)
        bundle = {"CPU": spec.cpus_per_rank, **({"GPU": 1} if device == "cuda" else {})}
        pg = placement_group([dict(bundle) for _ in range(world)], strategy=spec.placement, name=f"scopevid-{out.name}")
        wait_for_placement(spec, pg, world, bundle, out)
        no_other_job(out)
        board, ranks = _start_ranks(spec, pg, layout, device, out, actors)
        job.update(status="running", device=device, ranks=ranks, started=time.time())
        say(spec, f"{world} rank(s) on {device}: " + ", ".join(f"rank {i['rank']} pid {i['pid']} @ {i['node']}" for i in ranks))
        master = _gather_named([actors[0].endpoint.remote()], "report its address", timeout=60)[0]
        refs = [a.run.remote(cfg, str(out), master, resume=spec.resume, checkpoint_every=spec.checkpoint_every,
                             checkpoint_seconds=spec.checkpoint_seconds, dist_timeout_s=spec.dist_timeout_s, board=board)
                for a in actors]
        results = _wait(spec, refs, ranks, board, out)
        return _complete(spec, cfg, out, results, time.perf_counter() - t_start, job)
    except Stopped as e:
        # said and recorded first: under scancel the Ray head is going down with us, and the Ray client
        # ends this process a few seconds after it goes; then the ranks are asked to close their outputs
        msg = f"stopped by {e}; " + _kept(out)
        job.finish("stopped", stopped=msg)
        stop = Stopped(msg)
        report(stop)
        _stop_ranks(spec, board, refs, actors, pg)
        actors, board, pg = [], None, None  # released (or the cluster is gone)
        raise stop from None
    except BaseException as e:
        job.finish("failed", error=str(e) if isinstance(e, ScopevidError) else f"{type(e).__name__}: {e}")
        raise
    finally:
        release(actors + ([board] if board is not None else []), pg)
        restore()


def _stop_ranks(spec: JobSpec, board, refs: list, actors: list, pg) -> None:
    """Ask every rank to stop at its next iteration (they close their outputs), give them a moment, then
    release the actors and the placement group: all of it within `stop_grace_s`, as under scancel the
    Ray head is going down with us and its calls would block."""
    import threading

    import ray

    def stop() -> None:
        try:
            if board is not None and refs:
                board.request_stop.remote()
                ray.wait(refs, num_returns=len(refs), timeout=max(0.1, spec.stop_grace_s - 0.3))
        except Exception:  # the cluster is gone: nothing to ask
            pass
        release(actors + ([board] if board is not None else []), pg, wait_s=0.5)

    t = threading.Thread(target=stop, name="scopevid-stop", daemon=True)
    t.start()
    t.join(spec.stop_grace_s)


def _complete(spec: JobSpec, cfg, out: Path, results: list, wall: float, job: JobRecord) -> dict:
    """job.json of a finished job (its progress at 100%), and its one line."""
    summary = results[0]["summary"]
    frames = summary.get("frames") or cfg.frames
    per_rank = [{"rank": r["rank"], "pid": r["pid"], "peak_rss_mb": r["peak_rss_bytes"] / 2**20,
                 **({"gpu_peak_mb": r["gpu_peak_bytes"] / 2**20} if "gpu_peak_bytes" in r else {}),
                 "seconds": r["seconds"], "checkpoints": r["checkpoints"]} for r in results]
    job_seconds = _attempts_seconds(out) + wall
    rollout = summary.get("wall_seconds") or wall  # the rollout's own clock runs on across resumes
    iterations = summary.get("iterations")
    rec = job.finish(
        "complete", wall_seconds=wall, job_seconds=job_seconds, frames=frames,
        frames_per_second=frames / max(rollout, 1e-9), rollout_seconds=rollout, iterations=iterations,
        resumed_from=results[0].get("resumed_from"), per_rank=per_rank, counts=summary.get("counts"),
        decision_digest=summary.get("decision_digest"), sequence_parallel=summary.get("sequence_parallel"),
        progress={"iteration": (iterations or 1) - 1, "iterations": iterations, "frames": frames, "total_frames": frames,
                  "latent_frames": summary.get("latent_frames"), "time": time.time(), "eta_seconds": 0.0},
    )
    attempts = int(rec.get("attempts", 1))
    say(spec, f"done: {frames} frames, {frames / max(rollout, 1e-9):.2f} frames/s of rollout; "
               + (f"{job_seconds:.1f} s end to end over {attempts} attempts (this one {wall:.1f} s)" if attempts > 1
                  else f"{wall:.1f} s end to end")
               + ", peak RSS per rank " + ", ".join(f"{p['peak_rss_mb']:.0f} MiB" for p in per_rank)
               + f"; outputs in {out}")
    return rec


def _kept(out: Path) -> str:
    """What a job that ended early leaves, and the command that continues it."""
    from scopevid.engine.checkpoint import checkpoint_info

    ck = checkpoint_info(out)
    return (f"Kept in {out}: {_frames_on_disk(out)} finished frame(s) (video.mp4, frames/, latents/, steps.parquet)"
            + (f", checkpoint at iteration {ck['serial']}/{ck['total_iterations']} ({ck['pixel_frames']} frames)" if ck
               else ", no checkpoint yet")
            + f". Resume with: python -m scopevid.cluster.driver --resume {out}")


def _attempts_seconds(out: Path) -> float:
    """Seconds of the job's earlier attempts (a resumed job reports the whole job)."""
    path = out / JOB_FILE
    job = json.loads(path.read_text()) if path.is_file() else {}
    return float(sum(job.get("attempt_seconds", [])))


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
        done, pending = ray.wait(pending, num_returns=1, timeout=min(0.25, spec.progress_every_s))  # stops seen at once
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
                stop_point()  # a stop first: when the head goes down the board does not answer
                tracker.extend(ray.get(board.since.remote(tracker.last_time), timeout=1.0))
            except ray.exceptions.RayError:
                pass
            if tracker.latest is not None:
                say(spec, tracker.line())
                _update_job(out, progress=tracker.as_dict())
    if not failures:
        return [results[r] for r in range(len(refs))]
    for r, (w, died) in failures.items():  # in each failed rank's own log, also when its process was killed
        ranklog.append(out, r, f"[driver] rank {r} {'died' if died else 'failed'}: {w}")
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
    _update_job(out, failed_rank=first)
    raise DistributedError(msg)


