"""SIGTERM, SIGINT and SIGKILL at random points of a run: the run log and the video stay readable
every time, with one line (exit 1) for the signals a process can catch. Ten of each, at random times
(a fixed seed, so a failure reproduces)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

import imageio.v3 as iio
import pyarrow.parquet as pq
import pytest

from conftest import ROOT

pytestmark = pytest.mark.timeout(600)


def _start(cfg_path, out):
    return subprocess.Popen([sys.executable, "-m", "scopevid", "generate", "--config", str(cfg_path), "--out", str(out),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_signal_at_random_points_leaves_readable_outputs(tiny_config, tmp_path, sig):
    cfg_path = tiny_config(frames=257)
    rng = random.Random(int(sig))
    readable: dict = {}
    for k in range(10):
        out = tmp_path / f"run{k}"
        p = _start(cfg_path, out)
        deadline = time.monotonic() + 60
        while not (out / "steps.parquet").exists():  # the rollout has started
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.5))
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
        if p.returncode == 0:  # the run finished before the signal arrived: a whole video
            assert (out / "summary.json").is_file()
            continue
        if sig == signal.SIGKILL:
            assert p.returncode == -signal.SIGKILL
        else:
            lines = err.strip().splitlines()
            assert p.returncode == 1 and "Traceback" not in err, err[-2000:]
            assert f"stopped by {sig.name}" in lines[-1], lines[-1]
        log = pq.read_table(out / "steps.parquet")  # readable whatever the signal
        serials = log.column("serial").to_pylist()
        assert serials == list(range(len(serials)))
        video = out / "video.mp4"
        if sig != signal.SIGKILL and video.exists():  # closed on the way out: a playable MP4 of the frames finished
            frames = iio.imread(video)  # (no file: stopped before the first frame was finished)
            assert 0 < frames.shape[0] < 257
        readable[sig.name] = readable.get(sig.name, 0) + int(video.exists())
