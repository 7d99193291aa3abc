"""A batch of videos on a Ray cluster: `python -m scopevid.cluster.driver --batch FILE --out DIR`.

`--world-size W --parallel dp=D[,cfg=..,ulysses=..]` makes D rank groups of W / D ranks each (one
bundle per rank in one placement group). Every group loads the model once, keeps its process group
for the whole batch, and takes the next video from the driver's queue when it is free, so fast and
slow videos balance themselves. The driver owns DIR/manifest.parquet (the same layout as
`scopevid batch`) and DIR/job.json: a video that fails is recorded and the batch goes on; a group
whose rank dies is dropped, and the video it held goes back to the queue once (a video that kills a
second group is recorded as failed). Every rank writes DIR/logs/rank-NNNN.log. SIGTERM stops the
batch within seconds; `--resume DIR` runs what is not done, with the batch's own record.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from scopevid.cluster import rayjob, ranklog
from scopevid.errors import DistributedError, ScopevidError, Stopped
from scopevid.jobs import local
from scopevid.jobs.local import BatchRecord
from scopevid.jobs.manifest import Manifest, Status

REQUEUES = 1  # times a video whose group died goes back to the queue


class GroupWorker:
    """One rank of one rank group (a Ray actor): the process group and the model live for the whole
    batch; `video` makes one video with them. It logs to DIR/logs/rank-NNNN.log (its global rank)."""

    def __init__(self, out: str, layout, rank: int, threads: int, device: str):
        import torch

        self.layout, self.global_rank, self.device = layout, rank, device
        self.group_index, self.rank, self.world = layout.replica(rank), layout.video_rank(rank), layout.video_world
        torch.set_num_threads(max(1, int(threads)))
        self.group = self.topo = self.adapter = None
        self.log = ranklog.RankLog(Path(out), rank, layout)

    def info(self) -> dict:
        import ray

        return {"group": self.group_index, "rank": self.rank, "global_rank": self.global_rank, "pid": os.getpid(),
                "node": ray.util.get_node_ip_address(), "hostname": socket.gethostname()}

    def endpoint(self) -> tuple[str, int]:
        import ray

        from scopevid.cluster.groups import free_port

        ip = ray.util.get_node_ip_address()
        return ip, free_port("0.0.0.0" if ip not in ("127.0.0.1", "localhost") else "127.0.0.1")

    def open(self, cfg, master: tuple[str, int] | None, dist_timeout_s: float) -> None:
        from scopevid import adapters
        from scopevid.engine.runner import DTYPES

        if self.world > 1:
            from scopevid.cluster.groups import DistEnv
            from scopevid.cluster.worker import start

            env = DistEnv(self.rank, self.world, 0 if self.device == "cuda" else self.rank, master[0], int(master[1]))
            with self.log.phase(f"joining group {self.group_index}'s process group at {master[0]}:{master[1]}"):
                self.group, self.topo = start(env, cfg, timeout_s=dist_timeout_s, layout=self.layout.group_mesh())
        with self.log.phase("loading the model"):
            self.adapter = adapters.load(cfg.model, cfg.device, DTYPES[cfg.dtype], weights=self.topo.weights if self.topo else None)

    def video(self, cfg, out: str) -> dict:
        from scopevid.engine.runner import generate

        t0 = time.perf_counter()
        with self.log.phase(f"video {Path(out).name} (seed {cfg.seed}, {cfg.frames} frames, {cfg.policy})"):
            summary = generate(cfg, out, overwrite=True, progress=False, topology=self.topo, adapter=self.adapter,
                               observers=[ranklog.RankProgress(self.log)])
        return {"frames": summary["frames"], "wall_seconds": summary["wall_seconds"], "seconds": time.perf_counter() - t0,
                "peak_rss_mb": local.peak_rss_mb()}


def run(spec, record: BatchRecord, out: Path, world: int) -> Manifest:
    """The batch on Ray (connected by the caller); returns the final manifest."""
    import ray

    from scopevid import adapters
    from scopevid.engine.sinks import RunLock

    cfg, reqs = record.cfg, record.requests
    layout = adapters.preflight(cfg.with_overrides(prompt=cfg.prompt or reqs[0].prompt), world, batch=True)
    group_cfg = cfg.with_overrides(parallel=layout.group_mesh().parallel)  # what each rank group runs
    local.check_batch_dir(record, out, resume=spec.resume, overwrite=spec.overwrite)
    device = "cuda" if str(cfg.device).startswith("cuda") and ray.cluster_resources().get("GPU", 0) >= world else "cpu"
    group_cfg = group_cfg.with_overrides(device="cuda" if device == "cuda" else "cpu")
    with RunLock(out):
        manifest = local.open_batch(BatchRecord(cfg, reqs, record.options), out, resume=spec.resume)
        job = rayjob.JobRecord(out, kind="batch", world_size=world, mesh=layout.label, videos=len(reqs))
        restore = rayjob.stop_on_signals()
        actors: list = []
        pg = None
        try:
            pg, actors, infos = _place(spec, layout, out, device, job)
            groups = [[actors[r] for r in layout.group("video", layout.rank_of(d))] for d in range(layout.dp)]
            opening = []
            for members in groups:
                master = ray.get(members[0].endpoint.remote(), timeout=60) if layout.video_world > 1 else None
                opening.append([a.open.remote(group_cfg, master, spec.dist_timeout_s) for a in members])
            alive = _opened(groups, opening, spec, out, layout)
            job.update(status="running")
            _queue(spec, group_cfg, reqs, manifest, out, groups, alive, infos, layout)
            job.finish("complete", counts=manifest.counts())
        except Stopped as e:
            running = [x for x in manifest.entries if x.status == Status.RUNNING.value]
            for x in running:
                manifest.set(x.index, status=Status.STOPPED, error=f"stopped by {e}")
            msg = (f"the batch was stopped by {e} ({local.done_line(manifest)}); the finished videos are kept; "
                   f"continue with: python -m scopevid.cluster.driver --resume {out}")
            job.finish("stopped", stopped=msg, counts=manifest.counts())
            stop = Stopped(msg)
            rayjob.report(stop)  # at once: the rest of the way out may outlive a Ray head stopped with us
            raise stop from None
        except BaseException as e:
            job.finish("failed", error=str(e) if isinstance(e, ScopevidError) else f"{type(e).__name__}: {e}",
                       counts=manifest.counts())
            raise
        finally:
            manifest.write()
            rayjob.release(actors, pg)
            restore()
    return manifest


def _place(spec, layout, out: Path, device: str, job) -> tuple:
    """The placement group (one bundle per rank) and one GroupWorker per bundle, named after the job and
    where the rank sits in the mesh; returns (pg, actors, their info)."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    world = layout.world
    bundle = {"CPU": spec.cpus_per_rank, **({"GPU": 1} if device == "cuda" else {})}
    pg = placement_group([dict(bundle) for _ in range(world)], strategy=spec.placement, name=f"scopevid-batch-{out.name}")
    actors: list = []
    try:
        rayjob.wait_for_placement(spec, pg, world, bundle, out)
        rayjob.no_other_job(out)  # a killed driver's actors (named after DIR) end within seconds
        Worker = ray.remote(GroupWorker)
        for r in range(world):
            actors.append(Worker.options(
                name=rayjob.actor_name(out, r, layout), namespace=rayjob.NAMESPACE, num_cpus=spec.cpus_per_rank,
                num_gpus=1 if device == "cuda" else 0, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r),
            ).remote(str(out), layout, r, max(1, int(spec.cpus_per_rank)), device))
        infos = ray.get([a.info.remote() for a in actors], timeout=spec.placement_timeout_s + 60)
    except BaseException:
        rayjob.release(actors, pg)
        raise
    job.update(status="starting", device=device, ranks=infos)
    rayjob.say(spec, f"{layout.dp} group(s) of {layout.video_world} rank(s) on {device}: "
                     + ", ".join(f"group {i['group']} rank {i['rank']} pid {i['pid']}" for i in infos))
    return pg, actors, infos


def _opened(groups, opening, spec, out: Path, layout) -> list[bool]:
    """Wait for every group to join its process group and load the model; a group that cannot is dropped."""
    import ray

    alive = []
    for g, refs in enumerate(opening):
        try:
            ray.get(refs, timeout=spec.dist_timeout_s + 600)
            alive.append(True)
        except ray.exceptions.RayTaskError as e:  # e.g. a ConfigError: the same on every group
            cause = getattr(e, "cause", None)
            if isinstance(cause, ScopevidError):
                raise cause from None
            raise DistributedError(f"group {g}: cannot start: {rayjob.clip(str(e).strip().splitlines()[-1])}") from None
        except ray.exceptions.RayError as e:
            why = rayjob.cause(e)[0]
            rayjob.say(spec, f"group {g} lost while starting: {why}")
            _note_lost(out, layout, g, why)
            alive.append(False)
    if not any(alive):
        raise DistributedError("no rank group could start")
    return alive


def _note_lost(out: Path, layout, group: int, why: str) -> None:
    for r in layout.group("video", layout.rank_of(group)):
        ranklog.append(out, r, f"[driver] group {group} lost: {why}")


def _queue(spec, cfg, reqs, manifest: Manifest, out: Path, groups, alive: list[bool], infos, layout) -> None:
    """Hand the videos not done to free groups until none is left (or no group is)."""
    import ray

    todo = [e.index for e in manifest.entries if e.status != Status.OK.value]
    requeued: dict[int, int] = {}
    busy: dict[int, tuple[int, list, float]] = {}  # group -> (video index, refs, start)
    while todo or busy:
        rayjob.stop_point()
        for g in range(len(groups)):
            if not todo or not alive[g] or g in busy:
                continue
            i = todo.pop(0)
            try:
                row = local.resolve(cfg, reqs[i])
            except ScopevidError as e:  # a bad row fails alone, before any rank sees it
                manifest.set(i, status=Status.FAILED, error=str(e))
                rayjob.say(spec, f"failed {manifest.entries[i].out}: {e}")
                continue
            manifest.set(i, status=Status.RUNNING, error=None)
            busy[g] = (i, [a.video.remote(row, str(out / manifest.entries[i].out)) for a in groups[g]], time.perf_counter())
        if not busy:
            if todo:
                raise DistributedError(f"every rank group was lost; {local.done_line(manifest)}; continue with --resume")
            break
        refs = [r for _, rs, _ in busy.values() for r in rs]
        ray.wait(refs, num_returns=1, timeout=1.0)
        for g in list(busy):
            i, rs, t0 = busy[g]
            done, _ = ray.wait(rs, num_returns=len(rs), timeout=0)
            failed = _failure(rs)
            if len(done) < len(rs) and failed is None:
                continue
            del busy[g]
            _settle(spec, manifest, i, g, rs, t0, failed, alive, requeued, todo, infos, out, layout)


def _settle(spec, manifest: Manifest, i: int, g: int, rs: list, t0: float, failed, alive, requeued, todo, infos,
            out: Path, layout) -> None:
    """Record how video i ended on group g: ok, failed, or back to the queue when its group died."""
    import ray

    e = manifest.entries[i]
    if failed is None:
        res = ray.get(rs)
        manifest.set(i, status=Status.OK, seconds=time.perf_counter() - t0, frames=int(res[0]["frames"]),
                     frames_per_second=res[0]["frames"] / max(res[0]["wall_seconds"], 1e-9), group=g,
                     peak_rss_mb=max(r["peak_rss_mb"] for r in res))
        rayjob.say(spec, f"ok {e.out} on group {g}: {e.frames} frames in {e.seconds:.1f} s")
        return
    why, died = failed
    if died:  # the group is gone; its video goes back to the queue (once)
        alive[g] = False
        pids = [x["pid"] for x in infos if x["group"] == g]
        _note_lost(out, layout, g, why)
        again = requeued.get(i, 0) < REQUEUES
        rayjob.say(spec, f"group {g} lost (pids {pids}): {why}" + (f"; {e.out} goes back to the queue" if again else ""))
        if again:
            requeued[i] = requeued.get(i, 0) + 1
            manifest.set(i, status=Status.PENDING, error=f"requeued: group {g} lost ({why})")
            todo.insert(0, i)
            return
    manifest.set(i, status=Status.FAILED, error=why, seconds=time.perf_counter() - t0)
    rayjob.say(spec, f"failed {e.out} on group {g}: {why}")


def _failure(refs) -> tuple[str, bool] | None:
    """(why, the actor died) of the first finished ref that failed, None if none has."""
    import ray

    done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
    for r in done:
        try:
            ray.get(r)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            return (str(cause) if isinstance(cause, ScopevidError) else rayjob.cause(e)[0]), False
        except ray.exceptions.RayError as e:
            return rayjob.cause(e)
    return None
