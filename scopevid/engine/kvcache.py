"""Clean-context K/V per (CFG branch, layer, absolute frame), bounded by eviction.

Adapters write the K/V of frames that became clean and read the context they attend. What stays in
the cache between chunks and windows *is* the hand-over: nothing else is passed. Under Ulysses each
rank holds only its own heads, for every frame, so no K/V ever crosses ranks. Memory is bounded by
evicting frames that no future iteration attends (`evict_before`).
"""

from __future__ import annotations

import torch

KV = tuple[torch.Tensor, torch.Tensor]


class KVCache:
    def __init__(self) -> None:
        self._frames: dict[int, dict[tuple[str, int], KV]] = {}  # frame -> (branch, layer) -> (k, v)

    def branch(self, name: str) -> "KVBranch":
        return KVBranch(self, name)

    def frames(self, branch: str = "cond", layer: int = 0) -> set[int]:
        return {f for f, d in self._frames.items() if (branch, layer) in d}

    def has(self, frame: int) -> bool:
        return frame in self._frames

    def put(self, branch: str, layer: int, frame: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self._frames.setdefault(frame, {})[(branch, layer)] = (k, v)

    def get(self, branch: str, layer: int, frame: int) -> KV | None:
        d = self._frames.get(frame)
        return None if d is None else d.get((branch, layer))

    def evict_before(self, frame: int) -> None:
        for f in [f for f in self._frames if f < frame]:
            del self._frames[f]

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                   for d in self._frames.values() for k, v in d.values())

    def state_dict(self) -> dict:
        return {f"{b}|{l}|{f}": kv for f, d in self._frames.items() for (b, l), kv in d.items()}

    def load_state_dict(self, state: dict) -> None:
        self._frames = {}
        for key, (k, v) in state.items():
            b, l, f = key.split("|")
            self.put(b, int(l), int(f), k, v)


class KVBranch:
    """One CFG branch's view: the `KVStore` protocol adapters see."""

    def __init__(self, cache: KVCache, name: str):
        self.cache, self.name = cache, name

    def branch(self, name: str) -> "KVBranch":
        return KVBranch(self.cache, name)

    def put(self, layer: int, frame: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.cache.put(self.name, layer, frame, k, v)

    def get(self, layer: int, frames: list[int]) -> KV | None:
        kv = [self.cache.get(self.name, layer, f) for f in frames]
        if any(x is None for x in kv):
            return None
        return torch.cat([k for k, _ in kv], dim=1), torch.cat([v for _, v in kv], dim=1)
