"""`scopevid bench ablation`: SCOPE's parts one at a time, against every baseline, on held-out seeds.

    scopevid bench ablation --config configs/tiny.yaml --out out/ablation [--base scope-fast] \\
        [--seeds 11,12,13] [--frames 97]

One command for the question "which part of SCOPE costs quality": from the base preset it varies
one thing at a time (each mode switched off, each predictor, H, lambda, each signal of Eq. 4 the
model offers, selective computation off) and runs every other preset of the config (the baselines
and the other SCOPE presets) on the same seeds. The default seeds (11, 12, 13) are ones no shipped
preset was tuned on. Writes what `bench policies` writes (bench.parquet, steps/, summary.md with a
table per factor and the worst seed beside the mean) plus ablation.png.
"""

from __future__ import annotations

import argparse
import json
import shlex

from scopevid.errors import ConfigError

HELD_OUT = "11,12,13"  # no shipped preset was tuned on these (configs/policies/*.yaml say which seeds were)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="model preset YAML, e.g. configs/tiny.yaml")
    p.add_argument("--out", required=True, help="output directory (must be new or empty)")
    p.add_argument("--base", default="scope-fast", help="the SCOPE preset the factors vary (default scope-fast)")
    p.add_argument("--seeds", default=HELD_OUT, help=f"held-out seeds (default {HELD_OUT})")
    p.add_argument("--frames", help="pixel frame counts (default: the config's)")
    p.add_argument("--prompt", help="prompt for every run (default: the config's)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the config's)")
    p.add_argument("--policies", help="presets to run beside the base (default: every other preset of the config)")
    p.add_argument("--horizons", default="1,2,3,8", help="H values besides the base's (default 1,2,3,8)")
    p.add_argument("--decays", default="0.5,1", help="lambda values besides the base's (default 0.5,1)")
    p.add_argument("--quality", default="psnr", choices=("psnr", "latent_snr"),
                   help="what the Pareto check and the figure rank by: PSNR of the decoded frames (default), or the "
                        "latents' SNR against Original's, for a checkpoint whose decoder keeps little of the latent")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    p.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    from scopevid import adapters
    from scopevid.bench import runs
    from scopevid.commands.bench import _list, _report, execute, load_for_bench
    from scopevid.engine.runner import DTYPES
    from scopevid.engine.sinks import prepare_out_dir
    from scopevid.scheduler.predictors import PREDICTORS

    cfg, frames, seeds = load_for_bench(args)
    base = cfg.policy_spec(args.base)
    if base.get("kind") != "scope":
        raise ConfigError(f"--base: {args.base} is a {base.get('kind')} preset; the ablation varies a scope preset")
    named = _list(args.policies)
    others = named or [n for n in cfg.policies if n not in ("original", args.base)]
    for name in others:
        cfg.policy_spec(name)
    out = prepare_out_dir(args.out, args.overwrite)
    adapter = adapters.load(cfg.model, cfg.device, DTYPES[cfg.dtype])
    skipped = {} if named else _unrunnable(cfg, adapter, others)  # a preset named on purpose must run
    others = [n for n in others if n not in skipped]
    features = ["host"] + sorted(f.value for f in adapter.capabilities.features)
    factors = runs.plan_variants(
        cfg, adapter, [args.base], modes=list(runs.MODES),
        predictors=[p for p in PREDICTORS if p != base.get("predictor", "taylor2")],
        horizons=[h for h in _list(args.horizons, int) if h != base.get("horizon")],
        decays=[x for x in _list(args.decays, float) if x != base.get("decay")],
        features=[f for f in features if f != base.get("feature", "host")],
    )
    off = runs.Variant(f"{args.base}[selective=off]", args.base, base, "off", "selective")
    variants = runs.plan_variants(cfg, adapter, others) + factors[:1] + [off] + factors[1:]
    execute(cfg, adapter, variants, frames, seeds, out, threads=args.threads, progress=not args.no_progress)
    argv = ["--config", args.config, "--base", args.base, "--seeds", ",".join(map(str, seeds)),
            "--frames", ",".join(map(str, frames)), "--quality", args.quality, "--out", str(args.out)]
    notes = ["## What each factor changes", "", f"Every factor is one change to `{args.base}` ({_spec(base)}); "
             "the other rows are the config's presets as shipped.", ""]
    notes += [f"- `{m}`: {what}" for m, what in runs.MODES.items()]
    notes += [f"- `{n}` not run: {why}" for n, why in skipped.items()]
    notes += ["- `selective=off`: every iteration forwards the whole window (the temporal modes alone)",
              "- `predictor`, `H`, `decay`: Eq. 6/7 and the stability controls of section 3.5",
              "- `feature`: the signal phi of Eq. 4 (host: the adapter's host feature, the paper's)", ""]
    meta = {"command": "scopevid bench ablation " + " ".join(shlex.quote(a) for a in argv), "config": args.config,
            "notes": notes, "quality": args.quality}
    (out / "bench.json").write_text(json.dumps(meta, indent=2))
    return _report(out)


def _unrunnable(cfg, adapter, names: list[str]) -> dict[str, str]:
    """Presets of the config this model cannot run (e.g. FlowCache without a K/V cache), with the reason."""
    from scopevid.engine import reuse
    from scopevid.engine.runner import build_plan
    from scopevid.scheduler.policies import build

    plan = build_plan(cfg, adapter)
    out = {}
    for n in names:
        try:
            reuse.for_policy(build(cfg.policy_spec(n), n), adapter, plan)
        except ConfigError as e:
            out[n] = str(e)
    return out


def _spec(spec: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in spec.items() if k != "kind")
