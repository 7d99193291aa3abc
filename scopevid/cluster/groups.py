"""Process groups: who am I, how do I reach the others, and how does the job end.

`DistEnv.from_env()` reads what the launcher provides:
- torchrun / Ray workers / anything torch-style: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
- Slurm (`srun` steps, when RANK/WORLD_SIZE are absent): SLURM_PROCID, SLURM_STEP_NUM_TASKS (falling back
  to SLURM_NTASKS only with SLURM_STEP_ID set, i.e. inside a step: a batch script's own environment
  also has SLURM_NTASKS but runs a single process), SLURM_LOCALID; MASTER_ADDR defaults to the first
  host of SLURM_STEP_NODELIST/SLURM_JOB_NODELIST, MASTER_PORT to 29500 + job id mod 1000.

`init()` starts torch.distributed: gloo on CPU, nccl when the run's device is CUDA (one device per
local rank). Every collective runs under a timeout (`SCOPEVID_DIST_TIMEOUT` seconds, default 600), so
a dead or stalled rank ends the job instead of hanging it, and `collective()` turns the backend's
error into a `DistributedError` naming this rank, the operation and the likely cause.
`Group.teardown()` is a barrier then `destroy_process_group()` after a clean run (without the barrier,
gloo aborted about 1 run in 8 on exit); after a failure it skips the barrier (peers may be gone).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Mapping

import torch

from scopevid.errors import ConfigError, DistributedError
from scopevid.mesh import MeshLayout

DEFAULT_TIMEOUT_S = 600.0
TIMEOUT_ENV = "SCOPEVID_DIST_TIMEOUT"
NODE_ENV = "SCOPEVID_NODE"  # a node id of the launcher's; default: the host name (cluster.weights reads once per node)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "explicit"  # torchrun | slurm | explicit

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "DistEnv | None":
        """The launcher's view of this process, or None when nothing says it is one of several."""
        env = os.environ if env is None else env
        if "WORLD_SIZE" in env or "RANK" in env:
            missing = [k for k in ("RANK", "WORLD_SIZE") if k not in env]
            if missing:
                raise DistributedError(f"environment: {' and '.join(missing)} not set (both RANK and WORLD_SIZE are needed)")
            rank, world = _int_env(env, "RANK"), _int_env(env, "WORLD_SIZE")
            local = _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
            source = "torchrun"
        elif "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_STEP_ID" in env):
            rank = _int_env(env, "SLURM_PROCID")
            world = _int_env(env, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS")
            local = _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
            source = "slurm"
        else:
            return None
        if world < 1 or not 0 <= rank < world:
            raise DistributedError(f"environment: rank {rank} is not in [0, world size {world})")
        if world == 1:
            return cls(0, 1, 0, source=source)
        addr = env.get("MASTER_ADDR") or (_slurm_first_host(env) if source == "slurm" else None)
        if not addr:
            raise DistributedError("environment: MASTER_ADDR not set (the address of rank 0 for the rendezvous)")
        if "MASTER_PORT" in env:
            port = _int_env(env, "MASTER_PORT")
        elif source == "slurm":
            port = 29500 + int(env.get("SLURM_JOB_ID", "0") or 0) % 1000
        else:
            raise DistributedError("environment: MASTER_PORT not set (the rendezvous port on MASTER_ADDR)")
        return cls(rank, world, local, addr, port, source)


def _int_env(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise DistributedError(f"environment: {name}={env[name]!r} is not an integer") from None


def _slurm_first_host(env: Mapping[str, str]) -> str | None:
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodes:
        return None
    try:  # the authoritative expansion, when Slurm's tools are on PATH
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return first_host(nodes)


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list: 'gpu[03-05,09],cpu1' -> 'gpu03'."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(3)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def timeout_from_env(default: float = DEFAULT_TIMEOUT_S) -> float:
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise DistributedError(f"environment: {TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise DistributedError(f"environment: {TIMEOUT_ENV} must be > 0 seconds, got {raw}")
    return value


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on `host` (for rank 0's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Group:
    """An initialised process group and where this rank computes."""

    rank: int
    world: int
    local_rank: int
    backend: str
    device: torch.device
    timeout_s: float
    pg: object = None  # the torch ProcessGroup (WORLD, or a sub-group of a mesh)
    ranks: tuple[int, ...] = ()  # global ranks of the members in group order (empty: WORLD, 0..world-1)
    failed: bool = field(default=False)
    comm_seconds: float = 0.0  # wall time inside collectives (stats; Ulysses' includes local attention)
    sent_bytes: dict = field(default_factory=dict)  # kind -> bytes this rank sent (stats; cluster.comm models them)
    _closed: bool = field(default=False, repr=False)

    @contextmanager
    def collective(self, what: str, kind: str | None = None, sent: int = 0):
        """Run a collective; a backend error (peer gone, timeout) becomes one clear DistributedError.
        `sent`: the bytes this rank puts on the wire, counted under `kind` (cluster.comm.KINDS)."""
        t0 = time.monotonic()
        try:
            yield
            self.comm_seconds += time.monotonic() - t0
            if kind is not None:
                self.sent_bytes[kind] = self.sent_bytes.get(kind, 0) + int(sent)
        except DistributedError:
            self.failed = True
            raise
        except RuntimeError as e:  # gloo/nccl errors (DistBackendError is a RuntimeError)
            self.failed = True
            raise self.error(what, e, time.monotonic() - t0) from e

    def error(self, what: str, e: BaseException, waited: float) -> DistributedError:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        msg = re.sub(r"^\[[^\]]*\]\s*", "", msg)  # drop the backend's source location
        msg = msg.split(" This is typically caused by")[0]  # and gloo's generic advice
        low = msg.lower()
        if "timed out" in low or "timeout" in low:
            cause = f"a peer rank stalled: no progress within the collective timeout of {self.timeout_s:g} s"
        elif any(s in low for s in ("connection", "reset", "closed", "broken pipe", "peer")):
            cause = "a peer rank died or closed its connection"
        else:
            cause = "the collective failed"
        return DistributedError(
            f"rank {self.rank}/{self.world}: {what} failed after {waited:.1f} s: {cause} ({msg})"
        )

    def global_rank(self, rank: int) -> int:
        """The global rank of member `rank` (point-to-point calls take global ranks)."""
        return self.ranks[rank] if self.ranks else rank

    def sub(self, ranks: list[int]) -> "Group":
        """This process's view of the sub-group `ranks` (global ranks), already created with new_group."""
        return replace(self, rank=ranks.index(self.global_rank(self.rank)), world=len(ranks), ranks=tuple(ranks),
                       comm_seconds=0.0, sent_bytes={}, failed=False)

    def barrier(self, what: str = "barrier") -> None:
        import torch.distributed as dist

        with self.collective(what):
            if self.backend == "nccl":
                dist.barrier(group=self.pg, device_ids=[self.device.index or 0])
            else:
                dist.barrier(group=self.pg)

    def teardown(self, ok: bool = True) -> None:
        """Barrier then destroy after a clean run; destroy only when a peer may be gone."""
        import torch.distributed as dist

        if self._closed:
            return
        self._closed = True
        if not dist.is_initialized():
            return
        try:
            if ok and not self.failed:
                self.barrier("teardown barrier")
        finally:
            dist.destroy_process_group()
            global TORN_DOWN
            TORN_DOWN = True


# Set once a process group was destroyed in this process. A gloo group can leave C++ threads that
# abort the interpreter's exit ("terminate called without an active exception", SIGABRT) even after
# a barrier and destroy: the CLI then leaves with os._exit once its outputs are flushed.
TORN_DOWN = False


def pick_backend(device: str | torch.device | None) -> tuple[str, torch.device]:
    dev = torch.device(device or "cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedError("device: cuda requested but torch sees no CUDA device")
        return "nccl", dev
    return "gloo", torch.device("cpu")


def init(
    env: DistEnv | None = None,
    *,
    device: str | torch.device | None = "cpu",
    backend: str | None = None,
    timeout_s: float | None = None,
    threads: int | None = None,
) -> Group:
    """Start (or join) the default process group described by `env` (default: the environment)."""
    import torch.distributed as dist

    env = env or DistEnv.from_env() or DistEnv(0, 1)
    timeout_s = float(timeout_s) if timeout_s is not None else timeout_from_env()
    auto_backend, dev = pick_backend(device)
    backend = backend or auto_backend
    if backend == "nccl":
        n = torch.cuda.device_count()
        if dev.index is None:
            dev = torch.device("cuda", env.local_rank % max(n, 1))
        torch.cuda.set_device(dev)
    if threads is not None:
        torch.set_num_threads(int(threads))
    if dist.is_initialized():
        if dist.get_rank() != env.rank or dist.get_world_size() != env.world:
            raise DistributedError(
                f"a process group is already initialised as rank {dist.get_rank()}/{dist.get_world_size()}, "
                f"not {env.rank}/{env.world}"
            )
        return Group(env.rank, env.world, env.local_rank, dist.get_backend(), dev, timeout_s, dist.group.WORLD)
    t0 = time.monotonic()
    try:
        _rendezvous(lambda: dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{_host(env.master_addr)}:{env.master_port}",
            rank=env.rank,
            world_size=env.world,
            timeout=timedelta(seconds=timeout_s),
        ), f"rank {env.rank}/{env.world}", f"{env.master_addr}:{env.master_port}")
    except (RuntimeError, ValueError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(
            f"rank {env.rank}/{env.world}: rendezvous at {env.master_addr}:{env.master_port} ({backend}) failed "
            f"after {time.monotonic() - t0:.1f} s: {msg}"
        ) from e
    return Group(env.rank, env.world, env.local_rank, backend, dev, timeout_s, dist.group.WORLD)


def _rendezvous(join, who: str, where: str) -> None:
    """Run `join` (init_process_group, which waits inside C++ for every peer and so cannot see a
    signal) on a helper thread while this thread waits interruptibly: SIGTERM / SIGINT while a peer
    is missing end the rank at once with one line, instead of after the rendezvous timeout. The
    blocked helper dies with the process (the CLI then leaves with os._exit, see TORN_DOWN)."""
    import threading

    from scopevid import interrupts
    from scopevid.errors import Stopped

    if threading.current_thread() is not threading.main_thread():  # a Ray actor, a test thread: no signals here
        join()
        return
    failure: list[BaseException] = []

    def run() -> None:
        try:
            join()
        except BaseException as e:  # handed to the waiting thread
            failure.append(e)

    t = threading.Thread(target=run, name="scopevid-rendezvous", daemon=True)
    t.start()
    try:
        with interrupts.interruptible():
            while t.is_alive():
                t.join(0.2)
    except Stopped as e:
        global TORN_DOWN
        TORN_DOWN = True
        raise Stopped(f"{who}: {e.args[0].split(';')[0]} while waiting at the rendezvous {where} for the other ranks") from None
    if failure:
        raise failure[0]


def _host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr


@dataclass
class ParallelState:
    """One rank's place in the mesh, built once per job (`build_state`): the layout (scopevid.mesh:
    every rank's coordinates, groups, shard, ring part and branch) and this rank's process groups.
    The topology, ring attention and batch groups ask it; none does rank arithmetic of its own.

    Groups (cluster.groups.Group): `video` every rank of this video (control flags, digests, the
    writer), `sp` the ranks of one forward (its shards), `cfg` the rank with the other guidance
    branch of the same shard, `ulysses` the ranks of one all-to-all, `ring` the ranks the K/V blocks
    pass round. Groups with the same members are one Group; a group of one has no process group.
    `node`: the ranks on this rank's machine, lowest global rank first (weights are read once per node,
    cluster.weights); not a mesh axis, and not among `groups()` (it carries no rollout traffic)."""

    layout: MeshLayout
    world: Group
    video: Group
    sp: Group
    cfg: Group
    ulysses: Group
    ring: Group
    node: Group

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def replica(self) -> int:
        return self.layout.replica(self.rank)

    @property
    def branch(self) -> str | None:
        return self.layout.branch(self.rank)

    def shard(self, n: int) -> tuple[int, tuple[int, int]]:
        """(padded length, this rank's [lo, hi) slots) of a forward of n frames."""
        return self.layout.shard(n, self.rank)

    def ring_parts(self, n_pad: int) -> list[tuple[int, int]]:
        """The [lo, hi) slots of every ring member's queries in a padded forward, in ring order."""
        return [self.layout.ring_part(n_pad, i) for i in range(self.layout.ring)]

    def groups(self) -> list[Group]:
        """Every distinct group this rank belongs to (each once)."""
        out: list[Group] = []
        for g in (self.world, self.video, self.sp, self.cfg, self.ulysses, self.ring):
            if all(g is not x for x in out):
                out.append(g)
        return out


def build_state(world: Group, layout: MeshLayout) -> ParallelState:
    """Create every process group of `layout` on `world` and return this rank's ParallelState. Each
    rank creates all of them, in one order, as torch.distributed.new_group requires; groups of one
    rank need none, and a member set that recurs (sp = ulysses without a ring) is created once."""
    import torch.distributed as dist

    from scopevid.mesh import GROUPS

    if layout.world != world.world:
        raise ConfigError(f"parallel: the mesh {layout.label} has {layout.world} ranks, the job {world.world}")
    made: dict[tuple[int, ...], Group] = {}  # this rank's groups
    created: set[tuple[int, ...]] = set()  # every member set seen, on every rank alike
    for kind in GROUPS:
        for members in layout.groups(kind):
            if members in created:
                continue
            created.add(members)
            if len(members) == world.world:
                pg = world.pg
            elif len(members) == 1:
                pg = None
            else:
                pg = dist.new_group(list(members), timeout=timedelta(seconds=world.timeout_s))
            if world.rank in members:
                made[members] = replace(world.sub(list(members)), pg=pg) if pg is not world.pg else world
    mine = {kind: made[layout.group(kind, world.rank)] for kind in GROUPS}
    return ParallelState(layout, world, **mine, node=node_group(world))


def node_key() -> str:
    return os.environ.get(NODE_ENV) or socket.gethostname()


def node_group(world: Group) -> Group:
    """This rank's node group: the ranks gather their node keys and the ranks of each node form one group
    (every rank creates all of them, in one order, as new_group requires), members in global rank order."""
    import torch.distributed as dist

    keys = [node_key()] * world.world
    if world.world > 1:
        with world.collective("gathering node names"):
            dist.all_gather_object(keys, node_key(), group=world.pg)
    nodes: dict[str, list[int]] = {}
    for r, k in enumerate(keys):
        nodes.setdefault(k, []).append(r)
    mine = world
    for members in nodes.values():
        if len(members) == world.world:
            continue
        pg = dist.new_group(members, timeout=timedelta(seconds=world.timeout_s)) if len(members) > 1 else None
        if world.rank in members:
            mine = replace(world.sub(members), pg=pg)
    return mine
