"""WHAT model: one module per family behind the protocol of adapters.base; `load` picks one by kind."""

from __future__ import annotations

import torch

from scopevid.errors import ConfigError

KINDS = ("tiny", "skyreels_v2", "magi1")


def load(spec: dict, device: str = "cpu", dtype: torch.dtype = torch.float32):
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
