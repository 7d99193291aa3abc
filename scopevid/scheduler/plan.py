"""The planner-to-executor contract: one `Iteration` per model forward opportunity.

A plan (diffusion forcing or chunk-causal, see `schedules`) is a sequence of iterations. Each
iteration names the latent frames of the current window by absolute index and says, per frame,
which denoising step it is at (`progress`), whether it advances now (`update`, Eq. 8), which
frames the official pipeline would forward (`valid`) and which our forward runs on (`compute`,
Eq. 9). Everything is plain Python so the engine, the cluster and the tests share one picture.

Progress convention (SkyReels-V2's step index): for T denoising steps a frame's progress u is
0 before it starts, u in 1..T while it takes step u-1 (forward at sigmas[u-1], Euler to sigmas[u]),
and T+1 once clean. Prefix frames that enter a window clean (overlap history) sit at T+1.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Iteration:
    window: int  # window index in the video (0 for plans without windows)
    index: int  # row of this window's step matrix, 0-based
    serial: int  # iteration number over the whole rollout, 0-based
    start: int  # absolute latent index of window slot 0
    progress: tuple[int, ...]  # u per window slot
    update: tuple[bool, ...]  # m_{t,j}: slot advances now and is not terminal (Eq. 8)
    valid: tuple[int, int]  # [lo, hi) slots the official pipeline forwards
    compute: tuple[int, int]  # [lo, hi) slots our forward runs on (== valid without selective)
    num_steps: int  # T
    prefix: int = 0  # leading slots that entered this window clean (overlap history)
    context_start: int | None = None  # absolute index: clean frames [context_start, start+compute[0]) are
    # attended from the KV cache instead of being forwarded (None: start, i.e. only the window's own)

    @property
    def frames(self) -> range:
        """Absolute latent indices of the window."""
        return range(self.start, self.start + len(self.progress))

    @property
    def context(self) -> range:
        """Absolute latent indices of clean frames served from the KV cache at this iteration."""
        lo = self.start if self.context_start is None else self.context_start
        return range(lo, self.start + self.compute[0])

    @property
    def active(self) -> tuple[int, ...]:
        """Slots that advance at this iteration."""
        return tuple(j for j, m in enumerate(self.update) if m)

    def finished(self) -> tuple[int, ...]:
        """Slots that take their last step now (they leave the denoising front after this iteration)."""
        return tuple(j for j, (u, m) in enumerate(zip(self.progress, self.update)) if m and u == self.num_steps)

    def is_last_in_window(self) -> bool:
        return all(u >= self.num_steps for u in self.progress)

