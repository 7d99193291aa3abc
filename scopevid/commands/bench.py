"""`scopevid bench [policies|ablation|sp|scaling|memory|comm|coldstart] ...`: side-by-side benchmarks.

`bench` (or `bench policies`) runs Original and the given policies in one process on the same seeds
and prompt and writes DIR/bench.parquet (one row per run), DIR/steps/*.parquet (per-iteration logs),
the PNG figures of the paper (Table 1 frontier, Fig. 6 timeline, Fig. 8 length, Table 2 thresholds,
Fig. 7 H) and DIR/summary.md. `bench sp`, `bench scaling` and `bench memory` are other benchmarks in
their own modules (commands/bench_sp.py, bench_scaling.py, bench_memory.py), dispatched here when present.

    scopevid bench --config configs/tiny.yaml --policies original,scope-slow,scope-fast,teacache-slow \\
        --frames 97,257 --seeds 0,1 --out out/bench [--selective on,off] [--predictors taylor1,taylor2] \\
        [--horizons 1,3,5,8] [--thresholds 0.12:0.30,0.18:0.42]
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import shutil
import sys
from pathlib import Path

from scopevid.errors import ConfigError

KINDS = {"policies": None, "sp": "scopevid.commands.bench_sp", "scaling": "scopevid.commands.bench_scaling",
         "comm": "scopevid.commands.bench_comm", "coldstart": "scopevid.commands.bench_coldstart",
         "memory": "scopevid.commands.bench_memory",
         "ablation": "scopevid.commands.bench_ablation"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench_kind", metavar="{" + ",".join(KINDS) + "}")
    pol = sub.add_parser("policies", help="policies side by side (the default)", description=__doc__.split("\n\n")[1])
    add_policy_arguments(pol)
    for kind, mod in KINDS.items():
        if mod is None:
            continue
        sp = sub.add_parser(kind, help=f"see {mod}")
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            sp.set_defaults(_bench_main=_missing(kind, mod))
            sp.add_argument("rest", nargs=argparse.REMAINDER)
            continue
        module.add_arguments(sp)
        sp.set_defaults(_bench_main=module.main)
    # `bench --config ...` means `bench policies --config ...`: insert the default kind
    parse = p.parse_known_args

    def parse_known_args(args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        if not args or (args[0] not in KINDS and args[0] not in ("-h", "--help")):
            args = ["policies"] + args
        return parse(args, namespace)

    p.parse_known_args = parse_known_args


def _missing(kind: str, mod: str):
    def run(args) -> int:
        raise ConfigError(f"bench {kind}: not available in this build ({mod} is missing)")

    return run


def add_policy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="model preset YAML, e.g. configs/tiny.yaml")
    p.add_argument("--out", required=True, help="output directory (must be new or empty)")
    p.add_argument("--policies", help="comma-separated presets (default: every preset of the config)")
    p.add_argument("--frames", help="comma-separated pixel frame counts (default: the config's)")
    p.add_argument("--seeds", help="comma-separated seeds (default: the config's)")
    p.add_argument("--prompt", help="prompt for every run (default: the config's)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the config's)")
    p.add_argument("--selective", default="on", help="SCOPE with selective computation: on, off or on,off (ablation)")
    p.add_argument("--predictors", default="", help="predictor ablation for SCOPE: e.g. taylor1,taylor2,momentum,auto")
    p.add_argument("--horizons", default="", help="skip-length ablation for SCOPE (Fig. 7): e.g. 1,3,5,8")
    p.add_argument("--thresholds", default="", help="(tau_c:tau_p) sweep (Table 2): e.g. 0.12:0.30,0.18:0.42")
    p.add_argument("--modes", default="", help="SCOPE with one mode off: no-predict, cache-not-predict, no-cache, selective-only")
    p.add_argument("--decays", default="", help="Predict decay (lambda) ablation for SCOPE: e.g. 0.5,0.75,1")
    p.add_argument("--features", default="", help="signal of Eq. 4 for SCOPE: host and the model's others (temb, temb_mod, embed)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--report-only", action="store_true", help="only redo figures and summary.md from DIR/bench.parquet")


def main(args: argparse.Namespace) -> int:
    kind = getattr(args, "bench_kind", None) or "policies"
    if kind != "policies":
        return int(args._bench_main(args) or 0)
    return run_policies(args)


def _list(text: str | None, conv=str) -> list:
    if not text:
        return []
    try:
        return [conv(t.strip()) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"could not read the list {text!r}") from None


def _pair(text: str) -> tuple[float, float]:
    a, _, b = text.partition(":")
    try:
        return float(a), float(b)
    except ValueError:
        raise ConfigError(f"--thresholds: each entry is tau_c:tau_p, got {text!r}") from None


def run_policies(args: argparse.Namespace) -> int:
    if args.report_only:
        return _report(Path(args.out))
    from scopevid import adapters
    from scopevid.bench import runs
    from scopevid.engine.runner import DTYPES
    from scopevid.engine.sinks import prepare_out_dir

    cfg, frames, seeds = load_for_bench(args)
    policies = _list(args.policies) or list(cfg.policies)
    for name in policies:
        cfg.policy_spec(name)  # unknown names fail here, before anything runs
    out = prepare_out_dir(args.out, args.overwrite)

    adapter = adapters.load(cfg.model, cfg.device, DTYPES[cfg.dtype])
    variants = runs.plan_variants(
        cfg, adapter, policies, selective=_list(args.selective) or ["on"], predictors=_list(args.predictors),
        horizons=_list(args.horizons, int), thresholds=[_pair(t) for t in _list(args.thresholds)],
        modes=_list(args.modes), decays=_list(args.decays, float), features=_list(args.features),
    )
    execute(cfg, adapter, variants, frames, seeds, out, threads=args.threads, progress=not args.no_progress)
    command = "scopevid bench " + " ".join(shlex.quote(a) for a in _argv(args))
    (out / "bench.json").write_text(json.dumps({"command": command, "config": args.config}, indent=2))
    return _report(out)


def load_for_bench(args: argparse.Namespace):
    """The config (with --prompt / --steps applied), its frame counts and seeds; sets --threads."""
    from dataclasses import replace

    import torch

    from scopevid import config as config_lib

    cfg = config_lib.load(args.config)
    if args.prompt is not None:
        cfg = replace(cfg, prompt=args.prompt)
    if args.steps is not None:
        cfg = replace(cfg, schedule=replace(cfg.schedule, steps=args.steps))
    frames = _list(args.frames, int) or [cfg.frames]
    seeds = _list(args.seeds, int) or [cfg.seed]
    if any(f < 1 for f in frames):
        raise ConfigError(f"--frames: positive pixel frame counts, got {frames}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return cfg, frames, seeds


def execute(cfg, adapter, variants, frames: list[int], seeds: list[int], out: Path, *, threads: int | None,
            progress: bool = True) -> list[dict]:
    """Original then every variant, per (frames, seed); bench.parquet rewritten after every run."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from scopevid.bench import runs
    from scopevid.engine.sinks import FrameStore

    steps_dir = out / "steps"
    steps_dir.mkdir(exist_ok=True)
    lpips = runs.lpips_metric(cfg.device)
    memory = runs.PeakMemory(cfg.device)
    total = len(frames) * len(seeds) * (1 + len(variants))
    bar = tqdm(total=total, desc="bench", unit="run", dynamic_ncols=True, disable=not progress)
    rows: list[dict] = []
    for f in frames:
        for seed in seeds:
            ref_dir = out / "_reference"
            shutil.rmtree(ref_dir, ignore_errors=True)
            bar.set_postfix_str(f"{f} frames, seed {seed}: original")
            ref_latents = out / "_reference_latents.safetensors"
            ref_row, _ = runs.run_row(cfg, adapter, None, f, seed, reference=None, keep_frames=ref_dir,
                                      steps_dir=steps_dir, memory=memory, threads=threads, latents=ref_latents)
            rows.append(ref_row)
            bar.update(1)
            reference = FrameStore(ref_dir)
            for v in variants:
                bar.set_postfix_str(f"{f} frames, seed {seed}: {v.name}")
                keep = out / "_run" if lpips is not None else None
                row, _ = runs.run_row(cfg, adapter, v, f, seed, reference=reference, keep_frames=keep, steps_dir=steps_dir,
                                      memory=memory, lpips=lpips, reference_row=ref_row, threads=threads,
                                latents=out / "_run_latents.safetensors", reference_latents=ref_latents)
                rows.append(row)
                bar.update(1)
                _write(rows, out, pa, pq)  # partial results survive an interrupted bench
            shutil.rmtree(ref_dir, ignore_errors=True)
            ref_latents.unlink(missing_ok=True)
    bar.close()
    _write(rows, out, pa, pq)
    return rows


def _report(out: Path, notes: list[str] = ()) -> int:
    import pyarrow.parquet as pq

    from scopevid.bench import figures, report

    if not (out / "bench.parquet").is_file():
        raise ConfigError(f"--report-only: no {out / 'bench.parquet'}")
    rows = pq.read_table(out / "bench.parquet").to_pylist()
    meta = json.loads((out / "bench.json").read_text()) if (out / "bench.json").is_file() else {}
    quality = meta.get("quality", "psnr")
    made = figures.all_figures(rows, out / "steps", out, quality)
    md = report.summary_markdown(rows, command=meta.get("command", "?"), config=meta.get("config", "?"),
                                 figures=[p.name for p in made], notes=notes or meta.get("notes", ()), quality=quality)
    (out / "summary.md").write_text(md)
    print(json.dumps({"rows": len(rows), "parquet": str(out / "bench.parquet"), "summary": str(out / "summary.md"),
                      "figures": [str(p) for p in made]}, indent=2))
    return 0


def _write(rows, out: Path, pa, pq) -> None:
    from scopevid.bench.runs import ROW_FIELDS

    table = pa.Table.from_pylist([{k: r.get(k) for k in ROW_FIELDS} for r in rows], schema=_schema(pa))
    pq.write_table(table, out / "bench.parquet")


def _schema(pa):
    f64, i64, s = pa.float64(), pa.int64(), pa.string()
    types = {"frames": i64, "seed": i64, "horizon": i64, "recompute": i64, "cache": i64, "predict": i64, "fallbacks": i64,
             "iterations": i64, "threads": i64}
    strings = {"model", "policy", "base_policy", "kind", "sweep", "selective", "predictor", "feature", "memory_kind", "decision_digest"}
    from scopevid.bench.runs import ROW_FIELDS

    return pa.schema([(k, s if k in strings else types.get(k, f64)) for k in ROW_FIELDS])


def _argv(args: argparse.Namespace) -> list[str]:
    out = []
    for k in ("config", "policies", "frames", "seeds", "prompt", "steps", "selective", "modes", "predictors", "horizons",
              "decays", "features", "thresholds", "threads", "out"):
        v = getattr(args, k, None)
        if v not in (None, "") and not (k == "selective" and v == "on"):
            out += [f"--{k}", str(v)]
    return out
