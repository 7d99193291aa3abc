"""The one validation of a mesh (scopevid.mesh) at every entry point a user types: `scopevid generate`
on one process and as two torchrun-style ranks, `scopevid plan`, `scopevid batch`, and the Ray
driver (refused before Ray starts). Each bad value is one line on stderr with exit 2, naming the
allowed values or the meshes that fit; torchrun ranks refuse before the rendezvous (no rank waits)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml

from conftest import ROOT, write_magi_fixture_config
from scopevid import cli
from scopevid.cluster.groups import free_port
from scopevid.cluster.launch import rank_env

# (--parallel, what the one line must say); world 1 unless a case says otherwise
CASES = {
    "cfg=0": "parallel.cfg: must be 1 or 2",
    "ulysses=-1": "parallel.ulysses: must be a positive integer, got -1",
    "dp=3": "parallel.dp: rank groups for several videos at once are for batch jobs",
    "cfg_mode=bogus": "parallel.cfg_mode: must be one of sequential, batched, got 'bogus'",
    "cfg=2,cfg=1": "--parallel: cfg given twice",
}
PLAN_CASES = {
    "cfg=3": "parallel.cfg: must be 1 or 2",
    "ulysses=0": "parallel.ulysses: must be a positive integer, got 0",
    "ulysses=2,ulysses=4": "--parallel: ulysses given twice",
    "ulysses=-2": "parallel.ulysses: must be a positive integer, got -2",
    "ulysses=3": "parallel.ulysses: 3 ranks cannot split this model's 2 attention heads",
}
MAGI_CFG2 = "parallel.cfg: 2 puts the two classifier-free guidance branches on two rank groups, and this run has one branch"


def _one_line(capsys, rc: int, needle: str, command: str) -> None:
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith(f"scopevid {command}: error: ") and needle in err, (rc, err)


@pytest.fixture
def magi_cfg2(tmp_path):
    path = write_magi_fixture_config(tmp_path, frames=8)
    raw = yaml.safe_load(path.read_text())
    raw["parallel"] = {"cfg": 2}  # guidance 1.0: the distill model has one branch
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("parallel", sorted(CASES))
def test_generate_one_process(parallel, tiny_config, tmp_path, capsys):
    rc = cli.main(["generate", "--config", str(tiny_config()), "--out", str(tmp_path / "out"), "--parallel", parallel])
    _one_line(capsys, rc, CASES[parallel], "generate")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_generate_one_process_magi1_cfg2_at_guidance_1(magi_cfg2, tmp_path, capsys):
    rc = cli.main(["generate", "--config", str(magi_cfg2), "--out", str(tmp_path / "out")])
    _one_line(capsys, rc, MAGI_CFG2, "generate")


@pytest.mark.parametrize("parallel", sorted(PLAN_CASES))
def test_plan(parallel, tiny_config, capsys):
    rc = cli.main(["plan", "--config", str(tiny_config()), "--parallel", parallel, "--steps", "2"])
    _one_line(capsys, rc, PLAN_CASES[parallel], "plan")


def test_plan_magi1_cfg2_at_guidance_1(magi_cfg2, capsys):
    _one_line(capsys, cli.main(["plan", "--config", str(magi_cfg2), "--steps", "4"]), MAGI_CFG2, "plan")


def test_batch_and_driver(tiny_config, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("red square moving left\n")
    rc = cli.main(["batch", "--config", str(tiny_config()), "--prompts", str(prompts), "--out", str(tmp_path / "b"),
                   "--frames", "5"] + [])
    assert rc == 0, capsys.readouterr().err  # the default mesh of one process runs
    capsys.readouterr()
    cfg = tiny_config(parallel={"ulysses": 3})
    _one_line(capsys, cli.main(["batch", "--config", str(cfg), "--prompts", str(prompts), "--out", str(tmp_path / "c")]),
              "parallel: dp*cfg*ring*ulysses = 1*1*1*3 does not make the job's 1 rank(s)", "batch")
    from scopevid.cluster import driver

    t0 = time.monotonic()
    rc = driver.main(["--config", str(tiny_config()), "--world-size", "4", "--parallel", "cfg=2,ulysses=3",
                      "--out", str(tmp_path / "d"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == ("scopevid driver: error: parallel: dp*cfg*ring*ulysses = 1*2*1*3 does not make the job's "
                               "4 rank(s); meshes that fit: cfg=2,ulysses=2, cfg=2,ring=2, ring=2,ulysses=2, ring=4")  # 2 heads
    assert time.monotonic() - t0 < 30 and not (tmp_path / "d").exists()  # before Ray, the directory, any placement
    rc = driver.main(["--batch", str(prompts), "--config", str(tiny_config()), "--world-size", "4", "--parallel", "dp=3",
                      "--out", str(tmp_path / "e"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "does not make the job's 4 rank(s); meshes that fit: dp=4, dp=2,cfg=2, dp=2,ulysses=2" in err, err


@pytest.mark.timeout(180)
def test_torchrun_ranks_refuse_before_the_rendezvous(tiny_config, magi_cfg2, tmp_path):
    """Every case on two torchrun-style ranks at once: each rank prints the one line and exits 2 within
    seconds (a rank that refused after the rendezvous would leave its peer waiting for the timeout)."""
    runs = [(str(tiny_config()), ["--parallel", p], CASES[p]) for p in sorted(CASES)]
    runs.append((str(magi_cfg2), [], MAGI_CFG2))
    procs = []
    for i, (cfg, extra, _) in enumerate(runs):
        port = free_port()
        procs.append([subprocess.Popen([sys.executable, "-m", "scopevid", "generate", "--config", cfg,
                                        "--out", str(tmp_path / f"out{i}"), "--no-progress", *extra],
                                       env=rank_env(rank, 2, port, threads=1, dist_timeout_s=120), cwd=ROOT,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)])
    try:
        for (cfg, extra, needle), pair in zip(runs, procs):
            for p in pair:
                err = p.communicate(timeout=150)[1].strip()
                assert p.returncode == 2 and len(err.splitlines()) == 1 and needle in err, (extra, err)
    finally:
        for pair in procs:
            for p in pair:
                if p.poll() is None:
                    p.kill()
