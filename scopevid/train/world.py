"""A deterministic synthetic video world for the bundled tiny model.

Kept deliberately simple (two richer worlds did not train on this CPU
in the time we had): ONE square sprite of one of a few saturated colours, over a fixed dark
background, moving along one axis at a constant integer speed and bouncing off the walls. Positions
are integer pixels, so frames are crisp (no anti-aliasing) and a detector can check them exactly.

A clip is described by a prompt such as "red square moving left": the colour and the direction of
motion at the clip's first frame (after a bounce the sprite comes back, as in the world).

Pixels are float32 in [-1, 1], shape [F, 3, H, W]; everything is a pure function of a seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.85, 0.20),
    "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.15),
}
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx)
BACKGROUND = (0.10, 0.10, 0.14)


@dataclass(frozen=True)
class WorldConfig:
    size: int = 32  # frame height = width (pixels)
    sprite: int = 8  # side of the square (pixels)
    speeds: tuple[int, ...] = (1, 2)  # pixels per frame
    colours: tuple[str, ...] = tuple(COLOURS)
    directions: tuple[str, ...] = tuple(DIRECTIONS)
    background: tuple[float, float, float] = BACKGROUND

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("speeds", "colours", "directions", "background"):
            d[k] = list(d[k])
        d["colour_rgb"] = {c: list(COLOURS[c]) for c in self.colours}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "WorldConfig":
        keys = {"size", "sprite", "speeds", "colours", "directions", "background"}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in keys}
        return cls(**kw)


def vocabulary(cfg: WorldConfig = WorldConfig()) -> tuple[str, ...]:
    """Index 0 is the null prompt (guidance); then every word a prompt can use."""
    return ("<null>", *cfg.colours, "square", "moving", *cfg.directions)


def prompt_text(colour: str, direction: str) -> str:
    return f"{colour} square moving {direction}"


def tokenize(prompt: str, vocab: tuple[str, ...], max_len: int = 8) -> torch.Tensor:
    """Words -> indices [max_len] (0-padded). Unknown words are an error naming the word."""
    idx = []
    for w in prompt.lower().split():
        if w not in vocab:
            raise ValueError(f"word {w!r} is not in the tiny model's vocabulary {list(vocab[1:])}")
        idx.append(vocab.index(w))
    idx = idx[:max_len]
    return torch.tensor(idx + [0] * (max_len - len(idx)), dtype=torch.long)


def parse_prompt(prompt: str, cfg: WorldConfig = WorldConfig()) -> tuple[str | None, str | None]:
    words = prompt.lower().split()
    colour = next((w for w in words if w in cfg.colours), None)
    direction = next((w for w in words if w in cfg.directions), None)
    return colour, direction


@dataclass
class Clip:
    frames: torch.Tensor  # [F, 3, H, W] in [-1, 1]
    prompt: str
    colour: str
    direction: str
    speed: int
    positions: list[tuple[int, int]] = field(default_factory=list)  # (top, left) per frame


def _bounce(p: int, v: int, lo: int, hi: int) -> tuple[int, int]:
    p += v
    while p < lo or p > hi:  # reflect off the walls
        if p < lo:
            p, v = 2 * lo - p, -v
        if p > hi:
            p, v = 2 * hi - p, -v
    return p, v


def render(cfg: WorldConfig, colour: str, positions: list[tuple[int, int]]) -> torch.Tensor:
    n, s = len(positions), cfg.sprite
    img = np.empty((n, 3, cfg.size, cfg.size), dtype=np.float32)
    img[:] = np.asarray(cfg.background, dtype=np.float32)[None, :, None, None]
    rgb = np.asarray(COLOURS[colour], dtype=np.float32)[:, None, None]
    for i, (y, x) in enumerate(positions):
        img[i, :, y : y + s, x : x + s] = rgb
    return torch.from_numpy(img * 2.0 - 1.0)


def sample_clip(
    rng: np.random.Generator,
    frames: int,
    cfg: WorldConfig = WorldConfig(),
    colour: str | None = None,
    direction: str | None = None,
) -> Clip:
    """One clip: colour, direction (at the first frame), speed, start position drawn from `rng`."""
    colour = colour or cfg.colours[rng.integers(len(cfg.colours))]
    direction = direction or cfg.directions[rng.integers(len(cfg.directions))]
    speed = int(cfg.speeds[rng.integers(len(cfg.speeds))])
    hi = cfg.size - cfg.sprite
    dy, dx = DIRECTIONS[direction]
    y, x = int(rng.integers(0, hi + 1)), int(rng.integers(0, hi + 1))
    # the first step must go the named way: keep the start at least one step from that wall
    if dx < 0:
        x = max(x, speed)
    if dx > 0:
        x = min(x, hi - speed)
    if dy < 0:
        y = max(y, speed)
    if dy > 0:
        y = min(y, hi - speed)
    vy, vx = dy * speed, dx * speed
    pos = [(y, x)]
    for _ in range(frames - 1):
        y, vy = _bounce(y, vy, 0, hi)
        x, vx = _bounce(x, vx, 0, hi)
        pos.append((y, x))
    return Clip(render(cfg, colour, pos), prompt_text(colour, direction), colour, direction, speed, pos)


def clips(seed: int, n: int, frames: int, cfg: WorldConfig = WorldConfig()) -> list[Clip]:
    """n clips, deterministic from `seed`."""
    rng = np.random.default_rng(seed)
    return [sample_clip(rng, frames, cfg) for _ in range(n)]


def batch(
    rng: np.random.Generator, n: int, frames: int, vocab: tuple[str, ...], cfg: WorldConfig = WorldConfig(), max_prompt: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch: clips [n, F, 3, H, W] and prompt tokens [n, max_prompt]."""
    cs = [sample_clip(rng, frames, cfg) for _ in range(n)]
    x = torch.stack([c.frames for c in cs])
    tok = torch.stack([tokenize(c.prompt, vocab, max_prompt) for c in cs])
    return x, tok
