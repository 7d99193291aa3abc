"""A rank that dies or stalls mid-rollout ends the job: the survivor exits non-zero with a clear one-line
error within the collective timeout, and what rank 0 had written (MP4, run log) stays readable.

Ranks are real `python -m scopevid generate` processes (the torchrun code path: RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT in the environment), 1 thread each, gloo on 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import imageio.v2 as imageio
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, kill_all, write_tiny_config
from scopevid.cluster.groups import free_port
from scopevid.cluster.launch import rank_env

pytestmark = pytest.mark.integration

FRAMES = 64
# a slightly larger tiny model, so the rollout outlasts the moment we kill a rank
ARCH = {"size": 16, "patch": 4, "dim": 64, "depth": 4, "heads": 2,
        "vocab": ["<null>", "red", "green", "blue", "square", "moving", "left", "right"]}


def _launch(cfg, out, timeout_s: float) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(2):
        env = rank_env(rank, 2, port, threads=1, dist_timeout_s=timeout_s)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "scopevid", "generate", "--config", str(cfg), "--out", str(out), "--no-progress"],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ))
    return procs


def _wait_for(path, procs, limit: float = 120.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if any(p.poll() is not None for p in procs):
            outs = [p.communicate() for p in procs]
            pytest.fail(f"a rank ended before {path.name} appeared: {[p.returncode for p in procs]} {outs}")
        if time.monotonic() - t0 > limit:
            pytest.fail(f"{path.name} did not appear within {limit} s")
        time.sleep(0.01)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("how", ["kill", "stall"])
def test_dead_or_stalled_rank_ends_the_job_cleanly(tmp_path, how):
    timeout_s = 20.0 if how == "kill" else 8.0
    cfg = write_tiny_config(tmp_path, frames=FRAMES, model={"kind": "tiny", "weights": "random", "init_seed": 0,
                                                             "shift": 3.0, "arch": ARCH})
    out = tmp_path / "out"
    procs = _launch(cfg, out, timeout_s)
    try:
        # rank 0 opens the MP4 when its first group of 8 decoded frames is written: mid-rollout
        _wait_for(out / "video.mp4", procs)
        victim, survivor = procs[1], procs[0]
        t_fault = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        try:
            _, err = survivor.communicate(timeout=timeout_s + 60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"survivor still running {timeout_s + 60:.0f} s after the peer was {how}ed")
        took = time.monotonic() - t_fault
    finally:
        kill_all(procs)  # SIGKILL also ends a stopped process

    assert survivor.returncode != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("scopevid generate: error: rank 0/2:"), err[-2000:]
    assert "Traceback" not in err
    if how == "kill":
        assert "peer rank died" in lines[-1], lines[-1]
        assert took < timeout_s, f"a dead peer must be noticed at once, took {took:.1f} s"
    else:
        assert f"collective timeout of {timeout_s:g} s" in lines[-1], lines[-1]
        assert timeout_s - 1 < took < timeout_s + 30, took

    # what rank 0 wrote stays readable: a finalised MP4 with the frames done so far, and the run log
    frames = imageio.mimread(str(out / "video.mp4"), memtest=False)
    assert 8 <= len(frames) < FRAMES
    assert frames[0].shape == (16, 16, 3)
    steps = pq.read_table(out / "steps.parquet")
    assert steps.num_rows > 0
    assert not (out / "summary.json").exists()  # the run did not pretend to finish
