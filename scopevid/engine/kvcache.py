"""Clean-context K/V per (CFG branch, layer, absolute frame), bounded by eviction.

Adapters write the K/V of frames that became clean and read the context they attend. What stays in
the cache between chunks and windows *is* the hand-over: nothing else is passed. Under Ulysses each
rank holds only its own heads, for every frame, so no K/V ever crosses ranks. Memory is bounded by
evicting frames that no future iteration attends (`evict_before`).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self) -> None:
        self._store: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def branch(self, name: str) -> "KVBranch":
        return KVBranch(self, name)

    def frames(self, branch: str = "cond", layer: int = 0) -> set[int]:
        return {f for (b, l, f) in self._store if b == branch and l == layer}

    def has(self, frame: int) -> bool:
        return any(f == frame for (_, _, f) in self._store)

    def evict_before(self, frame: int) -> None:
        for key in [k for k in self._store if k[2] < frame]:
            del self._store[key]

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self._store.values())

    def state_dict(self) -> dict:
        return {f"{b}|{l}|{f}": (k, v) for (b, l, f), (k, v) in self._store.items()}

    def load_state_dict(self, state: dict) -> None:
        self._store = {}
        for key, (k, v) in state.items():
            b, l, f = key.split("|")
            self._store[(b, int(l), int(f))] = (k, v)


class KVBranch:
    """One CFG branch's view: the `KVStore` protocol adapters see."""

    def __init__(self, cache: KVCache, name: str):
        self.cache, self.name = cache, name

    def put(self, layer: int, frame: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.cache._store[(self.name, layer, frame)] = (k, v)

    def get(self, layer: int, frames: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        try:
            kv = [self.cache._store[(self.name, layer, f)] for f in frames]
        except KeyError:
            return None
        return torch.cat([k for k, _ in kv], dim=1), torch.cat([v for _, v in kv], dim=1)
