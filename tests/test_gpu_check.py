"""scripts/gpu_check.sh, the prepared device check, in its CPU dry mode: every check runs (tiny
model in bf16 against fp32, a toy SkyReels-V2 layout with and without selective computation,
every attention backend that runs here, a one-rank process group) and writes its Parquet and
markdown table, so the script that a GPU machine runs cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gc"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return out


def test_gpu_check_dry_mode_writes_its_table(dry):
    out = dry
    rows = pq.read_table(out / "gpu_check.parquet").to_pylist()
    checks = [x["check"] for x in rows]
    assert any(c.startswith("tiny bfloat16") for c in checks) and any(c.startswith("tiny float32") for c in checks)
    assert any("selective off" in c for c in checks) and any("selective paper" in c for c in checks)
    assert any(c.startswith("attention sdpa") for c in checks) and any(c.startswith("attention math") for c in checks)
    assert any(c.startswith("gloo with one rank") for c in checks)
    assert not [x for x in rows if x["ok"] is False], rows
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# gpu_check on cpu (dry run)") and md.count("\n|") >= len(rows) + 1


def test_the_device_check_compares_against_what_scopevid_plan_prints(dry):
    """The planned peak of the device check is Plan.peak_bytes of the config it runs, the number
    `scopevid plan` prints for that config (written beside its table), not a figure of its own."""
    out = dry
    rows = {x["check"]: x for x in pq.read_table(out / "gpu_check.parquet").to_pylist()}
    for selective in ("off", "paper"):
        planned = rows[f"toy SkyReels-V2 layout (dry): planned peak (selective {selective})"]
        steps = planned["note"].split("--steps ")[1].split()[0]
        p = subprocess.run([sys.executable, "-m", "scopevid", "plan", "--config", str(out / f"plan_{selective}.yaml"),
                            "--steps", steps, "--text-on-device", "yes", "--json"], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["peak_gib"] == pytest.approx(planned["value"], rel=1e-12)
