"""One rank of a sequence-parallel generation: the API that torchrun (via `scopevid generate`), the Ray
driver and Slurm steps all call.

    summary = run_rank(cfg, out, rank, world, master_addr, master_port)   # Ray actor i
    summary = run_from_env(cfg, out)                                      # torchrun / srun

Every rank runs the same rollout; rank 0 writes DIR/video.mp4, steps.parquet and summary.json as
frames finish. Before the rollout, ranks check they were started with the same config (a mismatch
is a one-line DistributedError, not a silent divergence) and rank 0 vets the output directory for
all (a refusal there is raised on every rank, so no rank waits for a peer that has already given up).
A failure on any rank ends every rank within the collective timeout: the writer's `finally` closes the
MP4 and the run log, so what was written stays readable.
"""

from __future__ import annotations

from pathlib import Path

from scopevid.cluster import consensus
from scopevid.cluster.groups import DistEnv, Group, build_state, init
from scopevid.cluster.sequence import MeshTopology
from scopevid.config import ParallelConfig
from scopevid.errors import DistributedError, NonFiniteError, RanksDisagree, ScopevidError, StopRequested


def run_rank(
    cfg,
    out: str | Path,
    rank: int,
    world: int,
    master_addr: str,
    master_port: int,
    *,
    local_rank: int | None = None,
    backend: str | None = None,
    timeout_s: float | None = None,
    threads: int | None = None,
    compare: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    check_decisions: bool = False,
    **generate_kw,
) -> dict:
    """Join the group as `rank` of `world` (rendezvous at master_addr:master_port), generate, tear down.

    Returns the run summary (rank 0's includes the written files' statistics; every rank's has the
    decision digest). Raises DistributedError when a peer dies or stalls, or ranks disagree. Further
    keywords (e.g. `checkpoint=`) go to `engine.runner.generate`."""
    env = DistEnv(rank, world, rank if local_rank is None else local_rank, master_addr, int(master_port))
    return _run(cfg, out, env, backend=backend, timeout_s=timeout_s, threads=threads, compare=compare,
                overwrite=overwrite, progress=progress, check_decisions=check_decisions, **generate_kw)


def run_from_env(cfg, out: str | Path, **kw) -> dict:
    """The same, with rank/world/rendezvous from the launcher's environment (torchrun, srun)."""
    env = DistEnv.from_env() or DistEnv(0, 1)
    return _run(cfg, out, env, **kw)


def start(env: DistEnv, cfg=None, *, backend: str | None = None, timeout_s: float | None = None,
          threads: int | None = None, mesh: ParallelConfig | None = None) -> tuple[Group, MeshTopology]:
    """Process group + topology for one rank; checks that every rank has the same config.
    The mesh: `mesh`, else the config's `parallel`, else Ulysses over every rank; validated (with the
    model's heads and guidance when `cfg` is given) before the rendezvous, so a bad mesh is one line
    on every rank and no rank waits for a peer that gave up."""
    from scopevid.mesh import MeshLayout

    if cfg is not None:
        from scopevid import adapters

        layout = adapters.preflight(cfg, env.world, parallel=mesh)
    else:
        layout = MeshLayout.resolve(mesh or ParallelConfig(), env.world)
    device = cfg.device if cfg is not None else "cpu"
    group = init(env, device=device, backend=backend, timeout_s=timeout_s, threads=threads)
    try:
        topo = MeshTopology(build_state(group, layout))
        if cfg is not None:
            settings = {k: v for k, v in cfg.to_dict().items() if k != "source"}  # the YAML's path may differ per node
            consensus.check_same(group, settings, "run config (every rank must load the same config, seed and overrides)")
    except RanksDisagree:
        group.teardown(ok=True)  # every rank got here after a successful gather: a barrier is safe
        raise
    except BaseException:
        group.teardown(ok=False)
        raise
    return group, topo


def _run(cfg, out, env: DistEnv, *, backend=None, timeout_s=None, threads=None, compare=False, overwrite=False,
         progress=False, check_decisions=False, **generate_kw) -> dict:
    from scopevid.engine.runner import generate
    from scopevid.engine.sinks import prepare_out_dir

    group, topo = start(env, cfg, backend=backend, timeout_s=timeout_s, threads=threads)
    ok = agreed = False
    restore = _raise_on_sigterm(group.rank, group.world)
    try:
        refusal = None
        resuming = generate_kw.get("checkpoint") is not None  # the checkpointer owns the directory then
        if group.rank == 0 and not resuming:
            try:
                prepare_out_dir(out, overwrite)
            except ScopevidError as e:
                refusal = (type(e).__name__, str(e))
        verdicts = consensus.gather_objects(group, refusal, "output directory check")
        if verdicts[0] is not None:
            from scopevid import errors

            cls = getattr(errors, verdicts[0][0], ScopevidError)
            agreed = True  # every rank saw the same verdict: peers are alive
            raise cls(verdicts[0][1])
        summary = generate(cfg, out, compare=compare, overwrite=overwrite or not resuming, topology=topo, progress=progress,
                           check_decisions=check_decisions, **generate_kw)
        summary["rank"] = group.rank
        summary["sequence_parallel"] = {
            "world_size": group.world,
            "backend": group.backend,
            "handovers": topo.handovers,
            "migrated_frames": topo.migrated_frames,
        }
        if group.rank == 0 and (Path(out) / "summary.json").exists():
            from scopevid.engine.sinks import write_json

            write_json(Path(out) / "summary.json", summary)
        ok = True
        return summary
    except (RanksDisagree, NonFiniteError, StopRequested):
        # both are raised by every rank together, after collectives that succeeded (a NaN velocity is
        # seen in the gathered velocities): peers are alive, so teardown can use its barrier
        agreed = True
        raise
    finally:
        try:
            group.teardown(ok=ok or agreed)
        finally:
            restore()


def _raise_on_sigterm(rank: int, world: int):
    """torchrun (and Slurm) stop the surviving ranks with SIGTERM when one fails; Python's default
    action would end the process at once, skipping the writer's `finally` (MP4 trailer, run log).
    Raise instead, so outputs are closed and the error is one line. Returns the undo function."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process
        raise DistributedError(f"rank {rank}/{world}: stopped by SIGTERM (the launcher ends the job, usually "
                               "because another rank failed: see its log)")

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def collect_rollout(topology, cfg, policy: str | None = None, *, check_decisions: bool = True) -> dict:
    """Run one rollout in memory (no files) under `topology` and return every clean latent in order,
    the per-iteration decisions and the wall time: what tests and `bench sp` compare across world sizes.

    `cfg` is a RunConfig or a path to its YAML."""
    import time

    import torch

    from scopevid import adapters
    from scopevid import config as config_lib
    from scopevid.engine import runner
    from scopevid.engine.rollout import Records, decision_digest
    from scopevid.scheduler import policies as policy_lib

    if not isinstance(cfg, config_lib.RunConfig):
        cfg = config_lib.load(cfg)
    name = policy or cfg.policy
    dtype = runner.DTYPES[cfg.dtype]
    adapter = adapters.load(cfg.model, cfg.device, dtype, weights=topology.weights)
    plan = runner.build_plan(cfg, adapter)
    spec = cfg.policy_spec(name)
    cond = adapter.encode_prompt(cfg.prompt, cfg.negative_prompt, cfg.guidance)
    watch = Records()
    ro = runner.make_rollout(cfg, adapter, plan, policy_lib.build(spec, name), cond, predictor=spec.get("predictor", "taylor2"),
                             topology=topology, observers=[watch], check_decisions=check_decisions)
    records = watch.records
    sent0 = topology.comm_bytes()  # the groups' counters run on over several rollouts
    t0, c0 = time.perf_counter(), time.process_time()
    out = list(ro.run())
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "frames": [i for i, _ in out],
        "latents": torch.stack([x.cpu() for _, x in out]),
        "modes": [r.mode for r in records],
        "records": [(r.serial, r.mode, r.reason, r.d, r.r, r.compute_lo, r.compute_hi) for r in records],
        "digest": decision_digest(records),
        "counts": dict(ro.state.stats.counts),
        "frame_forwards": ro.state.stats.frame_forwards,
        "wall_seconds": wall,
        "cpu_seconds": cpu,  # this process's CPU time (all its threads): the work, whatever the contention
        "latent_frames": plan.latent_frames,
        "handovers": topology.state_dict().get("handovers", 0),
        "migrated_frames": topology.state_dict().get("migrated_frames", 0),
        "comm_bytes": {k: v - sent0.get(k, 0) for k, v in topology.comm_bytes().items() if v - sent0.get(k, 0)},
        "attention_shape": adapter.attention_shape(),
        "guided": cond.branches == 2,
        "frame_elems": adapter.latent_channels * adapter.latent_hw[0] * adapter.latent_hw[1],
        "forwards": dict(ro.runner.forwards),
    }


def collect_rollout_many(topology, cases: list, check_decisions: bool = True) -> list[dict]:
    """`collect_rollout` for several (cfg, policy) pairs in one process group (saves start-up in tests)."""
    return [collect_rollout(topology, c, p, check_decisions=check_decisions) for c, p in cases]
