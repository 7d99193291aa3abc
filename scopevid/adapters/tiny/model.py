"""The bundled tiny autoregressive video DiT.

A small flow-matching video transformer in the style of SkyReels-V2 / MAGI-1, sized for a laptop CPU:
patchify -> N blocks of (per-frame adaLN, self-attention with 3D RoPE over frames x rows x cols and a
block-causal frame mask, MLP) -> per-frame adaLN head -> unpatchify. Each frame carries its own noise
level, so one set of weights serves diffusion forcing (async) and chunk-causal schedules. A prompt
is a few words from a fixed vocabulary, mean-pooled into the per-frame conditioning; the null prompt
(index 0 = "<null>") is trained by dropout for classifier-free guidance.

Convention: x_sigma = (1 - sigma) x0 + sigma eps, the network predicts v = eps - x0 = dx/dsigma.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from scopevid.adapters.base import Attention, ForwardHooks, ForwardSpec, HookContext, local_attention
from scopevid.adapters.rows import fixed_rows


@dataclass(frozen=True)
class TinyDiTConfig:
    channels: int = 3  # pixel space: the frames are the latents (see the model card for why)
    size: int = 32  # frame height = width
    patch: int = 4
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    vocab: tuple[str, ...] = ("<null>",)
    max_prompt: int = 8
    rope_theta: float = 256.0

    @property
    def tokens_per_frame(self) -> int:
        return (self.size // self.patch) ** 2

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def problem(self) -> tuple[str, str] | None:
        """(field, why) for the first shape rule the network cannot be built with, else None.

        Types are the caller's check (scopevid.validation); sizes are positive, patches tile the frame, heads split dim evenly, and the head dim is even with room for one RoPE
        pair per axis (rope_tables splits its pairs over frames, rows and columns)."""
        for name in ("channels", "size", "patch", "dim", "depth", "heads", "max_prompt"):
            if getattr(self, name) < 1:
                return name, f"must be a positive integer, got {getattr(self, name)!r}"
        for name in ("mlp_ratio", "rope_theta"):
            if not 0 < getattr(self, name) < math.inf:
                return name, f"must be a finite number > 0, got {getattr(self, name)!r}"
        if not self.vocab:
            return "vocab", "must hold at least the null prompt (index 0)"
        if self.size % self.patch:
            return "patch", f"frame size {self.size} must be a multiple of patch {self.patch}"
        if self.dim % self.heads:
            return "heads", f"dim {self.dim} must divide by heads {self.heads} (each head takes dim / heads channels)"
        if self.head_dim % 2 or self.head_dim < 6:
            return "heads", (f"the head dim (dim {self.dim} / heads {self.heads} = {self.head_dim}) must be even and at "
                             "least 6: the 3D RoPE rotates pairs of channels, at least one pair each for frames, rows and columns")
        return None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["vocab"] = list(self.vocab)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TinyDiTConfig":
        d = dict(d)
        d["vocab"] = tuple(d.get("vocab", ("<null>",)))
        return cls(**d)


def timestep_embedding(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of sigma * 1000 (the timestep scale of SkyReels-V2 / Wan). [F] -> [F, dim]"""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
    args = sigma.float()[:, None] * 1000.0 * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_tables(pos_t: torch.Tensor, hw: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [S, head_dim/2] for tokens laid out frame-major, then row, then column.

    The head dimension is split in three (time gets the remainder), as in Wan/SkyReels-V2's 3D RoPE.
    Scores depend only on position differences, so absolute frame indices are safe.
    """
    pairs = head_dim // 2
    ph = pw = pairs // 3
    pt = pairs - ph - pw
    dev = pos_t.device

    def freqs(n: int) -> torch.Tensor:
        return 1.0 / (theta ** (torch.arange(n, dtype=torch.float32, device=dev) / max(n, 1)))

    nf = pos_t.numel()
    t = pos_t.float()[:, None, None].expand(nf, hw, hw)
    r = torch.arange(hw, dtype=torch.float32, device=dev)[None, :, None].expand(nf, hw, hw)
    c = torch.arange(hw, dtype=torch.float32, device=dev)[None, None, :].expand(nf, hw, hw)
    ang = torch.cat(
        [t.reshape(-1, 1) * freqs(pt), r.reshape(-1, 1) * freqs(ph), c.reshape(-1, 1) * freqs(pw)], dim=-1
    )
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, h, d] rotated pairwise by angles [S, d/2]."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)
    return out.flatten(-2)


class Block(nn.Module):
    def __init__(self, cfg: TinyDiTConfig):
        super().__init__()
        self.cfg = cfg
        self.norm1 = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=1e-6)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.norm2 = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, cfg.dim))
        self.ada = nn.Linear(cfg.dim, 6 * cfg.dim)  # shift/scale/gate for attention and MLP, per frame

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """c [F, dim] -> six [F, 1, dim] tensors (per-frame rows in fixed blocks: rows.fixed_rows)."""
        return tuple(m[:, None, :] for m in fixed_rows(lambda c: self.ada(F.silu(c)), c).chunk(6, dim=-1))

    def modulated_input(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The attention input norm(x) * (1 + scale) + shift: SCOPE's host feature at block 0."""
        shift, scale = self.modulation(c)[:2]
        return self.norm1(x) * (1 + scale) + shift

    def forward(self, x, c, rope, layer: int, spec: ForwardSpec, attention: Attention, specs=None):
        # x [F, T, dim] (T tokens per frame), c [F, dim]
        return self.outputs(x, c, rope, layer, spec, attention, specs)[0]

    def outputs(self, x, c, rope, layer: int, spec: ForwardSpec, attention: Attention, specs=None):
        """(x_out, {"attn": a, "mlp": m}) with a, m the module outputs before their gates [F, T, dim].

        `specs`: B sequences stacked along the frames (x [B F, T, dim], c [B F, dim], e.g. the guidance
        branches batched): every layer runs on all of them at once, attention on each with its spec."""
        specs = specs or [spec]
        b = len(specs)
        nf, tpf, dim = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.modulation(c)
        h = self.norm1(x) * (1 + sc1) + sh1
        q, k, v = self.qkv(h).reshape(b, nf // b * tpf, 3, self.cfg.heads, self.cfg.head_dim).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if b == 1:
            o = attention(q, k, v, layer, spec)  # [1, S, heads, head_dim]
        else:
            o = torch.cat([attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], layer, sp) for i, sp in enumerate(specs)])
        a = self.proj(o.reshape(nf, tpf, dim))
        x = x + g1 * a
        m = self.mlp(self.norm2(x) * (1 + sc2) + sh2)
        return x + g2 * m, {"attn": a, "mlp": m}

    def apply(self, x, c, outs: dict) -> torch.Tensor:
        """x plus given module outputs under this step's gates (TaylorSeer's forecast step)."""
        _, _, g1, _, _, g2 = self.modulation(c)
        return x + g1 * outs["attn"] + g2 * outs["mlp"]


class TinyDiT(nn.Module):
    def __init__(self, cfg: TinyDiTConfig):
        super().__init__()
        self.cfg = cfg
        p, C, D = cfg.patch, cfg.channels, cfg.dim
        self.patch_embed = nn.Linear(C * p * p, D)
        self.time_mlp = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        self.word = nn.Embedding(len(cfg.vocab), D)
        self.prompt_mlp = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(D, 2 * D)
        self.out = nn.Linear(D, C * p * p)
        self._init()

    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.word.weight, std=0.02)
        for b in self.blocks:  # adaLN-zero: every block starts as the identity
            nn.init.zeros_(b.ada.weight)
            nn.init.zeros_(b.ada.bias)
        nn.init.zeros_(self.ada_out.weight)
        nn.init.zeros_(self.ada_out.bias)
        nn.init.zeros_(self.out.weight)

    # --- pieces -------------------------------------------------------------------------------
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[F, C, H, W] -> [F, T, C*p*p]"""
        f, c, h, w = x.shape
        p = self.cfg.patch
        x = x.reshape(f, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(f, (h // p) * (w // p), c * p * p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[F, T, C*p*p] -> [F, C, H, W]"""
        f = x.shape[0]
        p, c, n = self.cfg.patch, self.cfg.channels, self.cfg.size // self.cfg.patch
        x = x.reshape(f, n, n, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(f, c, n * p, n * p)

    def prompt_vector(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [L] word indices (0-padded) -> [dim]: mean of the words, through an MLP."""
        mask = (tokens > 0).to(self.word.weight.dtype)  # the model's dtype (bf16 / fp16 runs)
        if mask.sum() == 0:  # the null prompt
            e = self.word(torch.zeros(1, dtype=torch.long, device=tokens.device))[0]
        else:
            e = (self.word(tokens) * mask[:, None]).sum(0) / mask.sum()
        return self.prompt_mlp(e)

    def conditioning(self, sigma: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """Per-frame conditioning [F, dim] from per-frame sigmas [F] and a prompt vector [dim].

        A per-frame prompt [F, dim] is accepted too (training packs several clips into one call).
        """
        p = prompt if prompt.dim() == 2 else prompt[None, :]
        return fixed_rows(self.time_mlp, timestep_embedding(sigma, self.cfg.dim).to(p.dtype)) + p

    def host_feature(self, x: torch.Tensor, sigma: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """The timestep-modulated input of the first block, per frame: [F, T, dim]."""
        h = self.patch_embed(self.patchify(x))
        return self.blocks[0].modulated_input(h, self.conditioning(sigma, prompt))

    def forward(
        self,
        x: torch.Tensor,  # [F, C, H, W]
        sigma: torch.Tensor,  # [F]
        prompt: torch.Tensor,  # [dim] prompt vector (see prompt_vector)
        spec: ForwardSpec,
        attention: Attention = local_attention,
        hooks: ForwardHooks | None = None,  # optional reuse hooks (adapters/base.py), engine-owned
        branch: str = "cond",  # CFG branch name the hooks key their state by
    ) -> torch.Tensor:
        """Velocity [F, C, H, W] for the given frames."""
        c = self.conditioning(sigma, prompt)
        h = self.patch_embed(self.patchify(x))
        pos = torch.tensor(spec.local_positions(), device=x.device)
        rope = tuple(t.to(h.dtype) for t in rope_tables(pos, self.cfg.size // self.cfg.patch, self.cfg.head_dim, self.cfg.rope_theta))
        if hooks is None:
            for i, blk in enumerate(self.blocks):
                h = blk(h, c, rope, i, spec, attention)
        else:
            hc = HookContext(branch, tuple(spec.local_frames()), len(self.blocks))

            def run_stack(h):
                for i, blk in enumerate(self.blocks):
                    run = lambda h, i=i, blk=blk: blk.outputs(h, c, rope, i, spec, attention)  # noqa: E731
                    h = hooks.block(hc, i, h, run, lambda h, outs, blk=blk: blk.apply(h, c, outs))
                return h

            h = hooks.stack(hc, h, run_stack)
        shift, scale = (m[:, None, :] for m in fixed_rows(lambda c: self.ada_out(F.silu(c)), c).chunk(2, dim=-1))
        return self.unpatchify(self.out(self.norm_out(h) * (1 + scale) + shift))

    def forward_branches(self, x: torch.Tensor, sigma: torch.Tensor, prompts: list[torch.Tensor],
                         specs: list[ForwardSpec], attention: Attention = local_attention) -> list[torch.Tensor]:
        """`forward` for several prompts (the guidance branches) in one pass: the branches are stacked
        along the frames, so every linear layer runs once on all of them; attention runs per branch
        (each with its own spec and K/V cache). Velocities [F, C, H, W], one per prompt."""
        b = len(prompts)
        c = torch.cat([self.conditioning(sigma, p) for p in prompts])
        h = self.patch_embed(self.patchify(x)).repeat(b, 1, 1)
        pos = torch.tensor(specs[0].local_positions(), device=x.device)
        rope = tuple(t.to(h.dtype) for t in rope_tables(pos, self.cfg.size // self.cfg.patch, self.cfg.head_dim, self.cfg.rope_theta))
        for i, blk in enumerate(self.blocks):
            h = blk(h, c, rope, i, specs[0], attention, specs)
        shift, scale = (m[:, None, :] for m in fixed_rows(lambda c: self.ada_out(F.silu(c)), c).chunk(2, dim=-1))
        return list(self.unpatchify(self.out(self.norm_out(h) * (1 + scale) + shift)).chunk(b))

    def flops(self, frames: int, context: int = 0, blocks: int | None = None) -> float:
        """Matmul FLOPs of one forward (2 per multiply-add): linear layers plus attention scores.
        `blocks`: how many blocks ran per frame (reuse hooks skip some); default all."""
        cfg = self.cfg
        t = frames * cfg.tokens_per_frame
        s = (frames + context) * cfg.tokens_per_frame
        d = cfg.dim
        per_token = 2 * d * (3 * d + d + 2 * int(d * cfg.mlp_ratio))  # qkv, proj, mlp
        per_block = t * per_token + 2 * 2 * t * s * d + 2 * frames * d * 6 * d  # + scores/values + adaLN
        io = 2 * t * d * cfg.channels * cfg.patch**2 * 2  # patch embed + head
        return float((cfg.depth if blocks is None else blocks) * per_block + io)

