"""TeaCache's per-model rescaling polynomial, fitted the way its authors do for a new model.

Run Original (every iteration computed, whole window forwarded as the official pipeline does) and
record per iteration x = relative L1 change of the TeaCache signal (mean|f_k - f_{k-1}| / mean|f_{k-1}|,
over the forwarded frames, the engine's per-frame memory) and y = relative L1 change of the model
output (the guided velocity of the same frames) between consecutive iterations; fit y ~ poly(x) of
degree 4 (numpy.polyfit, highest power first, what TeaCache's `coefficients` hold). The first
iteration of each window has no previous output of its own frames and is left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from scopevid.engine.runner import build_plan, make_rollout, reference_config
from scopevid.scheduler.policies.base import Decision, Mode
from scopevid.scheduler.policies.teacache import TeaCache, TeaCacheConfig


class _Probe(TeaCache):
    """Always computes; remembers each iteration's signal distance."""

    def __init__(self, feature: str):
        super().__init__(TeaCacheConfig(thresh=0.0, feature=feature, ret_steps=0), name="teacache-probe")
        self.xs: dict[int, float] = {}

    def decide(self, ctx, disc):
        if disc is not None and ctx.index > 0:
            self.xs[ctx.serial] = disc.value(self.cfg.eps)
        self._serial = ctx.serial
        return Decision(Mode.RECOMPUTE, reason="probe")


class _Recorder:
    """Adapter proxy that keeps the last output per frame and the output distance per iteration."""

    def __init__(self, adapter, probe: _Probe):
        self._a, self._probe = adapter, probe
        self.prev: dict[int, torch.Tensor] = {}
        self.ys: dict[int, float] = {}

    def __getattr__(self, name):
        return getattr(self._a, name)

    def velocity(self, x, sigma, cond, spec, attention, hooks=None):
        out = self._a.velocity(x, sigma, cond, spec, attention, hooks)
        num = den = 0.0
        for i, f in enumerate(spec.local_frames()):
            if f < 0:
                continue
            p = self.prev.get(f)
            if p is not None:
                num += float((out[i].double() - p.double()).abs().sum())
                den += float(p.double().abs().sum())
            self.prev[f] = out[i].detach()
        if den > 0:
            self.ys[self._probe._serial] = num / den
        return out


@dataclass
class Fit:
    coefficients: list[float]
    pairs: int
    correlation: float
    x: list[float]
    y: list[float]


def probe_pairs(cfg, adapter, feature: str) -> tuple[list[float], list[float]]:
    cfg = reference_config(cfg)
    probe = _Probe(feature)
    rec = _Recorder(adapter, probe)
    plan = build_plan(cfg, adapter)
    cond = adapter.encode_prompt(cfg.prompt, cfg.negative_prompt, cfg.guidance)
    ro = make_rollout(cfg, rec, plan, probe, cond)
    for _ in ro.run():
        pass
    keys = sorted(set(probe.xs) & set(rec.ys))
    return [probe.xs[k] for k in keys], [rec.ys[k] for k in keys]


def fit(cfg, adapter, seeds: list[int], feature: str = "temb_mod", degree: int = 4) -> Fit:
    from dataclasses import replace

    xs, ys = [], []
    for seed in seeds:
        x, y = probe_pairs(replace(cfg, seed=seed), adapter, feature)
        xs += x
        ys += y
    coeffs = np.polyfit(np.asarray(xs), np.asarray(ys), degree)
    corr = float(np.corrcoef(xs, ys)[0, 1]) if len(xs) > 2 else float("nan")
    return Fit([float(c) for c in coeffs], len(xs), corr, xs, ys)


def plot(f: Fit, path, feature: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(f.x, f.y, s=6, alpha=0.5, label="iterations")
    xs = np.linspace(min(f.x), max(f.x), 200)
    ax.plot(xs, np.poly1d(f.coefficients)(xs), color="tab:red", label="degree-4 fit")
    ax.set_xlabel(f"relative L1 change of {feature}")
    ax.set_ylabel("relative L1 change of the output")
    ax.set_title(f"TeaCache rescaling (r = {f.correlation:.3f}, {f.pairs} pairs)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
