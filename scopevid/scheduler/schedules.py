"""Rollout plans: the diffusion forcing step matrix (SkyReels-V2) and the chunk-causal pipeline (MAGI-1).

Both are built from one staircase rule over blocks of frames: the first unfinished block advances by
one step per iteration and every later block trails its predecessor by `ar_step` steps (0 = all
blocks together, the synchronous schedule). This is SkyReels-V2's `generate_timestep_matrix`; MAGI-1's
chunk pipeline is the same staircase with block = chunk width and ar_step = steps per stage, run as
a stream with a bounded window instead of overlapping windows.

Selective computation (paper Eq. 8-9) turns the update mask into a compute interval per iteration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal

from scopevid.errors import ConfigError
from scopevid.scheduler.plan import Iteration

SelectiveMode = Literal["off", "paper", "causal"]


def staircase(num_blocks: int, num_steps: int, ar_step: int, pre_ready: int = 0) -> list[list[int]]:
    """Rows of per-block progress (0..T+1) until every block has reached T, as SkyReels-V2 builds them.

    Row r is the state *at* iteration r: block i advances by one when it is the first block or its
    predecessor has finished (>= T), otherwise it sits `ar_step` behind its predecessor's new value.
    """
    done = num_steps + 1
    prev = [done if i < pre_ready else 0 for i in range(num_blocks)]
    rows: list[list[int]] = []
    while not all(p >= num_steps for p in prev):
        new = [0] * num_blocks
        for i in range(num_blocks):
            if i == 0 or prev[i - 1] >= num_steps:
                new[i] = prev[i] + 1
            else:
                new[i] = new[i - 1] - ar_step
        new = [min(max(v, 0), done) for v in new]
        rows.append(new)
        prev = new
    return rows


def update_masks(rows: list[list[int]], num_steps: int, pre_ready: int = 0) -> list[list[bool]]:
    """Eq. 8: a block is active iff its progress changed and it is not terminal."""
    done = num_steps + 1
    prev = [done if i < pre_ready else 0 for i in range(len(rows[0]))] if rows else []
    masks = []
    for row in rows:
        masks.append([(n != p) and (n != done) for n, p in zip(row, prev)])
        prev = row
    return masks


def compute_intervals(
    masks: list[list[bool]], n: int, mode: SelectiveMode, interval: int | None
) -> list[tuple[int, int]]:
    """Per-iteration compute interval over n slots.

    off: the whole window (what both official pipelines forward).
    paper: Eq. 8-9, V_t = [max(e_t - B, 0), e_t) with e_t monotone; B = `interval` (default n).
           The start is pulled down to the first active slot if B is shorter than the active span,
           so an active frame is never left out.
    causal: [first active, e_t): the tightest interval; exact for block-causal models whose clean
           context is served from a KV cache (finished frames are constant, unstarted ones unseen).
    """
    if mode == "off":
        return [(0, n)] * len(masks)
    b = n if interval is None else min(interval, n)
    e_bar = 0
    out = []
    for m in masks:
        act = [j for j, a in enumerate(m) if a]
        if not act:
            e_bar = max(e_bar, b)
            out.append((max(e_bar - b, 0), e_bar))
            continue
        e_bar = max(e_bar, act[-1] + 1)
        lo = act[0] if mode == "causal" else min(max(e_bar - b, 0), act[0])
        out.append((lo, e_bar))
    return out


def _expand(values: list, block: int) -> tuple:
    return tuple(v for v in values for _ in range(block))


@dataclass(frozen=True)
class Window:
    index: int
    start: int  # absolute latent index of slot 0
    length: int  # latent frames in this window
    prefix: int  # leading slots that arrive clean (overlap history)


@dataclass(frozen=True)
class DiffusionForcingPlan:
    """SkyReels-V2 diffusion forcing over a long video, all sizes in latent frames.

    Long videos are successive windows of `window` frames; each later window starts `overlap`
    frames before the previous one ended and takes those frames as a clean prefix.
    """

    latent_frames: int
    window: int
    num_steps: int
    ar_step: int = 0
    block: int = 1  # causal_block_size
    overlap: int = 0
    selective: SelectiveMode = "off"
    interval: int | None = None  # B of Eq. 9 for selective="paper" (default: the window length)

    def __post_init__(self) -> None:
        _require(self.latent_frames >= 1, "frames", f"must give at least 1 latent frame, got {self.latent_frames}")
        _require(self.window >= 1, "window", f"must be >= 1 latent frame, got {self.window}")
        _require(self.num_steps >= 1, "steps", f"must be >= 1, got {self.num_steps}")
        _require(self.ar_step >= 0, "ar_step", f"must be >= 0 (0 = synchronous), got {self.ar_step}")
        _require(self.block >= 1, "causal_block_size", f"must be >= 1, got {self.block}")
        _require(
            self.window % self.block == 0,
            "causal_block_size",
            f"{self.block} must divide the window of {self.window} latent frames (use a window of "
            f"{max(self.block, self.window - self.window % self.block)} or {self.window - self.window % self.block + self.block} "
            f"latent frames, or a block size dividing {self.window}; diffusers' pipeline accepts this and drops the "
            "remainder from its step matrix, see docs/skyreels_v2.md)",
        )
        if self.latent_frames > self.window:
            _require(
                0 <= self.overlap < self.window,
                "overlap_history",
                f"must give 0 <= overlap < window ({self.window} latent frames), got {self.overlap}",
            )
            _require(self.overlap % self.block == 0, "overlap_history", f"{self.overlap} latent frames is not a multiple of causal_block_size {self.block}")
        _require(self.selective in ("off", "paper", "causal"), "selective", f"must be off, paper or causal, got {self.selective!r}")
        if self.interval is not None:
            _require(self.interval >= 1, "interval", f"must be >= 1 latent frame, got {self.interval}")

    chunked = False  # windows that restart (not a sliding chunk pipeline)

    @property
    def unit(self) -> int:
        """Latent frames per causal block: the granularity of per-chunk policies."""
        return self.block

    def prefixes(self) -> dict[int, int]:
        """Window origin -> clean prefix frames (overlap history) of that window."""
        return {w.start: w.prefix for w in self.windows()}

    def windows(self) -> list[Window]:
        if self.latent_frames <= self.window:
            return [Window(0, 0, self.latent_frames, 0)]
        out = [Window(0, 0, self.window, 0)]
        stride = self.window - self.overlap
        while out[-1].start + out[-1].length < self.latent_frames:
            start = out[-1].start + stride
            out.append(Window(len(out), start, min(self.window, self.latent_frames - start), self.overlap))
        return out

    def window_rows(self, w: Window) -> tuple[list[list[int]], list[list[bool]]]:
        """Frame-level progress rows and update masks of one window."""
        blocks = -(-w.length // self.block)
        pre = w.prefix // self.block
        rows = staircase(blocks, self.num_steps, self.ar_step, pre)
        masks = update_masks(rows, self.num_steps, pre)
        frows = [list(_expand(r, self.block))[: w.length] for r in rows]
        fmasks = [list(_expand(m, self.block))[: w.length] for m in masks]
        return frows, fmasks

    def iterations(self) -> Iterator[Iteration]:
        serial = 0
        for w in self.windows():
            rows, masks = self.window_rows(w)
            comp = compute_intervals(masks, w.length, self.selective, self.interval)
            for i, (row, mask, c) in enumerate(zip(rows, masks, comp)):
                yield Iteration(
                    window=w.index,
                    index=i,
                    serial=serial,
                    start=w.start,
                    progress=tuple(row),
                    update=tuple(mask),
                    valid=(0, w.length),
                    compute=c,
                    num_steps=self.num_steps,
                    prefix=w.prefix,
                )
                serial += 1

    def num_iterations(self) -> int:
        return sum(len(self.window_rows(w)[0]) for w in self.windows())


@dataclass(frozen=True)
class ChunkCausalPlan:
    """MAGI-1's chunk pipeline: chunks of `chunk` latent frames enter one by one, up to `window_chunks`
    of them are denoised together at staggered stages, `steps_per_stage = num_steps / window_chunks`.

    A chunk starts `steps_per_stage` iterations after its predecessor, so it takes all T steps
    while passing through the stages. The window slides: a chunk leaves it when clean, and its
    K/V stay as clean context (written by a clean re-forward, which the engine never skips). The compute interval is the chunks in the window (all of them active).
    """

    latent_frames: int
    chunk: int
    window_chunks: int
    num_steps: int
    context_chunks: int = 4  # clean chunks before the window that the window attends (KV cache)

    def __post_init__(self) -> None:
        _require(self.latent_frames >= 1, "frames", f"must give at least 1 latent frame, got {self.latent_frames}")
        _require(self.chunk >= 1, "chunk_width", f"must be >= 1, got {self.chunk}")
        _require(self.window_chunks >= 1, "window_size", f"must be >= 1, got {self.window_chunks}")
        _require(self.num_steps >= 1, "steps", f"must be >= 1, got {self.num_steps}")
        _require(self.context_chunks >= 0, "context_chunks", f"must be >= 0 clean chunks, got {self.context_chunks}")
        _require(
            self.num_steps % self.window_chunks == 0,
            "steps",
            f"{self.num_steps} steps do not split into {self.window_chunks} equal stages",
        )

    chunked = True  # one sliding window: chunks enter and leave, nothing restarts

    @property
    def unit(self) -> int:
        return self.chunk

    def prefixes(self) -> dict[int, int]:
        return {}

    @property
    def steps_per_stage(self) -> int:
        return self.num_steps // self.window_chunks

    @property
    def num_chunks(self) -> int:
        return -(-self.latent_frames // self.chunk)

    def progress(self, chunk: int, row: int) -> int:
        """Chunk `chunk`'s progress at iteration `row`: the staircase with ar_step = steps_per_stage in
        closed form (each chunk starts steps_per_stage iterations after its predecessor and advances one
        step per iteration), so a row costs the window, not the whole video."""
        return min(max(row + 1 - chunk * self.steps_per_stage, 0), self.num_steps + 1)

    def iterations(self) -> Iterator[Iteration]:
        t, sps = self.num_steps, self.steps_per_stage
        for i in range(self.num_iterations()):
            # active: progress moved (1 <= i + 1 - c * sps) and is not terminal (<= T)
            lo_chunk = max(0, -(-(i + 1 - t) // sps))
            hi_chunk = min(self.num_chunks, i // sps + 1)
            row = [self.progress(c, i) for c in range(lo_chunk, hi_chunk)]
            mask = [True] * len(row)
            start = lo_chunk * self.chunk
            end = min(hi_chunk * self.chunk, self.latent_frames)
            prog = _expand(row, self.chunk)[: end - start]
            upd = _expand(mask, self.chunk)[: end - start]
            yield Iteration(
                window=0,
                index=i,
                serial=i,
                start=start,
                progress=prog,
                update=upd,
                valid=(0, end - start),
                compute=(0, end - start),
                num_steps=self.num_steps,
                context_start=max(0, start - self.context_chunks * self.chunk),
            )

    def num_iterations(self) -> int:
        return self.num_steps + (self.num_chunks - 1) * self.steps_per_stage


def _require(ok: bool, field: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"{field}: {why}")
