"""`scopevid bench comm`: the comm model at published sizes (adapters built on the meta device from
configs/arch and the MAGI-1 presets) gives the hand-computed bytes, and its tables name a best mesh
per GPU count; nothing is allocated at real size (it runs in seconds)."""

from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("comm") / "out"
    r = subprocess.run([sys.executable, "-m", "scopevid", "bench", "comm", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "### SkyReels-V2-DF-1.3B 540P" in r.stdout and (out / "comm.md").read_text().strip() == r.stdout.strip()
    return pq.read_table(out / "comm.parquet").to_pylist()


def _row(rows, model, mesh, gpus=8):
    return next(r for r in rows if r["model"] == model and r["mesh"] == mesh and r["gpus"] == gpus)


def test_bytes_are_the_hand_computed_ones(rows):
    # SkyReels-V2-DF-1.3B at 540P: 30 layers, 12 heads of 128, 2040 tokens a frame, bf16; 25 frames
    # padded to 28 over 4 Ulysses ranks = 7 frames a rank; cfg=2: one branch a rank
    r = _row(rows, "SkyReels-V2-DF-1.3B 540P", "cfg=2,ulysses=4")
    tokens = 7 * 2040
    assert r["padded_frames"] == 28
    assert r["bytes_ulysses"] == 30 * (3 * tokens * 128 * (2 * 12 + 2 * 12) * 2 // 4)
    assert r["bytes_gather"] == 3 * 7 * (16 * 68 * 120) * 4 and r["bytes_cfg"] == 7 * 16 * 68 * 120 * 2
    # MAGI-1 4.5B at 720P: grouped-query K/V (24 query heads, 8 K/V groups), ring=2 passes K/V only
    m = _row(rows, "MAGI-1 4.5B distill 720P", "ring=2,ulysses=4")
    tokens = 3 * 2025  # 24 frames over 8 ranks
    assert m["bytes_ring"] == 34 * 1 * 2 * tokens * 8 * 128 * 2 == m["bytes_ring_store"]


def test_every_model_and_gpu_count_has_its_meshes(rows):
    models = {r["model"] for r in rows}
    assert models == {"SkyReels-V2-DF-1.3B 540P", "SkyReels-V2-DF-14B 540P", "SkyReels-V2-DF-14B 720P", "MAGI-1 4.5B distill 720P"}
    for model in models:
        for n in (8, 16, 32, 64):
            at = [r for r in rows if r["model"] == model and r["gpus"] == n]
            assert {r["gpus_per_video"] for r in at} >= {1, n}  # dp=N and one video on all N
            assert max(r["throughput_efficiency"] for r in at) == pytest.approx(1.0)  # dp=N: no traffic at all
    # MAGI-1 distill has one branch: no cfg meshes; Ulysses never exceeds its 8 K/V groups
    magi = [r for r in rows if r["model"].startswith("MAGI")]
    assert all("cfg=" not in r["mesh"] and int((r["mesh"] + ",ulysses=1").split("ulysses=")[1].split(",")[0]) <= 8
               for r in magi)
    # 12 heads: no Ulysses degree of 8 for the 1.3B model; ring takes the rest
    assert not [r for r in rows if r["model"].startswith("SkyReels-V2-DF-1.3B") and "ulysses=8" in r["mesh"]]


@pytest.mark.parametrize("spec,params,shape", [
    ({"kind": "skyreels_v2", "path": str(ROOT / "configs/arch/SkyReels-V2-DF-1.3B"), "height": 544, "width": 960},
     (1.3e9, 1.5e9), (30, 12, 12, 128, 2040)),
    ({"kind": "skyreels_v2", "path": str(ROOT / "configs/arch/SkyReels-V2-DF-14B"), "height": 720, "width": 1280},
     (13.5e9, 14.5e9), (40, 40, 40, 128, 3600)),
    ({"kind": "magi1", "arch": "4.5B", "weights": "random", "height": 720, "width": 720, "special_tokens": "x.npz"},
     (4.4e9, 4.5e9), (34, 24, 8, 128, 2025)),
    ({"kind": "magi1", "arch": "24B", "weights": "random", "height": 720, "width": 720, "special_tokens": "x.npz"},
     (23.5e9, 24.5e9), (48, 48, 8, 128, 2025)),
], ids=["skyreels-1.3B-540P", "skyreels-14B-720P", "magi1-4.5B", "magi1-24B"])
def test_published_models_build_on_meta_at_full_size(spec, params, shape):
    import torch

    from scopevid import adapters

    a = adapters.load(spec, "meta", torch.bfloat16)
    dit = a.parts.transformer if spec["kind"] == "skyreels_v2" else a.model
    n = sum(p.numel() for p in dit.parameters())
    assert params[0] < n < params[1], n
    assert all(p.device.type == "meta" for p in dit.parameters())  # nothing allocated, nothing read
    s = a.attention_shape()
    assert (s.layers, s.heads, s.kv_heads, s.head_dim, s.tokens_per_frame) == shape and s.element_bytes == 2
