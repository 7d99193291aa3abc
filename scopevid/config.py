"""One typed, validated config per run, loaded from a YAML preset plus command-line overrides.

Bad values fail at load time with a one-line ConfigError naming the field and what is allowed,
never with a traceback from deep inside a rollout. Numbers from the paper live in configs/*.yaml.
"""

from __future__ import annotations

from dataclasses import field, fields, replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, ValidationError
from pydantic.dataclasses import dataclass

from scopevid.errors import ConfigError

SCHEDULES = ("diffusion_forcing", "chunk_causal")
SELECTIVE = ("off", "paper", "causal")
SOLVERS = ("euler", "unipc")
NOISE = ("per_frame", "diffusers")
ATTENTION = ("sdpa", "math", "flash", "xformers")  # adapters.attention.BACKENDS  # initial noise: our per-frame generators, or diffusers' DF pipeline's draws
DTYPES = ("float32", "bfloat16", "float16")
CFG_MODES = ("sequential", "batched")
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a seed fits a signed 64-bit integer (torch's generators, Parquet's int64)


# Types checked by pydantic (strict: a string is not a number, None is not a prompt; unknown keys are
# refused by `_build` with the allowed list); value ranges and cross-field rules by `validate`.
TYPED = ConfigDict(strict=True, arbitrary_types_allowed=False)


@dataclass(frozen=True, config=TYPED)
class ScheduleConfig:
    kind: str = "diffusion_forcing"
    steps: int = 20
    # diffusion forcing (SkyReels-V2), sizes in pixel frames like the official API
    base_num_frames: int = 16
    overlap_history: int = 4
    ar_step: int = 0
    causal_block_size: int = 1
    selective: str = "off"
    interval: int | None = None  # B of Eq. 9 in latent frames (selective: paper); None = window
    # chunk-causal (MAGI-1), in latent frames
    chunk_width: int = 6
    window_size: int = 4
    context_chunks: int = 4


@dataclass(frozen=True, config=TYPED)
class ParallelConfig:
    """How a job's ranks share the work (`parallel:`; CLI `--parallel cfg=2,ulysses=2`).

    dp: rank groups making different videos of a batch at once. cfg: 2 puts the two classifier-free
    guidance branches on two rank groups that exchange one velocity per forward. ulysses: ranks
    splitting each forward's attention heads (must divide the head counts); None takes what the
    world size leaves. ring: ranks passing K/V blocks round a ring over the sequence (any head
    count; with ulysses, USP). cfg_mode: with both branches on one rank group, run them one after the
    other (sequential) or as one batched forward (batched; the tiny model). The rank layout, and the
    check of a mesh against a job's ranks and a model's heads, live in scopevid.mesh."""

    dp: int = 1
    cfg: int = 1
    ulysses: int | None = None
    ring: int = 1
    cfg_mode: str = "sequential"  # the branches on one rank group: one after the other, or batched in one forward

    def check(self) -> None:
        """Each field in its range, whatever the world size (scopevid.mesh checks the rest): one line
        naming the allowed values."""
        for name in ("dp", "ring") + (("ulysses",) if self.ulysses is not None else ()):
            v = getattr(self, name)
            _check(_int(v) and v >= 1, f"parallel.{name}", f"must be a positive integer, got {v!r}")
        _check(self.cfg in (1, 2) and _int(self.cfg), "parallel.cfg",
               f"must be 1 or 2 (the guidance branches on one or two rank groups), got {self.cfg!r}")
        _check(self.cfg_mode in CFG_MODES, "parallel.cfg_mode", f"must be one of {', '.join(CFG_MODES)}, got {self.cfg_mode!r}")


@dataclass(frozen=True, config=TYPED)
class RunConfig:
    model: dict
    schedule: ScheduleConfig
    prompt: str = ""
    negative_prompt: str | None = None
    guidance: float = 1.0
    frames: int = 16
    fps: int = 16
    seed: int = 0
    solver: str = "euler"
    policy: str = "original"
    policies: dict = field(default_factory=dict)  # name -> policy spec (from the presets file)
    dtype: str = "float32"
    device: str = "cpu"
    stability: dict = field(default_factory=lambda: {"clip": 1.0, "explode": 4.0, "max_velocity": 1000.0})
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # per_frame: each frame its own seeded generator (the same video for any windowing or mesh);
    # diffusers: one generator seeded with `seed`, one draw of the whole window per window, exactly as
    # SkyReelsV2DiffusionForcingPipeline(generator=torch.Generator().manual_seed(seed)) draws (parity)
    noise: str = "per_frame"
    attention: str = "sdpa"  # the self-attention backend: sdpa | math | flash | xformers (adapters.attention)
    source: str = ""  # the YAML it came from

    @property
    def guided(self) -> bool:
        """Classifier-free guidance on: two branches per velocity (the pipelines' guidance_scale > 1)."""
        return guided(self.guidance)

    def policy_spec(self, name: str | None = None) -> dict:
        name = name or self.policy
        if name not in self.policies:
            raise ConfigError(f"policy: unknown {name!r}; presets for this model: {', '.join(sorted(self.policies))}")
        return dict(self.policies[name])

    def with_overrides(self, **kw: Any) -> "RunConfig":
        kw = {k: v for k, v in kw.items() if v is not None}
        try:
            cfg = replace(self, **kw)
        except ValidationError as e:
            raise _one_line(e, "") from None
        validate(cfg)
        return cfg

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["schedule"] = {f.name: getattr(self.schedule, f.name) for f in fields(self.schedule)}
        out["parallel"] = {f.name: getattr(self.parallel, f.name) for f in fields(self.parallel)}
        return out

    def to_yaml(self) -> str:
        """The resolved config as a YAML file that `load` reads back to an equal config (no `source`)."""
        import json

        d = {k: v for k, v in self.to_dict().items() if k != "source"}
        return yaml.safe_dump(json.loads(json.dumps(d, default=str)), sort_keys=False)


def differences(old, new, path: str = "") -> list[tuple[str, object, object]]:
    """(dotted field path, old value, new value) of every leaf that differs between two JSON-like
    values, depth first: what a refused resume names, instead of printing whole sections."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += differences(old.get(k), new.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if old == new else [(path or "value", old, new)]


def describe_differences(diff: list[tuple[str, object, object]], then: str = "when the run started") -> str:
    """'frames was 17 {then} and is 9 now' for the first difference, and how many more there are."""
    def short(v) -> str:
        text = repr(v)
        return text if len(text) <= 80 else text[:77] + "..."

    key, a, b = diff[0]
    more = f" (and {len(diff) - 1} more: {', '.join(k for k, _, _ in diff[1:4])}{', ...' if len(diff) > 4 else ''})" \
        if len(diff) > 1 else ""
    return f"{key} was {short(a)} {then} and is {short(b)} now{more}"


def guided(guidance: float) -> bool:
    """Whether a guidance scale runs two branches (cond and uncond): the diffusers pipelines'
    `do_classifier_free_guidance` (guidance_scale > 1), for every adapter."""
    return float(guidance) > 1.0


def _read_mapping(path: Path, field: str) -> dict:
    """A YAML file that must hold a mapping: one ConfigError line for a missing, binary, non-UTF-8 or
    malformed file, or one whose top level is not a mapping."""
    if path.is_dir():
        raise ConfigError(f"{field}: {path} is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"{field}: no such file {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{field}: {path} is not UTF-8 text (byte {e.start}); is it a binary file?") from None
    except OSError as e:
        raise ConfigError(f"{field}: cannot read {path} ({e.strerror or e})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{field}: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if raw is None:
        raise ConfigError(f"{field}: {path} is empty (or only comments); it must hold a mapping")
    if not isinstance(raw, dict):
        raise ConfigError(f"{field}: {path} must hold a mapping at top level, not a {type(raw).__name__}")
    return dict(raw)


def load(path: str | Path) -> RunConfig:
    path = Path(path)
    raw = _read_mapping(path, "config")
    presets = raw.pop("policy_presets", None)
    policies = raw.pop("policies", {}) or {}
    if not isinstance(policies, dict):
        raise ConfigError(f"policies: must be a mapping of preset name to policy, not a {type(policies).__name__}")
    policies = dict(policies)
    if presets:
        if not isinstance(presets, str):
            raise ConfigError(f"policy_presets: must be a file path, got {presets!r}")
        policies = {**_read_mapping((path.parent / presets).resolve(), "policy_presets"), **policies}
    bad = sorted(str(k) for k, v in policies.items() if not isinstance(v, dict))
    if bad:
        raise ConfigError(f"policies.{bad[0]}: a preset must be a mapping with a `kind` (e.g. {{kind: scope, ...}})")
    policies.setdefault("original", {"kind": "original"})
    sched_raw = raw.pop("schedule", {}) or {}
    sched = _build(ScheduleConfig, sched_raw, "schedule.")
    par_raw = raw.pop("parallel", {}) or {}
    if not isinstance(par_raw, dict):
        raise ConfigError(f"parallel: must be a mapping (e.g. {{cfg: 2, ulysses: 2}}), not a {type(par_raw).__name__}")
    par = _build(ParallelConfig, par_raw, "parallel.")
    if "model" not in raw or not isinstance(raw["model"], dict) or "kind" not in raw["model"]:
        raise ConfigError("model: a mapping with at least `kind` is required")
    cfg = _build(RunConfig, {**raw, "schedule": sched, "parallel": par, "policies": policies, "source": str(path)}, "")
    validate(cfg)
    return cfg


def _build(cls, raw: dict, prefix: str):
    names = {f.name: f for f in fields(cls)}
    for k in raw:
        if k not in names:
            raise ConfigError(f"{prefix}{k}: unknown field; allowed: {', '.join(n for n in names if n != 'source')}")
    try:
        return cls(**raw)
    except ValidationError as e:
        raise _one_line(e, prefix) from None
    except TypeError as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def _one_line(e: ValidationError, prefix: str) -> ConfigError:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    return ConfigError(f"{prefix}{loc}: {err['msg'].lower()} (got {err.get('input')!r})")


def _check(ok: bool, name: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {why}")


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def validate(cfg: RunConfig) -> None:
    s = cfg.schedule
    _check(_int(cfg.frames) and cfg.frames >= 1, "frames", f"must be a positive integer, got {cfg.frames!r}")
    _check(_int(cfg.seed) and SEED_MIN <= cfg.seed <= SEED_MAX, "seed",
           f"must be an integer from {SEED_MIN} to {SEED_MAX} (signed 64-bit, as the batch manifest stores it), got {cfg.seed!r}")
    _check(_int(cfg.fps) and cfg.fps >= 1, "fps", f"must be a positive integer, got {cfg.fps!r}")
    _check(isinstance(cfg.guidance, (int, float)) and cfg.guidance >= 0, "guidance", f"must be a number >= 0, got {cfg.guidance!r}")
    _check(cfg.solver in SOLVERS, "solver", f"must be one of {', '.join(SOLVERS)}, got {cfg.solver!r}")
    _check(cfg.attention in ATTENTION, "attention", f"must be one of {', '.join(ATTENTION)}, got {cfg.attention!r}")
    _check(cfg.noise in NOISE, "noise", f"must be one of {', '.join(NOISE)}, got {cfg.noise!r}")
    _check(cfg.noise != "diffusers" or cfg.schedule.kind == "diffusion_forcing", "noise",
           "diffusers draws the diffusion forcing pipeline's noise; a chunk_causal schedule uses per_frame")
    _check(cfg.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    _check(cfg.device == "cpu" or str(cfg.device).startswith("cuda"), "device", f"must be cpu or cuda[:N], got {cfg.device!r}")
    _check(s.kind in SCHEDULES, "schedule.kind", f"must be one of {', '.join(SCHEDULES)}, got {s.kind!r}")
    _check(_int(s.steps) and s.steps >= 1, "schedule.steps", f"must be a positive integer, got {s.steps!r}")
    _check(s.selective in SELECTIVE, "schedule.selective", f"must be one of {', '.join(SELECTIVE)}, got {s.selective!r}")
    for name in ("base_num_frames", "causal_block_size", "chunk_width", "window_size"):
        v = getattr(s, name)
        _check(_int(v) and v >= 1, f"schedule.{name}", f"must be a positive integer, got {v!r}")
    for name in ("overlap_history", "ar_step", "context_chunks"):
        v = getattr(s, name)
        _check(_int(v) and v >= 0, f"schedule.{name}", f"must be an integer >= 0, got {v!r}")
    cfg.parallel.check()
    _check(cfg.policy in cfg.policies, "policy", f"unknown {cfg.policy!r}; presets for this model: {', '.join(sorted(cfg.policies))}")
    check_presets(cfg.policies)
    check_size(cfg)
    from scopevid.scheduler.predictors import Stability

    allowed = [f.name for f in fields(Stability)]
    unknown = sorted(str(k) for k in set(cfg.stability) - set(allowed))
    _check(not unknown, f"stability.{unknown[0] if unknown else ''}", f"unknown field; allowed: {', '.join(allowed)}")
    Stability(**cfg.stability)  # its own checks name the field (type and range)


# Bytes of the rollout's bookkeeping, measured with tracemalloc (2026-12): a diffusion-forcing plan
# holds ~40 B per latent frame (its windows) and, for the window being denoised, ~90 B per step per
# window frame (its step matrix); noise-level and solver tables ~200 B per step.
PLAN_BYTES_PER_FRAME, PLAN_BYTES_PER_STEP_FRAME, TABLE_BYTES_PER_STEP = 40, 90, 200
MEMORY_SHARE = 0.25  # of physical memory the bookkeeping alone may take before a run is refused


def check_size(cfg: RunConfig) -> None:
    """Refuse frame and step counts whose bookkeeping alone would not fit in memory, before any
    allocation (a billion steps used to reach 6 GB before the first iteration), with the estimate."""
    import os

    s = cfg.schedule
    frames = cfg.frames  # latent frames <= pixel frames: an upper bound whatever the model's compression
    width = s.base_num_frames if s.kind == "diffusion_forcing" else s.chunk_width * s.window_size
    est = (PLAN_BYTES_PER_FRAME * frames + PLAN_BYTES_PER_STEP_FRAME * width * (s.steps + width * max(s.ar_step, 1))
           + TABLE_BYTES_PER_STEP * s.steps)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # not POSIX: no bound to derive
        return
    limit = MEMORY_SHARE * memory
    if est > limit:
        field = "frames" if PLAN_BYTES_PER_FRAME * frames > est / 2 else "schedule.steps"
        raise ConfigError(f"{field}: {frames} frames x {s.steps} steps need about {est / 2**30:.1f} GiB for the plan and "
                          f"noise tables alone, over {MEMORY_SHARE:.0%} of this machine's {memory / 2**30:.0f} GiB; "
                          "use fewer frames or steps")


def check_presets(policies: dict) -> None:
    """Every preset of the file builds, not only the chosen one: a bad value in the preset that
    `--compare` or a later `--policy` picks fails here, before any work, not after a reference run."""
    from scopevid.scheduler import policies as policy_lib

    for name, spec in policies.items():
        try:
            policy_lib.build(spec, name)
        except ConfigError as e:
            msg = str(e)
            raise ConfigError(msg if msg.startswith(f"policy {name}") else f"policy {name}: {msg}") from None
