"""A real `ray job submit` of a 2-rank generation against a real local `ray start --head` cluster.

Everything is on 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray's node address on loopback on a
single machine), token auth is disabled as stack.md says `ray job submit` needs, and the cluster is
stopped in `finally`, by its own session and temp dir (never `ray stop`, which would stop every Ray
cluster on the machine).
"""

from __future__ import annotations

import json
import signal
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
    from scopevid.config import ParallelConfig

    # ... and made the video of one process (its mesh: one rank; cfg=2 on one process is refused in one line)
    one = runner.generate(rc.with_overrides(parallel=ParallelConfig()), tmp_path / "one", progress=False)
    assert summary["decision_digest"] == one["decision_digest"]
    assert (out / "video.mp4").read_bytes() == (tmp_path / "one" / "video.mp4").read_bytes()
    assert summary["iterations"] == plan.num_iterations()
    assert sum(summary["counts"].values()) == plan.num_iterations()

    # shards and the job record
    from safetensors.torch import load_file

    from scopevid.engine.checkpoint import read_frames

    assert [f for f, _ in read_frames(out / "frames")] == list(range(frames))
    assert load_file(out / "latents.safetensors")["latents"].shape[0] == plan.latent_frames
    assert not (out / "latents").exists()  # its resume copy is gone once the run is complete
    job = json.loads((out / "job.json").read_text())
    assert job["status"] == "complete" and job["world_size"] == 2 and job["kind"] == "video"
    assert job["error"] is None and job["stopped"] is None and job["mesh"] == "cfg=2"
    assert job["config"] == str(out / "config.yaml") and job["config_given"] == str(cfg)  # not Ray's copy of the dir
    assert job["progress"]["iteration"] == job["iterations"] - 1 and job["progress"]["frames"] == frames  # 100%
    assert job["argv"][0] == "python -m scopevid.cluster.driver"
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
        ("1", 1, 2, 24, "original"), ("dp=2", 2, 2, 24, "original"), ("cfg=2", 2, 2, 24, "original")]
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
                (runs["1"] / e["out"] / "video.mp4").read_bytes(), (m, e["out"])
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_job_json_says_how_a_job_ended(ray_head, tmp_path):
    """Unplaceable, failed and stopped jobs: job.json's status, error and stopped agree with the one
    line the driver printed, whatever ended the job."""
    from conftest import write_poisoned_tiny

    def driver(*args):
        return [sys.executable, "-m", "scopevid.cluster.driver", "--address", ray_head.address, "--progress-every", "0.5",
                *args]

    def job(out):
        return json.loads((out / "job.json").read_text())

    cfg = write_tiny_config(tmp_path, frames=9)
    # a job the cluster can never hold (2 CPUs in all): at once, with the fix
    r = subprocess.run(driver("--config", str(cfg), "--world-size", "2", "--cpus-per-rank", "2", "--out",
                              str(tmp_path / "big")), env=ray_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    line = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and line.startswith("scopevid driver: error: placement: 2 ranks x 2 CPU need 4 CPU"), r.stderr
    j = job(tmp_path / "big")
    assert (j["status"], j["stopped"]) == ("failed", None) and j["error"] == line.split("error: ", 1)[1] and j["finished"]
    # a rank fails (NaN from the model): failed, naming the rank
    (tmp_path / "p").mkdir()
    bad = write_poisoned_tiny(tmp_path / "p", frames=9, prompt="blue square moving left")
    r = subprocess.run(driver("--config", str(bad), "--world-size", "2", "--out", str(tmp_path / "nan")), env=ray_env(),
                       cwd=ROOT, capture_output=True, text=True, timeout=180)
    line = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and "NaN or inf" in line, r.stderr[-3000:]
    j = job(tmp_path / "nan")
    assert (j["status"], j["stopped"]) == ("failed", None) and j["error"] == line.split("error: ", 1)[1]
    assert j["failed_rank"] in (0, 1)
    # a user's stop: stopped, not an error
    (tmp_path / "long").mkdir()
    long = write_tiny_config(tmp_path / "long", frames=257)
    out = tmp_path / "stop"
    p = subprocess.Popen(driver("--config", str(long), "--world-size", "2", "--out", str(out)), env=ray_env(), cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "steps.parquet").exists():
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.1)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    line = err.strip().splitlines()[-1]
    assert p.returncode == 1 and line.startswith("scopevid driver: stopped: stopped by SIGTERM; Kept in "), err[-3000:]
    j = job(out)
    assert (j["status"], j["error"]) == ("stopped", None) and j["stopped"] == line.split("stopped: ", 1)[1]


def test_a_ray_already_running_without_address_gets_a_private_one_and_a_line(tmp_path):
    """Issue 21: with a Ray head running on this machine (Ray's own record of it where Ray looks,
    RAY_TMPDIR/ray/ray_current_cluster) and no --address, `scopevid bench scaling` and the driver used
    to end in a traceback (`ray.init()` joins it and refuses num_cpus). Now each starts a private Ray,
    finishes, and says in one line where the running one is and how to use it; the head is untouched."""
    import shutil
    import tempfile

    from scopevid.cluster.raycluster import LocalHead

    base = tempfile.mkdtemp(prefix="svrun", dir="/tmp")  # short: Ray's unix sockets live under it
    env = {**ray_env(), "RAY_TMPDIR": base}  # Ray's default layout under RAY_TMPDIR: base/ray
    head = LocalHead(Path(base) / "ray", num_cpus=2, env=env)
    try:
        head.start()
        record, deadline = Path(base) / "ray" / "ray_current_cluster", time.monotonic() + 30
        while not record.is_file():  # `ray start` writes it after the head answers
            assert time.monotonic() < deadline, "ray start wrote no ray_current_cluster"
            time.sleep(0.1)
        assert record.read_text().strip() == head.address
        cfg = write_tiny_config(tmp_path, frames=9)
        hint = f"a Ray cluster is already running on this machine at {head.address}"
        r = subprocess.run([sys.executable, "-m", "scopevid", "bench", "scaling", "--config", str(cfg), "--frames", "9",
                            "--meshes", "cfg=2", "--videos", "1", "--out", str(tmp_path / "scaling")],
                           env=env, cwd=ROOT, capture_output=True, text=True, timeout=200)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (r.stdout + r.stderr)[-4000:]
        assert f"{hint}; this job starts a private one (pass --address {head.address} " in r.stderr, r.stderr[-2000:]
        assert len(pq.read_table(tmp_path / "scaling" / "scaling.parquet")) == 2
        d = subprocess.run([sys.executable, "-m", "scopevid.cluster.driver", "--config", str(cfg), "--world-size", "2",
                            "--out", str(tmp_path / "job")], env=env, cwd=ROOT, capture_output=True, text=True, timeout=200)
        assert d.returncode == 0 and "Traceback" not in d.stdout + d.stderr, (d.stdout + d.stderr)[-4000:]
        assert f"[scopevid driver] {hint}" in d.stdout
        assert json.loads((tmp_path / "job" / "job.json").read_text())["status"] == "complete"
        assert count_video_frames(tmp_path / "job" / "video.mp4") == 9
        alive = subprocess.run([str(BIN / "ray"), "status", "--address", head.address], env=env, capture_output=True,
                               text=True, timeout=60)
        assert alive.returncode == 0, alive.stderr[-2000:]  # the running cluster was not joined, not stopped
    finally:
        head.stop()
        shutil.rmtree(base, ignore_errors=True)
