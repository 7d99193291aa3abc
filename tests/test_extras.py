"""The core runs without the optional integrations, and a missing one is refused in one line naming the
extra to install. Where a package is installed here, the child process is made unable to import it
(`sys.modules[name] = None`, Python's own way to make an import fail), so the same test also runs on a
stack that lacks it for real (scripts/second_stack.sh)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, write_tiny_config

pytestmark = pytest.mark.timeout(300)
HEAVY = ("ray", "deepspeed", "diffusers", "transformers")


def _python(code: str, *args: str, block: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    prelude = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in block)
    return subprocess.run([sys.executable, "-c", prelude + code, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)


def test_generate_on_one_process_imports_no_heavy_integration(tmp_path):
    cfg = write_tiny_config(tmp_path, frames=9)
    code = ("from scopevid.cli import main\n"
            "rc = main(['generate', '--config', sys.argv[1], '--out', sys.argv[2], '--no-progress'])\n"
            f"print(json.dumps({{'rc': rc, 'loaded': [m for m in {HEAVY!r} if sys.modules.get(m) is not None]}}))\n")
    r = _python("import json\n" + code, str(cfg), str(tmp_path / "out"), block=HEAVY)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == {"rc": 0, "loaded": []}
    assert (tmp_path / "out" / "video.mp4").stat().st_size > 0 and (tmp_path / "out" / "summary.json").exists()


def test_the_ray_driver_without_ray_is_one_line_naming_the_extra(tmp_path):
    cfg = write_tiny_config(tmp_path, frames=9)
    r = _python("from scopevid.cluster.driver import main\nsys.exit(main(sys.argv[1:]))",
                "--config", str(cfg), "--out", str(tmp_path / "o"), block=("ray",))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "scopevid driver: error: python -m scopevid.cluster.driver (jobs on a Ray cluster) needs ray, which is not "
        "installed here: pip install 'scopevid[ray]'"], r.stderr
    assert not (tmp_path / "o").exists()


def test_skyreels_without_diffusers_is_one_line_naming_the_extra(tmp_path):
    r = _python("from scopevid.cli import main\nsys.exit(main(sys.argv[1:]))", "plan", "--config",
                "configs/bench/plan/skyreels_v2_df_1.3b_540p.yaml", block=("diffusers",))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "scopevid plan: error: model.kind: skyreels_v2 (SkyReels-V2) needs diffusers, which is not installed here: "
        "pip install 'scopevid[skyreels]'"], r.stderr
