"""Streaming decode with the Wan VAE: one latent frame in, its pixel frames out, causal cache carried.

`AutoencoderKLWan._decode` already walks the latent video one frame at a time, feeding each frame to
the decoder together with a list of cached features (the last CACHE_T=2 time steps of every causal
conv). `StreamDecoder` runs that same walk across calls: `push` decodes the next finished latent
frame as soon as the rollout emits it, so memory holds one latent frame's activations plus the cache,
never the decoded video. The first latent frame gives 1 pixel frame, every later one gives 4
(the VAE's temporal stride). Values are mapped as the pipeline's postprocessing does: [-1, 1] ->
[0, 1], as [F, H, W, 3] float.
"""

from __future__ import annotations

import torch


class LatentNorm:
    """The DiT works on normalised latents; the VAE wants raw ones: z = latent * std + mean per channel."""

    def __init__(self, vae: torch.nn.Module):
        c = vae.config
        self.mean = torch.tensor(c.latents_mean, dtype=torch.float32).view(c.z_dim, 1, 1)
        self.inv_std = 1.0 / torch.tensor(c.latents_std, dtype=torch.float32).view(c.z_dim, 1, 1)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """[..., C, h, w] in the latent's dtype/device (the pipeline divides by 1/std, so do we)."""
        return latents / self.inv_std.to(latents) + self.mean.to(latents)


class StreamDecoder:
    """push(latent [C, h, w]) -> pixels [f, H, W, 3] in [0, 1]; flush() -> None (nothing is held back)."""

    def __init__(self, vae: torch.nn.Module, norm: LatentNorm):
        self.vae, self.norm = vae, norm
        self.device = vae.post_quant_conv.weight.device
        self.dtype = vae.post_quant_conv.weight.dtype
        n_convs = vae._cached_conv_counts["decoder"] if hasattr(vae, "_cached_conv_counts") else _count_causal_convs(vae.decoder)
        self._cache: list = [None] * n_convs  # per causal conv: its last input frames
        self._first = True
        self.frames_in = 0

    @torch.no_grad()
    def push(self, latent: torch.Tensor) -> torch.Tensor:
        z = self.norm.denormalize(latent.to(self.device, self.dtype))[None, :, None]  # [1, C, 1, h, w]
        x = self.vae.post_quant_conv(z)
        out = self.vae.decoder(x, feat_cache=self._cache, feat_idx=[0], first_chunk=self._first)  # [1, 3, f, H, W]
        self._first = False
        self.frames_in += 1
        patch = getattr(self.vae.config, "patch_size", None)
        if patch is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=patch)
        out = out.clamp(-1.0, 1.0)
        return (out * 0.5 + 0.5).clamp(0, 1)[0].permute(1, 2, 3, 0).float()  # [f, H, W, 3]

    def state_dict(self) -> dict:  # engine.checkpoint: the causal cache carries across a resume
        return {"cache": list(self._cache), "first": self._first, "frames_in": self.frames_in}

    def load_state_dict(self, state: dict) -> None:
        self._cache = [c.to(self.device) if isinstance(c, torch.Tensor) else c for c in state["cache"]]
        self._first, self.frames_in = bool(state["first"]), int(state["frames_in"])

    def flush(self) -> None:
        self._cache = [None] * len(self._cache)
        self._first = True
        return None


def _count_causal_convs(module: torch.nn.Module) -> int:
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    return sum(isinstance(m, WanCausalConv3d) for m in module.modules())
