"""`torchrun --nproc-per-node 2 -m scopevid generate ...` end to end: rank 0 alone writes, the video and
the decisions equal a 1-process run; ranks started with different settings refuse to run."""

from __future__ import annotations

import json
import subprocess
import sys

import imageio.v2 as imageio
import numpy as np
import pytest

from conftest import ROOT
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
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "scopevid", "generate", "--config", str(cfg_path), "--out", str(out),
                               "--no-progress", *args], env=rank_env(rank, 2, port, threads=1, dist_timeout_s=60),
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank, args in enumerate(extra)]
    try:
        return procs, [p.communicate(timeout=100)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


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
