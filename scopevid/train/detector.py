"""An honest recognizability score for clips of the synthetic world.

Per frame: the pixels close to the prompt's colour are grouped into 4-connected components; the frame
passes only if the LARGEST component is a compact square of the world's sprite size (area, bounding
box, aspect, fill) and little of the colour lies outside it (speckle in the right colour fails: its
components are small, and its stray pixels are many).

Across frames: the centre of the detected square must move along the prompt's axis, the first step
in the prompt's direction, with a plausible speed and no sideways drift; the direction may flip only
next to a wall (a bounce). A missing detection breaks the pairs around it; a frozen sprite fails.

Scores per clip: `object` (fraction of frames that pass), `motion` (fraction of consecutive pairs
that pass), `start` (the first step goes the prompt's way) and `ok` (object >= 0.9, motion >= 0.9
and start). The same function scores real world clips,
which is the ceiling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from scopevid.train.world import COLOURS, DIRECTIONS, WorldConfig, parse_prompt


@dataclass
class Detection:
    ok: bool
    centre: tuple[float, float] | None  # (row, col) of the bounding-box centre
    bbox: tuple[int, int, int, int] | None  # top, left, bottom (excl.), right (excl.)
    area: int = 0
    stray: int = 0


def components(mask: np.ndarray) -> np.ndarray:
    """4-connected labels of a boolean [H, W] mask (0 = background), by label propagation."""
    h, w = mask.shape
    big = h * w + 1
    lab = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        p = np.pad(lab, 1, constant_values=big)
        m = np.minimum.reduce([lab, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]])
        m = np.where(mask, m, big)
        if np.array_equal(m, lab):
            break
        lab = m
    return np.where(mask, lab, 0)


def to_rgb01(frames: torch.Tensor) -> np.ndarray:
    """[F, 3, H, W] in [-1, 1] -> [F, H, W, 3] in [0, 1]."""
    return ((frames.detach().float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()


def detect_frame(rgb: np.ndarray, colour: str, cfg: WorldConfig, tol: float = 0.2) -> Detection:
    target = np.asarray(COLOURS[colour], dtype=np.float32)
    mask = np.abs(rgb - target).max(-1) < tol
    total = int(mask.sum())
    if total == 0:
        return Detection(False, None, None)
    lab = components(mask)
    ids, counts = np.unique(lab[lab > 0], return_counts=True)
    best = ids[counts.argmax()]
    area = int(counts.max())
    rows, cols = np.nonzero(lab == best)
    t, l, b, r = rows.min(), cols.min(), rows.max() + 1, cols.max() + 1
    bh, bw = b - t, r - l
    s = cfg.sprite
    stray = total - area
    ok = (
        0.6 * s * s <= area <= 1.4 * s * s
        and s - 2 <= bh <= s + 2
        and s - 2 <= bw <= s + 2
        and max(bh, bw) / min(bh, bw) <= 1.3
        and area / (bh * bw) >= 0.8
        and stray <= 0.25 * area
    )
    return Detection(bool(ok), ((t + b) / 2, (l + r) / 2), (int(t), int(l), int(b), int(r)), area, stray)


def score_clip(frames: torch.Tensor, prompt: str, cfg: WorldConfig = WorldConfig()) -> dict:
    """frames [F, 3, H, W] in [-1, 1] against `prompt` -> {'object', 'motion', 'ok'}."""
    colour, direction = parse_prompt(prompt, cfg)
    if colour is None or direction is None:
        raise ValueError(f"prompt {prompt!r} names no colour or no direction of the world")
    rgb = to_rgb01(frames)
    dets = [detect_frame(f, colour, cfg) for f in rgb]
    obj = float(np.mean([d.ok for d in dets]))
    dy, dx = DIRECTIONS[direction]
    axis = 0 if dy != 0 else 1
    d = dy if axis == 0 else dx
    good = []
    prev_still = False
    for i in range(len(dets) - 1):
        a_, b_ = dets[i], dets[i + 1]
        if not (a_.ok and b_.ok):
            good.append(False)
            continue
        step = b_.centre[axis] - a_.centre[axis]
        side = abs(b_.centre[1 - axis] - a_.centre[1 - axis])
        lo_edge = min(a_.bbox[axis], b_.bbox[axis])  # top or left
        hi_edge = cfg.size - max(a_.bbox[axis + 2], b_.bbox[axis + 2])  # distance to bottom or right
        near = (lo_edge <= 3 if d < 0 else hi_edge <= 3) and i > 0  # a bounce cannot be the first step
        if side > 1.5 or abs(step) > 3.0:
            good.append(False)
        elif near:
            still = abs(step) < 0.5
            good.append(not (still and prev_still))  # a bounce stalls for at most one frame
            prev_still = still
            if not still:
                d = 1 if step > 0 else -1
            continue
        else:
            good.append(bool(step * d >= 0.5))
        prev_still = False
    motion = float(np.mean(good)) if good else 0.0
    start = float(bool(good) and good[0])  # the first step goes the named way
    return {"object": obj, "motion": motion, "start": start, "ok": float(obj >= 0.9 and motion >= 0.9 and start == 1.0)}


def score_many(clips: list[tuple[torch.Tensor, str]], cfg: WorldConfig = WorldConfig()) -> dict:
    """Mean scores over (frames, prompt) pairs."""
    s = [score_clip(f, p, cfg) for f, p in clips]
    return {k: float(np.mean([x[k] for x in s])) for k in ("object", "motion", "start", "ok")} | {"clips": len(s)}


def window_scores(frames: torch.Tensor, prompt: str, window: int = 16, cfg: WorldConfig = WorldConfig()) -> list[dict]:
    """Coherence of a long rollout, per window of `window` frames: `object` as above, and `motion`
    along the prompt's axis in whichever direction the window starts (the sprite bounces, so later
    windows may start in either direction). A collapse to noise fails `object`, a freeze `motion`."""
    colour, direction = parse_prompt(prompt, cfg)
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}[direction]
    out = []
    for lo in range(0, frames.shape[0] - window + 1, window):
        w = frames[lo : lo + window]
        a = score_clip(w, f"{colour} square moving {direction}", cfg)
        b = score_clip(w, f"{colour} square moving {opposite}", cfg)
        best = a if a["motion"] >= b["motion"] else b
        out.append({"start_frame": lo, "object": best["object"], "motion": best["motion"], "ok": float(best["object"] >= 0.9 and best["motion"] >= 0.9)})
    return out
