"""Resume: a job killed mid-rollout continues from its last checkpoint and finishes with exactly the
video of an uninterrupted run of the same seed (latents bit for bit, decoded frames, MP4 bytes).

- In process (fast): the rollout is interrupted by an exception at a chosen iteration (diffusion
  forcing and chunk-causal, SCOPE), then resumed.
- For real: 2-rank Ray jobs on a local `ray start --head` cluster; a rank's process is SIGKILLed (the
  driver must name the rank), or the whole driver is SIGKILLed; `--resume DIR` finishes the job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import ROOT, local_ray_head, ray_env, write_tiny_config



# --- helpers ----------------------------------------------------------------------------------------
def video_frames(path: Path) -> np.ndarray:
    import imageio.v2 as imageio

    with imageio.get_reader(str(path)) as r:
        return np.stack([f for f in r])


def assert_same_outputs(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    from scopevid.engine.checkpoint import read_frames

    # a finished run keeps its exact latents once, in latents.safetensors (the resume shards are gone)
    assert not (a / "latents").exists() and not (b / "latents").exists()
    la, lb = load_file(a / "latents.safetensors")["latents"], load_file(b / "latents.safetensors")["latents"]
    assert torch.equal(la, lb), "latents differ"
    fa = np.stack([x for _, x in read_frames(a / "frames")])
    fb = np.stack([x for _, x in read_frames(b / "frames")])
    assert fa.shape == fb.shape and (fa == fb).all(), "decoded frames differ"
    va, vb = video_frames(a / "video.mp4"), video_frames(b / "video.mp4")
    assert va.shape == vb.shape and (va == vb).all(), "MP4 frames differ"
    assert (a / "video.mp4").read_bytes() == (b / "video.mp4").read_bytes()
    # the lossless latents of the resumed run: the part before the kill comes back from the shards
    assert (a / "latents.safetensors").read_bytes() == (b / "latents.safetensors").read_bytes()
    ta, tb = pq.read_table(a / "steps.parquet"), pq.read_table(b / "steps.parquet")
    for col in ("serial", "mode", "compute_lo", "compute_hi", "frames_computed"):
        assert ta.column(col).to_pylist() == tb.column(col).to_pylist(), col
    sa, sb = json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
    assert sa["decision_digest"] == sb["decision_digest"] and sa["counts"] == sb["counts"]
    assert sa["frames"] == sb["frames"]


# --- in process -------------------------------------------------------------------------------------
class Interrupted(Exception):
    pass


@pytest.mark.parametrize("kind,stop_at", [("diffusion_forcing", 50), ("chunk_causal", 21)])
def test_interrupted_rollout_resumes_exactly(tmp_path, kind, stop_at):
    from scopevid import config as config_lib
    from scopevid.engine import runner
    from scopevid.engine.checkpoint import Checkpointer, checkpoint_info

    sched = {"kind": kind, "chunk_width": 2, "window_size": 4, "context_chunks": 2}
    cfg = config_lib.load(write_tiny_config(tmp_path, frames=30, policy="scope-fast", schedule=sched))
    runner.generate(cfg, tmp_path / "ref", progress=False, checkpoint=Checkpointer(tmp_path / "ref"))

    def stop(serial, total, next_emit, frames):
        if serial == stop_at:
            raise Interrupted

    with pytest.raises(Interrupted):
        runner.generate(cfg, tmp_path / "job", progress=False, checkpoint=Checkpointer(tmp_path / "job", on_iteration=stop))
    info = checkpoint_info(tmp_path / "job")
    assert info is not None and 0 < info["serial"] <= stop_at and info["pixel_frames"] > 0
    resumed = runner.generate(cfg, tmp_path / "job", progress=False, overwrite=True,
                              checkpoint=Checkpointer(tmp_path / "job", resume=True))
    assert resumed["frames"] == 30
    assert_same_outputs(tmp_path / "ref", tmp_path / "job")
    assert not (tmp_path / "job" / "checkpoint").exists()


def test_a_stop_after_the_rollout_before_the_summary_still_resumes(tmp_path, monkeypatch):
    """Found by the random-signal test: a SIGINT after the rollout and before summary.json was
    written used to find the checkpoint half deleted (removed at close), and --resume refused the
    run directory. The checkpoint now goes only after the summary."""
    from scopevid import config as config_lib
    from scopevid.engine import runner
    from scopevid.engine.checkpoint import Checkpointer, checkpoint_info
    from scopevid.errors import Stopped

    cfg = config_lib.load(write_tiny_config(tmp_path, frames=20, policy="scope-fast"))
    runner.generate(cfg, tmp_path / "ref", progress=False, checkpoint=Checkpointer(tmp_path / "ref"))
    real = runner.write_json

    def stopped(path, data):
        if path.name == "summary.json":
            raise Stopped("SIGINT")
        return real(path, data)

    monkeypatch.setattr(runner, "write_json", stopped)
    with pytest.raises(Stopped):
        runner.generate(cfg, tmp_path / "job", progress=False, checkpoint=Checkpointer(tmp_path / "job"))
    monkeypatch.setattr(runner, "write_json", real)
    assert not (tmp_path / "job" / "summary.json").exists() and checkpoint_info(tmp_path / "job") is not None
    resumed = runner.generate(cfg, tmp_path / "job", progress=False, overwrite=True,
                              checkpoint=Checkpointer(tmp_path / "job", resume=True))
    assert resumed["frames"] == 20
    assert_same_outputs(tmp_path / "ref", tmp_path / "job")
    assert not (tmp_path / "job" / "checkpoint").exists()


BASELINES = {
    "teacache": {"kind": "teacache", "thresh": 0.3, "ret_steps": 2, "feature": "host"},
    "flowcache": {"kind": "flowcache", "thresh": 0.3, "ret_steps": 2, "feature": "host"},
}


@pytest.mark.parametrize("kind,policy", [("diffusion_forcing", "teacache"), ("chunk_causal", "flowcache")])
def test_baselines_in_forward_reuse_state_resumes_exactly(tmp_path, kind, policy):
    """The baselines keep residual / K/V stores inside the forward (engine.reuse): checkpointed too."""
    from scopevid import config as config_lib
    from scopevid.engine import runner
    from safetensors.torch import load_file

    from scopevid.engine.checkpoint import Checkpointer, checkpoint_info

    sched = {"kind": kind, "chunk_width": 2, "window_size": 4, "context_chunks": 2}
    cfg = config_lib.load(write_tiny_config(tmp_path, frames=30, policy=policy, policies={policy: BASELINES[policy]},
                                            schedule=sched))
    ref = runner.generate(cfg, tmp_path / "ref", progress=False, checkpoint=Checkpointer(tmp_path / "ref"))
    assert ref["counts"]["cache"] > 0  # the reuse path really ran

    def stop(serial, total, *a):
        if serial == total // 2 + 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        runner.generate(cfg, tmp_path / "job", progress=False, checkpoint=Checkpointer(tmp_path / "job", on_iteration=stop))
    assert checkpoint_info(tmp_path / "job")["serial"] > 0
    got = runner.generate(cfg, tmp_path / "job", progress=False, overwrite=True,
                          checkpoint=Checkpointer(tmp_path / "job", resume=True))
    la = load_file(tmp_path / "ref" / "latents.safetensors")["latents"]
    lb = load_file(tmp_path / "job" / "latents.safetensors")["latents"]
    assert torch.equal(la, lb)
    assert got["decision_digest"] == ref["decision_digest"] and got["counts"] == ref["counts"]


def test_checkpoint_refuses_other_world_size(tmp_path):
    from scopevid import adapters
    from scopevid import config as config_lib
    from scopevid.engine import runner
    from scopevid.engine.checkpoint import Checkpointer
    from scopevid.engine.rollout import Rollout
    from scopevid.errors import CheckpointError
    from scopevid.scheduler.policies import Original

    cfg = config_lib.load(write_tiny_config(tmp_path, frames=20))

    def stop(serial, *a):
        if serial == 40:
            raise Interrupted

    with pytest.raises(Interrupted):
        runner.generate(cfg, tmp_path / "job", progress=False, checkpoint=Checkpointer(tmp_path / "job", on_iteration=stop))
    latest = tmp_path / "job" / "checkpoint" / "LATEST"
    info = json.loads(latest.read_text())
    latest.write_text(json.dumps({**info, "world": 2}))
    adapter = adapters.load(cfg.model)
    ro = Rollout(adapter, runner.build_plan(cfg, adapter), Original(), adapter.encode_prompt(cfg.prompt, None, 2.0), seed=0)
    with pytest.raises(CheckpointError, match="same --world-size"):
        Checkpointer(tmp_path / "job", resume=True).attach(ro, writes=True)


# --- real kills of a Ray job ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_head():
    with local_ray_head("svres") as head:
        yield head


@pytest.fixture(scope="module")
def job_config(tmp_path_factory):
    return write_tiny_config(tmp_path_factory.mktemp("cfg"), frames=48, policy="scope-fast")


def driver(head, *args: str, **popen) -> list[str]:
    return [sys.executable, "-m", "scopevid.cluster.driver", "--address", head.address, "--progress-every", "0.5", *args]


def run_driver(head, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    r = subprocess.run(driver(head, *args), env=ray_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return r


@pytest.fixture(scope="module")
def reference(ray_head, job_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "job"
    r = run_driver(ray_head, "--config", str(job_config), "--world-size", "2", "--out", str(out))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return out


def start_and_kill(head, job_config, out: Path, victim: str) -> tuple[subprocess.CompletedProcess | None, dict]:
    """Start a 2-rank job, wait for its first committed checkpoint, then SIGKILL `victim` (rank1|driver)."""
    proc = subprocess.Popen(driver(head, "--config", str(job_config), "--world-size", "2", "--out", str(out)),
                            env=ray_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        latest = out / "checkpoint" / "LATEST"
        deadline = time.monotonic() + 90
        while not latest.is_file():
            assert proc.poll() is None, f"job ended before its first checkpoint:\n{proc.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 90 s"
            time.sleep(0.05)
        info = json.loads(latest.read_text())
        t0 = time.monotonic()
        if victim == "driver":
            proc.send_signal(signal.SIGKILL)
        elif victim == "driver-sigterm":  # scancel, `ray job stop`
            proc.send_signal(signal.SIGTERM)
        else:
            pid = json.loads((out / "job.json").read_text())["ranks"][1]["pid"]
            os.kill(pid, signal.SIGKILL)
        text, _ = proc.communicate(timeout=90)
        info["took"] = time.monotonic() - t0
        return subprocess.CompletedProcess(proc.args, proc.returncode, text, ""), info
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.integration
@pytest.mark.timeout(240)
@pytest.mark.parametrize("victim", ["rank1", "driver", "driver-sigterm"])
def test_killed_job_resumes_to_the_same_video(ray_head, job_config, reference, tmp_path, victim):
    out = tmp_path / "job"
    killed, info = start_and_kill(ray_head, job_config, out, victim)
    assert killed.returncode != 0, killed.stdout[-3000:]
    job = json.loads((out / "job.json").read_text())
    assert job["status"] != "complete"
    assert (out / "checkpoint" / "LATEST").is_file()
    if victim == "driver-sigterm":  # ends at once with one line: what is kept and the command that resumes
        lines = killed.stdout.strip().splitlines()
        assert killed.returncode == 1 and info["took"] < 5, (info["took"], killed.stdout[-3000:])
        assert lines[-1].startswith("scopevid driver: stopped: stopped by SIGTERM; Kept in "), lines[-1]
        assert lines[-1].endswith(f"Resume with: python -m scopevid.cluster.driver --resume {out}")
        assert "Traceback" not in killed.stdout
        assert job["status"] == "stopped" and len(job["attempt_seconds"]) == 1
        pq.read_table(out / "steps.parquet")  # the run log reads
        n = len(video_frames(out / "video.mp4"))  # the ranks stopped together and rank 0 closed its MP4
        assert n > 0 and f"Kept in {out}: {n} finished frame(s)" in lines[-1], (n, lines[-1])
    if victim == "rank1":  # the driver names the dead rank, keeps what is finished, says how to resume
        pid = job["ranks"][1]["pid"]
        assert f"rank 1 (pid {pid}" in killed.stdout and "died" in killed.stdout, killed.stdout[-3000:]
        assert f"--resume {out}" in killed.stdout
        assert job["status"] == "failed" and job["failed_rank"] == 1
        assert (out / "video.mp4").stat().st_size > 0  # rank 0 closed its video cleanly
    r = run_driver(ray_head, "--resume", str(out))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "resuming" in r.stdout and "checkpoint at iteration" in r.stdout
    done = json.loads((out / "job.json").read_text())
    assert done["status"] == "complete" and done["resumed_from"] >= info["serial"] > 0
    assert_same_outputs(reference, out)
    # the whole job is reported, not the last attempt: hand-overs and counts as the uninterrupted job's
    ref_job = json.loads((reference / "job.json").read_text())
    assert done["sequence_parallel"]["handovers"] == ref_job["sequence_parallel"]["handovers"] > 0
    assert done["counts"] == ref_job["counts"]
    assert done["job_seconds"] > done["wall_seconds"] and "over 2 attempts" in r.stdout


@pytest.mark.parametrize("damage", ["latent-part-missing", "latent-part-truncated", "frame-part-truncated", "output-pt-corrupt"])
def test_resume_refuses_a_damaged_run_directory(tmp_path, damage):
    """Resume verifies every shard it relies on (latents too) and the decoder state: a missing or
    truncated shard, or a corrupt output.pt, is one CheckpointError naming it, never a short video."""
    from scopevid import config as config_lib
    from scopevid.engine import runner
    from scopevid.engine.checkpoint import Checkpointer, checkpoint_info
    from scopevid.errors import CheckpointError

    cfg = config_lib.load(write_tiny_config(tmp_path, frames=40, policy="scope-fast"))

    def stop(serial, total, *a):
        if serial == total - 5:
            raise Interrupted

    with pytest.raises(Interrupted):
        runner.generate(cfg, tmp_path / "job", progress=False,
                        checkpoint=Checkpointer(tmp_path / "job", on_iteration=stop, rows_per_part=4))
    info = checkpoint_info(tmp_path / "job")
    assert info["latent_parts"] >= 2 and info["frame_parts"] >= 2
    kind, how = damage.split("-", 1)[0], damage.rsplit("-", 1)[1]
    if kind == "output":
        victim = tmp_path / "job" / "checkpoint" / info["tag"] / "output.pt"
        victim.write_bytes(b"not a torch file")
    else:
        victim = sorted((tmp_path / "job" / ("latents" if kind == "latent" else "frames")).glob("part-*.parquet"))[0]
        if how == "missing":
            victim.unlink()
        else:
            victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    job = tmp_path / "job"
    before = {p.relative_to(job): p.read_bytes() for p in job.rglob("*") if p.is_file() and p.name != ".scopevid.lock"}
    with pytest.raises(CheckpointError, match=victim.name if how != "missing" else "shard parts"):
        runner.generate(cfg, job, progress=False, overwrite=True,
                        checkpoint=Checkpointer(job, resume=True, rows_per_part=4))
    assert not (job / "summary.json").exists()
    # the refusal came before anything was touched: the killed run's log, video and shards are as they were
    after = {p.relative_to(job): p.read_bytes() for p in job.rglob("*") if p.is_file() and p.name != ".scopevid.lock"}
    assert after == before, sorted(set(after) ^ set(before)) or [k for k in before if before[k] != after.get(k)]


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_a_job_that_cannot_be_placed_says_what_it_waits_for(ray_head, job_config, tmp_path):
    """Bundles the cluster could hold, but other work holds them now: the driver says what it waits for,
    gives up after --placement-timeout, and ends at once on SIGTERM while waiting."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, ray; ray.init(address=sys.argv[1], log_to_driver=False); "
        "pg = ray.util.placement_group([{'CPU': 2}]); ray.get(pg.ready()); print('held', flush=True); time.sleep(600)"),
        ray_head.address], env=ray_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        _placement_waits(ray_head, job_config, tmp_path)
    finally:
        holder.kill()
        holder.wait()


def _placement_waits(ray_head, job_config, tmp_path):
    out = tmp_path / "job"
    r = run_driver(ray_head, "--config", str(job_config), "--world-size", "2", "--placement-timeout", "5", "--out", str(out),
                   timeout=60)
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 1, (r.stdout + r.stderr)[-3000:]
    waiting = [ln for ln in lines if "waiting for 2 bundles of {'CPU': 1.0}" in ln]
    assert waiting and "free CPU 0 of 2" in waiting[0] and "giving up after 5 s" in waiting[0], lines
    err = [ln for ln in r.stderr.strip().splitlines() if "INFO worker.py" not in ln]  # Ray's own connect lines
    assert len(err) == 1 and "placement: 2 bundles of {'CPU': 1.0} not available within 5 s" in err[0], r.stderr
    assert "free CPU 0 of 2" in err[0] and "--placement-timeout" in err[0]
    job = json.loads((out / "job.json").read_text())
    assert (job["status"], job["error"]) == ("failed", err[0].split("error: ", 1)[1]), job
    # SIGTERM while waiting (no limit): the driver ends at once, saying so
    proc = subprocess.Popen(driver(ray_head, "--config", str(job_config), "--world-size", "2",
                                   "--placement-timeout", "0", "--out", str(tmp_path / "job2")),
                            env=ray_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while json.loads((tmp_path / "job2" / "job.json").read_text() if (tmp_path / "job2" / "job.json").is_file()
                         else "{}").get("status") != "waiting for placement":
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1 and took < 5, (took, stderr)
    assert "no time limit" in stdout
    assert stderr.strip().splitlines()[-1].startswith("scopevid driver: stopped: stopped by SIGTERM; Kept in"), stderr
    assert json.loads((tmp_path / "job2" / "job.json").read_text())["status"] == "stopped"
    # a resume that would change what the job computes is refused in one line (exit 2), before Ray is asked
    for args, says in [(["--world-size", "1"], "runs on 2 ranks (checkpoints are per rank); resume it with --world-size 2"),
                       (["--frames", "96"], "frames differ(s) from the job")]:  # noqa: E501
        r = run_driver(ray_head, "--resume", str(tmp_path / "job2"), *args, timeout=60)
        err = [ln for ln in r.stderr.strip().splitlines() if "INFO worker.py" not in ln]
        assert r.returncode == 2 and len(err) == 1 and says in err[0], r.stderr


def test_resume_refuses_changed_weights(tmp_path):
    """The weights file a run started with, edited in place (one tensor scaled by 1.5, same path, same
    size): a resume would finish one video with two models, so it is refused, naming the file."""
    import torch
    from safetensors.torch import load_file, save_file

    from conftest import TINY_ARCH
    from scopevid import config as config_lib
    from scopevid.adapters.tiny.model import TinyDiT, TinyDiTConfig
    from scopevid.engine import runner
    from scopevid.engine.checkpoint import Checkpointer
    from scopevid.errors import ConfigError

    torch.manual_seed(0)
    mcfg = TinyDiTConfig.from_dict(TINY_ARCH)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in TinyDiT(mcfg).state_dict().items()}, str(weights))
    weights.with_suffix(".json").write_text(json.dumps({"model": mcfg.to_dict(), "shift": 3.0}))
    cfg = config_lib.load(write_tiny_config(tmp_path, frames=40, model={"kind": "tiny", "weights": str(weights)}))

    def stop(serial, total, *a):
        if serial == total // 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        runner.generate(cfg, tmp_path / "job", progress=False, checkpoint=Checkpointer(tmp_path / "job", on_iteration=stop))
    sd = load_file(str(weights))
    sd["blocks.0.qkv.weight"] = sd["blocks.0.qkv.weight"] * 1.5
    save_file(sd, str(weights))
    with pytest.raises(ConfigError, match=r"resume: weights\..*w\.safetensors was '.*' when the run started and is"):
        runner.generate(cfg, tmp_path / "job", progress=False, overwrite=True,
                        checkpoint=Checkpointer(tmp_path / "job", resume=True))


def _killed_run(tmp_path, **over):
    """A --checkpoint run stopped halfway (its checkpoint committed); returns (config, run directory)."""
    from scopevid import config as config_lib
    from scopevid.engine import runner
    from scopevid.engine.checkpoint import Checkpointer

    cfg = config_lib.load(write_tiny_config(tmp_path, frames=40, **over))

    def stop(serial, total, *a):
        if serial == total // 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        runner.generate(cfg, tmp_path / "job", progress=False, checkpoint=Checkpointer(tmp_path / "job", on_iteration=stop))
    return cfg, tmp_path / "job"


@pytest.mark.parametrize("damage, needle", [
    ("latest-list", r"LATEST: not a checkpoint record \(a JSON list, not an object\)"),
    ("latest-no-log-parts", r"LATEST: damaged \(log_parts missing or not of its type\)"),
    ("settings-deleted", r"settings.json is missing while .*LATEST is there: the run directory was damaged"),
    ("rank-file-not-torch", r"rank-00000.pt: cannot read \(not a plain tensor checkpoint"),
])
def test_a_damaged_checkpoint_is_one_clear_line(tmp_path, damage, needle):
    from scopevid.engine import runner
    from scopevid.engine.checkpoint import Checkpointer, checkpoint_info
    from scopevid.errors import CheckpointError

    cfg, job = _killed_run(tmp_path)
    latest = job / "checkpoint" / "LATEST"
    info = checkpoint_info(job)
    if damage == "latest-list":
        latest.write_text(json.dumps([info]))
    elif damage == "latest-no-log-parts":
        latest.write_text(json.dumps({k: v for k, v in info.items() if k != "log_parts"}))
    elif damage == "settings-deleted":
        (job / "checkpoint" / "settings.json").unlink()
    else:
        import pickle

        (job / "checkpoint" / info["tag"] / "rank-00000.pt").write_bytes(pickle.dumps(Interrupted()))
    with pytest.raises(CheckpointError, match=needle) as e:
        runner.generate(cfg, job, progress=False, overwrite=True, checkpoint=Checkpointer(job, resume=True))
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value) and len(str(e.value)) < 400


def test_an_edited_preset_is_named_leaf_by_leaf(tmp_path):
    """A resume whose policy presets differ names the one value that changed, not the whole section."""
    import yaml

    from scopevid import config as config_lib
    from scopevid.engine import runner
    from scopevid.engine.checkpoint import Checkpointer
    from scopevid.errors import ConfigError

    presets = yaml.safe_load((ROOT / "configs" / "policies" / "tiny.yaml").read_text())
    cfg, job = _killed_run(tmp_path, policies=presets, policy_presets=None)
    presets["scope-fast"]["tau_c"] = 0.11
    edited = config_lib.load(write_tiny_config(tmp_path, frames=40, policies=presets, policy_presets=None))
    with pytest.raises(ConfigError) as e:
        runner.generate(edited, job, progress=False, overwrite=True, checkpoint=Checkpointer(job, resume=True))
    msg = str(e.value)
    assert msg.startswith("resume: policies.scope-fast.tau_c was ") and "is 0.11 now" in msg and len(msg) < 300, msg
