"""A real `ray job submit` of a 2-rank generation against a real local `ray start --head` cluster.

Everything is on 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray's node address on loopback on a
single machine), token auth is disabled as stack.md says `ray job submit` needs, and the cluster is
stopped in `finally`, by its own session and temp dir (never `ray stop`, which would stop every Ray
cluster on the machine).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import ROOT, local_ray_head, ray_env, write_tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

BIN = Path(sys.executable).parent




def count_video_frames(path: Path) -> int:
    import imageio.v2 as imageio

    with imageio.get_reader(str(path)) as r:
        return sum(1 for _ in r)


@pytest.fixture(scope="module")
def ray_head():
    with local_ray_head("svray") as head:
        yield head


def test_ray_job_submit_two_ranks_as_a_cfg_mesh(ray_head, tmp_path):
    frames = 24
    cfg = write_tiny_config(tmp_path, frames=frames, policy="scope-fast")
    out = tmp_path / "job"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", ray_head.dashboard, "--working-dir", str(ROOT),
           "--", "python", "-m", "scopevid.cluster.driver", "--config", str(cfg), "--frames", str(frames),
           "--world-size", "2", "--parallel", "cfg=2", "--out", str(out), "--progress-every", "0.5"]
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, env=ray_env(), cwd=ROOT, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"ray job submit did not finish in 180 s:\n{(e.stdout or b'')[-3000:]!r}")
    took = time.monotonic() - t0
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "[scopevid driver] done:" in log, log[-3000:]
    assert "2 rank(s) on cpu" in log

    # the video: exactly the requested frames
    assert count_video_frames(out / "video.mp4") == frames

    # the run log is complete: one row per iteration of the plan, in order
    from scopevid import adapters
    from scopevid import config as config_lib
    from scopevid.engine import runner

    rc = config_lib.load(out / "config.yaml")
    plan = runner.build_plan(rc, adapters.load(rc.model))
    steps = pq.read_table(out / "steps.parquet")
    assert steps.num_rows == plan.num_iterations()
    assert steps.column("serial").to_pylist() == list(range(plan.num_iterations()))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"] == frames and summary["world_size"] == 2
    assert summary["config"]["parallel"]["cfg"] == 2  # the guidance branches ran on the two ranks
    one = runner.generate(rc, tmp_path / "one", progress=False)  # ... and made the 1-process video
    assert summary["decision_digest"] == one["decision_digest"]
    assert (out / "video.mp4").read_bytes() == (tmp_path / "one" / "video.mp4").read_bytes()
    assert summary["iterations"] == plan.num_iterations()
    assert sum(summary["counts"].values()) == plan.num_iterations()

    # shards and the job record
    from scopevid.engine.checkpoint import read_frames, read_latents

    assert [f for f, _ in read_frames(out / "frames")] == list(range(frames))
    assert [f for f, _ in read_latents(out / "latents")] == list(range(plan.latent_frames))
    job = json.loads((out / "job.json").read_text())
    assert job["status"] == "complete" and job["world_size"] == 2
    assert [p["rank"] for p in job["per_rank"]] == [0, 1]
    assert all(p["peak_rss_mb"] > 10 for p in job["per_rank"])
    assert not (out / "checkpoint").exists(), "a completed job removes its checkpoint"
    print(f"ray job submit round trip: {took:.1f} s")


def test_bench_scaling_table_and_plot(ray_head, tmp_path):
    """`scopevid bench scaling`: one batch job per mesh on the cluster (the same 2 videos each), Parquet,
    JSON and PNG; dp=2 makes the two videos at once on two groups, and every mesh's videos are the
    1-process videos byte for byte (the bench measures the same work on every mesh)."""
    cfg = write_tiny_config(tmp_path, frames=12)
    out = tmp_path / "scaling"
    r = subprocess.run([sys.executable, "-m", "scopevid", "bench", "scaling", "--config", str(cfg), "--frames", "12",
                        "--meshes", "dp=2;cfg=2", "--videos", "2", "--address", ray_head.address, "--out", str(out)],
                       env=ray_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    rows = pq.read_table(out / "scaling.parquet").to_pylist()
    assert [(x["mesh"], x["processes"], x["videos"], x["frames"], x["policy"]) for x in rows] == [
        ("1 process", 1, 2, 24, "original"), ("dp=2", 2, 2, 24, "original"), ("cfg=2", 2, 2, 24, "original")]
    for x in rows:
        assert x["wall_seconds"] > 0 and x["peak_rss_mb_max"] > 10
        assert x["frames_per_second"] == pytest.approx(24 / x["wall_seconds"])
        assert x["videos_per_hour"] == pytest.approx(3600 * 2 / x["wall_seconds"])
        assert x["parallel_efficiency"] == pytest.approx(x["frames_per_second"] / rows[0]["frames_per_second"] / x["processes"])
    assert rows[0]["speedup"] == pytest.approx(1.0)
    best = json.loads((out / "scaling.json").read_text())["best"]["original"]["2"]
    assert best["best_mesh"] == max(rows[1:], key=lambda x: x["frames_per_second"])["mesh"]
    runs = {x["mesh"]: Path(x["run_dir"]) for x in rows}
    manifests = {m: pq.read_table(d / "manifest.parquet").to_pylist() for m, d in runs.items()}
    assert [e["group"] for e in manifests["dp=2"]] == [0, 1]  # two videos at once, one per group
    for m, entries in manifests.items():
        for e in entries:
            assert (runs[m] / e["out"] / "video.mp4").read_bytes() == \
                (runs["1 process"] / e["out"] / "video.mp4").read_bytes(), (m, e["out"])
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
