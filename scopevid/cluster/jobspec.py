"""What a Ray job is asked to do (`JobSpec`, from the driver's command line) and the run config it
resolves to: the YAML with the command-line overrides for a new job, the job's own DIR/config.yaml
for a resumed one (overrides that would change it are refused, naming what differs)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from scopevid.errors import CheckpointError, ConfigError

CONFIG_FILE = "config.yaml"


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


def with_overrides(spec: JobSpec, cfg):
    """The config with the job's command-line overrides."""
    from scopevid.mesh import parse

    sched = cfg.schedule if spec.steps is None else replace(cfg.schedule, steps=spec.steps)
    parallel = parse(spec.parallel) if spec.parallel else None
    return cfg.with_overrides(frames=spec.frames, policy=spec.policy, seed=spec.seed, prompt=spec.prompt,
                              schedule=sched, parallel=parallel)


def resolve_config(spec: JobSpec):
    """The RunConfig of the job: YAML + overrides (new job) or DIR/config.yaml (resume)."""
    from scopevid import config as config_lib

    if not spec.resume:
        return with_overrides(spec, config_lib.load(spec.config))
    saved_path = spec.out / CONFIG_FILE
    if not saved_path.is_file():
        raise CheckpointError(f"resume: {saved_path} not found: {spec.out} is not the output directory of a driver job")
    saved = config_lib.load(saved_path)
    if spec.config is not None or any(v is not None for v in (spec.frames, spec.policy, spec.seed, spec.steps, spec.prompt,
                                                               spec.parallel)):
        given = with_overrides(spec, config_lib.load(spec.config) if spec.config else saved)
        a, b = _comparable(saved.to_dict()), _comparable(given.to_dict())
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            raise ConfigError(f"resume: {', '.join(diff)} differ(s) from the job in {spec.out}; a job resumes with its own "
                              "config (omit --config and overrides)")
    return saved


def write_config(cfg, out: Path) -> None:
    """DIR/config.yaml: the resolved config a resume reloads."""
    from scopevid.engine.files import atomic_write_text

    atomic_write_text(out / CONFIG_FILE, cfg.to_yaml())


def _comparable(d: dict) -> dict:
    d = {k: v for k, v in d.items() if k != "source"}
    return json.loads(json.dumps(d, default=str))
