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
    assert not (tmp_path / "a" / LOCK_NAME).exists() and (tmp_path / "a" / "video.mp4").is_file()  # and leaves no lock file
    with pytest.raises(OutputExistsError, match="not empty"):  # and the finished run is never overwritten
        runner.generate(cfg, tmp_path / "a", progress=False)


def test_out_naming_a_file_is_one_line(tiny_config, tmp_path):
    (tmp_path / "f").write_text("x")
    p = _generate(tiny_config(), tmp_path / "f")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and "is a file" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert (tmp_path / "f").read_text() == "x"


def test_a_lock_file_removed_under_a_waiting_run_is_taken_again(tmp_path, monkeypatch):
    """A run that opened the lock file just before its holder removed it locks a removed file: it must
    see that the path names another file (or none) and lock that one, so a third run is refused."""
    import os

    out = tmp_path / "d"
    out.mkdir()
    path = out / LOCK_NAME
    stale = os.open(path, os.O_RDWR | os.O_CREAT)  # the file as this run found it ...
    os.unlink(path)  # ... then its holder finished and removed it
    opens = iter([stale])
    real = RunLock._open
    monkeypatch.setattr(RunLock, "_open", lambda self, p: next(opens, None) or real(self, p))
    lock = RunLock(out).__enter__()
    try:
        assert os.stat(path).st_ino == os.fstat(lock.fd).st_ino  # the lock is on the file at the path, not the removed one
        monkeypatch.setattr(RunLock, "_open", real)
        with pytest.raises(OutputExistsError, match="in use"):
            RunLock(out).__enter__()
    finally:
        lock.__exit__(None, None, None)
    assert not path.exists()


def test_a_run_inside_another_runs_checkpoint_is_refused(tiny_config, tmp_path):
    """--out inside checkpoint/ (or frames/, logs/, ...) of another run: that run deletes it when it
    finishes, so the second run is refused in one line, before writing anything."""
    cfg = config_lib.load(tiny_config(frames=9))
    runner.generate(cfg, tmp_path / "a", progress=False)
    (tmp_path / "a" / "checkpoint").mkdir()
    with pytest.raises(OutputExistsError, match=r"is inside checkpoint/ of the run in .*a, which that run manages"):
        runner.generate(cfg, tmp_path / "a" / "checkpoint" / "b", progress=False)
    assert not (tmp_path / "a" / "checkpoint" / "b").exists()
