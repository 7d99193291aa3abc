"""Everything a rollout holds between iterations, and the one place it is saved and restored.

The loop (engine.rollout) and the forward runner (engine.forward) read and write this object; the
checkpointer (engine.checkpoint) calls `state_dict` / `load_state_dict` and nothing else. Per-frame
state is keyed by absolute latent index and leaves with `evict_before` when its frame has left the
window and its context for good, so memory is bounded by the window on every schedule.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping, Protocol

import torch

from scopevid.engine.history import FeatureMemory, VelocityHistory
from scopevid.engine.kvcache import KVCache
from scopevid.errors import CheckpointError
from scopevid.scheduler.policies import Mode

FORMAT = 2  # of a saved rollout state; 1 (before the state object) is not read


class Stateful(Protocol):
    """A component whose state a resume must restore (policy, solver, reuse executor, noise, topology)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class RolloutStats:
    counts: dict = field(default_factory=lambda: {m.label: 0 for m in Mode})
    fallbacks: int = 0  # cheap decisions that could not be served and were recomputed
    frame_forwards: int = 0
    flops: float = 0.0
    iterations: int = 0


class RolloutState:
    """Latents, per-frame history and features, K/V, counters, and the stateful components."""

    def __init__(self, components: Mapping[str, Stateful], history_depth: int = 4):
        self.components = dict(components)
        self.latents: dict[int, torch.Tensor] = {}  # in-window latents by absolute frame
        self.final: dict[int, torch.Tensor] = {}  # clean latents still needed (prefix, K/V fill, emit)
        self.history = VelocityHistory(depth=history_depth)  # recomputed velocities per frame
        self.features = FeatureMemory()  # previous pre-forward feature per frame (Eq. 4)
        self.kv = KVCache()
        self.window = -1  # the diffusion forcing window being denoised
        self.feature_frames: list[int] = []  # frames of the last feature pass (their owners under SP)
        self.stats = RolloutStats()
        self.next_serial = 0  # where a restored rollout goes on
        self.next_emit = 0

    # --- lifetime of per-frame state -----------------------------------------------------------
    def enter_window(self, window: int) -> None:
        """A diffusion forcing window restarts attention from its own first frame, so K/V computed in
        the previous window (which saw older frames) are not valid here: the cache starts empty."""
        self.window = window
        self.latents = {}
        self.kv = KVCache()

    def evict_before(self, frame: int) -> None:
        """Forget every frame before `frame`: no later iteration reads it (it is clean, emitted, and
        outside every later window and context)."""
        self.kv.evict_before(frame)
        for d in (self.final, self.latents):
            for f in [f for f in d if f < frame]:
                del d[f]
        self.history.drop_before(frame)
        self.features.drop_before(frame)

    def frames_held(self) -> int:
        """Per-frame entries held (for memory tests): latents, clean latents, histories, features."""
        return len(self.latents) + len(self.final) + len(self.history) + len(self.features)

    # --- resume ------------------------------------------------------------------------------------
    def state_dict(self, *, window_reset: bool = False) -> dict:
        """Everything the rest of the rollout reads, as CPU tensors that own their storage.

        window_reset: the next iteration opens a new diffusion forcing window, which discards the
        in-window latents and the K/V cache: they are not saved (they can be large)."""
        state = {
            "format": FORMAT,
            "serial": self.next_serial,
            "next_emit": self.next_emit,
            "window": self.window,
            "final": dict(self.final),
            "latents": {} if window_reset else dict(self.latents),
            "kv": {} if window_reset else self.kv.state_dict(),
            "history": self.history.state_dict(),
            "features": self.features.state_dict(),
            "feature_frames": list(self.feature_frames),
            "stats": asdict(self.stats),
            "components": {name: c.state_dict() for name, c in self.components.items()},
            "torch_rng": torch.get_rng_state(),
        }
        return compact(state)

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        if state.get("format") != FORMAT:
            raise CheckpointError(f"rollout state format {state.get('format')!r}, this build reads {FORMAT}")
        missing = sorted(set(self.components) - set(state["components"]))
        if missing:
            raise CheckpointError(f"rollout state lacks the state of {', '.join(missing)}")
        self.next_serial, self.next_emit = int(state["serial"]), int(state["next_emit"])
        self.window = int(state["window"])
        self.final = to_device(state["final"], device)
        self.latents = to_device(state["latents"], device)
        self.kv.load_state_dict(to_device(state["kv"], device))
        self.history.load_state_dict(to_device(state["history"], device))
        self.features.load_state_dict(to_device(state["features"], device))
        self.feature_frames = list(state["feature_frames"])
        self.stats = RolloutStats(**state["stats"])
        for name, c in self.components.items():
            c.load_state_dict(to_device(state["components"][name], device))
        torch.set_rng_state(state["torch_rng"])


def compact(x):
    """Deep copy with contiguous CPU tensors (views of a gathered batch would save the whole batch)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", copy=True).contiguous()
    if isinstance(x, dict):
        return {k: compact(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(compact(v) for v in x)
    return x


def to_device(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device) for v in x)
    return x
