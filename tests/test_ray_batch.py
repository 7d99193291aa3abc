"""A batch on a real local Ray cluster: `python -m scopevid.cluster.driver --batch FILE --world-size 2
--parallel dp=2` runs 6 prompts on 2 rank groups that each load the model once and pull videos from
the driver's queue. One group's rank is SIGKILLed mid-batch: the other group finishes every video
(the lost one goes back to the queue), and each video equals `scopevid batch`'s on one process byte
for byte. A SIGKILLed driver's batch finishes with --resume, skipping what was done."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from conftest import ROOT, local_ray_head, ray_env, write_tiny_config
from scopevid.jobs.manifest import Manifest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]
PROMPTS = ["red square moving right", "blue square moving left", "green square moving right",
           "red square moving left", "blue square moving right", "green square moving left"]


@pytest.fixture(scope="module")
def ray_head():
    with local_ray_head("svbatch") as head:
        yield head


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("raybatch")
    cfg = write_tiny_config(tmp, frames=17, policy="scope-fast")
    prompts = tmp / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    ref = tmp / "local"
    r = subprocess.run([sys.executable, "-m", "scopevid", "batch", "--config", str(cfg), "--prompts", str(prompts),
                        "--out", str(ref)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return cfg, prompts, ref


def _driver(head, cfg, prompts, out, *extra):
    return [sys.executable, "-m", "scopevid.cluster.driver", "--address", head.address, "--batch", str(prompts),
            "--config", str(cfg), "--world-size", "2", "--parallel", "dp=2", "--progress-every", "0.5", *extra,
            *(["--out", str(out)] if "--resume" not in extra else [])]


def _resume(head, out):
    """`--resume DIR` alone: the batch's own record gives its config, prompts and options."""
    return [sys.executable, "-m", "scopevid.cluster.driver", "--address", head.address, "--resume", str(out),
            "--progress-every", "0.5"]


def _same_videos(out, ref) -> None:
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [x["prompt"] for x in rows] == PROMPTS and [x["status"] for x in rows] == ["ok"] * len(PROMPTS), rows
    for x in rows:
        assert (out / x["out"] / "video.mp4").read_bytes() == (ref / x["out"] / "video.mp4").read_bytes(), x["out"]


def test_two_groups_one_killed_the_other_finishes_every_video(ray_head, setup, tmp_path):
    cfg, prompts, ref = setup
    out = tmp_path / "batch"
    p = subprocess.Popen(_driver(ray_head, cfg, prompts, out), env=ray_env(), cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    lines, pid = [], None
    try:
        deadline = time.monotonic() + 240
        for line in p.stdout:  # the driver names each group's pids, then reports videos as they finish
            lines.append(line)
            m = re.search(r"group 1 rank 0 pid (\d+)", line)
            if m:
                pid = int(m.group(1))
            if pid and "] ok " in line:
                os.kill(pid, signal.SIGKILL)  # mid-batch: group 1 holds a video or is about to take one
                break
            assert time.monotonic() < deadline, "".join(lines)
        rest, _ = p.communicate(timeout=240)
        lines.append(rest)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    log = "".join(lines)
    assert p.returncode == 0, log[-4000:]
    assert "2 group(s) of 1 rank(s)" in log
    assert f"group 1 lost (pids [{pid}])" in log, log[-3000:]
    assert "6 of 6 videos done, 0 failed" in log
    _same_videos(out, ref)
    oks = re.findall(r"ok \S+ on group (\d)", log)
    assert oks.count("0") >= 4 and len(oks) == 6  # the survivor did the rest
    # every rank's own log names it and where it sits; the killed rank's ends with the cause the driver saw
    for rank in (0, 1):
        text = (out / "logs" / f"rank-{rank:04d}.log").read_text()
        assert f"rank {rank} of 2: group {rank}, branch both, shard 0 of 1 (mesh dp=2)" in text, text
    killed = (out / "logs" / "rank-0001.log").read_text().strip().splitlines()
    assert "[driver] group 1 lost: its process was killed" in killed[-1], killed
    assert "Traceback" not in log  # the rank's death was handled: no Ray traceback in the driver's output


def test_a_killed_driver_resumes_the_batch(ray_head, setup, tmp_path):
    cfg, prompts, ref = setup
    out = tmp_path / "batch"
    p = subprocess.Popen(_driver(ray_head, cfg, prompts, out), env=ray_env(), cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        for line in p.stdout:
            if "] ok " in line:
                p.send_signal(signal.SIGKILL)
                break
            assert time.monotonic() < deadline
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    done = [e.out for e in Manifest.read(out).entries if e.status == "ok"]  # the snapshot and its journal
    assert 0 < len(done) < len(PROMPTS)
    stamps = {d: (out / d / "video.mp4").stat().st_mtime_ns for d in done}
    deadline = time.monotonic() + 60
    while True:  # Ray ends a dead driver's actors within seconds; the resumed job waits for their names
        r = subprocess.run(_resume(ray_head, out), env=ray_env(), cwd=ROOT, capture_output=True, text=True, timeout=240)
        if r.returncode == 0 or time.monotonic() > deadline or "in use by another scopevid run" not in r.stderr:
            break
        time.sleep(1)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    _same_videos(out, ref)
    assert {d: (out / d / "video.mp4").stat().st_mtime_ns for d in done} == stamps, "a finished video was run again"


def test_a_stopped_batch_resumes_from_its_own_record(ray_head, setup, tmp_path):
    """SIGTERM mid-batch: one line saying what is kept and the command that continues, job.json and
    the manifest say stopped (no video left running); `--resume DIR` alone then finishes the batch with
    its recorded config, prompts and options, each video equal to the one-process batch's."""
    cfg, prompts, ref = setup
    out = tmp_path / "batch"
    p = subprocess.Popen(_driver(ray_head, cfg, prompts, out), env=ray_env(), cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        for line in p.stdout:
            if "] ok " in line:
                p.send_signal(signal.SIGTERM)
                break
            assert time.monotonic() < deadline
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    last = err.strip().splitlines()[-1]
    assert p.returncode == 1 and last.startswith("scopevid driver: stopped: the batch was stopped by SIGTERM"), err[-3000:]
    assert last.endswith(f"continue with: python -m scopevid.cluster.driver --resume {out}"), last
    job = json.loads((out / "job.json").read_text())
    assert (job["status"], job["error"], job["kind"]) == ("stopped", None, "batch") and "--resume" in job["stopped"], job
    statuses = [e.status for e in Manifest.read(out).entries]
    assert "running" not in statuses and "ok" in statuses, statuses
    r = subprocess.run(_resume(ray_head, out), env=ray_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    _same_videos(out, ref)
    job = json.loads((out / "job.json").read_text())
    assert (job["status"], job["error"], job["stopped"], job["attempts"]) == ("complete", None, None, 2), job
    # given again, an option that differs from the record is refused with both values
    r = subprocess.run(_resume(ray_head, out) + ["--config", str(cfg), "--frames", "9"], env=ray_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "frames was 17 when the batch started and is 9 now" in r.stderr.strip().splitlines()[-1], r.stderr


DECISIONS = ["window", "iteration", "serial", "mode", "reason", "valid_lo", "valid_hi", "compute_lo", "compute_hi"]


def _dp2_case(model: str, tmp):
    """A config and 4 rows (two prompts x Original, scope-fast; the prompts also differ in seed)."""
    if model == "tiny":
        cfg = write_tiny_config(tmp, frames=17, policy="scope-fast", guidance=2.5)
        prompts = ["red square moving right", "blue square moving left"]
    else:
        sky = pytest.importorskip("test_skyreels_v2")  # its tiny-checkpoint builder (diffusers + transformers)
        from test_cluster_skyreels import case_config

        ckpt = sky.build_tiny_checkpoint(tmp / "SkyReels-V2-DF-tiny")
        cfg = case_config(sky, ckpt, tmp / "sky.yaml", "scope-fast", 0, "paper")
        prompts = [sky.PROMPT, "a blue fox runs in the sky"]
    rows = [{"prompt": p, "seed": 3 + i, "policy": policy, "name": f"{policy}-{i}"}
            for policy in ("original", "scope-fast") for i, p in enumerate(prompts)]
    path = tmp / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return cfg, path


@pytest.mark.parametrize("model", ["tiny", "skyreels_v2"])
def test_dp2_makes_two_prompts_at_once_each_equal_to_one_process(ray_head, tmp_path, model):
    """dp=2: two rank groups, two different prompts at once (rows alternate between the groups); each
    video is the 1-process video of its row byte for byte, with the same decisions, under Original and
    scope-fast (the SCOPE sums never cross videos)."""
    cfg, rows = _dp2_case(model, tmp_path)
    ref = tmp_path / "one"
    r = subprocess.run([sys.executable, "-m", "scopevid", "batch", "--config", str(cfg), "--prompts", str(rows),
                        "--out", str(ref)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**ray_env(), "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"})
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "dp2"
    r = subprocess.run([sys.executable, "-m", "scopevid.cluster.driver", "--address", ray_head.address, "--batch", str(rows),
                        "--config", str(cfg), "--world-size", "2", "--parallel", "dp=2", "--out", str(out)],
                       env=ray_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    entries = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [e["status"] for e in entries] == ["ok"] * 4
    assert sorted({e["group"] for e in entries}) == [0, 1]
    for e in entries:
        assert (out / e["out"] / "video.mp4").read_bytes() == (ref / e["out"] / "video.mp4").read_bytes(), e["out"]
        mine = pq.read_table(out / e["out"] / "steps.parquet", columns=DECISIONS).to_pylist()
        assert mine == pq.read_table(ref / e["out"] / "steps.parquet", columns=DECISIONS).to_pylist(), e["out"]
    fast = pq.read_table(out / entries[2]["out"] / "steps.parquet", columns=["mode"]).column("mode").to_pylist()
    assert set(fast) - {"recompute"}, "scope-fast skipped nothing: the test would not see a sum that crossed videos"
    d = {k: [pq.read_table(top / e["out"] / "steps.parquet", columns=["d"]).column("d").to_pylist() for e in entries[2:]]
         for k, top in (("dp2", out), ("one", ref))}
    assert d["one"][0] != d["one"][1], "the two prompts measure the same d: a sum shared by the videos would go unseen"
    for mine, theirs in zip(d["dp2"], d["one"]):  # each video's own Eq. 4 sums, not the two videos' together
        assert all((x is None and y is None) or abs(x - y) <= 1e-5 * max(abs(y), 1e-12) for x, y in zip(mine, theirs))


def test_a_video_that_fails_inside_generate_is_failed_in_the_manifest(ray_head, tmp_path):
    """On rank groups: NaN from the model inside one video's `generate` is that video's failure (the
    manifest says failed, with the cause), the group stays and makes the next video."""
    from conftest import write_poisoned_tiny

    cfg = write_poisoned_tiny(tmp_path, frames=9)
    prompts = tmp_path / "p.txt"
    prompts.write_text("blue square moving left\nred square moving right\ngreen square moving left\n")
    r = subprocess.run(_driver(ray_head, cfg, prompts, tmp_path / "out"), cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=ray_env())
    assert r.returncode == 1 and "1 video(s) failed" in r.stderr.strip().splitlines()[-1], (r.stdout + r.stderr)[-3000:]
    rows = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    assert [x["status"] for x in rows] == ["failed", "ok", "ok"], rows
    assert "NaN or inf velocities" in rows[0]["error"]
