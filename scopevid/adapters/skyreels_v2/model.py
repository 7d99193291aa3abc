"""The SkyReels-V2 DiT forward over diffusers' weights, with absolute frame positions and our attention.

`SkyReelsV2Transformer3DModel.forward` (diffusers 0.42) numbers RoPE positions 0..F-1 for whatever
frames it is handed and runs self-attention through its own processor. Selective computation and
sequence parallelism need two changes, and nothing else may change: (1) temporal RoPE positions are
given per frame (window-relative, `frame - origin`), so a cropped forward keeps every frame where it
was; (2) self-attention goes through the `attention(q, k, v, layer, spec)` callable the engine hands
in (SDPA on one process, Ulysses all-to-all across many). Everything else reuses the module's own
submodules and weights: patch embedding, time/text/fps embedders, the blocks' norms, projections,
cross-attention and feed-forward, the output head. With positions 0..F-1 and every frame given, the
result equals diffusers' forward (checked in tests/test_skyreels_v2.py).

Diffusion forcing: every frame has its own timestep, so the adaLN modulation is per frame, [1, F, 6, D];
it is broadcast over the frame's tokens instead of being repeated per token (same values, less memory).
Shapes: x [F, C, H, W] latents; tokens S = F * tpf with tpf = (H / ph) * (W / pw); hidden [1, S, D].
"""

from __future__ import annotations

import math

import torch

from scopevid.adapters.base import Attention, ForwardHooks, ForwardSpec, HookContext
from scopevid.adapters.rows import fixed_rows
from scopevid.errors import CheckpointError

MODULES = ("attn", "cross", "mlp")  # a block's module outputs that reuse hooks see (Wan's three)


class DFTransformer:
    """Forward / host feature / FLOPs of one loaded SkyReelsV2Transformer3DModel (weights not copied)."""

    def __init__(self, module: torch.nn.Module):
        self.m = module  # diffusers SkyReelsV2Transformer3DModel
        cfg = module.config
        self.patch = tuple(cfg.patch_size)
        self.heads = cfg.num_attention_heads
        self.dim = cfg.num_attention_heads * cfg.attention_head_dim
        self.ffn = cfg.ffn_dim
        self.layers = cfg.num_layers
        self.text_dim = cfg.text_dim
        self.out_channels = cfg.out_channels
        self.inject_fps = bool(cfg.inject_sample_info)
        if self.patch[0] != 1:
            raise CheckpointError(f"transformer: temporal patch size {self.patch[0]} is not supported (frames must stay separable)")
        if cfg.image_dim is not None or cfg.added_kv_proj_dim is not None:
            raise CheckpointError("transformer: image-conditioned SkyReels-V2 models (I2V) are not supported; use a DF checkpoint")

    @property
    def dtype(self) -> torch.dtype:
        return self.m.patch_embedding.weight.dtype

    # --- embeddings --------------------------------------------------------------------------
    def text_context(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """[1, L, text_dim] encoder states -> [1, L, D] cross-attention context."""
        return self.m.condition_embedder.text_embedder(prompt_embeds)

    def time_modulation(self, timesteps: torch.Tensor, fps_id: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame timesteps [F] (long) -> (temb [1, F, D], e [1, F, 6, D]), fps embedding included.

        `like` fixes temb's dtype as diffusers does (it casts to the text encoder states' dtype)."""
        ce = self.m.condition_embedder
        t = ce.timesteps_proj(timesteps[None])  # [1, F, freq] float64 sinusoids
        wdt = next(ce.time_embedder.parameters()).dtype
        if t.dtype != wdt and wdt != torch.int8:
            t = t.to(wdt)
        # per-frame rows in fixed blocks (rows.fixed_rows): a frame's bits must not depend on the shard
        temb = fixed_rows(ce.time_embedder, t[0])[None].type_as(like)  # [1, F, D]
        e = fixed_rows(lambda r: ce.time_proj(ce.act_fn(r)), temb[0])[None].unflatten(-1, (6, -1))  # [1, F, 6, D]
        if self.inject_fps:
            fps = torch.tensor([fps_id], dtype=torch.long, device=e.device)
            e = e + self.m.fps_projection(self.m.fps_embedding(fps)).unflatten(1, (6, -1))  # + [1, 6, D]
        return temb, e

    def rope(self, positions: list[int], pph: int, ppw: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [1, S, 1, head_dim] for temporal positions `positions` and the full h x w grid."""
        r = self.m.rope
        n = len(positions)
        if max(positions, default=0) >= r.max_seq_len or min(positions, default=0) < 0:
            raise ValueError(f"frame positions {min(positions)}..{max(positions)} outside the RoPE table 0..{r.max_seq_len - 1}")
        idx = torch.tensor(positions, dtype=torch.long, device=r.freqs_cos.device)
        out = []
        for table in (r.freqs_cos, r.freqs_sin):
            ft, fh, fw = table.split([r.t_dim, r.h_dim, r.w_dim], dim=1)
            parts = (
                ft[idx].view(n, 1, 1, -1).expand(n, pph, ppw, -1),
                fh[:pph].view(1, pph, 1, -1).expand(n, pph, ppw, -1),
                fw[:ppw].view(1, 1, ppw, -1).expand(n, pph, ppw, -1),
            )
            out.append(torch.cat(parts, dim=-1).reshape(1, n * pph * ppw, 1, -1).to(device))
        return out[0], out[1]

    @staticmethod
    def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, S, H, d] by the angles in cos/sin."""
        x_even, x_odd = x.unflatten(-1, (-1, 2)).unbind(-1)
        c, s = cos[..., 0::2], sin[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = x_even * c - x_odd * s
        out[..., 1::2] = x_even * s + x_odd * c
        return out

    # --- the forward -------------------------------------------------------------------------
    def patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """x [F, C, H, W] -> hidden [1, S, D], (pph, ppw)."""
        _, ph, pw = self.patch
        # the Conv3d over fixed blocks of frames (rows.fixed_rows): its kernel choice follows the frame count
        embed = lambda b: self.m.patch_embedding(b.permute(1, 0, 2, 3)[None])[0].transpose(0, 1)  # noqa: E731  [f, D, pph, ppw]
        h = fixed_rows(embed, x.to(self.dtype)).transpose(0, 1)[None]  # [1, D, F, pph, ppw]
        return h.flatten(2).transpose(1, 2), x.shape[-2] // ph, x.shape[-1] // pw

    def host_feature(self, x: torch.Tensor, timesteps: torch.Tensor, prompt_embeds: torch.Tensor, fps_id: int) -> torch.Tensor:
        """The timestep-modulated input of block 0, per frame: [F, tpf, D] (TeaCache's signal)."""
        hidden, pph, ppw = self.patchify(x)
        _, e = self.time_modulation(timesteps, fps_id, prompt_embeds)
        blk = self.m.blocks[0]
        mod = blk.scale_shift_table.unsqueeze(1) + e.float()  # [1, F, 6, D]
        shift, scale = mod[:, :, 0, None], mod[:, :, 1, None]  # [1, F, 1, D]
        hv = hidden.view(1, x.shape[0], pph * ppw, -1)
        return (blk.norm1(hv.float()) * (1 + scale) + shift).type_as(hidden)[0]

    def forward(
        self,
        x: torch.Tensor,  # [F, C, H, W] latents of this process's frames
        timesteps: torch.Tensor,  # [F] long
        prompt_embeds: torch.Tensor,  # [1, L, text_dim] (for dtype and fps; raw encoder states)
        context: torch.Tensor,  # [1, L, D] text_context(prompt_embeds)
        positions: list[int],  # temporal RoPE position per frame
        spec: ForwardSpec,  # handed to `attention` unchanged
        attention: Attention,
        fps_id: int,
        hooks: ForwardHooks | None = None,  # optional reuse hooks (adapters/base.py), engine-owned
        branch: str = "cond",  # CFG branch the hooks key their state by
    ) -> torch.Tensor:
        """Velocity (flow prediction) [F, C, H, W] in the model dtype."""
        nf = x.shape[0]
        hidden, pph, ppw = self.patchify(x)
        tpf = pph * ppw
        cos, sin = self.rope(positions, pph, ppw, hidden.device)
        temb, e = self.time_modulation(timesteps, fps_id, prompt_embeds)
        ef = e.float()

        def block(layer: int, h: torch.Tensor) -> tuple[torch.Tensor, dict]:
            return self._block(layer, h, ef, context, cos, sin, spec, attention, nf, tpf)

        if hooks is None:
            for layer in range(self.layers):
                hidden = block(layer, hidden)[0]
        else:  # hooks see frame-major [F, tpf, D] (adapters/base.py)
            fm = lambda t: t.reshape(nf, tpf, -1)  # noqa: E731
            seq = lambda t: t.reshape(1, nf * tpf, -1)  # noqa: E731
            hc = HookContext(branch, tuple(spec.local_frames()), self.layers, MODULES)

            def run_stack(h):
                for layer in range(self.layers):
                    def run(h, layer=layer):
                        out, outs = block(layer, seq(h))
                        return fm(out), {k: fm(v) for k, v in outs.items()}

                    def apply(h, outs, layer=layer):
                        return fm(self._apply(layer, seq(h), ef, {k: v.reshape(1, nf, tpf, -1) for k, v in outs.items()}, nf, tpf))

                    h = hooks.block(hc, layer, h, run, apply)
                return h

            hidden = seq(hooks.stack(hc, fm(hidden), run_stack))
        # output head: per-frame shift/scale from temb
        shift, scale = (self.m.scale_shift_table.unsqueeze(2) + temb.unsqueeze(1)).chunk(2, dim=1)  # [1, 1, F, D]
        shift, scale = shift[:, 0, :, None], scale[:, 0, :, None]  # [1, F, 1, D]
        hv = hidden.view(1, nf, tpf, -1)
        hv = (self.m.norm_out(hv.float()) * (1 + scale.to(hv.device)) + shift.to(hv.device)).type_as(hidden)
        out = self.m.proj_out(hv)  # [1, F, tpf, C * pt * ph * pw]
        _, ph, pw = self.patch
        out = out.reshape(nf, pph, ppw, ph, pw, self.out_channels)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(nf, self.out_channels, pph * ph, ppw * pw)

    def _block(self, layer, hidden, ef, context, cos, sin, spec, attention, nf, tpf) -> tuple[torch.Tensor, dict]:
        """Block `layer` on hidden [1, S, D]; also returns its module outputs before their gates
        (self-attention and feed-forward [1, F, tpf, D], cross-attention [1, S, D])."""
        blk = self.m.blocks[layer]
        mod = blk.scale_shift_table.unsqueeze(1) + ef  # [1, F, 6, D]
        sh, sc, gate, c_sh, c_sc, c_gate = (mod[:, :, i, None] for i in range(6))  # each [1, F, 1, D]
        hv = hidden.view(1, nf, tpf, -1)
        # 1. self-attention (through the engine's attention)
        normed = (blk.norm1(hv.float()) * (1 + sc) + sh).type_as(hidden).view(1, nf * tpf, -1)
        attn = self._self_attention(blk.attn1, normed, cos, sin, layer, spec, attention).view(1, nf, tpf, -1)
        hidden = (hv.float() + attn * gate).type_as(hidden).view(1, nf * tpf, -1)
        # 2. cross-attention to the prompt (token-local: no cross-shard traffic)
        normed = blk.norm2(hidden.float()).type_as(hidden)
        cross = blk.attn2(normed, context, None, None)
        hidden = hidden + cross
        # 3. feed-forward
        hv = hidden.view(1, nf, tpf, -1)
        normed = (blk.norm3(hv.float()) * (1 + c_sc) + c_sh).type_as(hidden)
        ff = blk.ffn(normed)
        hidden = (hv.float() + ff.float() * c_gate).type_as(hidden).view(1, nf * tpf, -1)
        return hidden, {"attn": attn, "cross": cross, "mlp": ff}

    def _apply(self, layer, hidden, ef, outs: dict, nf, tpf) -> torch.Tensor:
        """hidden [1, S, D] plus given module outputs ([1, F, tpf, D] each) with this step's gates:
        the residual path of `_block` without computing the modules (TaylorSeer's forecast)."""
        mod = self.m.blocks[layer].scale_shift_table.unsqueeze(1) + ef
        gate, c_gate = mod[:, :, 2, None], mod[:, :, 5, None]
        hv = hidden.view(1, nf, tpf, -1)
        hidden = (hv.float() + outs["attn"] * gate).type_as(hidden).view(1, nf * tpf, -1)
        hidden = hidden + outs["cross"].reshape(1, nf * tpf, -1)
        hv = hidden.view(1, nf, tpf, -1)
        return (hv.float() + outs["mlp"].float() * c_gate).type_as(hidden).view(1, nf * tpf, -1)

    def _self_attention(self, a, x, cos, sin, layer: int, spec: ForwardSpec, attention: Attention) -> torch.Tensor:
        if getattr(a, "fused_projections", False):
            q, k, v = a.to_qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = a.to_q(x), a.to_k(x), a.to_v(x)
        q, k = a.norm_q(q), a.norm_k(k)  # RMS norm across heads: token-local, before any split
        q, k, v = (t.unflatten(2, (a.heads, -1)) for t in (q, k, v))  # [1, S, H, d]
        q = self.apply_rope(q, cos, sin)
        k = self.apply_rope(k, cos, sin)
        o = attention(q, k, v, layer, spec)  # [1, S, H, d]
        o = o.flatten(2, 3).type_as(q)
        return a.to_out[1](a.to_out[0](o))

    # --- cost --------------------------------------------------------------------------------
    def flops(self, frames: int, tokens_per_frame: int, text_len: int, blocks: int | None = None, context: int = 0) -> float:
        """Multiply-adds x 2 of one forward on `frames` frames (one CFG branch) attending `context`
        cached frames, that ran `blocks` of its blocks per frame (reuse hooks skip some; default all)."""
        s, d, L = frames * tokens_per_frame, self.dim, text_len
        keys = s + context * tokens_per_frame
        per_layer = (
            2 * s * 4 * d * d  # q, k, v, out projections
            + 2 * 2 * s * keys * d  # QK^T and AV
            + 2 * s * 2 * d * d + 2 * L * 2 * d * d  # cross-attention q/out and k/v (text)
            + 2 * 2 * s * L * d  # cross-attention scores and values
            + 2 * s * 2 * d * self.ffn  # feed-forward
        )
        c_in = self.m.config.in_channels * math.prod(self.patch)
        return float((self.layers if blocks is None else blocks) * per_layer + 2 * s * c_in * d + 2 * s * d * self.out_channels * math.prod(self.patch))
