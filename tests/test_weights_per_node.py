"""Weights read once per node (cluster.weights.NodeShared) on real gloo processes: on one node only the
first rank reads the checkpoint files and its peers receive every tensor, ending bit-equal to it; on two
(simulated) nodes each node's first rank reads. SkyReels-V2 (diffusers' and transformers' loaders) and
MAGI-1 (our own loader) fixtures."""

from __future__ import annotations

import hashlib

import pytest
import torch

from conftest import ROOT, write_magi_fixture_config
from scopevid.cluster.launch import spawn

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
ENV = {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}


def _load(topo, cfg_path: str) -> dict:
    """Runs on every rank: the adapter through the topology's weight source; a digest of every tensor."""
    from scopevid import adapters
    from scopevid import config as config_lib
    from scopevid.engine.runner import DTYPES

    cfg = config_lib.load(cfg_path)
    ad = adapters.load(cfg.model, cfg.device, DTYPES[cfg.dtype], weights=topo.weights)
    h = hashlib.sha256()
    for role, m in sorted(ad.modules().items()):
        for name, t in [*m.named_parameters(), *m.named_buffers()]:
            h.update(f"{role}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
    return {"digest": h.hexdigest(), **topo.weights.stats.to_dict(), "node": topo.state.node.ranks or (0,)}


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("weights")
    return {"magi1": (str(write_magi_fixture_config(tmp)), None), "tmp": tmp}


def _config(configs, model: str):
    if model == "skyreels" and "skyreels" not in configs:
        sky = pytest.importorskip("test_skyreels_v2")  # its tiny-checkpoint builder (the skyreels extra)
        from test_cluster_skyreels import case_config

        ckpt = sky.build_tiny_checkpoint(configs["tmp"] / "SkyReels-V2-DF-tiny")
        size = sum(f.stat().st_size for f in ckpt.glob("*/*.safetensors"))
        configs["skyreels"] = (case_config(sky, ckpt, configs["tmp"] / "sky.yaml", "original", 0, "off"), size)
    return configs[model]


def _one_process(cfg_path: str) -> dict:
    from scopevid.engine.topology import LocalTopology

    topo = LocalTopology()

    class View:  # the same loader through a one-process topology
        weights = topo.weights
        state = type("S", (), {"node": type("N", (), {"ranks": (0,)})()})()

    return _load(View, cfg_path)


@pytest.mark.parametrize("model", ["skyreels", "magi1"])
def test_one_node_reads_once_and_its_peers_receive(configs, model):
    path, size = _config(configs, model)
    one = _one_process(path)
    two = spawn("test_weights_per_node:_load", 2, args=(path,), timeout_s=300, env=ENV)
    assert one["bytes_read"] > 0 and (size is None or one["bytes_read"] == size)
    assert two[0]["bytes_read"] == one["bytes_read"] and two[0]["bytes_received"] == 0
    assert two[1]["bytes_read"] == 0 and two[1]["files_read"] == 0 and two[1]["bytes_received"] > 0
    assert two[0]["digest"] == two[1]["digest"] == one["digest"]  # every tensor, dtype and buffer the same


def test_two_nodes_each_read_once(configs):
    path, _ = configs["magi1"]
    four = spawn("test_weights_per_node:_load", 4, args=(path,), timeout_s=400, env=ENV, nodes=2)
    assert [r["node"] for r in four] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    readers = [r["bytes_read"] > 0 for r in four]
    assert readers == [True, False, True, False]
    assert len({r["digest"] for r in four}) == 1


def _load_error(topo, cfg_path: str) -> tuple[str, str] | None:
    from scopevid.errors import CheckpointError

    try:
        _load(topo, cfg_path)
    except CheckpointError as e:  # anything else (a collective's timeout) fails the rank, with its own message
        return type(e).__name__, str(e)
    return None


def test_a_load_that_fails_on_the_first_rank_fails_its_peers_in_the_same_line(configs, tmp_path):
    """Only the leader runs the loader (and its checks): a tensor of the wrong shape, found there, reaches the
    node's other rank as the same one-line error, not as a wait for the collective timeout."""
    import shutil

    import yaml
    from safetensors.torch import load_file, save_file

    dit = tmp_path / "dit"
    shutil.copytree(ROOT / "tests" / "fixtures" / "magi1" / "dit", dit)
    shard = sorted(dit.rglob("*.safetensors"))[0]
    state = load_file(str(shard))
    name = sorted(state)[0]
    state[name] = torch.zeros(*(s + 1 for s in state[name].shape), dtype=state[name].dtype)
    save_file(state, str(shard))
    raw = yaml.safe_load(open(configs["magi1"][0]))
    raw["model"]["weights"] = str(dit)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    got = spawn("test_weights_per_node:_load_error", 2, args=(str(path),), timeout_s=500, env=ENV, dist_timeout_s=300)
    assert got[0] is not None and got[0][0] == "CheckpointError" and "has shape" in got[0][1], got
    assert got[1] == got[0]
