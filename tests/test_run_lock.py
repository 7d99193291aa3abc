"""The run directory as a unit: a second run into a directory a run is writing is refused at once
with one line (exit 2), and the first run's outputs are whole; `--out` naming a file is one line."""

from __future__ import annotations

import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from conftest import ROOT
from scopevid import config as config_lib
from scopevid.engine import runner
from scopevid.engine.sinks import LOCK_NAME, RunLock
from scopevid.errors import OutputExistsError


def _generate(cfg_path, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "scopevid", "generate", "--config", str(cfg_path), "--out", str(out),
                             "--no-progress", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def test_second_run_into_a_busy_directory_is_refused_at_once(tiny_config, tmp_path):
    cfg_path = tiny_config(frames=120)
    out = tmp_path / "out"
    first = _generate(cfg_path, out)
    try:
        deadline = time.monotonic() + 60
        while not (out / "steps.parquet").exists():  # the first run is writing
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        t0 = time.monotonic()
        second = _generate(cfg_path, out, "--overwrite")  # even --overwrite may not take a busy directory
        _, err = second.communicate(timeout=60)
        assert second.returncode == 2 and "in use by another scopevid run (pid" in err.strip().splitlines()[-1], err
        assert "Traceback" not in err and time.monotonic() - t0 < 30
        _, err1 = first.communicate(timeout=180)
    finally:
        for p in (first,):
            if p.poll() is None:
                p.kill()
    assert first.returncode == 0, err1[-2000:]
    assert pq.read_table(out / "steps.parquet").num_rows > 0 and (out / "summary.json").is_file()


def test_lock_is_released_with_the_run(tiny_config, tmp_path):
    cfg = config_lib.load(tiny_config())
    with RunLock(tmp_path / "a"):
        with pytest.raises(OutputExistsError, match="in use by another scopevid run"):
            with RunLock(tmp_path / "a"):
                pass
    runner.generate(cfg, tmp_path / "a", progress=False)  # released: a run can take it
    assert (tmp_path / "a" / LOCK_NAME).is_file() and (tmp_path / "a" / "video.mp4").is_file()
    with pytest.raises(OutputExistsError, match="not empty"):  # and the finished run is never overwritten
        runner.generate(cfg, tmp_path / "a", progress=False)


def test_out_naming_a_file_is_one_line(tiny_config, tmp_path):
    (tmp_path / "f").write_text("x")
    p = _generate(tiny_config(), tmp_path / "f")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and "is a file" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert (tmp_path / "f").read_text() == "x"
