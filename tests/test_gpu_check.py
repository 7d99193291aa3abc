"""scripts/gpu_check.sh, the prepared device check, in its CPU dry mode: every check runs (tiny
model in bf16 against fp32, a toy SkyReels-V2 layout with and without selective computation,
every attention backend that runs here, a one-rank process group) and writes its Parquet and
markdown table, so the script that a GPU machine runs cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gc"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
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
    pytest.importorskip("diffusers")  # `scopevid plan` of a SkyReels-V2 config needs the skyreels extra in this Python
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


def _wheel_of_installed(dist: str, dest) -> str:
    """A wheel of an installed distribution, zipped from its installed files (what a wheel is)."""
    import importlib.metadata as md
    import zipfile

    d = md.distribution(dist)
    name = f"{dist}-{d.version}-py3-none-any.whl"
    with zipfile.ZipFile(dest / name, "w") as z:
        for f in d.files:
            if ".." not in f.parts and "__pycache__" not in f.parts:
                z.write(f.locate(), str(f))
    return name


def test_the_self_test_names_what_is_missing_in_one_line_and_takes_carried_wheels(tmp_path):
    """The device check's entry point on a bare Python (a venv with no packages), with a wheel folder that
    carries one real package: the carried package is unpacked and found, everything else missing is named
    in ONE line, and nothing is measured (exit 3)."""
    import venv

    bare = tmp_path / "bare"
    venv.EnvBuilder(with_pip=False).create(bare)
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel_of_installed("PyYAML", wheels)
    out = tmp_path / "gc"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PYTHON": str(bare / "bin" / "python"),
                                                    "GPU_CHECK_WHEELS": str(wheels), "PYTHONPATH": ""})
    assert r.returncode == 3, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and not r.stderr.strip(), r.stdout + r.stderr
    line = lines[0]
    assert line.startswith("gpu_check: cannot start, missing: torch for everything")
    for dist in ("numpy", "pydantic", "safetensors", "pyarrow", "diffusers", "transformers", "ftfy"):
        assert f"{dist} for " in line, (dist, line)
    assert "pyyaml for" not in line and "unpacked from" in line and "pyyaml 6" in line.lower()
    assert not out.exists()  # nothing measured, no table
