"""How the engine sees the process group: one process here; cluster.sequence implements many.

The engine stays free of torch.distributed: it asks the topology which contiguous part of the
compute interval this process forwards, to sum scalars over processes, and to gather velocities
so that every process holds the same latents and takes the same step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Hashable, MutableMapping, Protocol

import torch

from scopevid.adapters.base import Attention, local_attention
from scopevid.adapters.weights import Files, WeightSource


@dataclass(frozen=True)
class FrameKeyed:
    """A mapping whose entries each belong to one absolute frame (`frame_of(key)`): per-frame state
    that lives on the rank computing that frame, which `Topology.migrate` hands to its new owner."""

    data: MutableMapping
    frame_of: Callable[[Hashable], int] = field(default=int)


class Topology(Protocol):
    rank: int  # this process among the ranks of its video (0 writes the outputs)
    world: int
    attention: Attention
    heads_split: int  # ranks one forward's attention heads are split over (Ulysses)
    branch: str | None  # the guidance branch this process computes ("cond" / "uncond"); None: both
    weights: WeightSource  # who reads the checkpoint files (this process, or one rank per node for its peers)

    def layout(self, n: int) -> tuple[int, tuple[int, int]]:
        """For n frames: (padded length of the full sequence, this process's [lo, hi) of it)."""

    def migrate(self, old: list[int], new: list[int], stores: list[FrameKeyed]) -> None:
        """Hand per-frame state to the owners its frames have in the layout of `new`, given the full
        frame lists of the previous and the current forward (equal lists: nothing moves)."""

    def allreduce(self, values: list[float]) -> list[float]:
        """Sum over every process of the video in float64 (identical on every process): control flags."""

    def reduce_shards(self, values: list[float]) -> list[float]:
        """Sum over the processes sharing one forward (its shards), float64, identical everywhere:
        the discrepancy sums of Eq. 4 (guidance-branch replicas hold the same terms and are not added)."""

    def exchange(self, mine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """With `branch` set: (cond, uncond) velocity rows of this shard, this process's and its peer's."""

    def gather(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """Concatenate every process's [rows, ...] along dim 0 and drop padding: [n, ...]."""

    def check(self, digest: str) -> None:
        """Debug: fail loudly if processes disagree on a decision digest."""

    def comm_bytes(self) -> dict[str, int]:
        """Bytes this process sent so far, by kind (stats; cluster.comm models them)."""

    @property
    def comm_seconds(self) -> float:
        """Wall seconds spent in collectives so far, attention compute excluded (stats)."""

    def state_dict(self) -> dict:
        """Counters worth keeping across a resume (none on one process)."""

    def load_state_dict(self, state: dict) -> None: ...


class LocalTopology:
    rank = 0
    world = 1
    heads_split = 1
    branch = None
    comm_seconds = 0.0
    attention: Attention = staticmethod(local_attention)

    def __init__(self) -> None:
        self.weights = Files()

    def layout(self, n: int) -> tuple[int, tuple[int, int]]:
        return n, (0, n)

    def migrate(self, old: list[int], new: list[int], stores: list[FrameKeyed]) -> None:
        pass

    def allreduce(self, values: list[float]) -> list[float]:
        return [float(v) for v in values]

    def reduce_shards(self, values: list[float]) -> list[float]:
        return [float(v) for v in values]

    def exchange(self, mine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise RuntimeError("one process computes both guidance branches")

    def gather(self, local: torch.Tensor, n: int) -> torch.Tensor:
        return local[:n]

    def check(self, digest: str) -> None:
        pass

    def comm_bytes(self) -> dict[str, int]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
