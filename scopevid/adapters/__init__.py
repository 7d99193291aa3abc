"""WHAT model: one module per family behind the protocol of adapters.base; `load` picks one by kind."""

from __future__ import annotations

import torch

from scopevid.errors import ConfigError

KINDS = ("tiny", "skyreels_v2", "magi1")


def load(spec: dict, device: str = "cpu", dtype: torch.dtype = torch.float32):
    _check_device(str(device))
    kind = spec.get("kind")
    if kind == "tiny":
        from scopevid.adapters.tiny.adapter import TinyAdapter

        return TinyAdapter.from_config(spec, device, dtype)
    if kind == "skyreels_v2":
        from scopevid.adapters.skyreels_v2 import SkyReelsV2Adapter

        return SkyReelsV2Adapter.from_config(spec, device, dtype)
    if kind == "magi1":
        from scopevid.adapters.magi1 import Magi1Adapter

        return Magi1Adapter.from_config(spec, device, dtype)
    raise ConfigError(f"model.kind: unknown {kind!r}; allowed: {', '.join(KINDS)}")


def _check_device(device: str) -> None:
    """Refuse a device this torch cannot use before any weights load (one line, not a traceback)."""
    kind = device.split(":")[0]
    if kind == "cpu":
        return
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {device} is not available (this torch build has no CUDA or sees no GPU); use cpu")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device: {device} is not available ({torch.cuda.device_count()} CUDA devices)")
        return
    raise ConfigError(f"device: {device!r} is not supported; allowed: cpu, cuda, cuda:N")
