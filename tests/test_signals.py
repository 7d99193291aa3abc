"""SIGTERM, SIGINT and SIGKILL at random points of a 257-frame `scopevid generate --checkpoint` run,
ten of each: the run log and the video are readable every time (one line and exit 1 for the signals
a process can catch), and `--resume` finishes the video byte for byte as an uninterrupted run did.
Random times from a fixed seed, so a failure reproduces."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import imageio.v3 as iio
import pyarrow.parquet as pq
import pytest

from conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
FRAMES = 257


def _generate(cfg_path, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "scopevid", "generate", "--config", str(cfg_path), "--out", str(out),
                             "--no-progress", "--checkpoint", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _started(p, out) -> float:
    """Wait until the rollout has started (its run log exists); returns that moment."""
    deadline = time.monotonic() + 60
    while not (out / "steps.parquet").exists():
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.02)
    return time.monotonic()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from conftest import write_tiny_config

    tmp = tmp_path_factory.mktemp("signals")
    cfg_path = write_tiny_config(tmp, frames=FRAMES, policy="scope-fast")
    p = _generate(cfg_path, tmp / "ref")
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    parts = len(list((tmp / "ref" / "steps.parquet").glob("part-*.parquet")))  # 64 iterations a part, + the schema part
    return cfg_path, tmp / "ref", parts


def _at_part(p, out, part: int) -> None:
    """Wait until the run has logged `part` parts of iterations (or ended): a point of the run set by
    its progress, not by the clock, so a loaded machine moves it nowhere."""
    deadline = time.monotonic() + 240
    while not (out / "steps.parquet" / f"part-{part:05d}.parquet").exists() and p.poll() is None:
        assert time.monotonic() < deadline, "the run made no progress in 240 s"
        time.sleep(0.01)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_signal_at_random_points_then_resume(reference, tmp_path, sig):
    cfg_path, ref, parts = reference
    rng = random.Random(int(sig))
    interrupted, outcomes = 0, []
    for k in range(10):
        out = tmp_path / f"run{k}"
        p = _generate(cfg_path, out)
        _started(p, out)
        _at_part(p, out, rng.randrange(0, parts - 1))  # a random point of the rollout ...
        time.sleep(rng.uniform(0.0, 0.3))  # ... and within the 64 iterations after it
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
        finished = (out / "summary.json").is_file()  # the signal came after the work, while exiting
        outcomes.append((p.returncode, finished))
        if p.returncode != 0 and not finished:
            interrupted += 1
            if sig == signal.SIGKILL:
                assert p.returncode == -signal.SIGKILL
            else:
                lines = err.strip().splitlines()
                assert p.returncode == 1 and "Traceback" not in err, err[-2000:]
                assert f"stopped by {sig.name}" in lines[-1] and "--resume" in lines[-1], lines[-1]
            log = pq.read_table(out / "steps.parquet")  # readable whatever the signal
            assert log.column("serial").to_pylist() == list(range(log.num_rows))
            video = out / "video.mp4"
            if sig != signal.SIGKILL and video.exists():  # closed on the way out (absent: no frame finished yet)
                assert 0 < iio.imread(video).shape[0] <= FRAMES  # == FRAMES: stopped between the last frame and the summary
            r = _generate(cfg_path, out, "--resume")
            _, err = r.communicate(timeout=300)
            assert r.returncode == 0, err[-2000:]
        assert (out / "video.mp4").read_bytes() == (ref / "video.mp4").read_bytes(), f"run {k}: the video differs"
        a, b = pq.read_table(ref / "steps.parquet"), pq.read_table(out / "steps.parquet")
        assert a.column("mode").to_pylist() == b.column("mode").to_pylist()
        sa, sb = json.loads((ref / "summary.json").read_text()), json.loads((out / "summary.json").read_text())
        assert sa["decision_digest"] == sb["decision_digest"] and sb["frames"] == FRAMES
    assert interrupted >= 7, outcomes  # most signals landed mid-run


def test_resume_refuses_changed_settings(reference, tmp_path):
    cfg_path, _, _ = reference
    out = tmp_path / "run"
    p = _generate(cfg_path, out)
    while not (out / "checkpoint" / "settings.json").exists():  # what a resume compares against
        assert p.poll() is None
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    r = _generate(cfg_path, out, "--resume", "--seed", "7")
    _, err = r.communicate(timeout=60)
    assert r.returncode == 2 and "resume: seed was 0 when the run started and is 7 now" in err.strip().splitlines()[-1], err


def test_a_signal_inside_a_run_log_flush_is_acted_on_at_the_next_safe_point(tmp_path, monkeypatch):
    """SIGTERM delivered to this process while a run-log part is being written, with the CLI's handler
    installed as `scopevid generate` has it: the write and its bookkeeping finish (no row written twice,
    none lost), the signal waits as pending, and the next safe point raises Stopped with the one line."""
    import os

    from scopevid import cli, interrupts
    from scopevid.engine import sinks
    from scopevid.engine.rollout import STEP_SCHEMA
    from scopevid.errors import Stopped

    def row(i: int) -> dict:
        return {"window": 0, "iteration": i, "serial": i, "mode": "recompute", "reason": "", "d": None, "r": None,
                "valid_lo": 0, "valid_hi": 1, "compute_lo": 0, "compute_hi": 1, "active": 1, "frames_computed": 1,
                "flops": 0.0, "seconds": 0.0}

    real = sinks.atomic_write_table
    signalled = []

    def write_with_a_signal(path, table):
        if not signalled and table.num_rows:  # the first part with rows: the signal lands mid-flush
            signalled.append(path)
            os.kill(os.getpid(), signal.SIGTERM)
        real(path, table)

    restore = cli._stop_on_signals()
    try:
        log = sinks.RunLog(tmp_path / "steps.parquet", STEP_SCHEMA, every=4)
        monkeypatch.setattr(sinks, "atomic_write_table", write_with_a_signal)
        for i in range(10):
            log.add(row(i))
        assert signalled and interrupts.pending() == "SIGTERM"
        with pytest.raises(Stopped, match="stopped by SIGTERM"):
            interrupts.check()
        log.close()
    finally:
        restore()
        interrupts.reset()
    assert pq.read_table(tmp_path / "steps.parquet").column("serial").to_pylist() == list(range(10))
