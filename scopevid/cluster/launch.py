"""Run a function on N local ranks (fresh processes, a gloo group on 127.0.0.1): for tests, benchmarks
and laptops. Production launches go through torchrun, Slurm or the Ray driver instead.

    results = spawn("scopevid.cluster.worker:collect_rollout", 2, args=(cfg_dict, "original"))

The target is named "module:function" and called as fn(topology, *args, **kwargs) on every rank,
with a `MeshTopology` over the mesh `mesh=` (default: Ulysses over every rank); its return values (anything torch.save can write) come back
in rank order. Every rank runs with `threads` intra-op threads (OMP/MKL too), the whole launch is
bounded by `timeout_s` (ranks still alive then are killed), and a failing rank's traceback is raised
in the caller.
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from scopevid.cluster.groups import NODE_ENV, TIMEOUT_ENV, free_port

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class LaunchError(RuntimeError):
    def __init__(self, msg: str, codes: list[int | None], errors: dict[int, str]):
        super().__init__(msg)
        self.codes, self.errors = codes, errors


def rank_env(rank: int, world: int, port: int, *, threads: int | None = 1, dist_timeout_s: float | None = None,
             extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), PYTHONUNBUFFERED="1")
    if threads is not None:
        env.update({k: str(threads) for k in THREAD_VARS})
    if dist_timeout_s is not None:
        env[TIMEOUT_ENV] = str(dist_timeout_s)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def spawn(target: str, world: int, args: tuple = (), kwargs: dict | None = None, *, timeout_s: float = 300,
          threads: int | None = 1, dist_timeout_s: float | None = 60, env: dict | None = None,
          mesh=None, nodes: int | None = None) -> list:
    """`mesh`: a config.ParallelConfig for the topology (default: Ulysses over all ranks). `nodes`: split
    the ranks, in order, into that many simulated nodes (SCOPEVID_NODE per rank; default: this host is one)."""
    import torch

    with tempfile.TemporaryDirectory(prefix="scopevid-spawn-") as tmp:
        tmp = Path(tmp)
        (tmp / "call.pkl").write_bytes(pickle.dumps((target, args, kwargs or {}, mesh)))
        port = free_port()
        procs = []
        for r in range(world):
            log = open(tmp / f"{r}.log", "wb")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "scopevid.cluster.launch", str(tmp)],
                env=rank_env(r, world, port, threads=threads, dist_timeout_s=dist_timeout_s,
                             extra={**(env or {}), **({NODE_ENV: f"node{r * nodes // world}"} if nodes else {})}),
                stdout=log, stderr=subprocess.STDOUT,
            ))
            log.close()
        deadline = time.monotonic() + timeout_s
        timed_out = False
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                timed_out = True
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        codes = [p.wait() for p in procs]
        errors = {r: (tmp / f"{r}.log").read_text(errors="replace")[-4000:] for r, c in enumerate(codes) if c != 0}
        if timed_out or errors:
            why = f"timed out after {timeout_s:g} s" if timed_out else "rank(s) failed"
            detail = "\n".join(f"--- rank {r} (exit {codes[r]}) ---\n{t}" for r, t in errors.items())
            raise LaunchError(f"spawn {target} on {world} ranks: {why}\n{detail}", codes, errors)
        return [torch.load(tmp / f"{r}.pt", weights_only=False) for r in range(world)]


def _child(tmp: Path) -> int:
    import torch

    from scopevid.cluster.groups import DistEnv
    from scopevid.cluster.worker import start

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    target, args, kwargs, mesh = pickle.loads((tmp / "call.pkl").read_bytes())
    mod, name = target.split(":")
    fn = getattr(importlib.import_module(mod), name)
    env = DistEnv.from_env() or DistEnv(0, 1)
    group, topo = start(env, mesh=mesh, batch=True)  # a harness: rank groups (dp) are allowed
    ok = False
    try:
        result = fn(topo, *args, **kwargs)
        torch.save(result, tmp / f"{group.rank}.pt")
        ok = True
    finally:
        group.teardown(ok=ok)
    return 0


if __name__ == "__main__":
    try:
        code = _child(Path(sys.argv[1]))
    except Exception:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # the result file is written and the group torn down: leave without the interpreter's exit, which a
    # torn-down gloo group's C++ threads can abort (SIGABRT, "terminate called without an active
    # exception"; see cluster.groups.TORN_DOWN), as the CLI's ranks do
    os._exit(code)
