"""Row-stable per-frame layers: a frame's bits must not depend on how many frames share the call.

A BLAS picks its kernel by the matrix shape. On CPU a linear layer over 1-3 rows (a matrix-vector
path) rounds differently from the same rows inside a larger call, so per-frame layers (the timestep
MLP, adaLN projections), which run on as many rows as the forward has frames, gave a frame other
bits on a rank holding 2 frames than in one process holding 11: the tiny model's 1 vs 2-process
videos drifted apart through the rollout (issue 24). `fixed_rows` runs such a layer over blocks of
exactly ROWS rows (the last one zero-padded), so every row goes through one kernel at one shape,
whatever the shard. Token-level layers need nothing: their row count is frames x tokens per frame,
far above the small-matrix paths, and each row's result there does not depend on the row count
(tests/test_bitwise_mesh.py checks both on this machine's BLAS).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ROWS = 8  # rows per call: above the small-matrix kernels' sizes, and a window's frames in one or two calls


def fixed_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rows: int = ROWS) -> torch.Tensor:
    """fn(x) computed on blocks of exactly `rows` leading-dim rows; fn must act on each row alone."""
    n = x.shape[0]
    if n == 0:
        return fn(x)
    pad = (-n) % rows
    if pad:
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
    return torch.cat([fn(b) for b in x.split(rows)])[:n]
