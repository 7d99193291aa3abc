"""Flow matching with diffusion forcing for the tiny DiT, resumable, logged to Parquet.

- x_s = (1 - s) x0 + s eps, target v = eps - x0, MSE over the frames that carry noise.
- Diffusion forcing: every frame has its own noise level. A batch mixes independent per-frame
  levels, non-decreasing levels (the shape of the async schedule), one shared level (the
  chunk-causal schedule) and clean-prefix clips (a clean context followed by a noisy chunk).
- Levels are drawn logit-normal with a positive mean: high noise, where the layout is decided, is
  weighted more (docs/MODEL_CARD.md).
- The forward is TinyDiT.forward with a frame-level block-causal ForwardSpec and
  adapters.base.local_attention: the code path of inference. Several clips are packed into one
  call: frames of clip b carry absolute indices offset_b + f (random offsets: RoPE positions),
  and `PackedAttention` reshapes the packed sequence into a batch axis before local_attention,
  so that no clip attends another.
- 10% of the prompts are dropped to the null prompt (index 0) for classifier-free guidance.
- AdamW, gradient clipping, EMA; checkpoints hold model + EMA + optimizer + step + RNG states.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from scopevid.adapters.base import ForwardSpec, local_attention
from scopevid.adapters.tiny.model import TinyDiT, TinyDiTConfig
from scopevid.engine.files import atomic_torch_save, atomic_write_table, atomic_write_text
from scopevid.errors import CheckpointError, load_reason
from scopevid.train import world as W


@dataclass
class TrainConfig:
    frames: int = 16  # frames per training clip
    batch: int = 16  # clips per step
    lr: float = 8e-4
    warmup: int = 200
    anneal_start: int = 0  # with anneal_steps > 0: the lr falls linearly from this step ...
    anneal_steps: int = 0  # ... over this many steps, to anneal_floor * lr (0: constant lr)
    anneal_floor: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema: float = 0.999
    prompt_dropout: float = 0.1
    sigma_mean: float = 0.5  # logit-normal location (positive: more weight on high noise)
    sigma_std: float = 1.0
    p_independent: float = 0.35
    p_sorted: float = 0.2
    p_shared: float = 0.2  # the rest: clean prefix + shared level
    max_offset: int = 1000  # random absolute frame offset (RoPE positions)
    seed: int = 0
    shift: float = 1.0  # sigma shift recorded for inference (see evaluate)
    init: dict = field(default_factory=dict)  # warm start: the exported weights this run began from

    def to_dict(self) -> dict:
        return asdict(self)


class PackedAttention:
    """local_attention over B clips packed along the sequence: [1, B*S, h, d] <-> [B, S, h, d]."""

    def __init__(self, clips: int, frames: int):
        self.clips = clips
        self.spec = ForwardSpec(frames=list(range(frames)), causal=True)

    def __call__(self, q, k, v, layer: int, spec: ForwardSpec) -> torch.Tensor:
        b, s, h, d = q.shape
        n = self.clips
        q, k, v = (t.reshape(n, (b * s) // n, h, d) for t in (q, k, v))
        return local_attention(q, k, v, layer, self.spec).reshape(b, s, h, d)


def prompt_vectors(model: TinyDiT, tokens: torch.Tensor) -> torch.Tensor:
    """TinyDiT.prompt_vector for a batch of token rows [B, L] -> [B, dim] (same arithmetic)."""
    mask = (tokens > 0).float()
    n = mask.sum(1, keepdim=True)
    e = (model.word(tokens) * mask[..., None]).sum(1) / n.clamp(min=1)
    null = model.word(torch.zeros(1, dtype=torch.long, device=tokens.device))
    e = torch.where(n > 0, e, null.expand_as(e))
    return model.prompt_mlp(e)


def packed_forward(model: TinyDiT, x: torch.Tensor, sigma: torch.Tensor, prompt: torch.Tensor, offsets: list[int], attn: PackedAttention):
    """x [B, F, C, H, W], sigma [B, F], prompt [B, dim] -> v [B, F, C, H, W] via TinyDiT.forward."""
    b, f = sigma.shape
    spec = ForwardSpec(frames=[o + i for o in offsets for i in range(f)], causal=True)
    v = model(x.reshape(b * f, *x.shape[2:]), sigma.reshape(-1), prompt.repeat_interleave(f, 0), spec, attn)
    return v.reshape(x.shape)


def sample_sigmas(g: torch.Generator, b: int, f: int, cfg: TrainConfig) -> torch.Tensor:
    """Per-frame noise levels [B, F] in the diffusion-forcing mix; clean-prefix frames get 0."""

    def ln(*shape):
        return torch.sigmoid(cfg.sigma_mean + cfg.sigma_std * torch.randn(*shape, generator=g))

    u = torch.rand(b, generator=g)
    s = ln(b, f)
    t1 = cfg.p_independent
    t2 = t1 + cfg.p_sorted
    t3 = t2 + cfg.p_shared
    srt = s.sort(dim=1).values
    shared = ln(b, 1).expand(b, f)
    prefix_len = torch.randint(1, f, (b, 1), generator=g)
    prefix = torch.where(torch.arange(f)[None, :] < prefix_len, torch.zeros(()), shared)
    out = torch.where((u < t1)[:, None], s, torch.where((u < t2)[:, None], srt, torch.where((u < t3)[:, None], shared, prefix)))
    return out.contiguous()


def loss_fn(model, x0, tokens, g: torch.Generator, cfg: TrainConfig, attn: PackedAttention) -> torch.Tensor:
    b, f = x0.shape[:2]
    sigma = sample_sigmas(g, b, f, cfg)
    eps = torch.randn(x0.shape, generator=g)
    drop = torch.rand(b, generator=g) < cfg.prompt_dropout
    tokens = torch.where(drop[:, None], torch.zeros_like(tokens), tokens)
    s = sigma[:, :, None, None, None]
    xs = (1 - s) * x0 + s * eps
    offsets = torch.randint(0, cfg.max_offset + 1, (b,), generator=g).tolist()
    v = packed_forward(model, xs, sigma, prompt_vectors(model, tokens), offsets, attn)
    w = (sigma > 0).float()  # clean context frames carry no target
    err = ((v - (eps - x0)) ** 2).mean(dim=(2, 3, 4))
    return (err * w).sum() / w.sum().clamp(min=1)


def _read_checkpoint(path: str) -> dict:
    """ckpt.pt as tensors and plain values only (weights_only): a file from elsewhere that pickles
    objects is refused in one line instead of being unpickled, which could run its code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for files that are not its checkpoints
        raise CheckpointError(f"{path}: {load_reason(e)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint of `scopevid train` (it holds a {type(state).__name__}, not a mapping)")
    return state


class Trainer:
    """One run directory: config.json, ckpt.pt (latest), loss.parquet."""

    def __init__(self, out: str, model_cfg: TinyDiTConfig, train_cfg: TrainConfig, world_cfg: W.WorldConfig):
        self.out = out
        self.mcfg, self.tcfg, self.wcfg = model_cfg, train_cfg, world_cfg
        torch.manual_seed(train_cfg.seed)
        self.model = TinyDiT(model_cfg)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        decay, no_decay = [], []
        for n, p in self.model.named_parameters():
            (no_decay if p.dim() < 2 or n.startswith("word") else decay).append(p)
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": train_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=train_cfg.lr, betas=(0.9, 0.99),
        )
        self.step = 0
        self.wall = 0.0  # seconds of training, summed over resumes
        self.rng = np.random.default_rng(train_cfg.seed)  # world
        self.gen = torch.Generator().manual_seed(train_cfg.seed + 1)  # noise, levels, dropout
        self.attn = PackedAttention(train_cfg.batch, train_cfg.frames)  # built once
        self.log: list[dict] = []

    # --- persistence --------------------------------------------------------------------------
    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.out, "ckpt.pt")

    def save(self) -> None:
        os.makedirs(self.out, exist_ok=True)
        state = {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "opt": self.opt.state_dict(),
            "step": self.step,
            "wall": self.wall,
            "rng": self.rng.bit_generator.state,
            "gen": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "model_cfg": self.mcfg.to_dict(),
            "train_cfg": self.tcfg.to_dict(),
            "world_cfg": self.wcfg.to_dict(),
        }
        atomic_torch_save(Path(self.ckpt_path), state)
        self.flush_log()
        atomic_write_text(Path(self.out) / "config.json", json.dumps(
            {"model": self.mcfg.to_dict(), "train": self.tcfg.to_dict(), "world": self.wcfg.to_dict()}, indent=2))

    @classmethod
    def resume(cls, out: str, **schedule) -> "Trainer":
        """Continue a run from its checkpoint. `schedule` may set the anneal_* fields (an lr tail can
        be decided once the loss flattens); the model, data and every other setting stay the run's."""
        bad = sorted(set(schedule) - {"anneal_start", "anneal_steps", "anneal_floor"})
        if bad:
            raise ValueError(f"resume can only change the lr anneal, not {', '.join(bad)}")
        path = os.path.join(out, "ckpt.pt")
        state = _read_checkpoint(path)
        try:
            tcfg = TrainConfig(**{**state["train_cfg"], **schedule})
            t = cls(out, TinyDiTConfig.from_dict(state["model_cfg"]), tcfg, W.WorldConfig.from_dict(state["world_cfg"]))
            t.model.load_state_dict(state["model"])
            t.ema.load_state_dict(state["ema"])
            t.opt.load_state_dict(state["opt"])
            t.step, t.wall = state["step"], state["wall"]
            t.rng.bit_generator.state = state["rng"]
            t.gen.set_state(state["gen"])
            torch.set_rng_state(state["torch_rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: not a checkpoint of `scopevid train` ({load_reason(e)})") from None
        return t

    def warm_start(self, model: TinyDiT, init: dict) -> None:
        """Start model and EMA from trained weights (a fresh optimizer, with its own warm-up), e.g.
        when a run directory is lost but its export survives; `init` records where they came from."""
        if self.step:
            raise ValueError(f"warm start is for a new run, not one at step {self.step}")
        self.model.load_state_dict(model.state_dict())
        self.ema.load_state_dict(model.state_dict())
        self.tcfg.init = dict(init)

    def flush_log(self) -> None:
        if not self.log:
            return
        path = os.path.join(self.out, "loss.parquet")
        new = pa.Table.from_pylist(self.log)
        if os.path.exists(path):
            old = pq.read_table(path)
            old = old.filter(pa.compute.less(old["step"], self.log[0]["step"]))  # drop rows a resume redoes
            new = pa.concat_tables([old, new.cast(old.schema)])
        atomic_write_table(Path(path), new)
        self.log = []

    # --- training -----------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """Linear warm-up, then constant, then (if set) a linear anneal to `anneal_floor * lr`."""
        c = self.tcfg
        lr = c.lr * min(1.0, (step + 1) / max(c.warmup, 1))
        if c.anneal_steps > 0 and step >= c.anneal_start:
            frac = min(1.0, (step - c.anneal_start) / c.anneal_steps)
            lr *= 1.0 - (1.0 - c.anneal_floor) * frac
        return lr

    def train_step(self) -> float:
        t0 = time.perf_counter()
        cfg = self.tcfg
        x0, tok = W.batch(self.rng, cfg.batch, cfg.frames, self.mcfg.vocab, self.wcfg, self.mcfg.max_prompt)
        for gr in self.opt.param_groups:
            gr["lr"] = self.lr_at(self.step)
        self.model.train()
        loss = loss_fn(self.model, x0, tok, self.gen, cfg, self.attn)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = optimizer_step(self.model, self.ema, self.opt, cfg.grad_clip, cfg.ema, self.step)
        self.step += 1
        dt = time.perf_counter() - t0
        self.wall += dt
        self.log.append({"step": self.step, "loss": loss.item(), "grad_norm": gnorm.item(), "lr": self.lr_at(self.step - 1), "seconds": dt, "wall": self.wall})
        return self.log[-1]["loss"]


def optimizer_step(model: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer, grad_clip: float,
                   ema_decay: float, step: int) -> torch.Tensor:
    """Clip, step, then move the EMA weights towards the model's (decay warmed up over the first
    steps); the gradient norm before clipping. Shared by every trainer in scopevid.train."""
    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    d = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - d)
    return gnorm
