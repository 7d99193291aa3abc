"""scripts/gpu_check.sh, the prepared device check, in its CPU dry mode: every check runs (tiny
model in bf16 against fp32, a toy SkyReels-V2 layout with and without selective computation,
every attention backend that runs here, a one-rank process group) and writes its Parquet and
markdown table, so the script that a GPU machine runs cannot rot."""

from __future__ import annotations

import subprocess

import pyarrow.parquet as pq

from conftest import ROOT


def test_gpu_check_dry_mode_writes_its_table(tmp_path):
    out = tmp_path / "gc"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    rows = pq.read_table(out / "gpu_check.parquet").to_pylist()
    checks = [x["check"] for x in rows]
    assert any(c.startswith("tiny bfloat16") for c in checks) and any(c.startswith("tiny float32") for c in checks)
    assert any("selective off" in c for c in checks) and any("selective paper" in c for c in checks)
    assert any(c.startswith("attention sdpa") for c in checks) and any(c.startswith("attention math") for c in checks)
    assert any(c.startswith("gloo with one rank") for c in checks)
    assert not [x for x in rows if x["ok"] is False], rows
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# gpu_check on cpu (dry run)") and md.count("\n|") >= len(rows) + 1
