"""Solvers: per-frame updates from a velocity and the frame's own pair of noise levels.

A solver is pure in the sense that matters here: per-frame sigmas in, no deep-copied scheduler per
frame (the diffusers SkyReels-V2 pipeline's way). Multistep solvers keep their state per absolute
frame, like every other per-frame state in the engine.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Solver(Protocol):
    """One frame's update from its velocity and its pair of noise levels; state per absolute frame."""

    name: str

    def step(self, frame: int, x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float, step: int) -> torch.Tensor: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Euler:
    """Flow-matching Euler, paper Eq. 1: x_{k-1} = x_k + v (sigma_{k-1} - sigma_k)."""

    name = "euler"

    def step(self, frame: int, x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float, step: int) -> torch.Tensor:
        return x + v * (sigma_next - sigma)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


SOLVERS = {"euler": Euler}
