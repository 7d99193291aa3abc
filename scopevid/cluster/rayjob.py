"""Ray job plumbing shared by the driver's two kinds of job (one video: cluster.video_job; a batch on
rank groups: cluster.batch): connecting, placement with a visible wait, named rank actors, signals
that stop a job within a second, one-line causes of actor failures."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from scopevid.errors import ConfigError, DistributedError, Stopped

NAMESPACE = "scopevid"
JOB_FILE = "job.json"


def update_job(out: Path, **kw) -> dict:
    """Merge `kw` into DIR/job.json (atomically)."""
    from scopevid.engine.sinks import write_json

    path = out / JOB_FILE
    try:
        job = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):  # a damaged record is replaced, not a reason to fail the job
        job = {}
    job = job if isinstance(job, dict) else {}
    job.update(kw)
    write_json(path, job)
    return job


class JobRecord:
    """DIR/job.json of one attempt of a job, kept consistent whatever ends it: `status` goes starting
    -> (waiting for placement) -> running -> complete | stopped | failed; `error` is set exactly when
    it failed, `stopped` (what was kept, how to resume) exactly when a user stopped it."""

    def __init__(self, out: Path, **fields):
        self.out = out
        self.t0 = time.time()
        job = update_job(out)
        update_job(out, **fields, status="starting", error=None, stopped=None, finished=None,
                   attempts=int(job.get("attempts", 0)) + 1, attempt_started=self.t0,
                   argv=["python -m scopevid.cluster.driver", *sys.argv[1:]])

    def update(self, **kw) -> dict:
        return update_job(self.out, **kw)

    def finish(self, status: str, **kw) -> dict:
        job = update_job(self.out)
        return update_job(self.out, status=status, finished=time.time(), **kw,
                          attempt_seconds=[*job.get("attempt_seconds", []), time.time() - self.t0])


def say(spec, msg: str) -> None:
    if not spec.quiet:
        print(f"[scopevid driver] {msg}", flush=True)


def clip(text: str, n: int = 200) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def cause(e: BaseException) -> tuple[str, bool]:
    """(one-line cause, whether the actor process itself died)."""
    import ray.exceptions as rex

    if isinstance(e, rex.ActorDiedError) or (isinstance(e, rex.RayActorError) and not isinstance(e, rex.RayTaskError)):
        text = str(e)
        low = text.lower()
        if "sigkill" in low or "killed" in low or "signal" in low:
            why = "its process was killed (SIGKILL, OOM killer or a lost node)"
        elif "node" in low and ("dead" in low or "died" in low or "failed" in low):
            why = "its node died"
        else:
            why = "its process exited unexpectedly"
        return why, True
    cause = getattr(e, "cause", None) or e
    if isinstance(e, rex.RayTaskError) and cause is e:
        first = str(e).strip().splitlines()
        return (first[-1] if first else type(e).__name__), False
    return f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}", False


def _private_token() -> None:
    """A local Ray instance started by the driver gets token auth with a token of its own, held in the
    environment only (Ray would otherwise generate and keep one in ~/.ray/auth_token)."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    import secrets

    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    try:  # ray reads the mode once at import; refresh it as ray's own _enable_token_auth does
        from ray._raylet import Config

        Config.initialize("")
    except Exception:
        pass


def connect(address: str | None = None, cpus: float = 1.0, say=None) -> bool:
    """Join the Ray cluster at address (or RAY_ADDRESS); without one, start a private local instance
    with at least `cpus` CPUs, also when another Ray already runs on this machine (which `ray.init()`
    would join, refusing our CPU count with a traceback): `say` is told where that one is, so the user
    can pass --address to use it. Returns whether this call started Ray (the caller shuts it down).
    Workers' output is not streamed here (each rank writes its own log); errors of refs a handled
    failure left behind are not printed."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        return False
    _private_token()
    running = running_local_cluster()
    if running and say is not None:
        say(f"a Ray cluster is already running on this machine at {running}; this job starts a private one "
            f"(pass --address {running} to run on that cluster instead)")
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(cpus + 0.999)), include_dashboard=False,
             log_to_driver=False, logging_level="ERROR")
    return True


def running_local_cluster() -> str | None:
    """The address of a Ray cluster started on this machine (Ray's own record of its latest head), if
    its GCS answers; None otherwise."""
    import socket as socket_lib
    import tempfile

    record = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    try:
        address = record.read_text().strip()
        host, port = address.rsplit(":", 1)
        with socket_lib.create_connection((host, int(port)), timeout=0.5):
            return address
    except (OSError, ValueError):
        return None


# Signals seen by the driver. An exception raised from a signal handler inside Ray's Cython calls
# becomes a SystemError, so the handler only records the signal and every wait of the driver is a
# loop of waits of at most a second that calls _stop_point between them.
_STOP: list[str] = []


def stop_on_signals():
    """SIGTERM (`ray job stop`, scancel) and SIGINT (Ctrl-C) are noted, and acted on at the next
    stop_point (within a second). A second Ctrl-C ends the process; a second SIGTERM is ignored: under
    scancel the driver gets one from Slurm and one from launch.sh, and its stop is bounded anyway
    (launch.sh sends SIGKILL if it is not done). Returns the undo function."""
    def on_term(signum, frame):
        if signum == signal.SIGINT:
            signal.signal(signum, signal.SIG_DFL)
        if not _STOP:
            _STOP.append(signal.Signals(signum).name)

    previous = {}
    _STOP.clear()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, on_term)
        except ValueError:  # not the main thread
            pass
    return lambda: [signal.signal(sig, h) for sig, h in previous.items()]


def report(e: Stopped) -> None:
    """The driver's one line for a stop, printed as soon as the stop is decided (the rest of the stop is
    bounded but may outlive a Ray head that scancel stops at the same moment); printed once."""
    import sys

    if not e.reported:
        e.reported = True
        print(f"scopevid driver: stopped: {e}", file=sys.stderr, flush=True)


def stop_point() -> None:
    if _STOP:
        raise Stopped(_STOP[0])


def wait_for_placement(spec, pg, world: int, bundle: dict, out: Path) -> None:
    """Wait for the placement group, saying what it waits for (after a few seconds, then every 30 s).
    A job the cluster can never hold, whatever else finishes, fails at once with the fix (unless
    `--placement-timeout 0`: wait as long as it takes, e.g. for an autoscaler's nodes)."""
    import ray

    limit = spec.placement_timeout_s
    if limit > 0:
        why = never_fits(world, bundle, spec.placement)
        if why:
            raise ConfigError(f"placement: {why}; {fix_line(world, bundle)}")
    t0 = time.monotonic()
    said, first = 0.0, True
    ready = pg.ready()
    while True:
        stop_point()
        try:
            ray.get(ready, timeout=1.0)
            if not first:
                say(spec, f"placed after {time.monotonic() - t0:.0f} s")
            return
        except ray.exceptions.GetTimeoutError:
            pass
        waited = time.monotonic() - t0
        if limit > 0 and waited >= limit:
            raise DistributedError(f"placement: {world} bundles of {bundle} not available within {limit:g} s "
                                   f"(strategy {spec.placement}); {resources_line()}: other work holds them; wait "
                                   "longer with --placement-timeout S (0: no limit)")
        if (first and waited >= 3.0) or (not first and waited - said >= 30.0):
            first, said = False, waited
            until = f"giving up after {limit:g} s" if limit > 0 else "no time limit"
            say(spec, f"waiting for {world} bundles of {bundle} (strategy {spec.placement}): {resources_line()}; "
                       f"{until}")
            update_job(out, status="waiting for placement")


def never_fits(world: int, bundle: dict, strategy: str, nodes: list[dict] | None = None) -> str | None:
    """Why `world` bundles can never be placed on the alive nodes' total resources (what the nodes
    have in all, not what is free now), or None. `nodes`: Ray's node resource dicts (default: now)."""
    if nodes is None:
        import ray

        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    need = {k: v for k, v in bundle.items() if v}
    fits = [n for n in nodes if all(n.get(k, 0) >= v for k, v in need.items())]
    total = {k: sum(n.get(k, 0) for n in nodes) for k in need}
    have = ", ".join(f"{total[k]:g} {k}" for k in need) + f" on {len(nodes)} node(s)"
    if not fits:
        return f"one rank needs {_res(need)} on one node, and no node of the Ray cluster has it ({have})"
    if strategy == "STRICT_PACK":
        if not any(all(n.get(k, 0) >= v * world for k, v in need.items()) for n in nodes):
            return f"{world} ranks x {_res(need)} must share one node (STRICT_PACK), and no node has that ({have})"
        return None
    if strategy == "STRICT_SPREAD":
        if len(fits) < world:
            return f"{world} ranks on {world} different nodes (STRICT_SPREAD), and {len(fits)} node(s) can hold one"
        return None
    capacity = sum(min(int(n.get(k, 0) // v + 1e-9) for k, v in need.items()) for n in nodes)
    if capacity < world:
        return f"{world} ranks x {_res(need)} need {_res({k: v * world for k, v in need.items()})}, and the Ray cluster " \
               f"has {have} in all"
    return None


def fix_line(world: int, bundle: dict) -> str:
    """What makes a job fit: more CPUs for the cluster, fewer ranks, or ranks sharing CPUs."""
    cpus = bundle.get("CPU", 1)
    need = world * cpus
    more = (f"submit with more CPUs (sbatch -c {int(need + 0.999)} ...)" if os.environ.get("SLURM_JOB_ID")
            else f"start Ray with more (ray start --num-cpus {int(need + 0.999)}; launch.sh --local counts this machine's)")
    share = f"--cpus-per-rank {cpus / 2:g} puts two ranks on each CPU" if cpus >= 0.5 else "fewer ranks"
    return f"{more}, use fewer ranks (--world-size), or share CPUs ({share})"


def _res(r: dict) -> str:
    return " + ".join(f"{v:g} {k}" for k, v in r.items())


def resources_line() -> str:
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    keys = [k for k in ("CPU", "GPU", "memory") if k in total]
    fmt = (lambda k, v: f"{v / 2**30:.1f} GiB" if k == "memory" else f"{v:g}")
    return "free " + ", ".join(f"{k} {fmt(k, free.get(k, 0))} of {fmt(k, total[k])}" for k in keys)


def job_prefix(out: Path) -> str:
    import hashlib

    return f"scopevid-{hashlib.sha1(str(out).encode()).hexdigest()[:12]}-"


def actor_name(out: Path, rank: int, layout=None) -> str:
    """A rank actor's name: the job (its output directory), the rank, and where it sits in the mesh
    (group, guidance branch, shard), as `ray list actors` shows it."""
    if layout is None:
        return f"{job_prefix(out)}rank{rank:04d}"
    x = layout.coords(rank)
    return (f"{job_prefix(out)}rank{rank:04d}-group{x.d}-{layout.branch(rank) or 'both-branches'}"
            f"-shard{layout.sp_rank(rank)}of{layout.seq}")


def no_other_job(out: Path, wait_s: float = 20.0) -> None:
    """Rank actors are named after the output directory: two jobs can never write one directory at once.
    After a killed driver, Ray ends its actors within seconds; wait for that, then refuse."""
    import ray

    prefix = job_prefix(out)
    deadline = time.monotonic() + wait_s
    while True:
        alive = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                       if a.get("namespace") == NAMESPACE and a["name"].startswith(prefix))
        if not alive:
            return
        if time.monotonic() > deadline:
            raise DistributedError(f"another job is still running on {out} (actors {', '.join(alive[:4])}); stop it first")
        time.sleep(0.5)


def release(actors: list, pg, wait_s: float = 3.0) -> None:
    """End a job's actors and free its placement group. Each step is tried whatever happened before
    it (an actor already dead, a group already gone), and the whole is bounded: when the cluster
    itself is going down (scancel stops the Ray head with the driver) its calls would block."""
    import threading

    def run() -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        if pg is not None:
            try:
                remove_placement_group(pg)
            except Exception:
                pass

    t = threading.Thread(target=run, name="scopevid-release", daemon=True)
    t.start()
    t.join(wait_s)
