"""Ray job plumbing shared by the driver's two kinds of job (one video: cluster.video_job; a batch on
rank groups: cluster.batch): connecting, placement with a visible wait, named rank actors, signals
that stop a job within a second, one-line causes of actor failures."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from scopevid.errors import DistributedError, Stopped

NAMESPACE = "scopevid"
JOB_FILE = "job.json"


def update_job(out: Path, **kw) -> dict:
    """Merge `kw` into DIR/job.json (atomically)."""
    from scopevid.engine.sinks import write_json

    path = out / JOB_FILE
    job = json.loads(path.read_text()) if path.is_file() else {}
    job.update(kw)
    write_json(path, job)
    return job


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


def connect(address: str | None = None, cpus: float = 1.0) -> bool:
    """Join the Ray cluster at address (or RAY_ADDRESS); without one, start a local instance with at
    least `cpus` CPUs. Returns whether this call started Ray (the caller then shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    _private_token()
    ray.init(num_cpus=max(os.cpu_count() or 1, int(cpus + 0.999)), include_dashboard=False, log_to_driver=True)
    return True


# Signals seen by the driver. An exception raised from a signal handler inside Ray's Cython calls
# becomes a SystemError, so the handler only records the signal and every wait of the driver is a
# loop of waits of at most a second that calls _stop_point between them.
_STOP: list[str] = []


def stop_on_signals():
    """SIGTERM (`ray job stop`, scancel) and SIGINT (Ctrl-C) are noted, and acted on at the next
    stop_point (within a second); a second one ends the process. Returns the undo function."""
    def on_term(signum, frame):
        signal.signal(signum, signal.SIG_DFL)
        _STOP.append(signal.Signals(signum).name)

    previous = {}
    _STOP.clear()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, on_term)
        except ValueError:  # not the main thread
            pass
    return lambda: [signal.signal(sig, h) for sig, h in previous.items()]


def stop_point() -> None:
    if _STOP:
        raise Stopped(_STOP[0])


def wait_for_placement(spec, pg, world: int, bundle: dict, out: Path) -> None:
    """Wait for the placement group, saying what it waits for (after a few seconds, then every 30 s);
    `--placement-timeout 0` waits as long as it takes (a queue on a full cluster)."""
    import ray

    t0 = time.monotonic()
    limit = spec.placement_timeout_s
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
                                   f"(strategy {spec.placement}); {resources_line()}; wait longer with "
                                   "--placement-timeout S (0: no limit)")
        if (first and waited >= 3.0) or (not first and waited - said >= 30.0):
            first, said = False, waited
            until = f"giving up after {limit:g} s" if limit > 0 else "no time limit"
            say(spec, f"waiting for {world} bundles of {bundle} (strategy {spec.placement}): {resources_line()}; "
                       f"{until}")
            update_job(out, status="waiting for placement")


def resources_line() -> str:
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    keys = [k for k in ("CPU", "GPU", "memory") if k in total]
    fmt = (lambda k, v: f"{v / 2**30:.1f} GiB" if k == "memory" else f"{v:g}")
    return "free " + ", ".join(f"{k} {fmt(k, free.get(k, 0))} of {fmt(k, total[k])}" for k in keys)


def actor_name(out: Path, rank: int) -> str:
    import hashlib

    return f"scopevid-{hashlib.sha1(str(out).encode()).hexdigest()[:12]}-rank{rank}"


def no_other_job(out: Path, world: int, wait_s: float = 20.0) -> None:
    """Rank actors are named after the output directory: two jobs can never write one directory at once.
    After a killed driver, Ray ends its actors within seconds; wait for that, then refuse."""
    import ray

    deadline = time.monotonic() + wait_s
    while True:
        alive = []
        for r in range(max(world, 1) + 8):
            try:
                ray.get_actor(actor_name(out, r), namespace=NAMESPACE)
                alive.append(r)
            except ValueError:
                pass
        if not alive:
            return
        if time.monotonic() > deadline:
            raise DistributedError(f"another job is still running on {out} (rank actor(s) {alive} alive); stop it first")
        time.sleep(0.5)


def release(actors: list, pg) -> None:
    """End a job's actors and free its placement group. Each step is tried whatever happened before
    it (an actor already dead, a group already gone): this runs on the way out of a failed job too."""
    import ray
    from ray.util.placement_group import remove_placement_group

    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception:
            pass
    try:
        remove_placement_group(pg)
    except Exception:
        pass

