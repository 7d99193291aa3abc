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
from scopevid.errors import NonFiniteError, RanksDisagree, ScopevidError, StopRequested


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
          threads: int | None = None, mesh: ParallelConfig | None = None, layout=None,
          batch: bool = False) -> tuple[Group, MeshTopology]:
    """Process group + topology for one rank; checks that every rank has the same config.
    The mesh: `mesh`, else the config's `parallel`, else Ulysses over every rank; validated (with the
    model's heads and guidance when `cfg` is given) before the rendezvous, so a bad mesh is one line
    on every rank and no rank waits for a peer that gave up. `layout`: that check's result, when the
    caller made it; `batch`: a test harness's mesh may have rank groups (dp)."""
    from scopevid.mesh import MeshLayout

    if layout is not None:
        pass
    elif cfg is not None:
        from scopevid import adapters

        layout = adapters.preflight(cfg, env.world, parallel=mesh)
    else:
        layout = MeshLayout.resolve(mesh or ParallelConfig(), env.world, batch=batch)
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
    from scopevid import adapters
    from scopevid.cluster.ranklog import RankLog, RankProgress

    layout = adapters.preflight(cfg, env.world)  # a bad mesh: one line on every rank, before anything
    log = RankLog(Path(out), env.rank, layout)
    try:
        with log.phase(f"joining the process group at {env.master_addr}:{env.master_port}"):
            group, topo = start(env, cfg, backend=backend, timeout_s=timeout_s, threads=threads, layout=layout)
        with log.phase("the run"):
            summary = _run_in_group(group, topo, cfg, out, compare=compare, overwrite=overwrite, progress=progress,
                                    check_decisions=check_decisions, observers=[RankProgress(log)], **generate_kw)
        log.line(f"done: {summary.get('iterations')} iterations, counts {summary.get('counts')}, "
                 f"{summary.get('wall_seconds', 0):.1f} s of rollout")
        return summary
    finally:
        log.close()


def _run_in_group(group: Group, topo: MeshTopology, cfg, out, *, compare, overwrite, progress, check_decisions,
                  **generate_kw) -> dict:
    """Rank 0 vets the output directory for every rank, every rank generates, the group is torn down."""
    from scopevid.engine.runner import generate
    from scopevid.engine.sinks import prepare_out_dir

    ok = agreed = False
    try:
        refusal = None
        ckpt = generate_kw.get("checkpoint")
        resuming = ckpt is not None and ckpt.resume  # the checkpointer owns the directory then
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
        # rank 0 vetted the directory above for every rank (a resume: the checkpointer vets it)
        summary = generate(cfg, out, compare=compare, overwrite=True, topology=topo, progress=progress,
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
        # raised by every rank together, after collectives that succeeded (a NaN velocity is seen in the
        # gathered velocities, a stop is agreed): peers are alive, so teardown can use its barrier
        agreed = True
        raise
    finally:
        group.teardown(ok=ok or agreed)


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
