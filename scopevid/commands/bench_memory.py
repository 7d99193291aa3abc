"""`scopevid bench memory --config C [--config C2 ...] --frames 97,257,737 --out DIR`: peak memory vs. length.

Why: a streaming rollout should hold a bounded window of latents, a bounded K/V context and the frames
not yet written, so its peak resident memory should not grow with the video length. This benchmark
measures that claim instead of asserting it.

Every (config, frames) pair is one fresh `python -m scopevid generate ... --no-progress` child process
(its output in DIR/runs/<config>-<frames>/, its stdout/stderr next to it as .log/.err), so no run
inherits allocations, caches or allocator state from another. The child's peak RSS is the ru_maxrss
that os.wait4 returns when it is reaped: exact per child, no sampling. On Linux that is the maximum over
the child and the descendants it waited for (e.g. the ffmpeg encoder), not their sum. Wall seconds are
end to end (interpreter start, imports and model load included). `ratio_to_first` divides by the peak of
the smallest frame count of the same config: a flat ~1.0 column means memory is bounded.

The interpreter, torch and the weights are most of a small model's peak and hide growth in that ratio,
so each config also gets one import-only child (`baseline_mb`; DIR/runs/<config>-baseline.log/.err):
it imports what generate imports and loads the model (adapters.load of the config's model spec), but
runs no rollout. `above_baseline_mb` = peak_rss_mb - baseline_mb is what the rollout itself adds, and
`ratio_above_first` divides it by that of the smallest frame count (empty when that adds nothing measurable).

DIR/memory.parquet (one row per run), DIR/memory.md (the same as a markdown table, also printed).
A child that fails is recorded (exit_code, last stderr line in `error`; a failed baseline leaves the
baseline columns empty), the others still run, and the command exits 1 naming the failed runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from scopevid.errors import ConfigError

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
COLUMNS = ("config", "model", "policy", "frames", "latent_frames", "peak_rss_mb", "ratio_to_first", "baseline_mb",
           "above_baseline_mb", "ratio_above_first", "wall_seconds", "exit_code", "error")
BASELINE = "import sys; from scopevid.commands.bench_memory import load_only; load_only(sys.argv[1])"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", required=True, help="model preset YAML; repeat for several models")
    p.add_argument("--frames", required=True, help="comma-separated pixel frame counts, e.g. 97,257,737")
    p.add_argument("--out", required=True, help="output directory (must be new or empty)")
    p.add_argument("--policy", help="policy preset of every run (default: each config's)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the config's)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of each child (OMP/MKL/OpenBLAS)")
    p.add_argument("--timeout", type=float, help="seconds allowed per run (default: none)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")


def _frames(text: str) -> list[int]:
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise ConfigError(f"--frames: comma-separated positive integers expected, got {text!r}")
    return sorted(set(vals))  # the first (smallest) is the denominator of ratio_to_first


def load_only(path: str) -> None:
    """The import-only baseline child: generate's imports and the model load, no rollout."""
    import imageio.v2  # noqa: F401  (Mp4Sink's writer, imported lazily by a run)

    from scopevid import adapters, config as config_lib
    from scopevid.commands import generate  # noqa: F401
    from scopevid.engine.runner import DTYPES

    cfg = config_lib.load(path)
    adapters.load(cfg.model, cfg.device, DTYPES[cfg.dtype])


def _child(cmd: list[str], env: dict, log: Path, timeout: float | None) -> tuple[int, float, float, bool]:
    """Run cmd; (exit code, peak RSS in MiB, wall seconds, timed out). Exit code < 0: killed by that signal."""
    import subprocess

    t0, timed_out = time.perf_counter(), False
    with open(f"{log}.log", "wb") as out, open(f"{log}.err", "wb") as err:  # not with_suffix: names hold dots
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env)
        while True:
            pid, status, usage = os.wait4(proc.pid, 0 if timeout is None or timed_out else os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                proc.kill()  # reaped by the next (blocking) wait4
                timed_out = True
            else:
                time.sleep(0.1)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return proc.returncode, usage.ru_maxrss / scale, wall, timed_out


def _last_line(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()] if path.is_file() else []
    return lines[-1] if lines else ""


def markdown(rows: list[dict]) -> str:
    fmt = {"peak_rss_mb": "{:.1f}", "baseline_mb": "{:.1f}", "above_baseline_mb": "{:.1f}", "wall_seconds": "{:.1f}",
           "ratio_to_first": "{:.2f}", "ratio_above_first": "{:.2f}"}

    def cell(r, k):
        return "" if r[k] is None else fmt.get(k, "{}").format(r[k])

    cols = COLUMNS[:-1] + (("error",) if any(r["error"] for r in rows) else ())
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r, k).replace("|", "\\|") for k in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from scopevid import config as config_lib
    from scopevid.engine.sinks import prepare_out_dir

    frames = _frames(args.frames)
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps: a positive integer expected, got {args.steps}")
    if args.threads < 1:
        raise ConfigError(f"--threads: a positive integer expected, got {args.threads}")
    configs, names = [], []
    for path in args.config:
        cfg = config_lib.load(path)  # unknown file / bad YAML: ConfigError before anything runs
        policy = args.policy or cfg.policy
        cfg.policy_spec(policy)
        name = Path(path).stem
        name = name if name not in names else f"{name}-{len(names)}"
        configs.append((path, cfg, policy, name))
        names.append(name)
    out = prepare_out_dir(args.out, args.overwrite)
    runs = out / "runs"
    runs.mkdir(exist_ok=True)

    root = str(Path(__file__).resolve().parents[2])  # the child imports this scopevid, whatever the cwd
    env = {**os.environ, **{k: str(args.threads) for k in THREAD_VARS}}
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    rows: list[dict] = []
    failed: list[str] = []
    for path, cfg, policy, name in configs:
        code, floor, _, timed_out = _child([sys.executable, "-c", BASELINE, str(path)], env, runs / f"{name}-baseline",
                                           args.timeout)
        if code != 0:  # the runs still run, their baseline columns empty
            floor = None
            why = "timed out" if timed_out else _last_line(runs / f"{name}-baseline.err") or f"exit code {code}"
            failed.append(f"{name}-baseline (exit {code}: {why})")
        print(f"{name} import-only baseline: peak RSS {floor or float('nan'):.1f} MiB, exit {code}", file=sys.stderr,
              flush=True)
        base = above0 = None
        for f in frames:
            run_dir = runs / f"{name}-{f}"
            shutil.rmtree(run_dir, ignore_errors=True)  # only with --overwrite can one exist
            cmd = [sys.executable, "-m", "scopevid", "generate", "--config", str(path), "--frames", str(f),
                   "--policy", policy, "--out", str(run_dir), "--no-progress"]
            if args.steps is not None:
                cmd += ["--steps", str(args.steps)]
            code, peak, wall, timed_out = _child(cmd, env, run_dir, args.timeout)
            summary = run_dir / "summary.json"
            s = json.loads(summary.read_text()) if code == 0 and summary.is_file() else {}
            above = peak - floor if floor is not None and code == 0 else None
            if f == frames[0] and code == 0:
                base, above0 = peak, above
            rows.append({
                "config": str(path), "model": s.get("model", cfg.model.get("kind")), "policy": policy, "frames": f,
                "latent_frames": s.get("latent_frames"), "peak_rss_mb": peak,
                "ratio_to_first": peak / base if base and code == 0 else None, "baseline_mb": floor,
                "above_baseline_mb": above, "ratio_above_first": above / above0 if above is not None and above0 is not None and above0 > 0 else None,
                "wall_seconds": wall, "exit_code": code,
                "error": None if code == 0 else f"timed out after {args.timeout:g} s" if timed_out else
                         (_last_line(Path(f"{run_dir}.err")) or f"exit code {code}"),
            })
            if code != 0:
                failed.append(f"{name}-{f} (exit {code}: {rows[-1]['error']})")
            print(f"{name} {f} frames: peak RSS {peak:.1f} MiB, {wall:.1f} s, exit {code}", file=sys.stderr, flush=True)
            _write(rows, out, pa, pq)  # partial results survive an interrupted bench
    md = markdown(rows)
    (out / "memory.md").write_text(md)
    print(md, end="")
    if failed:
        print("scopevid bench memory: failed runs: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


def _write(rows: list[dict], out: Path, pa, pq) -> None:
    s, i64, f64 = pa.string(), pa.int64(), pa.float64()
    types = {"config": s, "model": s, "policy": s, "frames": i64, "latent_frames": i64, "peak_rss_mb": f64,
             "ratio_to_first": f64, "baseline_mb": f64, "above_baseline_mb": f64, "ratio_above_first": f64,
             "wall_seconds": f64, "exit_code": i64, "error": s}
    schema = pa.schema([(k, types[k]) for k in COLUMNS])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), out / "memory.parquet")
