"""`torchrun --nproc-per-node 2 -m scopevid generate ...` end to end: rank 0 alone writes, the video and
the decisions equal a 1-process run; ranks started with different settings refuse to run."""

from __future__ import annotations

import json
import subprocess
import sys

import imageio.v2 as imageio
import numpy as np
import pytest

from conftest import ROOT, kill_all
from scopevid import config as config_lib
from scopevid.cluster.groups import free_port
from scopevid.cluster.launch import rank_env
from scopevid.engine import runner

pytestmark = pytest.mark.integration


@pytest.mark.timeout(240)
def test_torchrun_generate_matches_one_process(tiny_config, tmp_path):
    cfg_path = tiny_config(policy="scope-fast", frames=24)
    env = rank_env(0, 1, 0, threads=1, dist_timeout_s=60)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k)
    out2 = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "scopevid", "generate", "--config", str(cfg_path),
           "--out", str(out2), "--no-progress", "--check-decisions"]
    p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert p.returncode == 0, p.stderr[-3000:]
    printed = json.loads(p.stdout[p.stdout.index("{"):])  # rank 0 alone prints the brief summary
    assert p.stdout.count('"policy"') == 1

    one = runner.generate(config_lib.load(cfg_path), tmp_path / "one", progress=False)
    two = json.loads((out2 / "summary.json").read_text())
    assert sorted(p.name for p in out2.iterdir()) == ["latents.safetensors", "logs", "steps.parquet", "summary.json",
                                                      "video.mp4"]  # no lock file left behind
    for rank in (0, 1):  # each rank's own log: who it was, and how its run ended
        text = (out2 / "logs" / f"rank-{rank:04d}.log").read_text()
        assert f"rank {rank} of 2: group 0, branch both, shard {rank} of 2 (mesh ulysses=2)" in text and "done: " in text
    assert two["world_size"] == 2 and two["sequence_parallel"]["world_size"] == 2
    assert two["decision_digest"] == one["decision_digest"] and two["counts"] == one["counts"] == printed["counts"]
    a = np.stack(imageio.mimread(str(tmp_path / "one" / "video.mp4"))).astype(int)
    b = np.stack(imageio.mimread(str(out2 / "video.mp4"))).astype(int)
    assert a.shape == b.shape and a.shape[0] == 24
    assert np.abs(a - b).max() <= 2  # at most a rounding step through the codec
    from safetensors.torch import load_file

    la, lb = (load_file(str(d / "latents.safetensors"))["latents"] for d in (tmp_path / "one", out2))
    assert la.shape == lb.shape and la.shape[0] == 24 and float((la - lb).abs().max()) < 1e-5  # the lossless latents agree


@pytest.mark.timeout(120)
def test_ranks_with_different_settings_refuse_to_run(tiny_config, tmp_path):
    """The most reported multi-GPU bug is ranks drawing different noise: a rank started with another
    seed must stop the job before the rollout, with one clear line on every rank."""
    procs, errs = _two_ranks(tiny_config(frames=8), tmp_path / "out", [["--seed", "0"], ["--seed", "1"]])
    for p, err in zip(procs, errs):
        assert p.returncode == 2, err[-2000:]
        assert "ranks disagree on the run config" in err.strip().splitlines()[-1]
    assert not (tmp_path / "out" / "video.mp4").exists()


@pytest.mark.timeout(120)
def test_nan_on_two_ranks_is_one_line_on_each(tiny_config, tmp_path):
    """A NaN weight under sequence parallelism: both ranks see it in the gathered velocities, stop
    together with one line and exit 1, and tear the group down cleanly (no abort)."""
    from test_nonfinite import _tiny_weights

    cfg_path = tiny_config(frames=8, model={"kind": "tiny", "weights": str(_tiny_weights(tmp_path, poison=True))})
    procs, errs = _two_ranks(cfg_path, tmp_path / "out", [[], []])
    for p, err in zip(procs, errs):
        assert p.returncode == 1, err[-2000:]
        assert "NaN or inf" in err.strip().splitlines()[-1] and "Traceback" not in err, err[-2000:]


def _two_ranks(cfg_path, out, extra: list[list[str]]):
    """`scopevid generate` as ranks 0 and 1 of a torchrun-style group (each with its own extra args);
    returns the processes and their stderr, killing any still running."""
    procs = _ranks(cfg_path, out, per_rank=extra)
    try:
        return procs, [p.communicate(timeout=100)[1] for p in procs]
    finally:
        kill_all(procs)


@pytest.mark.timeout(200)
def test_cfg_mesh_from_the_command_line_equals_one_process(tiny_config, tmp_path):
    """`--parallel cfg=2` on two ranks: each runs one guidance branch; rank 0 alone writes, and the
    video is the 1-process video byte for byte (the exchanged branches combine in one order)."""
    cfg_path = tiny_config(policy="scope-fast", frames=16)
    procs, errs = _two_ranks(cfg_path, tmp_path / "two", [["--parallel", "cfg=2"]] * 2)
    assert [p.returncode for p in procs] == [0, 0], errs
    one = runner.generate(config_lib.load(cfg_path), tmp_path / "one", progress=False)
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["decision_digest"] == one["decision_digest"] and two["counts"] == one["counts"]
    assert (tmp_path / "two" / "video.mp4").read_bytes() == (tmp_path / "one" / "video.mp4").read_bytes()
    # a mesh that cannot run is one line on every rank, before any work
    procs, errs = _two_ranks(cfg_path, tmp_path / "bad", [["--parallel", "cfg=2,ulysses=2"]] * 2)
    for p, err in zip(procs, errs):
        assert p.returncode == 2 and err.strip().splitlines()[-1].startswith(
            "scopevid generate: error: parallel: dp*cfg*ring*ulysses = 1*2*1*2 does not make the job's 2 rank(s)"), err


def _ranks(cfg_path, out, *extra, world: int = 2, ranks=None, per_rank: list[list[str]] | None = None):
    """`scopevid generate` as torchrun-style ranks (RANK/WORLD_SIZE/MASTER_* as torchrun sets them) of
    one group; `ranks`: which of them to start (default all); `per_rank`: each rank's own extra args."""
    port = free_port()
    ranks = list(range(world) if ranks is None else ranks)
    per_rank = per_rank or [[]] * len(ranks)
    return [subprocess.Popen([sys.executable, "-m", "scopevid", "generate", "--config", str(cfg_path), "--out", str(out),
                              "--no-progress", *extra, *own], env=rank_env(rank, world, port, threads=1, dist_timeout_s=60),
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for rank, own in zip(ranks, per_rank, strict=True)]


@pytest.mark.timeout(300)
def test_checkpoint_and_resume_under_torchrun_finish_the_one_process_video(tiny_config, tmp_path):
    """Issue 21: `--checkpoint` / `--resume` under torchrun did nothing (the ranks got no checkpointer;
    resume then said "not empty"). Two ranks of a cfg=2 mesh stopped by SIGTERM after their first
    checkpoint (what torchrun forwards to its workers on scancel) say so in one line, and `--resume`
    on the same two ranks finishes the 1-process video byte for byte."""
    import signal
    import time

    cfg_path = tiny_config(policy="scope-fast", frames=257)
    out = tmp_path / "two"
    procs = _ranks(cfg_path, out, "--parallel", "cfg=2", "--checkpoint")
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint" / "LATEST").is_file():
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, [p.communicate() for p in procs]
            time.sleep(0.02)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        errs = [p.communicate(timeout=60)[1] for p in procs]
    finally:
        kill_all(procs)
    assert [p.returncode for p in procs] == [1, 1], errs
    for err in errs:
        assert "Traceback" not in err and "stopped by SIGTERM" in err.strip().splitlines()[-1], err[-2000:]
    assert not (out / "summary.json").exists()
    procs = _ranks(cfg_path, out, "--parallel", "cfg=2", "--resume")
    try:
        errs = [p.communicate(timeout=200)[1] for p in procs]
    finally:
        kill_all(procs)
    assert [p.returncode for p in procs] == [0, 0], errs
    one = runner.generate(config_lib.load(cfg_path), tmp_path / "one", progress=False)
    two = json.loads((out / "summary.json").read_text())
    assert two["decision_digest"] == one["decision_digest"] and two["frames"] == 257
    assert (out / "video.mp4").read_bytes() == (tmp_path / "one" / "video.mp4").read_bytes()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_rank_waiting_for_a_missing_peer_stops_at_once_on_a_signal(tiny_config, tmp_path, signame):
    """Issue 21: a rank blocked in the rendezvous (its peer never came) ignored SIGTERM and SIGINT until
    SIGKILL. Now it leaves within seconds, exit 1, one line that says where it was waiting."""
    import signal
    import time

    out = tmp_path / "out"
    (p,) = _ranks(tiny_config(frames=8), out, ranks=[0])
    try:
        log = out / "logs" / "rank-0000.log"
        deadline = time.monotonic() + 60
        while not (log.is_file() and "joining the process group" in log.read_text()):
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.05)
        time.sleep(1.0)  # inside init_process_group, waiting for rank 1
        t0 = time.monotonic()
        p.send_signal(getattr(signal, signame))
        _, err = p.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        kill_all([p])
    lines = err.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert f"stopped by {signame}" in lines[0] and "waiting at the rendezvous" in lines[0], lines[0]
    assert took < 5, took


def test_batch_under_torchrun_is_refused_in_one_line(tiny_config, tmp_path):
    """Issue 21: `torchrun -m scopevid batch` let every rank run the whole batch. A rank of a torchrun
    group is refused before any work, naming the driver that runs batches on many ranks."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "red square moving right"}\n')
    r = subprocess.run([sys.executable, "-m", "scopevid", "batch", "--config", str(tiny_config(frames=8)), "--prompts",
                        str(prompts), "--out", str(tmp_path / "b")], env=rank_env(1, 2, free_port(), threads=1), cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert "runs on one process (this is rank 1 of 2)" in lines[0] and "scopevid.cluster.driver" in lines[0], lines[0]
    assert not (tmp_path / "b").exists()
