"""`scopevid calibrate --config CONFIG (--target-psnr X | --target-speedup Y) --out DIR`.

Searches SCOPE's (tau_c, tau_p, H) on a few short calibration rollouts (bench/calibrate.py) and
writes DIR/preset.yaml, a policy preset ready to paste into the model's presets file, plus
DIR/calibrate.json (every evaluation, cost, held-out check). `--fit-teacache` instead fits TeaCache's
rescaling polynomial for the model (bench/teacache_fit.py) and writes DIR/teacache.yaml.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="model preset YAML, e.g. configs/tiny.yaml")
    p.add_argument("--out", required=True, help="output directory (must be new or empty)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--target-psnr", type=float, help="lowest PSNR (dB vs Original) to accept; the fastest setting wins")
    g.add_argument("--target-speedup", type=float, help="lowest FLOPs speedup to accept; the best-quality setting wins")
    g.add_argument("--fit-teacache", action="store_true", help="fit TeaCache's rescaling polynomial for this model")
    p.add_argument("--frames", type=int, default=49, help="pixel frames of each calibration rollout (default 49)")
    p.add_argument("--seeds", default="0,1", help="calibration seeds (default 0,1)")
    p.add_argument("--holdout", default="", help="seeds to check the pick on afterwards, e.g. 2")
    p.add_argument("--holdout-frames", default="", help="frame counts for the held-out check, e.g. 49,257 (default: --frames)")
    p.add_argument("--horizons", default="2,3,5,8", help="candidate H values (default 2,3,5,8)")
    p.add_argument("--family", default="ray", choices=("ray", "predict", "cache"),
                   help="ray: tau_p = ratio * tau_c of --base; predict: tau_c = 0 (no Cache), tau_p searched; "
                        "cache: tau_p = tau_c (no Predict) (default ray)")
    p.add_argument("--metric", default="psnr", choices=("psnr", "latent_snr"),
                   help="quality for --target-psnr: PSNR of the decoded frames (default) or the latents' SNR against "
                        "Original's (a checkpoint whose decoder keeps little of the latent)")
    p.add_argument("--base", default="scope-fast", help="preset giving the predictor, decay, warmup and tau_p/tau_c ratio")
    p.add_argument("--name", default="scope-calibrated", help="name of the written preset")
    p.add_argument("--steps", type=int, default=7, help="bisection points per H (default 7)")
    p.add_argument("--feature", default="temb_mod", help="--fit-teacache: signal to fit (temb_mod = e0, temb = e)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")


def _ints(text: str) -> list[int]:
    from scopevid.errors import ConfigError

    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"expected comma-separated integers, got {text!r}") from None


def main(args: argparse.Namespace) -> int:
    import torch

    from scopevid import adapters
    from scopevid import config as config_lib
    from scopevid.engine.runner import DTYPES
    from scopevid.engine.sinks import prepare_out_dir, write_json
    from scopevid.errors import ConfigError

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = config_lib.load(args.config).with_overrides(frames=args.frames)
    seeds = _ints(args.seeds)
    if not seeds:
        raise ConfigError("--seeds: at least one calibration seed")
    out = prepare_out_dir(args.out, args.overwrite)
    adapter = adapters.load(cfg.model, cfg.device, DTYPES[cfg.dtype])
    command = "scopevid calibrate " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["calibrate"] else "scopevid calibrate"

    if args.fit_teacache:
        return _fit_teacache(cfg, adapter, seeds, args, out, command)

    from scopevid.bench.calibrate import Calibrator, preset_yaml

    target, value = ("psnr", args.target_psnr) if args.target_psnr is not None else ("speedup", args.target_speedup)
    cal = Calibrator(cfg, adapter, args.base, args.frames, seeds, out / "_work", family=args.family, metric=args.metric)
    result = cal.search(target, value, _ints(args.horizons), steps=args.steps)
    holdout = _ints(args.holdout)
    if result.pick is not None and holdout:
        for frames in _ints(args.holdout_frames) or [args.frames]:
            cal.holdout(result, holdout, frames)
    report = {
        "command": command, "target": target, "value": value, "frames": args.frames, "seeds": seeds,
        "rollouts": result.rollouts, "seconds": result.seconds,
        "pick": None if result.pick is None else result.pick.__dict__,
        "holdout": result.holdout,
        "evaluations": [e.__dict__ for e in result.evaluations],
    }
    write_json(out / "calibrate.json", report)
    import shutil

    shutil.rmtree(out / "_work", ignore_errors=True)
    if result.pick is None:
        raise ConfigError(f"calibrate: no setting reached {target} {value} on every calibration seed "
                          f"(see {out / 'calibrate.json'}); relax the target or add horizons")
    spec = cal.spec(result.pick.x, result.pick.horizon)
    (out / "preset.yaml").write_text(preset_yaml(result, spec, args.name, {"command": command, "seeds": seeds, "frames": args.frames}))
    print(json.dumps({"preset": str(out / "preset.yaml"), "tau_c": spec["tau_c"], "tau_p": spec["tau_p"], "horizon": spec["horizon"],
                      "calibration_psnr": min(result.pick.psnr), "calibration_flops_speedup": min(result.pick.flops_speedup),
                      "holdout": result.holdout, "rollouts": result.rollouts, "seconds": round(result.seconds, 1)}, indent=2))
    return 0


def _fit_teacache(cfg, adapter, seeds, args, out, command) -> int:
    from scopevid.bench import teacache_fit

    f = teacache_fit.fit(cfg, adapter, seeds, feature=args.feature)
    teacache_fit.plot(f, out / "teacache_fit.png", args.feature)
    c = "[" + ", ".join(f"{x:.6g}" for x in f.coefficients) + "]"
    text = (
        f"# TeaCache rescaling polynomial for this model, fitted by `{command}`\n"
        f"# ({f.pairs} iteration pairs, {args.frames} frames, seeds {seeds}, signal {args.feature}; "
        f"correlation of the raw distances {f.correlation:.3f}). Paste into the presets file.\n"
        f"coefficients: {c}\n"
    )
    (out / "teacache.yaml").write_text(text)
    print(json.dumps({"coefficients": f.coefficients, "pairs": f.pairs, "correlation": f.correlation,
                      "file": str(out / "teacache.yaml")}, indent=2))
    return 0
