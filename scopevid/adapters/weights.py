"""Where a loaded network comes from: this process's own reading of the checkpoint, or a peer's.

Adapters load each network through a `WeightSource`:

    module = source.module("transformer", load=lambda: <read the files>, skeleton=lambda: <build on meta>,
                           files=[...the weight files `load` reads...])

`Files` (one process, and every rank that shares nothing) calls `load`. cluster.weights.NodeShared lets one
rank per node call `load` and hands every parameter and buffer of the result to the other ranks of its node
over the process group; they only build the `skeleton` (the same module tree on torch's meta device, nothing
read or allocated) and take the leader's tensors into it. So a node's ranks read one copy of the checkpoint
instead of one each, whatever the loader (diffusers, transformers, our own) did to the tensors on the way.

`stats` counts what this process read from checkpoint files (the sizes of the weight files its loads read
whole) and what it received from a peer instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch


@dataclass
class WeightStats:
    files_read: int = 0
    bytes_read: int = 0  # bytes of checkpoint weight files this process loaded
    bytes_received: int = 0  # bytes of tensors a node peer sent instead
    seconds: float = 0.0  # wall time in `module` calls (reading, or receiving)

    def to_dict(self) -> dict:
        return {"files_read": self.files_read, "bytes_read": self.bytes_read, "bytes_received": self.bytes_received,
                "load_seconds": self.seconds}


class WeightSource(Protocol):
    stats: WeightStats

    def module(self, name: str, load: Callable[[], torch.nn.Module], skeleton: Callable[[], torch.nn.Module],
               files: list[Path]) -> torch.nn.Module:
        """The network `name`: from `load()` (which reads `files` whole), or the same tensors from a peer
        placed into `skeleton()` (the module tree on the meta device)."""


class Files:
    """This process reads every file itself."""

    def __init__(self) -> None:
        self.stats = WeightStats()

    def module(self, name, load, skeleton, files):
        t0 = time.perf_counter()
        m = load()
        self.stats.files_read += len(files)
        self.stats.bytes_read += sum(Path(f).stat().st_size for f in files)
        self.stats.seconds += time.perf_counter() - t0
        return m
