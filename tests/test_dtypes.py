"""The run dtypes GPU users pick (bfloat16, float16) work on CPU for the tiny model, and stay within
stated tolerances of float32: PSNR of the decoded video against the float32 run's, 33 frames.
Measured: bf16 53-59 dB, fp16 73-76 dB (bundled and random weights)."""

from __future__ import annotations

import dataclasses

import pytest

from scopevid import adapters
from scopevid import config as config_lib
from scopevid.engine import runner
from scopevid.engine.sinks import FrameStore
from scopevid.errors import ConfigError

FLOOR_DB = {"bfloat16": 45.0, "float16": 60.0}


@pytest.mark.parametrize("weights", ["random", "bundled"])
def test_low_precision_runs_stay_close_to_float32(tiny_config, tmp_path, weights):
    over = {} if weights == "random" else {"model": {"kind": "tiny", "weights": "bundled"}, "prompt": "blue square moving left"}
    base = config_lib.load(tiny_config(frames=33, **over))
    ref = FrameStore(tmp_path / "fp32")
    runner.run_once(base, adapters.load(base.model), "original", frames_to=ref)
    for dtype, floor in FLOOR_DB.items():
        cfg = dataclasses.replace(base, dtype=dtype)
        ad = adapters.load(cfg.model, cfg.device, runner.DTYPES[dtype])
        assert next(ad.model.parameters()).dtype == runner.DTYPES[dtype]
        s = runner.run_once(cfg, ad, "original", reference=ref).summary
        assert floor <= s["psnr"] < 100.0, (dtype, s["psnr"])  # close, and really computed in low precision


def test_unavailable_device_is_refused_at_load(tiny_config):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    cfg = config_lib.load(tiny_config())
    with pytest.raises(ConfigError, match="device: cuda.*not available"):
        adapters.load(cfg.model, "cuda")
