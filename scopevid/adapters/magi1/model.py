"""The MAGI-1 DiT in plain PyTorch, with the parameter names and shapes of the official checkpoints.

Reference: SandAI-org/MAGI-1, inference/model/dit/ (dit_model.py, dit_module.py), and the MAGI-1 report
(arXiv 2505.13211). Written from the semantics, not the code: one model, no parallel state, no custom
kernels. The module tree is laid out so that `state_dict()` names equal the official ones
(`videodit_blocks.layers.N.self_attention.linear_qkv.q.weight`, ...), which is what lets a released
checkpoint load with a per-name shape check.

One forward, tokens laid out frame-major then row then column (S = F * tokens_per_frame):
  patch embed (conv 1x2x2) -> per-frame condition c = t_emb(t) [+ t_emb(distill step size)] + caption_adaLN
  -> L x [ LN -> q, qx, k, v (GQA: 8 K/V heads);  q,k: LayerNorm(+1) + 3D RoPE;  self-attention through the
           given `attention` callable (K/V cache, chunk ranges);  qx: LayerNorm(+1), cross-attention to the
           chunk's caption tokens;  [self | cross] regrouped in 8 groups -> linear_proj;
           x += post_norm(out * tanh(gate_msa(c)));  x += post_norm(MLP(LN(x)) * tanh(gate_mlp(c))) ]
  -> final LayerNorm(+1) -> linear -> unpatchify.
There is no shift/scale modulation of block inputs: the conditioning only gates the branch outputs
("softcap modulation"), and the output head is unconditioned.

Time convention is MAGI-1's own here: t = 0 noise, t = 1 clean, the output is dx/dt. The adapter
converts to the engine's sigma = 1 - t (velocity sign flipped).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from scopevid.adapters.base import Attention, ForwardHooks, ForwardSpec, HookContext, local_attention
from scopevid.adapters.rows import fixed_rows
from scopevid.adapters.magi1.config import Magi1Arch

FREQ_DIM = 256  # sinusoidal timestep features
T_SCALE = 1000.0  # timestep rescale inside the sinusoid


class LayerNorm1p(nn.Module):
    """LayerNorm whose stored weight is (gamma - 1) when `one_p` (Megatron's zero-centred gamma)."""

    def __init__(self, dim: int, eps: float, one_p: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps, self.one_p = eps, one_p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight + 1 if self.one_p else self.weight
        return F.layer_norm(x, w.shape, w, self.bias, self.eps)


class TimestepEmbedder(nn.Module):
    def __init__(self, arch: Magi1Arch):
        super().__init__()
        c = arch.cond_dim
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, c), nn.SiLU(), nn.Linear(c, c))

    @staticmethod
    def sinusoid(t: torch.Tensor) -> torch.Tensor:
        """[N] -> [N, 256]: cos then sin of t * 1000 * 10000^(-i/128)."""
        half = FREQ_DIM // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None] * T_SCALE
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        w = self.mlp[0].weight
        return fixed_rows(self.mlp, self.sinusoid(t).to(w.dtype))  # per frame: rows.fixed_rows


class CaptionEmbedder(nn.Module):
    def __init__(self, arch: Magi1Arch):
        super().__init__()
        self.y_proj_xattn = nn.Sequential(nn.Linear(arch.caption_channels, int(arch.hidden_size * arch.xattn_cond_hidden_ratio)), nn.SiLU())
        self.y_proj_adaln = nn.Sequential(nn.Linear(arch.caption_channels, arch.cond_dim))
        # learned tokens: rows [:50] are the null caption; rows -2 / -1 feed the adaLN path (kept / dropped)
        self.null_caption_embedding = nn.Parameter(torch.zeros(arch.caption_max_length, arch.caption_channels))

    def adaln(self, dropped: bool = False) -> torch.Tensor:
        """The caption part of the condition: a learned token, not the prompt (as the official model)."""
        return self.y_proj_adaln(self.null_caption_embedding[-1 if dropped else -2])


class RotaryBands(nn.Module):
    """Holds the learned frequency bands (`rope.bands`, dim/8 of them) of the 3D rotary embedding."""

    def __init__(self, dim: int):
        super().__init__()
        n = dim // 8
        self.bands = nn.Parameter(1.0 / (10000.0 ** (torch.arange(n, dtype=torch.float32) / n)))


def rope_tables(bands: torch.Tensor, pos_t: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [F*h*w, 3*nb] for tokens (frame, row, col), angles ordered (axis, band).

    Time coordinates are the given positions; spatial ones are centred and rescaled to a 16x16 reference
    grid of the same area (the official multi-resolution rule), so the angles depend on the aspect only.
    """
    dev = bands.device
    rescale = math.sqrt((h * w) / (16 * 16))

    def axis(n: int, ref: float) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.int64, device=dev).to(torch.float32) - (n - 1) / 2
        return x / (n - 1) * (ref - 1) if n > 1 else x

    grid = torch.stack(
        torch.meshgrid(pos_t.to(dev, torch.float32), axis(h, h / rescale), axis(w, w / rescale), indexing="ij"), dim=-1
    )  # [F, h, w, 3]
    ang = (grid[..., None] * bands.float()).reshape(-1, 3 * bands.numel())
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first 2*r dims of x [S, h, d] in halves (GPT-NeoX layout); the rest pass through."""
    r = cos.shape[-1]
    x1, x2, rest = x[..., :r], x[..., r : 2 * r], x[..., 2 * r :]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c, rest], dim=-1)


class QKV(nn.Module):
    """`linear_qkv`: the shared pre-norm and the four projections (q, qx for cross-attention, k, v)."""

    def __init__(self, arch: Magi1Arch):
        super().__init__()
        d = arch.hidden_size
        self.layer_norm = nn.LayerNorm(d, eps=arch.layernorm_epsilon)
        self.q = nn.Linear(d, arch.q_size, bias=False)
        self.qx = nn.Linear(d, arch.q_size, bias=False)
        self.k = nn.Linear(d, arch.kv_size, bias=False)
        self.v = nn.Linear(d, arch.kv_size, bias=False)


class SelfAttention(nn.Module):
    """`self_attention`: self-attention over frames + cross-attention to the caption, in parallel."""

    def __init__(self, arch: Magi1Arch):
        super().__init__()
        hd, eps, one_p = arch.kv_channels, arch.layernorm_epsilon, arch.apply_layernorm_1p
        self.linear_qkv = QKV(arch)
        self.linear_kv_xattn = nn.Linear(int(arch.hidden_size * arch.xattn_cond_hidden_ratio), 2 * arch.kv_size, bias=False)
        self.linear_proj = nn.Linear(2 * arch.q_size, arch.hidden_size, bias=False)
        self.q_layernorm = LayerNorm1p(hd, eps, one_p)
        self.q_layernorm_xattn = LayerNorm1p(hd, eps, one_p)
        self.k_layernorm = LayerNorm1p(hd, eps, one_p)
        self.k_layernorm_xattn = LayerNorm1p(hd, eps, one_p)


class MLP(nn.Module):
    def __init__(self, arch: Magi1Arch):
        super().__init__()
        d, f = arch.hidden_size, arch.ffn_hidden_size
        self.glu = arch.gated_linear_unit
        self.layer_norm = nn.LayerNorm(d, eps=arch.layernorm_epsilon)
        self.linear_fc1 = nn.Linear(d, 2 * f if self.glu else f, bias=False)
        self.linear_fc2 = nn.Linear(f, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear_fc1(self.layer_norm(x))
        if self.glu:  # SwiGLU: silu(first half) * second half
            a, b = h.chunk(2, dim=-1)
            h = F.silu(a) * b
        else:
            h = F.gelu(h)
        return self.linear_fc2(h)


class AdaModulate(nn.Module):
    def __init__(self, arch: Magi1Arch):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(arch.cond_dim, int(arch.hidden_size * arch.cond_gating_ratio * 2)))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        """c [F, cond] -> softcapped gates [F, 2 * hidden] (cap 1: tanh)."""
        return torch.tanh(fixed_rows(lambda c: self.proj(F.silu(c)), c).float())  # per frame: rows.fixed_rows


class Layer(nn.Module):
    def __init__(self, arch: Magi1Arch):
        super().__init__()
        self.arch = arch
        eps, one_p = arch.layernorm_epsilon, arch.apply_layernorm_1p
        self.ada_modulate_layer = AdaModulate(arch)
        self.self_attention = SelfAttention(arch)
        self.self_attn_post_norm = LayerNorm1p(arch.hidden_size, eps, one_p)
        self.mlp = MLP(arch)
        self.mlp_post_norm = LayerNorm1p(arch.hidden_size, eps, one_p)

    def forward(
        self,
        x: torch.Tensor,  # [F, T, D] hidden states of the local frames
        c: torch.Tensor,  # [F, cond] per-frame condition
        rope: tuple[torch.Tensor, torch.Tensor],
        captions: list[torch.Tensor],  # per caption: [L_i, D] projected caption tokens
        cap_index: torch.Tensor,  # [F] caption each frame cross-attends
        layer: int,
        spec: ForwardSpec,
        attention: Attention,
    ) -> torch.Tensor:
        return self.outputs(x, c, rope, captions, cap_index, layer, spec, attention)[0]

    def outputs(self, x, c, rope, captions, cap_index, layer, spec, attention) -> tuple[torch.Tensor, dict]:
        """The layer's output and its two module outputs before their gates and post-norms: the
        attention projection ("attn", self and cross together) and the MLP ("mlp"), each [F, T, D]."""
        arch, a = self.arch, self.self_attention
        nf, tpf, d = x.shape
        hq, hk, hd = arch.num_attention_heads, arch.num_query_groups, arch.kv_channels
        s = nf * tpf
        h = a.linear_qkv.layer_norm(x.reshape(s, d))

        # self-attention: q/k LayerNorm in float32, RoPE, then the engine's attention (cache, ranges, shards)
        q = apply_rope(a.q_layernorm(a.linear_qkv.q(h).reshape(s, hq, hd).float()), *rope).to(h.dtype)
        k = apply_rope(a.k_layernorm(a.linear_qkv.k(h).reshape(s, hk, hd).float()), *rope).to(h.dtype)
        v = a.linear_qkv.v(h).reshape(s, hk, hd)
        core = attention(q[None], k[None], v[None], layer, spec)[0]  # [S, hq, hd]

        # cross-attention: local per token, each frame to its chunk's caption (GQA K/V)
        qx = a.q_layernorm_xattn(a.linear_qkv.qx(h).reshape(s, hq, hd))
        cross = torch.empty_like(qx)
        tok_cap = cap_index.repeat_interleave(tpf)
        for i, y in enumerate(captions):
            sel = (tok_cap == i).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            kv = a.linear_kv_xattn(y.to(a.linear_kv_xattn.weight.dtype)).reshape(y.shape[0], hk, 2 * hd)
            kx, vx = a.k_layernorm_xattn(kv[..., :hd]), kv[..., hd:]
            rep = hq // hk
            o = F.scaled_dot_product_attention(
                qx[sel].transpose(0, 1)[None],
                kx.repeat_interleave(rep, dim=1).transpose(0, 1)[None],
                vx.repeat_interleave(rep, dim=1).transpose(0, 1)[None],
            )
            cross[sel] = o[0].transpose(0, 1).to(cross.dtype)

        # [self | cross] as (2, 8 groups, rest) -> (8 groups, 2, rest): the official projection layout
        both = torch.cat([core.reshape(s, hq * hd), cross.reshape(s, hq * hd)], dim=-1)
        both = both.reshape(s, 2, 8, -1).transpose(1, 2).reshape(s, -1)
        out = a.linear_proj(both).reshape(nf, tpf, d)

        gate_msa, gate_mlp = self.ada_modulate_layer(c)[:, None, :].chunk(2, dim=-1)  # [F, 1, D] each
        x = (x.float() + self.self_attn_post_norm(out.float() * gate_msa)).to(x.dtype)
        m = self.mlp(x)
        x = (x.float() + self.mlp_post_norm(m.float() * gate_mlp)).to(x.dtype)
        return x, {"attn": out, "mlp": m}

    def apply(self, x: torch.Tensor, c: torch.Tensor, outs: dict) -> torch.Tensor:
        """x plus given module outputs through this step's gates and the post-norms (the residual
        path of `outputs` without computing the modules: TaylorSeer's forecast)."""
        gate_msa, gate_mlp = self.ada_modulate_layer(c)[:, None, :].chunk(2, dim=-1)
        x = (x.float() + self.self_attn_post_norm(outs["attn"].float() * gate_msa)).to(x.dtype)
        return (x.float() + self.mlp_post_norm(outs["mlp"].float() * gate_mlp)).to(x.dtype)


class Blocks(nn.Module):
    def __init__(self, arch: Magi1Arch):
        super().__init__()
        self.layers = nn.ModuleList(Layer(arch) for _ in range(arch.num_layers))
        self.final_layernorm = LayerNorm1p(arch.hidden_size, arch.layernorm_epsilon, arch.apply_layernorm_1p)


class FinalLinear(nn.Module):
    def __init__(self, arch: Magi1Arch):
        super().__init__()
        p = arch.patch_size
        self.linear = nn.Linear(arch.hidden_size, p * p * arch.t_patch_size * arch.out_channels, bias=False)


class Magi1DiT(nn.Module):
    def __init__(self, arch: Magi1Arch):
        super().__init__()
        self.arch = arch
        p = arch.patch_size
        self.x_embedder = nn.Conv3d(arch.in_channels, arch.hidden_size, kernel_size=(1, p, p), stride=(1, p, p), bias=False)
        self.t_embedder = TimestepEmbedder(arch)
        self.y_embedder = CaptionEmbedder(arch)
        self.rope = RotaryBands(arch.rope_dim)
        self.videodit_blocks = Blocks(arch)
        self.final_linear = FinalLinear(arch)

    # --- pieces -------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Latents [F, C, H, W] (VAE channels) -> patch tokens [F, T, D]."""
        arch = self.arch
        x = x * arch.x_rescale_factor
        if arch.half_channel_vae:
            x = torch.cat([x, x], dim=1)
        w = self.x_embedder.weight  # [D, C, 1, p, p]
        # over fixed blocks of frames (rows.fixed_rows): the conv's kernel choice follows the batch size
        h = fixed_rows(lambda b: F.conv2d(b, w[:, :, 0], stride=arch.patch_size), x.to(w.dtype))  # [F, D, H/p, W/p]
        return h.flatten(2).transpose(1, 2)

    def condition(self, t: torch.Tensor, step_size: float | None) -> torch.Tensor:
        """Per-frame condition [F, cond]: timestep embedding (+ distill step-size embedding) + caption adaLN."""
        c = self.t_embedder(t)
        if step_size is not None:
            c = c + self.t_embedder(torch.full_like(t, float(step_size)))
        return c + self.y_embedder.adaln(False)[None]

    def project_caption(self, tokens: torch.Tensor) -> torch.Tensor:
        """Valid caption tokens [L, caption_channels] -> cross-attention inputs [L, D]."""
        w = self.y_embedder.y_proj_xattn[0].weight
        return self.y_embedder.y_proj_xattn(tokens.to(w.dtype))

    def unpatchify(self, out: torch.Tensor, hp: int, wp: int) -> torch.Tensor:
        """[F, T, p*p*C] -> [F, C, H, W]; channels are the fastest axis of a token."""
        nf, p, c = out.shape[0], self.arch.patch_size, self.arch.out_channels
        out = out.reshape(nf, hp, wp, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(nf, c, hp * p, wp * p)

    # --- forward ------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,  # [F, C, H, W] latents of this process's frames
        t: torch.Tensor,  # [F] MAGI time per frame (0 noise .. 1 clean)
        captions: list[torch.Tensor],  # raw caption tokens [L_i, caption_channels], valid tokens only
        cap_index: torch.Tensor,  # [F] long: which caption each frame attends
        spec: ForwardSpec,
        attention: Attention = local_attention,
        *,
        positions: torch.Tensor | None = None,  # [F] temporal RoPE positions (default: spec.local_positions())
        step_size: float | None = None,  # distill step-size embedding input, None for base models
        hooks: ForwardHooks | None = None,  # optional reuse hooks (adapters/base.py), engine-owned
        branch: str = "cond",  # the branch the hooks key their state by
    ) -> torch.Tensor:
        """dx/dt [F, C_vae, H, W] for the given frames (float32)."""
        arch = self.arch
        nf, _, hh, ww = x.shape
        hp, wp = hh // arch.patch_size, ww // arch.patch_size
        dt = self.videodit_blocks.layers[0].mlp.linear_fc2.weight.dtype  # the blocks' (params) dtype
        h = self.embed(x).to(dt)
        c = self.condition(t, step_size).to(dt)
        if positions is None:
            positions = torch.tensor(spec.local_positions(), dtype=torch.float32)
        rope = rope_tables(self.rope.bands, positions, hp, wp)
        caps = [self.project_caption(y) for y in captions]
        cap_index = cap_index.to(h.device)
        layers = self.videodit_blocks.layers
        if hooks is None:
            for i, layer in enumerate(layers):
                h = layer(h, c, rope, caps, cap_index, i, spec, attention)
        else:
            hc = HookContext(branch, tuple(spec.local_frames()), len(layers))

            def run_stack(h):
                for i, layer in enumerate(layers):
                    run = lambda h, i=i, layer=layer: layer.outputs(h, c, rope, caps, cap_index, i, spec, attention)  # noqa: E731
                    h = hooks.block(hc, i, h, run, lambda h, outs, layer=layer: layer.apply(h, c, outs))
                return h

            h = hooks.stack(hc, h, run_stack)
        h = self.videodit_blocks.final_layernorm(h.float())
        out = self.final_linear.linear(h.to(self.final_linear.linear.weight.dtype)).float()
        out = self.unpatchify(out, hp, wp)
        if arch.half_channel_vae:
            out = out[:, : arch.latent_channels]
        return out / arch.x_rescale_factor

    def promote_high_precision(self) -> "Magi1DiT":
        """float32 for the embedders, the head, the RoPE bands and the q/k and post norms, whatever the
        run dtype (as the official `_high_precision_promoter`); the cross-attention norms stay."""
        for m in (self.x_embedder, self.t_embedder, self.y_embedder, self.final_linear, self.rope,
                  self.videodit_blocks.final_layernorm):
            m.float()
        for layer in self.videodit_blocks.layers:
            a = layer.self_attention
            for m in (a.q_layernorm, a.k_layernorm, layer.self_attn_post_norm, layer.mlp_post_norm):
                m.float()
        return self

    # --- cost ---------------------------------------------------------------------------------
    def flops(self, frames: int, keys: int, tokens_per_frame: int, caption_tokens: int = 0, blocks: int | None = None) -> float:
        """Matmul FLOPs (2 per multiply-add) of one forward: `frames` query frames attending `keys`
        key frames on average, plus cross-attention to `caption_tokens` tokens; `blocks` layers run per
        frame (reuse hooks skip some; default all)."""
        a = self.arch
        t, s = frames * tokens_per_frame, keys * tokens_per_frame
        d = a.hidden_size
        fc1 = (2 if a.gated_linear_unit else 1) * a.ffn_hidden_size
        linear = d * (2 * a.q_size + 2 * a.kv_size) + 2 * a.q_size * d + d * fc1 + a.ffn_hidden_size * d
        attn = 2 * 2 * a.q_size * (s + caption_tokens)
        per_layer = 2 * t * linear + t * attn
        io = 2 * t * d * (a.in_channels + a.out_channels) * a.patch_size**2
        return float((a.num_layers if blocks is None else blocks) * per_layer + io)
