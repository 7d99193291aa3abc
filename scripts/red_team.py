"""Hostile inputs and events against `scopevid generate`, as a markdown table.

Each case runs the real CLI in a fresh process and is judged as a user would: the exit code (2 bad
input, 1 runtime failure, 0 only with a complete video), whether stderr is one line without a
traceback, and the line itself. Nothing is mocked; the NaN case writes a real safetensors file
with one poisoned weight, the full-disk case mounts a real 300 KB tmpfs (needs root; skipped
otherwise). The same behaviours are pinned by tests; this script is the overview.

    .venv/bin/python scripts/red_team.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
BASE["policy_presets"] = str(ROOT / "configs" / "policies" / "tiny.yaml")
BASE["frames"] = 33


def config(tmp: Path, name: str, **over) -> Path:
    d = json.loads(json.dumps(BASE))
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k].update(v)
        else:
            d[k] = v
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def raw(tmp: Path, name: str, data: bytes) -> Path:
    p = tmp / name
    p.write_bytes(data)
    return p


def nan_weights(tmp: Path) -> str:
    from safetensors.torch import load_file, save_file

    src = ROOT / "scopevid" / "weights" / "tiny.safetensors"
    state = load_file(str(src))
    name = next(k for k in state if k.endswith("weight") and state[k].dim() == 2)
    state[name][0, 0] = float("nan")
    dst = tmp / "nan.safetensors"
    save_file(state, str(dst))
    shutil.copy(src.with_suffix(".json"), dst.with_suffix(".json"))
    return str(dst)


def run(args: list[str], *, signal_after: float | None = None, sig=signal.SIGTERM) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "scopevid", *args]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if signal_after is not None:
        time.sleep(signal_after)
        p.send_signal(sig)
    _, err = p.communicate(timeout=600)
    return p.returncode, err


def cases(tmp: Path):
    good = config(tmp, "good")
    gen = lambda cfg, out, *a: ["generate", "--config", str(cfg), "--out", str(tmp / out), "--no-progress", *a]  # noqa: E731
    yield "top-level typo `promt:`", gen(config(tmp, "typo", promt="x"), "o1"), {}
    yield "model typo `weigths:`", gen(config(tmp, "wtypo", model={"weigths": "x"}), "o2"), {}
    yield "SkyReels-V2 `heigth:`", gen(config(tmp, "sky", model={"kind": "skyreels_v2", "path": "x", "heigth": 544}), "o3"), {}
    yield "MAGI-1 height 100", gen(config(tmp, "magi", model={"kind": "magi1", "weights": "random", "height": 100}), "o4"), {}
    yield "binary config file", gen(raw(tmp, "bin.yaml", bytes(range(256))), "o5"), {}
    yield "non-UTF-8 config", gen(raw(tmp, "latin.yaml", "prompt: \"caf\xe9\"\n".encode("latin-1")), "o6"), {}
    yield "empty config file", gen(raw(tmp, "empty.yaml", b""), "o7"), {}
    yield "config is a directory", gen(tmp, "o8"), {}
    yield "policy_presets not a mapping", gen(config(tmp, "ppcfg", policy_presets=str(raw(tmp, "list.yaml", b"- a\n- b\n"))), "o9"), {}
    yield "--steps 1e9", gen(good, "o10", "--steps", "1000000000"), {}
    yield "--frames 1e9", gen(good, "o11", "--frames", "1000000000"), {}
    yield "--frames 0", gen(good, "o12", "--frames", "0"), {}
    yield "--seed abc", gen(good, "o13", "--seed", "abc"), {}
    yield "unknown policy", gen(good, "o14", "--policy", "scope-fastest"), {}
    yield "prompt word not in vocabulary", gen(good, "o15", "--prompt", "purple square"), {}
    yield "guidance: .inf", gen(config(tmp, "inf", guidance=float("inf")), "o16"), {}
    yield "guidance: 1e30", gen(config(tmp, "big", guidance=1e30), "o17"), {}
    yield "NaN in a model weight", gen(config(tmp, "nan", model={"weights": nan_weights(tmp)}), "o18"), {}
    yield "dtype bfloat16 (CPU)", gen(config(tmp, "bf16", dtype="bfloat16"), "o19"), {}
    yield "dtype float16 (CPU)", gen(config(tmp, "fp16", dtype="float16"), "o20"), {}
    yield "device cuda without a GPU", gen(config(tmp, "cuda", device="cuda"), "o21"), {}
    yield "--out names a file", gen(good, raw(tmp, "afile", b"x").name), {}
    yield "--compare with tau_c > tau_p", gen(config(tmp, "tau", policies={"bad": {"kind": "scope", "tau_c": 0.5, "tau_p": 0.1, "decay": 0.75, "horizon": 5}},
                                                     policy="bad"), "o23", "--compare"), {}
    yield "--resume with nothing to resume", gen(good, "o24", "--resume"), {}
    (tmp / "o25").mkdir()
    (tmp / "o25" / "video.mp4").write_bytes(b"old")
    yield "non-empty --out without --overwrite", gen(good, "o25"), {}
    yield "SIGTERM mid-run", gen(config(tmp, "long", frames=257), "o26"), {"signal_after": 3.0}
    yield "SIGINT mid-run", gen(config(tmp, "long2", frames=257), "o27"), {"signal_after": 3.0, "sig": signal.SIGINT}


def full_disk(tmp: Path):
    disk = tmp / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)], capture_output=True).returncode:
        return None
    try:
        return run(["generate", "--config", str(config(tmp, "disk", frames=257)), "--out", str(disk / "o"), "--no-progress",
                    "--checkpoint"])
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def judge(rc: int, err: str) -> tuple[str, str]:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    one = "yes" if len(lines) <= 1 and "Traceback" not in err else f"NO ({len(lines)} lines)"
    return one, (lines[-1][:150] if lines else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="keep the run directories here (default: a temporary directory)")
    a = ap.parse_args()
    tmp = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="redteam"))
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, args, kw in cases(tmp):
        rc, err = run(args, **kw)
        rows.append((name, rc, *judge(rc, err)))
    res = full_disk(tmp)
    if res is not None:
        rows.append(("full disk (300 KB tmpfs)", res[0], *judge(*res)))
    print("| case | exit | one line | message |\n|---|---|---|---|")
    for name, rc, one, msg in rows:
        print(f"| {name} | {rc} | {one} | {msg.replace('|', '/')} |")
    bad = [r for r in rows if r[2] != "yes" or (r[1] == 0 and r[0] not in ("dtype bfloat16 (CPU)", "dtype float16 (CPU)"))]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
