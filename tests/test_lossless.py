"""Every run keeps its latents losslessly, and --compare measures against a lossless reference:
a run identical to Original reads as identical (PSNR at its 100 dB cap, SSIM 1), and its latents
equal Original's bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file

from conftest import ROOT, write_tiny_config


def test_an_identical_run_reads_as_identical(tmp_path):
    cfg = write_tiny_config(tmp_path, frames=20, schedule={"selective": "off"})  # exactly what --compare's Original runs
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "scopevid", "generate", "--config", str(cfg), "--policy", "original",
                        "--compare", "--out", str(out), "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["psnr"] == 100.0 and s["ssim"] == 1.0, (s["psnr"], s["ssim"])
    ours, ref = (load_file(str(out / n))["latents"] for n in ("latents.safetensors", "original_latents.safetensors"))
    assert ours.dtype == torch.float32 and ours.shape[0] == 20 and torch.equal(ours, ref)
    assert not (out / "original_frames").exists()  # the lossless reference frames were only for the comparison
