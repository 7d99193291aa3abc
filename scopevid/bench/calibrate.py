"""Search SCOPE's (tau_c, tau_p, H) for a quality or a speed target on short calibration rollouts.

The paper names per-model threshold calibration as SCOPE's limitation; this removes the hand work.
One scalar per H is searched. Family `ray`: thresholds move along the ray tau_p = ratio * tau_c of
a base preset (the paper's pairs keep tau_p / tau_c ~ 2.2-2.5). Family `cache`: tau_p = tau_c (no
Predict; where extrapolation across the solver's steps overshoots, as on the SkyReels-V2-layout
checkpoint). Family `predict`: tau_c = 0 (no Cache) and tau_p is searched; on models whose per-step discrepancy is nearly constant Cache fires
every other iteration as soon as tau_c passes it and costs most of the quality (`bench ablation`,
docs/BENCHMARKS.md), so only Predict is left to trade. Either way: speed rises and quality falls with tau_c,
and a bisection in log(tau_c) finds the boundary of the target for every candidate H. Targets are
met on the *worst* calibration seed, not the mean, so that they transfer to unseen seeds. Speed is
the FLOPs speedup against Original (deterministic and machine-independent, unlike wall time on a
shared machine); quality is PSNR against Original (per frame in [0, 1], averaged).

Cost: one Original rollout per calibration seed, then `steps` bisection points x |horizons| x |seeds|
SCOPE rollouts of `frames` frames, all recorded in the result.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from scopevid.config import RunConfig, validate
from scopevid.engine.runner import reference_config, run_once
from scopevid.engine.sinks import FrameStore
from scopevid.errors import ConfigError


FAMILIES = ("ray", "predict", "cache")


@dataclass
class Evaluation:
    x: float  # the searched scalar: tau_c (family ray) or tau_p (family predict)
    tau_c: float
    tau_p: float
    horizon: int
    psnr: list[float]  # quality per calibration seed: PSNR, or latent SNR with metric latent_snr (dB either way)
    flops_speedup: list[float]
    cpu_seconds: float

    @property
    def worst_psnr(self) -> float:
        return min(self.psnr)

    @property
    def worst_speedup(self) -> float:
        return min(self.flops_speedup)


@dataclass
class Result:
    target: str  # "psnr" | "speedup"
    value: float
    pick: Evaluation | None
    evaluations: list[Evaluation] = field(default_factory=list)
    rollouts: int = 0
    seconds: float = 0.0
    holdout: list[dict] = field(default_factory=list)


class Calibrator:
    def __init__(self, cfg: RunConfig, adapter, base: str, frames: int, seeds: list[int], workdir: Path,
                 selective: str | None = None, family: str = "ray", metric: str = "psnr"):
        spec = cfg.policy_spec(base)
        if spec.get("kind") != "scope":
            raise ConfigError(f"--base: {base} is not a scope preset")
        if family not in FAMILIES:
            raise ConfigError(f"--family: {' or '.join(FAMILIES)}, got {family!r}")
        if metric not in ("psnr", "latent_snr"):
            raise ConfigError(f"--metric: psnr or latent_snr, got {metric!r}")
        self.family, self.metric = family, metric
        self.cfg, self.adapter, self.base_spec = cfg, adapter, spec
        self.ratio = spec["tau_p"] / spec["tau_c"] if spec.get("tau_c") else 2.3
        self.frames, self.seeds, self.workdir = frames, seeds, Path(workdir)
        self.selective = selective or cfg.schedule.selective
        self.refs: dict[tuple[int, int], tuple[FrameStore, float]] = {}  # (seed, frames) -> Original
        self.rollouts = 0

    def _cfg(self, seed: int, spec: dict | None) -> RunConfig:
        if spec is None:
            run = reference_config(self.cfg)
        else:
            run = replace(self.cfg, policy="scope-calibrating", policies={**self.cfg.policies, "scope-calibrating": spec},
                          schedule=replace(self.cfg.schedule, selective=self.selective))
        run = replace(run, frames=self.frames, seed=seed)
        validate(run)
        return run

    def reference(self, seed: int) -> tuple[FrameStore, float]:
        key = (seed, self.frames)
        if key not in self.refs:
            d = self.workdir / f"reference_{seed}_{self.frames}"
            shutil.rmtree(d, ignore_errors=True)
            store = FrameStore(d)
            res = run_once(self._cfg(seed, None), self.adapter, "original", frames_to=store, keep_records=False,
                           latents_to=self._latents(seed))
            self.rollouts += 1
            self.refs[key] = (store, res.summary["flops"])
        return self.refs[key]

    def _latents(self, seed: int | None) -> Path | None:
        """Original's latents for `seed` (None: the run under evaluation), when quality is latent SNR."""
        if self.metric != "latent_snr":
            return None
        return self.workdir / (f"latents_{seed}_{self.frames}.safetensors" if seed is not None else "latents_run.safetensors")

    def spec(self, x: float, horizon: int) -> dict:
        if self.family == "predict":
            return {**self.base_spec, "tau_c": 0.0, "tau_p": round(x, 6), "horizon": int(horizon)}
        if self.family == "cache":
            return {**self.base_spec, "tau_c": round(x, 6), "tau_p": round(x, 6), "horizon": int(horizon)}
        return {**self.base_spec, "tau_c": round(x, 6), "tau_p": round(x * self.ratio, 6), "horizon": int(horizon)}

    def evaluate(self, x: float, horizon: int, seeds: list[int] | None = None) -> Evaluation:
        spec = self.spec(x, horizon)
        psnr, speed = [], []
        t0 = time.process_time()
        for seed in seeds or self.seeds:
            ref, ref_flops = self.reference(seed)
            res = run_once(self._cfg(seed, spec), self.adapter, "scope-calibrating", reference=ref, keep_records=False,
                           latents_to=self._latents(None))
            self.rollouts += 1
            if self.metric == "latent_snr":
                from safetensors.torch import load_file

                from scopevid.engine.metrics import latent_snr

                psnr.append(latent_snr(load_file(str(self._latents(None)))["latents"],
                                       load_file(str(self._latents(seed)))["latents"]))
            else:
                psnr.append(res.summary["psnr"])
            speed.append(ref_flops / res.summary["flops"])
        return Evaluation(x, spec["tau_c"], spec["tau_p"], int(horizon), psnr, speed, time.process_time() - t0)

    def search(self, target: str, value: float, horizons: list[int], lo: float = 0.005, hi: float = 1.0,
               steps: int = 7) -> Result:
        """Per H: bisect log(x) for the boundary of the target; pick the best H by the other metric."""
        if target not in ("psnr", "speedup"):
            raise ConfigError(f"target: psnr or speedup, got {target!r}")
        t0 = time.perf_counter()
        result = Result(target, value, None)
        ok = (lambda e: e.worst_psnr >= value) if target == "psnr" else (lambda e: e.worst_speedup >= value)
        candidates = []
        for h in horizons:
            a, b = math.log(lo), math.log(hi)  # psnr: ok at a, maybe not at b; speedup: the reverse
            best = None
            for _ in range(steps):
                mid = (a + b) / 2
                e = self.evaluate(math.exp(mid), h)
                result.evaluations.append(e)
                if ok(e):
                    best = e if best is None or _better(e, best, target) else best
                    a, b = (mid, b) if target == "psnr" else (a, mid)
                else:
                    a, b = (a, mid) if target == "psnr" else (mid, b)
            if best is None:  # try the safe end of the range once
                e = self.evaluate(lo if target == "psnr" else hi, h)
                result.evaluations.append(e)
                best = e if ok(e) else None
            if best is not None:
                candidates.append(best)
        if candidates:
            key = (lambda e: (e.worst_speedup, e.worst_psnr)) if target == "psnr" else (lambda e: (e.worst_psnr, e.worst_speedup))
            result.pick = max(candidates, key=key)
        result.rollouts, result.seconds = self.rollouts, time.perf_counter() - t0
        return result

    def holdout(self, result: Result, seeds: list[int], frames: int | None = None) -> list[dict]:
        """The pick on unseen seeds (and optionally another length): what a user would get."""
        if result.pick is None:
            return []
        out = []
        saved = self.frames
        if frames is not None:
            self.frames = frames
        try:
            for seed in seeds:
                e = self.evaluate(result.pick.x, result.pick.horizon, [seed])
                out.append({"seed": seed, "frames": self.frames, "psnr": e.psnr[0], "flops_speedup": e.flops_speedup[0]})
        finally:
            self.frames = saved
        result.holdout += out
        result.rollouts = self.rollouts  # the hold-out check's references and runs count too
        return out


def _better(e: Evaluation, best: Evaluation, target: str) -> bool:
    """Among points meeting the target: psnr target -> fastest; speedup target -> best quality."""
    return e.worst_speedup > best.worst_speedup if target == "psnr" else e.worst_psnr > best.worst_psnr


def preset_yaml(result: Result, spec: dict, name: str, meta: dict) -> str:
    lines = [f"# Written by `scopevid calibrate` ({meta.get('command', '')}).",
             f"# Target: {result.target} >= {result.value} on the worst of calibration seeds {meta.get('seeds')},",
             f"# {meta.get('frames')} frames; calibration picked PSNR {min(result.pick.psnr):.2f} dB, "
             f"FLOPs speedup {min(result.pick.flops_speedup):.2f}x; {result.rollouts} rollouts, {result.seconds:.0f} s."]
    for h in result.holdout:
        lines.append(f"# Held-out seed {h['seed']} ({h['frames']} frames): PSNR {h['psnr']:.2f} dB, FLOPs speedup {h['flops_speedup']:.2f}x.")
    items = ", ".join(f"{k}: {v}" for k, v in spec.items())
    lines.append(f"{name}: {{{items}}}")
    return "\n".join(lines) + "\n"
