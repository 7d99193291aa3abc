"""Attention backends chosen by the run (`attention:`), not by the model: they agree where they run,
and a backend that cannot run here is one line (exit 2) before anything loads."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import ROOT, write_tiny_config
from scopevid.adapters import attention
from scopevid.errors import ConfigError


def _qkv(seed=0, b=1, h=3, sq=24, sk=40, d=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype) for n in (sq, sk, sk)]


@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_and_math_agree(masked):
    q, k, v = _qkv()
    mask = None
    if masked:
        mask = torch.rand(24, 40, generator=torch.Generator().manual_seed(1)) > 0.5
        mask[:, 0] = True  # every query attends something
    a = attention.kernel("sdpa")(q, k, v, mask)
    b = attention.kernel("math")(q, k, v, mask)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if masked:  # the mask is honoured: the masked-out keys change nothing
        v2 = v.clone()
        v2[:, :, ~mask.any(0)] += 100.0
        torch.testing.assert_close(attention.kernel("math")(q, k, v2, mask), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["flash", "xformers"])
def test_optional_backends_agree_with_sdpa_where_they_run(name):
    why = attention.unavailable(name, "cuda" if torch.cuda.is_available() else "cpu", torch.bfloat16)
    if why is not None:
        with pytest.raises(ConfigError, match=rf"^attention: {name} .*; use sdpa"):
            attention.check(name, "cpu", torch.float32)
        pytest.skip(why)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (x.to(dev) for x in _qkv(dtype=torch.bfloat16))
    torch.testing.assert_close(attention.kernel(name)(q, k, v, None), attention.kernel("sdpa")(q, k, v, None), rtol=2e-2, atol=2e-2)


def test_a_rollout_under_math_equals_sdpa(tmp_path):
    from scopevid import config as config_lib
    from scopevid.cluster.worker import collect_rollout
    from scopevid.engine.topology import LocalTopology

    cfg = config_lib.load(write_tiny_config(tmp_path, frames=12, guidance=2.5))
    a = collect_rollout(LocalTopology(), cfg, "original", check_decisions=False)
    b = collect_rollout(LocalTopology(), cfg.with_overrides(attention="math"), "original", check_decisions=False)
    assert float((a["latents"] - b["latents"]).abs().max()) < 1e-4


@pytest.mark.parametrize("value,msg", [
    ("flash", "attention: flash needs the flash-attn package, which is not installed (pip install flash-attn "
              "--no-build-isolation, on a CUDA machine); use sdpa (torch picks its fastest kernel itself)"),
    ("fast", "attention: must be one of sdpa, math, flash, xformers, got 'fast'"),
])
def test_a_backend_that_cannot_run_is_one_line(tmp_path, value, msg):
    if value == "flash" and attention.unavailable("flash") is None:
        pytest.skip("flash-attn is installed here")
    cfg = write_tiny_config(tmp_path, frames=8, attention=value)
    r = subprocess.run([sys.executable, "-m", "scopevid", "generate", "--config", str(cfg), "--out", str(tmp_path / "o"),
                        "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [f"scopevid generate: error: {msg}"], r.stderr
