"""The device check behind scripts/gpu_check.sh: what must hold on a CUDA GPU, measured, in one run.

Checks (one Parquet row each, and a markdown table):
1. tiny model: fp32 and bf16 on the device against fp32 on the CPU (relative RMS of the latents,
   within the stated bf16 tolerance).
2. a SkyReels-V2-1.3B-shaped model with random weights (configs/arch, the real module tree) at
   540P, bf16, one window: seconds per forward with and without selective computation, SCOPE's
   engine overhead share, peak memory against `scopevid plan`'s number for the same run.
3. every attention backend that runs here: time and agreement with sdpa.
4. nccl with one rank: init, all-reduce, barrier, destroy.

`--dry` runs the same code on the CPU at toy sizes (a 2-layer SkyReels-V2 layout, 32x32), so the
script cannot rot: `make test` runs it that way. Nothing here is an assertion on speed; a row's `ok`
is a correctness check (agreement, tolerance, fit), and the numbers are the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BF16_REL_RMS = 0.05  # the stated bf16 tolerance (tests/test_dtypes.py)
ROWS: list[dict] = []


def row(check: str, value, unit: str, ok: bool | None, note: str = "") -> None:
    ROWS.append({"check": check, "value": float(value) if value is not None else None, "unit": unit,
                 "ok": ok, "note": note})
    print(f"{check:<46} {'' if value is None else f'{value:.4g}':>12} {unit:<10} {'' if ok is None else ('ok' if ok else 'FAIL')} {note}",
          flush=True)


def guarded(name: str):
    def wrap(fn):
        def run(*a, **k):
            try:
                fn(*a, **k)
            except Exception as e:  # one failing check must not hide the others
                traceback.print_exc()
                row(name, None, "", False, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
        return run
    return wrap


def _rel_rms(x, ref) -> float:
    x, ref = x.double().cpu(), ref.double().cpu()
    return float((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


@guarded("tiny model on the device")
def check_tiny(device: str) -> None:
    from scopevid import config as config_lib
    from scopevid.cluster.worker import collect_rollout
    from scopevid.engine.topology import LocalTopology

    cfg = config_lib.load(ROOT / "configs" / "tiny.yaml").with_overrides(frames=33)
    ref = collect_rollout(LocalTopology(), cfg.with_overrides(device="cpu", dtype="float32"), "original", check_decisions=False)
    for dtype, tol in (("float32", 1e-3), ("bfloat16", BF16_REL_RMS)):
        t0 = time.perf_counter()
        run = collect_rollout(LocalTopology(), cfg.with_overrides(device=device, dtype=dtype), "original", check_decisions=False)
        e = _rel_rms(run["latents"], ref["latents"])
        row(f"tiny {dtype} on {device} vs fp32 CPU (rel RMS)", e, "", e < tol, f"{time.perf_counter() - t0:.1f} s, tolerance {tol}")


def _skyreels_arch(dry: bool, tmp: Path) -> Path:
    if not dry:
        return ROOT / "configs" / "arch" / "SkyReels-V2-DF-1.3B"
    src = ROOT / "configs" / "arch" / "SkyReels-V2-DF-1.3B"
    out = tmp / "SkyReels-V2-toy"
    for f in src.rglob("*.json"):
        d = json.loads(f.read_text())
        rel = f.relative_to(src)
        if rel.parts[0] == "transformer":
            d.update(num_attention_heads=2, attention_head_dim=12, ffn_dim=32, num_layers=2, text_dim=32, freq_dim=256)
        if rel.parts[0] == "text_encoder":
            d.update(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=64)
        if rel.parts[0] == "vae":
            d.update(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(json.dumps(d))
    return out


def _materialized(arch: Path, h: int, w: int, device: str, dtype: torch.dtype):
    """A SkyReels-V2 adapter of the layout's real module tree with random weights on `device`."""
    from scopevid.adapters.skyreels_v2 import SkyReelsV2Adapter
    from scopevid.adapters.skyreels_v2.loader import build_on_meta

    parts = build_on_meta(arch, dtype=dtype, vae_dtype=torch.float32, text_dtype=dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    for m in (parts.transformer, parts.vae, parts.text_encoder):
        m.to_empty(device=device)
        with torch.no_grad():
            for name, p in [*m.named_parameters(), *m.named_buffers()]:
                if p.is_floating_point():
                    vals = torch.randn(p.shape, generator=g, dtype=torch.float32) * (0.02 if p.dim() > 1 else 0.0)
                    p.copy_((vals + (1.0 if "norm" in name and p.dim() == 1 else 0.0)).to(p.dtype))
    return SkyReelsV2Adapter(parts, height=h, width=w, fps=24, addnoise_condition=20)


@guarded("SkyReels-V2-1.3B-shaped window")
def check_skyreels(device: str, dry: bool, tmp: Path, out: Path) -> None:
    """Measured against `scopevid plan`: the rollout decodes its frames as a run does, and its peak is
    compared with `Plan.peak_bytes` of the same config, which is written to OUT/plan_<selective>.yaml
    (`scopevid plan --config OUT/plan_off.yaml --steps N --text-on-device yes` prints the same number)."""
    from dataclasses import replace

    from scopevid import config as config_lib
    from scopevid.dryrun.planner import plan
    from scopevid.engine import runner
    from scopevid.scheduler import policies as policy_lib

    arch = _skyreels_arch(dry, out)
    h, w, base, frames = (32, 32, 13, 13) if dry else (544, 960, 97, 97)
    dtype = torch.bfloat16
    cfg = config_lib.load(ROOT / "configs" / "bench" / "plan" / "skyreels_v2_df_1.3b_540p.yaml")
    cfg = cfg.with_overrides(model={**cfg.model, "path": str(arch), "height": h, "width": w}, frames=frames,
                             device="cpu" if device == "cpu" else "cuda", dtype="bfloat16",
                             schedule=replace(cfg.schedule, steps=4 if dry else 10, base_num_frames=base, ar_step=5,
                                              causal_block_size=1 if dry else 5))
    ad = _materialized(arch, h, w, device, dtype)
    label = "toy SkyReels-V2 layout (dry)" if dry else "SkyReels-V2-1.3B-shaped 540P"
    for selective in ("off", "paper"):
        c = cfg.with_overrides(schedule=replace(cfg.schedule, selective=selective))
        (out / f"plan_{selective}.yaml").write_text(c.to_yaml())
        planned = plan(c, steps=c.schedule.steps, text_on_device=True).peak_bytes / 2**30
        row(f"{label}: planned peak (selective {selective})", planned, "GiB", None,
            f"scopevid plan --config plan_{selective}.yaml --steps {c.schedule.steps} --text-on-device yes")
        plan_ = runner.build_plan(c, ad)
        cond = ad.encode_prompt(c.prompt, None, c.guidance)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        ro = runner.make_rollout(c, ad, plan_, policy_lib.build(c.policy_spec("scope-fast"), "scope-fast"), cond)
        decoder = ad.stream_decoder()  # the frames are decoded as a run decodes them: the plan counts the decode
        t0 = time.perf_counter()
        n = 0
        for _, x in ro.run():
            decoder.push(x)
            n += 1
        decoder.flush()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        tm, st = ro.runner.timings, ro.state.stats
        per = tm.forward / max(1, sum(ro.runner.forwards.values()))
        row(f"{label}: seconds per forward (selective {selective})", per, "s", None,
            f"{n} frames, {st.iterations} iterations, {wall:.1f} s")
        row(f"{label}: SCOPE engine overhead (selective {selective})", tm.overhead / max(tm.loop, 1e-9), "share", None)
        if device.startswith("cuda"):
            peak = torch.cuda.max_memory_allocated() / 2**30
            row(f"{label}: peak memory (selective {selective})", peak, "GiB", abs(peak - planned) <= 0.25 * planned,
                f"scopevid plan says {planned:.2f} GiB (Plan.peak_bytes)")
    del ad


@guarded("attention backends")
def check_attention(device: str) -> None:
    from scopevid.adapters import attention

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    s = 4096 if device.startswith("cuda") else 256
    q, k, v = (torch.randn(1, 12, s, 128, generator=g).to(device, dtype) for _ in range(3))
    ref = attention.kernel("sdpa")(q, k, v, None)
    for name in attention.BACKENDS:
        why = attention.unavailable(name, device, dtype)
        if why is not None:
            row(f"attention {name}", None, "", None, f"not run: {why}")
            continue
        fn = attention.kernel(name)
        fn(q, k, v, None)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            out = fn(q, k, v, None)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        e = _rel_rms(out, ref)
        row(f"attention {name}: ms per call ({s} tokens, 12 heads)", (time.perf_counter() - t0) / 5 * 1e3, "ms", e < 2e-2,
            f"rel RMS vs sdpa {e:.2e}")


@guarded("process group with one rank")
def check_backend(device: str) -> None:
    import torch.distributed as dist

    from scopevid.cluster.groups import free_port

    backend = "nccl" if device.startswith("cuda") else "gloo"
    t0 = time.perf_counter()
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    x = torch.ones(1024, device=device)
    dist.all_reduce(x)
    dist.barrier()
    ok = bool((x == 1).all())
    dist.destroy_process_group()
    row(f"{backend} with one rank: init + all-reduce + barrier", time.perf_counter() - t0, "s", ok)


def write_tables(out: Path, info: dict) -> None:
    """The Parquet table and its markdown, rewritten after every check: a run stopped by its time limit
    keeps what it measured."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{**r, **info} for r in ROWS]), out / "gpu_check.parquet")
    lines = [f"# gpu_check on {info['device']} (torch {info['torch']}, CUDA {info['cuda']})", "",
             "| check | value | unit | ok | note |", "|---|---|---|---|---|"]
    for r in ROWS:
        v = "" if r["value"] is None else f"{r['value']:.4g}"
        lines.append(f"| {r['check']} | {v} | {r['unit']} | {'' if r['ok'] is None else ('yes' if r['ok'] else 'NO')} | {r['note']} |")
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--dry", action="store_true", help="the CPU at toy sizes (no GPU needed)")
    p.add_argument("--budget-s", type=float, default=430.0, help="no check starts after this many seconds")
    args = p.parse_args()
    start = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if args.dry else "cuda"
    if not args.dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --dry on a CPU", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    info = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run)",
            "torch": torch.__version__, "cuda": torch.version.cuda}
    print(json.dumps(info), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        checks = [("tiny model on the device", lambda: check_tiny(device)),
                  ("SkyReels-V2-1.3B-shaped window", lambda: check_skyreels(device, args.dry, Path(tmp), out)),
                  ("attention backends", lambda: check_attention(device)),
                  ("process group with one rank", lambda: check_backend(device))]
        for name, run in checks:
            spent = time.monotonic() - start
            if spent > args.budget_s:
                row(name, None, "", False, f"not run: {spent:.0f} s spent of the {args.budget_s:.0f} s budget")
            else:
                run()
            write_tables(out, info)
    failed = [r["check"] for r in ROWS if r["ok"] is False]
    print(f"gpu_check: {len(ROWS)} rows, {len(failed)} failed; {out / 'gpu_check.md'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
