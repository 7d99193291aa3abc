"""What a benchmark runs and how one run becomes one row of bench.parquet.

Every (frames, seed) pair first runs the reference, Original as the official pipelines run it
(runner.reference_config: selective computation off), and keeps its frames; every variant then runs
on the same seed and prompt and is compared with it frame by frame (PSNR/SSIM per frame in [0, 1],
averaged: engine/metrics.py). A variant is a policy preset, possibly with one setting changed for an
ablation (selective on/off, predictor, H, thresholds).

Selective computation is SCOPE's component: SCOPE variants run with it as `--selective` says; the
baselines run as their public code does (the whole valid interval forwarded), except FlowCache, whose
own chunk skipping forwards only the active chunks (policies/flowcache.py).
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from scopevid.config import RunConfig, validate
from scopevid.engine.runner import reference_config, run_once
from scopevid.engine.sinks import FrameStore
from scopevid.errors import ConfigError
from scopevid.scheduler.policies import build as build_policy

ROW_FIELDS = [
    "model", "policy", "base_policy", "kind", "sweep", "frames", "seed", "selective", "predictor", "horizon",
    "tau_c", "tau_p", "decay", "feature", "wall_seconds", "speedup", "cpu_seconds", "cpu_speedup", "forwards", "frame_forwards", "flops", "flops_speedup",
    "psnr", "ssim", "latent_snr", "lpips", "peak_memory_mb", "memory_kind", "recompute", "cache", "predict", "fallbacks",
    "iterations", "decision_digest", "threads", "loop_seconds", "forward_seconds", "feature_seconds", "engine_overhead_share",
]


@dataclass(frozen=True)
class Variant:
    name: str  # row label: the preset name, with [setting=value] for ablations
    base: str  # the preset it derives from
    spec: dict = field(hash=False)  # policy spec after the override
    selective: str  # schedule.selective for this run
    sweep: str = "main"  # main | selective | mode | predictor | horizon | decay | feature | threshold


# SCOPE's modes switched off one at a time (the `mode` ablation), as threshold rewrites of a preset:
# each keeps Eq. 3's bands and lets one band take the other mode's place.
MODES = {
    "no-predict": "Predict band -> Recompute (tau_p = tau_c): Cache / Recompute only",
    "cache-not-predict": "Predict band -> Cache (tau_c = tau_p): the same skips, reused instead of extrapolated",
    "no-cache": "Cache band -> Predict (tau_c = 0): Predict / Recompute only",
    "selective-only": "no skipped iteration (tau_c = tau_p = 0): selective computation alone",
}


def mode_spec(spec: dict, mode: str) -> dict:
    """The preset with one of SCOPE's modes switched off (MODES)."""
    tc, tp = float(spec["tau_c"]), float(spec["tau_p"])
    if mode == "no-predict":
        return {**spec, "tau_p": tc}
    if mode == "cache-not-predict":
        return {**spec, "tau_c": tp}
    if mode == "no-cache":
        return {**spec, "tau_c": 0.0}
    if mode == "selective-only":
        return {**spec, "tau_c": 0.0, "tau_p": 0.0}
    raise ConfigError(f"--modes: values are {', '.join(MODES)}, got {mode!r}")


def selective_mode(cfg: RunConfig, adapter, flag: str) -> str:
    """'on' = the config's selective mode if it has one, else the exact one for the model."""
    if flag == "off":
        return "off"
    if flag != "on":
        raise ConfigError(f"--selective: values are on and off, got {flag!r}")
    if cfg.schedule.selective != "off":
        return cfg.schedule.selective
    return "causal" if adapter.capabilities.causal else "paper"


def plan_variants(
    cfg: RunConfig,
    adapter,
    policies: list[str],
    selective: list[str] = ("on",),
    predictors: list[str] = (),
    horizons: list[int] = (),
    thresholds: list[tuple[float, float]] = (),
    modes: list[str] = (),
    decays: list[float] = (),
    features: list[str] = (),
) -> list[Variant]:
    out: list[Variant] = []
    scope_names = []
    for name in policies:
        spec = cfg.policy_spec(name)
        kind = spec.get("kind")
        if name == "original":
            continue  # the reference, always run first
        if kind != "scope":
            out.append(Variant(name, name, spec, "off"))
            continue
        scope_names.append(name)
        for flag in selective:
            label = name if len(selective) == 1 else f"{name}[selective={flag}]"
            out.append(Variant(label, name, spec, selective_mode(cfg, adapter, flag), "main" if len(selective) == 1 else "selective"))
    on = selective_mode(cfg, adapter, "on")
    for name in scope_names:
        spec = cfg.policy_spec(name)
        for m in modes:
            out.append(Variant(f"{name}[{m}]", name, mode_spec(spec, m), on, "mode"))
        for p in predictors:
            out.append(Variant(f"{name}[predictor={p}]", name, {**spec, "predictor": p}, on, "predictor"))
        for h in horizons:
            out.append(Variant(f"{name}[H={h}]", name, {**spec, "horizon": int(h)}, on, "horizon"))
        for lam in decays:
            out.append(Variant(f"{name}[decay={lam:g}]", name, {**spec, "decay": float(lam)}, on, "decay"))
        for feat in features:
            out.append(Variant(f"{name}[feature={feat}]", name, {**spec, "feature": feat}, on, "feature"))
    if thresholds:
        if not scope_names:
            raise ConfigError("--thresholds: needs a scope policy in --policies to sweep")
        base = scope_names[-1]
        spec = cfg.policy_spec(base)
        for tc, tp in thresholds:
            out.append(Variant(f"scope({tc:g},{tp:g})", base, {**spec, "tau_c": tc, "tau_p": tp}, on, "threshold"))
    seen = set()
    offered = {"host"} | {f.value for f in adapter.capabilities.features}
    for v in out:
        if v.name in seen:
            raise ConfigError(f"--policies: {v.name} listed twice")
        seen.add(v.name)
        build_policy(v.spec, v.name)  # a bad value fails here, before the first rollout
        if v.spec.get("kind") == "scope" and v.spec.get("feature", "host") not in offered:
            raise ConfigError(f"--features: model {adapter.name} offers {', '.join(sorted(offered))}, "
                              f"not {v.spec['feature']!r}")
    return out


def config_for(cfg: RunConfig, variant: Variant | None, frames: int, seed: int) -> RunConfig:
    if variant is None:
        run = reference_config(cfg)
    else:
        run = replace(cfg, policy=variant.name, policies={**cfg.policies, variant.name: variant.spec},
                      schedule=replace(cfg.schedule, selective=variant.selective))
    run = replace(run, frames=frames, seed=seed)
    validate(run)
    return run


# ------------------------------------------------------------------------------ measurement
class PeakMemory:
    """Peak memory of one run: CUDA's allocator peak on GPU; on CPU the process's peak resident set
    (VmHWM), reset before the run through /proc/self/clear_refs (Linux)."""

    def __init__(self, device: str):
        self.cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        self.kind = "cuda_allocated" if self.cuda else "cpu_rss"

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    def peak_mb(self) -> float | None:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None


def lpips_metric(device: str = "cpu"):
    """LPIPS (alex) only when the `lpips` package, its linear weights and torchvision's AlexNet
    weights are all on this machine; else None (the column stays null: nothing is downloaded)."""
    if importlib.util.find_spec("lpips") is None or importlib.util.find_spec("torchvision") is None:
        return None
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    if not any(hub.glob("alexnet-owt-*.pth")):
        return None
    import lpips  # noqa: F401

    lin = Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth"
    if not lin.is_file():
        return None
    model = lpips.LPIPS(net="alex", verbose=False).to(device).eval()

    def score(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # [F, H, W, 3] in [0, 1] -> [F]
        with torch.no_grad():
            x = a.permute(0, 3, 1, 2).to(device) * 2 - 1
            y = b.permute(0, 3, 1, 2).to(device) * 2 - 1
            return model(x, y).flatten().cpu()

    return score


def mean_lpips(score, a: FrameStore, b: FrameStore) -> float:
    total, n = 0.0, 0
    for x, y in zip(a.read(), b.read()):
        total += float(score(x, y).sum())
        n += x.shape[0]
    return total / max(n, 1)


# ------------------------------------------------------------------------------------ runs
def run_row(cfg: RunConfig, adapter, variant: Variant | None, frames: int, seed: int, *, reference: FrameStore | None,
            keep_frames: Path | None, steps_dir: Path, memory: PeakMemory, lpips=None, reference_row: dict | None = None,
            threads: int | None = None, latents: Path | None = None, reference_latents: Path | None = None) -> tuple[dict, list]:
    """One rollout -> (row, step records). With variant None it is the reference (Original).

    latents: where the run's clean latents go (safetensors); with reference_latents (Original's) the
    row gets latent_snr, and the variant's file is removed afterwards."""
    run_cfg = config_for(cfg, variant, frames, seed)
    name = "original" if variant is None else variant.name
    store = FrameStore(keep_frames) if keep_frames is not None else None
    memory.reset()
    cpu0 = time.process_time()
    res = run_once(run_cfg, adapter, name, frames_to=store, reference=reference, latents_to=latents,
                   steps_log=steps_dir / f"{_safe(name)}__{frames}__{seed}.parquet")
    cpu = time.process_time() - cpu0  # this process's CPU time: robust to other processes on the machine
    snr = None
    if latents is not None and reference_latents is not None:
        from safetensors.torch import load_file

        from scopevid.engine.metrics import latent_snr

        snr = latent_snr(load_file(str(latents))["latents"], load_file(str(reference_latents))["latents"])
        latents.unlink()
    s = res.summary
    spec = run_cfg.policy_spec(name)
    ref = reference_row or {}
    row = {
        "model": adapter.name,
        "policy": name,
        "base_policy": "original" if variant is None else variant.base,
        "kind": spec.get("kind"),
        "sweep": "main" if variant is None else variant.sweep,
        "frames": frames,
        "seed": seed,
        "selective": run_cfg.schedule.selective,
        "predictor": spec.get("predictor") if spec.get("kind") == "scope" else None,
        "horizon": spec.get("horizon"),
        "tau_c": spec.get("tau_c"),
        "tau_p": spec.get("tau_p"),
        "decay": spec.get("decay"),
        "feature": (spec.get("feature") or "host") if spec.get("kind") == "scope" else spec.get("feature"),
        "wall_seconds": s["wall_seconds"],
        "speedup": (ref["wall_seconds"] / s["wall_seconds"]) if ref else 1.0,
        "cpu_seconds": cpu,
        "cpu_speedup": (ref["cpu_seconds"] / cpu) if ref and cpu > 0 else 1.0,
        "forwards": s["full_forwards"],
        "frame_forwards": s["frame_forwards"],
        "flops": s["flops"],
        "flops_speedup": (ref["flops"] / s["flops"]) if ref and s["flops"] else 1.0,
        "psnr": s.get("psnr") if reference is not None else None,
        "ssim": s.get("ssim") if reference is not None else None,
        "latent_snr": snr,
        "lpips": None,
        "peak_memory_mb": memory.peak_mb(),
        "memory_kind": memory.kind,
        "recompute": s["counts"]["recompute"],
        "cache": s["counts"]["cache"],
        "predict": s["counts"]["predict"],
        "fallbacks": s["predict_fallbacks"],
        "iterations": s["iterations"],
        "decision_digest": s["decision_digest"],
        "threads": threads or torch.get_num_threads(),
        # where the rollout's time goes: inside the model (forwards, pre-forward signals) or the engine
        "loop_seconds": s["engine_seconds"]["loop"],
        "forward_seconds": s["engine_seconds"]["forward"],
        "feature_seconds": s["engine_seconds"]["feature"],
        "engine_overhead_share": s["engine_seconds"]["overhead_share"],
    }
    if lpips is not None and reference is not None and store is not None:
        row["lpips"] = mean_lpips(lpips, store, reference)
    if variant is not None and store is not None and keep_frames is not None:
        shutil.rmtree(keep_frames, ignore_errors=True)
    return row, res.records


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.,=" else "_" for c in name)

