"""The paper's figures from bench rows (PNG, matplotlib Agg). Each returns the path it wrote or None.

frontier.png   Table 1 analogue: PSNR / SSIM against time and FLOPs speedup, Pareto front drawn
timeline.png   Fig. 6: Cache / Predict / Recompute per iteration, one strip per method
length.png     Fig. 8: Original vs SCOPE time per video length, speedups annotated
thresholds.png Table 2: speedup and quality per (tau_c, tau_p)
horizon.png    Fig. 7: time, 1-LPIPS (or FLOPs speedup without LPIPS), SSIM, PSNR against H
ablation.png   SCOPE's parts one at a time (modes, predictor, H, lambda, signal) against the baselines:
               FLOPs speedup vs mean PSNR and vs worst-seed PSNR
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from scopevid.bench.report import QUALITY, aggregate, frontier_frames  # noqa: E402
from scopevid.bench.runs import _safe  # noqa: E402

KIND_COLORS = {"original": "black", "scope": "tab:red", "teacache": "tab:blue", "taylorseer": "tab:green",
               "flowcache": "tab:purple", "deltadit": "tab:brown"}
MODE_CODE = {"recompute": 0, "predict": 1, "cache": 2, "partial": 3}
MODE_COLORS = ["#3b3b3b", "#f0a030", "#4caf50", "#a5d6a7"]  # partial: some chunks reused (FlowCache)
_CHUNKS = re.compile(r"chunks (\d+)/(\d+) computed")


def _code(mode: str, reason: str) -> int:
    m = _CHUNKS.match(reason or "")
    if mode == "recompute" and m and int(m.group(1)) < int(m.group(2)):
        return MODE_CODE["partial"]
    return MODE_CODE[mode]


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Upper-right front: no other point has both higher speedup and higher quality."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(front)


def frontier(rows: list[dict], out: Path) -> Path | None:
    f = frontier_frames(rows)
    agg = [a for a in aggregate(rows) if a["frames"] == f and a["sweep"] in ("main", "selective") and a["psnr"] is not None]
    if not agg:
        return None
    # CPU time of the process rather than wall time: on a shared machine other jobs inflate wall time
    panels = [("cpu_speedup", "psnr", "CPU-time speedup", "PSNR (dB)"), ("cpu_speedup", "ssim", "CPU-time speedup", "SSIM"),
              ("flops_speedup", "psnr", "FLOPs speedup", "PSNR (dB)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for ax, (xk, yk, xl, yl) in zip(axes, panels):
        pts = []
        for a in agg:
            x, y = a[xk], a[yk]
            pts.append((x, y))
            ax.scatter(x, y, color=KIND_COLORS.get(a["kind"], "gray"), s=45, zorder=3)
            ax.annotate(a["policy"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        front = _pareto(pts)
        ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="gray", lw=1, zorder=2, label="Pareto front")
        ax.axvline(1.0, color="black", lw=0.6)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower left", fontsize=7)
    fig.suptitle(f"Speed / quality frontier, {f} frames, {rows[0]['model']} (vs Original, mean over seeds)")
    fig.tight_layout()
    path = out / "frontier.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def timeline(rows: list[dict], steps_dir: Path, out: Path) -> Path | None:
    f = frontier_frames(rows)
    seed = min(r["seed"] for r in rows)
    names = [r["policy"] for r in rows if r["frames"] == f and r["seed"] == seed and r["sweep"] in ("main", "selective")]
    strips = []
    for n in names:
        p = steps_dir / f"{_safe(n)}__{f}__{seed}.parquet"
        if p.exists():  # a run log is a directory of parts (engine.sinks.RunLog)
            t = pq.read_table(p, columns=["mode", "reason"])
            strips.append((n, [_code(m, r) for m, r in zip(t.column("mode").to_pylist(), t.column("reason").to_pylist())]))
    if not strips:
        return None
    width = max(len(s) for _, s in strips)
    fig, ax = plt.subplots(figsize=(14, 0.45 * len(strips) + 1.4))
    from matplotlib.colors import ListedColormap

    import numpy as np

    grid = np.full((len(strips), width), np.nan)
    for i, (_, s) in enumerate(strips):
        grid[i, : len(s)] = s
    ax.imshow(grid, aspect="auto", interpolation="nearest", cmap=ListedColormap(MODE_COLORS), vmin=0, vmax=3)
    ax.set_yticks(range(len(strips)))
    ax.set_yticklabels([f"{n} (C {s.count(2)} / P {s.count(1)} / R {s.count(0) + s.count(3)})" for n, s in strips], fontsize=8)
    ax.set_xlabel("iteration (all windows)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in MODE_COLORS]
    ax.legend(handles, ["Recompute", "Predict", "Cache", "Recompute, some chunks reused"], ncol=4, loc="upper right", bbox_to_anchor=(1, 1.25), fontsize=8)
    ax.set_title(f"Decisions per iteration, {f} frames, seed {seed} (Total {width})", loc="left", fontsize=10)
    fig.tight_layout()
    path = out / "timeline.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def length(rows: list[dict], out: Path) -> Path | None:
    agg = aggregate(rows)
    frames = sorted({a["frames"] for a in agg})
    scope = []
    for a in agg:
        if a["kind"] == "scope" and a["sweep"] in ("main", "selective") and a["policy"] not in scope:
            scope.append(a["policy"])
    if len(frames) < 2 or not scope:
        return None
    by = {(a["policy"], a["frames"]): a for a in agg}
    names = ["original"] + scope
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(frames), 4.2))
    w = 0.8 / len(names)
    for i, n in enumerate(names):
        xs, ys = [], []
        for j, f in enumerate(frames):
            a = by.get((n, f))
            if a is not None:
                xs.append(j + (i - (len(names) - 1) / 2) * w)
                ys.append(a["cpu_seconds"])
                if n != "original":
                    ax.annotate(f"{a['cpu_speedup']:.2f}x\n({a['flops_speedup']:.2f}x)", (xs[-1], ys[-1]), ha="center",
                                va="bottom", fontsize=7)
        ax.bar(xs, ys, width=w, label=n, color="black" if n == "original" else None)
    ax.set_xticks(range(len(frames)))
    ax.set_xticklabels([f"{f} frames" for f in frames])
    ax.set_ylabel("rollout CPU time (s)")
    ax.legend(fontsize=8)
    ax.set_title(f"Original vs SCOPE by video length ({rows[0]['model']}): CPU speedup (FLOPs speedup)", fontsize=10)
    fig.tight_layout()
    path = out / "length.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _sweep_plot(rows: list[dict], sweep: str, xkey, xlabel: str, out: Path, name: str, title: str) -> Path | None:
    f = frontier_frames(rows)
    agg = [a for a in aggregate(rows) if a["frames"] == f and a["sweep"] == sweep]
    if len(agg) < 2:
        return None
    agg.sort(key=lambda a: xkey(a))
    xs = [xkey(a) for a in agg]
    lp = all(a["lpips"] is not None for a in agg)
    panels = [("wall_seconds", "time (s)"), ("lpips", "1 - LPIPS") if lp else ("flops_speedup", "FLOPs speedup (no LPIPS weights)"),
              ("ssim", "SSIM"), ("psnr", "PSNR (dB)")]
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5))
    for ax, (k, label) in zip(axes.flat, panels):
        ys = [(1 - a[k]) if k == "lpips" else a[k] for a in agg]
        ax.plot(range(len(xs)), ys, "o-", color="tab:red")
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels([str(x) for x in xs], fontsize=8, rotation=20)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}, {f} frames", fontsize=10)
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def thresholds(rows: list[dict], out: Path) -> Path | None:
    return _sweep_plot(rows, "threshold", lambda a: (a["tau_c"], a["tau_p"]), "(tau_c, tau_p)", out, "thresholds.png",
                       "Threshold sensitivity (Table 2 analogue)")


def horizon(rows: list[dict], out: Path) -> Path | None:
    return _sweep_plot(rows, "horizon", lambda a: a["horizon"], "H (bounded skip length)", out, "horizon.png",
                       "Skip-length sensitivity (Fig. 7 analogue)")


SWEEP_MARKERS = {"main": "o", "selective": "s", "mode": "D", "predictor": "^", "horizon": "v", "decay": "P", "feature": "X",
                 "threshold": "*"}


def ablation(rows: list[dict], out: Path, quality: str = "psnr") -> Path | None:
    """One point per variant: FLOPs speedup (deterministic) against mean and worst-seed quality."""
    f = frontier_frames(rows)
    agg = [a for a in aggregate(rows) if a["frames"] == f and a[quality] is not None]
    if not any(a["sweep"] not in ("main", "selective") for a in agg):
        return None
    q = QUALITY[quality]
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.5))
    for ax, yk, yl in ((axes[0], quality, f"{q} (dB), mean over seeds"), (axes[1], f"{quality}_min", f"{q} (dB), worst seed")):
        for a in agg:
            x, y = a["flops_speedup"], min(a[yk], 80.0)  # lossless runs (100 dB) drawn at the top edge
            base = a["kind"] != "scope"
            ax.scatter(x, y, marker="o" if base else SWEEP_MARKERS.get(a["sweep"], "o"), s=50 if base else 40,
                       color=KIND_COLORS.get(a["kind"], "gray") if base or a["sweep"] == "main" else "tab:orange",
                       edgecolors="black" if base else None, zorder=3)
            ax.annotate(a["policy"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6)
        ax.set_xlabel("FLOPs speedup vs Original")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker=m, ls="", color="tab:orange", label=k) for k, m in SWEEP_MARKERS.items()
               if k not in ("main", "selective") and any(a["sweep"] == k for a in agg)]
    handles += [plt.Line2D([], [], marker="o", ls="", color=c, label=k) for k, c in KIND_COLORS.items()
                if k != "original" and any(a["kind"] == k for a in agg)]
    axes[0].legend(handles=handles, fontsize=7, loc="lower left")
    seeds = sorted({r["seed"] for r in rows})
    fig.suptitle(f"SCOPE ablation, {rows[0]['model']}, {f} frames, seeds {seeds} ({q} capped at 80 dB for drawing)")
    fig.tight_layout()
    path = out / "ablation.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def all_figures(rows: list[dict], steps_dir: Path, out: Path, quality: str = "psnr") -> list[Path]:
    made = [frontier(rows, out), timeline(rows, steps_dir, out), length(rows, out), thresholds(rows, out), horizon(rows, out),
            ablation(rows, out, quality)]
    return [p for p in made if p is not None]
