"""`scopevid bench` and `scopevid calibrate` end to end on a small random-weight tiny model (seconds).

Calibration's stated tolerance, checked on a seed it never saw: PSNR at most 1 dB below a PSNR
target, FLOPs speedup at least 90% of a speedup target.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import yaml

from scopevid import cli
from scopevid.bench.runs import ROW_FIELDS

PSNR_TOLERANCE_DB = 1.0
SPEEDUP_TOLERANCE = 0.9


def _config(tiny_config, tmp_path, **over):
    presets = tmp_path / "presets.yaml"
    presets.write_text(yaml.safe_dump({
        "original": {"kind": "original"},
        "scope-fast": {"kind": "scope", "tau_c": 0.18, "tau_p": 0.42, "decay": 0.75, "horizon": 5, "warmup": 2},
        "teacache-x": {"kind": "teacache", "thresh": 1.5, "ret_steps": 2},
        "taylorseer-x": {"kind": "taylorseer", "interval": 3},
        "flowcache-x": {"kind": "flowcache", "thresh": 1.5, "ret_steps": 1},
        "deltadit": {"kind": "deltadit"},
    }))
    return str(tiny_config(policy_presets=str(presets), **over))


def test_bench_writes_parquet_figures_and_summary(tiny_config, tmp_path, capsys):
    out = tmp_path / "bench"
    rc = cli.main(["bench", "--config", _config(tiny_config, tmp_path), "--policies",
                   "original,scope-fast,teacache-x,taylorseer-x,flowcache-x,deltadit", "--frames", "9,12", "--seeds", "0",
                   "--selective", "on,off", "--horizons", "2,5", "--thresholds", "0.05:0.1,0.2:0.5",
                   "--predictors", "taylor1,auto", "--threads", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    rows = pq.read_table(out / "bench.parquet").to_pylist()
    assert list(rows[0]) == ROW_FIELDS
    # per length: original, scope-fast on/off, 4 baselines, 2 predictors, 2 horizons, 2 thresholds
    assert len(rows) == 2 * 13
    for r in rows:
        assert r["model"] == "tiny" and r["flops"] > 0 and r["wall_seconds"] > 0 and r["peak_memory_mb"] > 0
        assert r["lpips"] is None  # no LPIPS weights on a test machine: null, never invented
        if r["policy"] == "original":
            assert r["psnr"] is None and r["speedup"] == 1.0 and r["selective"] == "off"
        else:
            assert r["psnr"] > 20 and 0 < r["ssim"] <= 1 and r["flops_speedup"] >= 1.0
    by = {(r["policy"], r["frames"]): r for r in rows}
    assert by[("scope-fast[selective=on]", 12)]["selective"] == "causal"
    assert by[("scope-fast[selective=off]", 12)]["selective"] == "off"
    assert by[("scope-fast[H=2]", 9)]["horizon"] == 2 and by[("scope(0.05,0.1)", 9)]["tau_c"] == 0.05
    for fig in ("frontier.png", "timeline.png", "length.png", "thresholds.png", "horizon.png"):
        assert (out / fig).stat().st_size > 1000, fig
    md = (out / "summary.md").read_text()
    assert "Table 1 analogue" in md and "| teacache-x |" in md and "Speedup versus video length" in md
    assert len(list((out / "steps").glob("*.parquet"))) == len(rows)
    assert not (out / "_reference").exists()


def test_bench_accepts_explicit_kind_and_rejects_unknown_policy(tiny_config, tmp_path, capsys):
    cfg = _config(tiny_config, tmp_path)
    rc = cli.main(["bench", "policies", "--config", cfg, "--policies", "original,taylorseer-x", "--frames", "9",
                   "--out", str(tmp_path / "b"), "--no-progress"])
    assert rc == 0 and (tmp_path / "b" / "bench.parquet").is_file()
    assert cli.main(["bench", "--config", cfg, "--policies", "original,nope", "--out", str(tmp_path / "c")]) == 2
    assert "nope" in capsys.readouterr().err


def test_bench_ablation_varies_one_part_of_scope_at_a_time(tiny_config, tmp_path):
    out = tmp_path / "abl"
    rc = cli.main(["bench", "ablation", "--config", _config(tiny_config, tmp_path), "--policies", "teacache-x",
                   "--frames", "12", "--seeds", "5", "--horizons", "2", "--decays", "1", "--threads", "1",
                   "--out", str(out), "--no-progress"])
    assert rc == 0
    rows = {r["policy"]: r for r in pq.read_table(out / "bench.parquet").to_pylist()}
    modes = ["no-predict", "cache-not-predict", "no-cache", "selective-only"]
    features = ["embed", "temb", "temb_mod"]  # the tiny model's signals besides host
    assert set(rows) == {"original", "teacache-x", "scope-fast", "scope-fast[selective=off]", "scope-fast[H=2]",
                         "scope-fast[decay=1]"} | {f"scope-fast[{m}]" for m in modes} | {
                         f"scope-fast[predictor={p}]" for p in ("taylor1", "newton2", "momentum", "auto")} | {
                         f"scope-fast[feature={f}]" for f in features}
    # each mode switched off is the preset's thresholds rewritten by hand (tau_c 0.18, tau_p 0.42)
    th = {m: (rows[f"scope-fast[{m}]"]["tau_c"], rows[f"scope-fast[{m}]"]["tau_p"]) for m in modes}
    assert th == {"no-predict": (0.18, 0.18), "cache-not-predict": (0.42, 0.42), "no-cache": (0.0, 0.42),
                  "selective-only": (0.0, 0.0)}
    assert rows["scope-fast[no-predict]"]["predict"] == 0 and rows["scope-fast[cache-not-predict]"]["predict"] == 0
    assert rows["scope-fast[no-cache]"]["cache"] == 0
    only = rows["scope-fast[selective-only]"]
    assert only["cache"] == only["predict"] == 0 and only["selective"] == "causal" and only["psnr"] == 100.0
    assert only["latent_snr"] == 100.0 and 0 < rows["scope-fast"]["latent_snr"] < 100 and rows["original"]["latent_snr"] is None
    assert rows["scope-fast[selective=off]"]["selective"] == "off" and rows["scope-fast[decay=1]"]["decay"] == 1.0
    # the signal of Eq. 4 really changes: d per iteration differs from the host feature's
    d = {f: pq.read_table(out / "steps" / f"scope-fast_feature={f}___12__5.parquet").column("d").to_pylist() for f in features}
    d["host"] = pq.read_table(out / "steps" / "scope-fast__12__5.parquet").column("d").to_pylist()
    assert all(rows[f"scope-fast[feature={f}]"]["feature"] == f for f in features)
    assert len({tuple(round(x or 0, 9) for x in v) for v in d.values()}) == 4
    assert (out / "ablation.png").stat().st_size > 1000
    md = (out / "summary.md").read_text()
    assert "One mode off" in md and "Signal of Eq. 4" in md and "worst seed" in md and "`no-cache`" in md


def test_latent_snr_by_hand():
    import torch

    from scopevid.engine.metrics import latent_snr

    ref = torch.ones(2, 5, dtype=torch.float64)  # |ref|^2 = 10
    assert abs(latent_snr(ref + 0.1, ref) - 20.0) < 1e-9  # |err|^2 = 0.1 -> 10 log10(100)
    assert latent_snr(ref, ref) == 100.0


def test_bench_ablation_refuses_a_signal_the_model_lacks_and_a_baseline_base(tiny_config, tmp_path, capsys):
    cfg = _config(tiny_config, tmp_path)
    assert cli.main(["bench", "--config", cfg, "--policies", "scope-fast", "--features", "nope", "--frames", "9",
                     "--out", str(tmp_path / "a")]) == 2
    assert "feature" in capsys.readouterr().err
    assert cli.main(["bench", "ablation", "--config", cfg, "--base", "teacache-x", "--out", str(tmp_path / "b")]) == 2
    assert "varies a scope preset" in capsys.readouterr().err


def test_calibrate_predict_family_never_caches_and_can_rank_by_latent_snr(tiny_config, tmp_path):
    cfg = _config(tiny_config, tmp_path, frames=12)
    reports = {}
    for metric in ("psnr", "latent_snr"):
        out = tmp_path / metric
        rc = cli.main(["calibrate", "--config", cfg, "--family", "predict", "--metric", metric, "--target-psnr", "60",
                       "--frames", "12", "--seeds", "0", "--horizons", "3", "--steps", "4", "--threads", "1", "--out", str(out)])
        assert rc == 0
        report = reports[metric] = json.loads((out / "calibrate.json").read_text())
        assert all(e["tau_c"] == 0.0 and e["tau_p"] == round(e["x"], 6) for e in report["evaluations"])
        preset = yaml.safe_load((out / "preset.yaml").read_text())["scope-calibrated"]
        assert preset["tau_c"] == 0.0 and preset["tau_p"] == report["pick"]["tau_p"] and min(report["pick"]["psnr"]) >= 60
    first = [reports[m]["evaluations"][0] for m in ("psnr", "latent_snr")]
    assert first[0]["x"] == first[1]["x"] and first[0]["psnr"] != first[1]["psnr"]  # the same run, scored two ways


def test_calibrate_families_by_hand(tiny_config, tmp_path):
    from scopevid import adapters, config
    from scopevid.bench.calibrate import Calibrator

    cfg = config.load(_config(tiny_config, tmp_path))
    adapter = adapters.load(cfg.model, "cpu")
    spec = {f: Calibrator(cfg, adapter, "scope-fast", 9, [0], tmp_path / f, family=f).spec(0.1, 3) for f in ("ray", "predict", "cache")}
    assert (spec["ray"]["tau_c"], round(spec["ray"]["tau_p"], 6)) == (0.1, round(0.1 * 0.42 / 0.18, 6))
    assert (spec["predict"]["tau_c"], spec["predict"]["tau_p"]) == (0.0, 0.1)
    assert (spec["cache"]["tau_c"], spec["cache"]["tau_p"]) == (0.1, 0.1) and spec["cache"]["horizon"] == 3


def test_calibrate_hits_psnr_target_on_a_held_out_seed(tiny_config, tmp_path, capsys):
    out = tmp_path / "cal"
    target = 62.0
    rc = cli.main(["calibrate", "--config", _config(tiny_config, tmp_path, frames=12), "--target-psnr", str(target),
                   "--frames", "12", "--seeds", "0,1", "--holdout", "2", "--holdout-frames", "12,20", "--horizons", "2,5",
                   "--steps", "5", "--threads", "1", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "calibrate.json").read_text())
    assert min(report["pick"]["psnr"]) >= target  # met on every calibration seed
    held = report["holdout"][0]
    assert held["seed"] == 2 and held["frames"] == 12 and held["psnr"] >= target - PSNR_TOLERANCE_DB
    assert report["holdout"][1]["frames"] == 20  # the longer check has its own reference
    preset = yaml.safe_load((out / "preset.yaml").read_text())["scope-calibrated"]
    assert preset["kind"] == "scope" and preset["tau_c"] <= preset["tau_p"] and preset["horizon"] in (2, 5)
    # cost: 2 seeds per evaluated point + their 2 Original references + per hold-out length a reference and a run
    assert report["rollouts"] == len(report["evaluations"]) * 2 + 2 + 2 * 2


def test_calibrate_hits_speedup_target_on_a_held_out_seed(tiny_config, tmp_path):
    out = tmp_path / "cal"
    target = 3.0
    rc = cli.main(["calibrate", "--config", _config(tiny_config, tmp_path, frames=12), "--target-speedup", str(target),
                   "--frames", "12", "--seeds", "0,1", "--holdout", "2", "--horizons", "2,5", "--steps", "5",
                   "--threads", "1", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "calibrate.json").read_text())
    assert min(report["pick"]["flops_speedup"]) >= target
    assert report["holdout"][0]["flops_speedup"] >= SPEEDUP_TOLERANCE * target


def test_calibrate_unreachable_target_is_a_clear_error(tiny_config, tmp_path, capsys):
    rc = cli.main(["calibrate", "--config", _config(tiny_config, tmp_path, frames=9), "--target-speedup", "1000",
                   "--frames", "9", "--seeds", "0", "--horizons", "2", "--steps", "2", "--out", str(tmp_path / "c")])
    assert rc == 2 and "no setting reached speedup 1000" in capsys.readouterr().err


def test_calibrate_fits_teacache_coefficients(tiny_config, tmp_path, capsys):
    out = tmp_path / "fit"
    rc = cli.main(["calibrate", "--config", _config(tiny_config, tmp_path, frames=12), "--fit-teacache", "--frames", "12",
                   "--seeds", "0", "--out", str(out)])
    assert rc == 0
    coeffs = yaml.safe_load((out / "teacache.yaml").read_text())["coefficients"]
    assert len(coeffs) == 5 and (out / "teacache_fit.png").is_file()


def test_bench_sp_compares_meshes_side_by_side(tmp_path):
    """`bench sp --meshes`: one row per mesh next to the 1-process baseline, the same video everywhere
    (a mesh that computed something else would be a fast wrong answer), comm time measured."""
    out = tmp_path / "sp"
    rc = cli.main(["bench", "sp", "--meshes", "cfg=2;ulysses=2", "--frames", "6", "--dim", "32", "--depth", "2",
                   "--heads", "2", "--size", "16", "--steps", "2", "--out", str(out)])
    assert rc == 0
    rows = pq.read_table(out / "bench_sp.parquet").to_pylist()
    assert [(r["mesh"], r["world_size"]) for r in rows] == [("1", 1), ("cfg=2", 2), ("ulysses=2", 2)]
    assert all(r["same_decisions_as_1rank"] for r in rows)
    assert rows[1]["max_abs_diff_vs_1rank"] == 0.0  # the branches combine exactly as on one process
    assert rows[2]["max_abs_diff_vs_1rank"] <= 1e-4
    assert rows[0]["comm_seconds"] == 0.0 and rows[1]["comm_seconds"] > 0 and rows[2]["comm_seconds"] > 0
    best = json.loads((out / "bench_sp.json").read_text())["best"]
    assert set(best) == {"1", "cfg=2", "ulysses=2"} and best["cfg=2"]["world_size"] == 2


def test_selective_on_is_the_exact_mode_for_block_causal_models_only(tiny_config):
    """`--selective on` without a mode in the config: causal (exact) for block-causal models, the paper's
    interval approximation for bidirectional ones, read from the adapter's declared capabilities."""
    import torch

    from scopevid import adapters, config as config_lib
    from scopevid.bench.runs import selective_mode
    from conftest import ROOT

    cfg = config_lib.load(tiny_config(schedule={"selective": "off"}))
    tiny = adapters.load(cfg.model)
    sky = adapters.load({"kind": "skyreels_v2", "path": str(ROOT / "configs/arch/SkyReels-V2-DF-1.3B"), "height": 64,
                         "width": 64}, "meta", torch.bfloat16)
    assert tiny.capabilities.causal and not sky.capabilities.causal
    assert selective_mode(cfg, tiny, "on") == "causal" and selective_mode(cfg, sky, "on") == "paper"
    assert selective_mode(cfg, tiny, "off") == "off"
