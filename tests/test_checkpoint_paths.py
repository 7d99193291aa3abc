"""Checkpoint files cannot make a loader read outside the checkpoint directory, and a typo in a model
spec is refused instead of silently running other weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from scopevid import adapters
from scopevid.errors import ConfigError, CheckpointError

FX = Path(__file__).parent / "fixtures" / "magi1"


@pytest.mark.parametrize("entry", ["../../../../etc/passwd", "/etc/passwd", "sub/../../outside.safetensors", 7])
def test_magi1_index_entries_stay_inside_the_checkpoint(tmp_path, entry):
    from scopevid.adapters.magi1.checkpoint import INDEX, weight_map

    d = tmp_path / "dit"
    shutil.copytree(FX / "dit" / "inference_weight.distill", d)
    index = d / INDEX
    wm = json.loads(index.read_text())
    name = next(iter(wm["weight_map"]))
    wm["weight_map"][name] = entry
    index.write_text(json.dumps(wm))
    (tmp_path / "outside.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="outside the checkpoint directory|not a file name"):
        weight_map(d)


def test_skyreels_index_entries_stay_inside_the_checkpoint(tmp_path):
    from scopevid.adapters.skyreels_v2.loader import _weight_files

    folder = tmp_path / "transformer"
    folder.mkdir()
    single = "diffusion_pytorch_model.safetensors"
    (folder / (single + ".index.json")).write_text(json.dumps({"weight_map": {"a.weight": "../../../../etc/passwd"}}))
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        _weight_files(folder, single)


def test_tiny_spec_typo_is_refused():
    with pytest.raises(ConfigError, match=r"model\.weigths: unknown field for tiny; allowed: kind, weights"):
        adapters.load({"kind": "tiny", "weigths": "/nonexistent.safetensors"})
