"""Single-process parts of cluster: launcher environments, the sharding rule, clear errors."""

from __future__ import annotations

import pytest
import torch

from scopevid.adapters.base import ForwardSpec
from scopevid.cluster import groups
from scopevid.cluster.groups import DistEnv, first_host
from scopevid.cluster.sequence import MeshTopology
from scopevid.errors import ConfigError, DistributedError
from scopevid.mesh import shard_layout

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29400"}


def test_torchrun_environment():
    assert DistEnv.from_env(TORCHRUN) == DistEnv(3, 4, 1, "10.0.0.7", 29400, "torchrun")
    assert DistEnv.from_env({}) is None
    assert DistEnv.from_env({"RANK": "0", "WORLD_SIZE": "1"}).world == 1  # needs no rendezvous


def test_slurm_step_environment():
    env = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_STEP_NODELIST": "gpu[03-04,09]", "PATH": ""}
    got = DistEnv.from_env(env)
    assert (got.rank, got.world, got.local_rank, got.master_addr, got.master_port, got.source) == (
        5, 8, 1, "gpu03", 29500 + 456, "slurm")
    # an sbatch script's own environment (no step) runs one process: not distributed
    assert DistEnv.from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n1"}) is None
    # torch-style variables win over Slurm's
    assert DistEnv.from_env({**env, **TORCHRUN}).source == "torchrun"


@pytest.mark.parametrize("env, needle", [
    ({"RANK": "0"}, "WORLD_SIZE not set"),
    ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "rank 2 is not in [0, world size 2)"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, "MASTER_ADDR not set"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "MASTER_PORT not set"),
])
def test_bad_environment_is_one_clear_error(env, needle):
    with pytest.raises(DistributedError) as e:
        DistEnv.from_env(env)
    assert needle in str(e.value)


def test_first_host_of_slurm_nodelists():
    assert first_host("gpu[03-05,09],cpu1") == "gpu03"
    assert first_host("node7") == "node7"
    assert first_host("a-b[1,2]") == "a-b1"


def test_timeout_setting(monkeypatch):
    monkeypatch.delenv(groups.TIMEOUT_ENV, raising=False)
    assert groups.timeout_from_env() == groups.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(groups.TIMEOUT_ENV, "7.5")
    assert groups.timeout_from_env() == 7.5
    monkeypatch.setenv(groups.TIMEOUT_ENV, "-1")
    with pytest.raises(DistributedError, match="must be > 0"):
        groups.timeout_from_env()


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("n", [0, 1, 2, 5, 7, 8, 13, 16])
def test_shard_rule(n, world):
    """Contiguous, equal shards covering the padded sequence in rank order; padding < world, at the end."""
    pads = set()
    covered = []
    for r in range(world):
        n_pad, (lo, hi) = shard_layout(n, world, r)
        pads.add(n_pad)
        assert hi - lo == n_pad // world
        covered.extend(range(lo, hi))
    (n_pad,) = pads
    assert covered == list(range(n_pad))
    assert n <= n_pad < n + world and n_pad % world == 0


def test_heads_must_divide_world_size():
    topo = MeshTopology.__new__(MeshTopology)  # no group needed: the check comes before any traffic
    topo._ulysses = object()
    topo.uly = type("G", (), {"world": 2})()  # the Ulysses group: heads split 2 ways
    q = torch.zeros(1, 16, 3, 8)
    with pytest.raises(ConfigError, match="parallel.ulysses: .* 3 query / 3 key heads, not divisible by 2 ranks"):
        topo.attention(q, q, q, 0, ForwardSpec(frames=[0]))
