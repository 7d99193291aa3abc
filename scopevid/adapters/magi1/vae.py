"""The MAGI-1 VAE decoder (a ViT: 8x space, 4x time) and the official tiled decoding of a chunk.

Reference: SandAI-org/MAGI-1 inference/model/vae/ (ViTDecoder) and inference/infra/parallelism/
tile_parallel.py (TileProcessor.tiled_decode), driven as in pipeline/video_process.py: a finished chunk
is divided by scale_factor, cut into tiles of 3 latent frames x 32 x 32 latent pixels with a quarter
spatial overlap (no temporal overlap), every tile decoded on its own, neighbours blended linearly over
64 pixels, and the tiles cropped and stitched.

Checkpoint: the official `vae/` directory: `config.json` (diffusers-style, `ddconfig` with the ViT
sizes) and `diffusion_pytorch_model.safetensors` (encoder.* and decoder.*; only decoder.* is read).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from scopevid.errors import CheckpointError

WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclass(frozen=True)
class VaeConfig:
    video_size: int = 256
    video_length: int = 16
    patch_size: int = 8
    patch_length: int = 4
    z_chans: int = 16
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    with_cls_token: bool = True
    ln_in_attn: bool = False
    use_final_proj: bool = False
    use_rope: bool = False

    @classmethod
    def from_ddconfig(cls, dd: dict, where: Path) -> "VaeConfig":
        if dd.get("use_rope", False):
            raise CheckpointError(f"{where}: a VAE with use_rope is not supported")
        if not dd.get("conv_last_layer", True):
            raise CheckpointError(f"{where}: the ViT decoder needs conv_last_layer (as upstream)")
        keep = {k: dd[k] for k in cls.__dataclass_fields__ if k in dd}
        return cls(**keep)

    @property
    def unpatch_channels(self) -> int:
        return 4 if self.use_final_proj else self.embed_dim // (self.patch_size**2 * self.patch_length)


class _Attn(nn.Module):
    def __init__(self, c: VaeConfig):
        super().__init__()
        self.heads = c.num_heads
        self.ln = c.ln_in_attn
        self.qkv = nn.Linear(c.embed_dim, 3 * c.embed_dim, bias=c.qkv_bias)
        self.proj = nn.Linear(c.embed_dim, c.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads)
        if self.ln:  # parameter-free LayerNorm over each head of q, k and v: (x - mean) / (std + 1e-5)
            qkv = (qkv - qkv.mean(-1, keepdim=True)) / (qkv.std(-1, keepdim=True, unbiased=False) + 1e-5)
        q, k, v = (t.squeeze(2).transpose(1, 2) for t in qkv.split(1, dim=2))  # [B, h, N, hd]
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.proj(o)


class _Mlp(nn.Module):
    def __init__(self, c: VaeConfig):
        super().__init__()
        hidden = int(c.embed_dim * c.mlp_ratio)
        self.fc1 = nn.Linear(c.embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, c.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, c: VaeConfig):
        super().__init__()
        self.norm1 = nn.Identity() if c.ln_in_attn else nn.LayerNorm(c.embed_dim)
        self.attn = _Attn(c)
        self.norm2 = nn.LayerNorm(c.embed_dim)
        self.mlp = _Mlp(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTDecoder(nn.Module):
    """Latents [B, z, T, H, W] -> pixels [B, 3, 4T, 8H, 8W] in [-1, 1] (state names as upstream's `decoder.*`)."""

    def __init__(self, c: VaeConfig):
        super().__init__()
        self.c = c
        self.latent_size, self.latent_length = c.video_size // c.patch_size, c.video_length // c.patch_length
        self.cls = 1 if c.with_cls_token else 0
        self.proj_in = nn.Linear(c.z_chans, c.embed_dim)
        if c.with_cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.latent_size**2 * self.latent_length + self.cls, c.embed_dim))
        self.blocks = nn.ModuleList(_Block(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.embed_dim)
        if c.use_final_proj:
            n = c.unpatch_channels * c.patch_size**2 * c.patch_length
            self.final_proj = nn.Linear(c.embed_dim, n)
            self.final_norm = nn.LayerNorm(n)
        self.last_layer = nn.Conv3d(c.unpatch_channels, 3, kernel_size=3, stride=1, padding=1)

    def _pos(self, t: int, h: int, w: int) -> torch.Tensor:
        pe = self.pos_embed
        if (t, h, w) == (self.latent_length, self.latent_size, self.latent_size):
            return pe
        grid = pe[:, self.cls :].reshape(1, self.latent_length, self.latent_size, self.latent_size, -1).permute(0, 4, 1, 2, 3)
        grid = F.interpolate(grid, size=(t, h, w), mode="trilinear", align_corners=False)
        grid = grid.permute(0, 2, 3, 4, 1).reshape(1, t * h * w, -1)
        return torch.cat([pe[:, : self.cls], grid], dim=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c = self.c
        b, zc, t, h, w = z.shape
        x = self.proj_in(z.permute(0, 2, 3, 4, 1).reshape(b, -1, zc))
        if self.cls:
            x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = x + self._pos(t, h, w)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)[:, self.cls :]
        if c.use_final_proj:
            x = self.final_norm(self.final_proj(x))
        p, pt, uc = c.patch_size, c.patch_length, c.unpatch_channels
        x = x.reshape(b, t, h, w, pt, p, p, uc).permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, uc, t * pt, h * p, w * p)
        return self.last_layer(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """As upstream ViTVAE.decode: a single latent frame decodes to its first pixel frame only."""
        out = self(z)
        return out[:, :, :1] if z.shape[2] == 1 else out


@dataclass(frozen=True)
class Tiling:
    """The official decode tiling (post_chunk_process): 256x256-pixel tiles, fps // 2 frames."""

    sample_h: int = 256
    sample_w: int = 256
    sample_t: int = 12
    spatial_overlap: float = 0.25
    temporal_overlap: float = 0.0


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """b's first `extent` slices along dim fade in over a's last `extent` slices (linear weights y/extent)."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent == 0:
        return b
    wgt = torch.arange(extent, dtype=torch.float32, device=b.device) / extent
    shape = [1] * b.dim()
    shape[dim] = extent
    wgt = wgt.reshape(shape).to(b.dtype)
    head = b.narrow(dim, 0, extent) * wgt + a.narrow(dim, a.shape[dim] - extent, extent) * (1 - wgt)
    return torch.cat([head, b.narrow(dim, extent, b.shape[dim] - extent)], dim=dim)


def tiled_decode(dec: ViTDecoder, z: torch.Tensor, tiling: Tiling = Tiling()) -> torch.Tensor:
    """z [B, C, T, H, W] (already divided by scale_factor) -> pixels [B, 3, T', H', W'] in about [-1, 1]."""
    c = dec.c
    sf, tf = c.patch_size, c.patch_length
    tl_h, tl_w, tl_t = tiling.sample_h // sf, tiling.sample_w // sf, tiling.sample_t // tf  # latent tile sizes
    ov_h, ov_w = int(tl_h * (1 - tiling.spatial_overlap)), int(tl_w * (1 - tiling.spatial_overlap))
    ov_t = int(tl_t * (1 - tiling.temporal_overlap))
    px_h, px_w, px_t = tl_h * sf, tl_w * sf, tl_t * tf
    bl_h, bl_w, bl_t = int(px_h * tiling.spatial_overlap), int(px_w * tiling.spatial_overlap), int(px_t * tiling.temporal_overlap)
    lim_h, lim_w, lim_t = px_h - bl_h, px_w - bl_w, px_t - bl_t
    nt, nh, nw = (-(-z.shape[2] // ov_t), -(-z.shape[3] // ov_h), -(-z.shape[4] // ov_w))
    raw = {}
    for f in range(nt):
        for i in range(nh):
            for j in range(nw):
                tile = z[:, :, f * ov_t : f * ov_t + tl_t, i * ov_h : i * ov_h + tl_h, j * ov_w : j * ov_w + tl_w]
                raw[f, i, j] = dec.decode(tile)
    rows_t = []
    for f in range(nt):
        rows_h = []
        for i in range(nh):
            row = []
            for j in range(nw):
                tile = raw[f, i, j]
                if f > 0:
                    tile = _blend(raw[f - 1, i, j], tile, bl_t, 2)
                if i > 0:
                    tile = _blend(raw[f, i - 1, j], tile, bl_h, 3)
                if j > 0:
                    tile = _blend(raw[f, i, j - 1], tile, bl_w, 4)
                row.append(tile[:, :, :lim_t, :lim_h, :lim_w])
            rows_h.append(torch.cat(row, dim=4))
        rows_t.append(torch.cat(rows_h, dim=3))
    return torch.cat(rows_t, dim=2)


def decoder_on_meta(path: str | Path, dtype: torch.dtype = torch.float32) -> ViTDecoder:
    """The decoder `load_decoder` builds, on the meta device (a rank that receives its weights from a peer)."""
    cfg_file = Path(path) / "config.json"
    raw = json.loads(cfg_file.read_text())
    with torch.device("meta"):
        return ViTDecoder(VaeConfig.from_ddconfig(raw.get("ddconfig", raw), cfg_file)).to(dtype).eval()


def load_decoder(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> ViTDecoder:
    """The decoder from an official `vae/` directory; a CheckpointError names what is missing."""
    path = Path(path)
    cfg_file, weights = path / "config.json", path / WEIGHTS
    for f in (cfg_file, weights):
        if not f.is_file():
            raise CheckpointError(
                f"MAGI-1 VAE: {f} is missing (the official `vae/` folder holds config.json and {WEIGHTS}); "
                f"set model.vae to that folder, or decode latents elsewhere"
            )
    try:
        raw = json.loads(cfg_file.read_text())
        dd = raw.get("ddconfig", raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    cfg = VaeConfig.from_ddconfig(dd, cfg_file)
    dec = ViTDecoder(cfg)
    expected = {f"decoder.{k}": tuple(v.shape) for k, v in dec.state_dict().items()}
    state = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            present = set(f.keys())
            for name, shape in expected.items():
                if name not in present:
                    raise CheckpointError(f"MAGI-1 VAE {weights}: missing tensor {name!r}")
                got = tuple(f.get_slice(name).get_shape())
                if got != shape:
                    raise CheckpointError(f"MAGI-1 VAE {weights}: tensor {name!r} has shape {got}, config.json implies {shape}")
                state[name[len("decoder.") :]] = f.get_tensor(name).to(dtype)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{weights}: cannot read safetensors ({e})") from None
    extra = sorted(n for n in present if n.startswith("decoder.") and n not in expected)
    if extra:
        raise CheckpointError(f"MAGI-1 VAE {weights}: unexpected tensor {extra[0]!r}; does config.json match?")
    dec.load_state_dict(state)
    return dec.to(device=device, dtype=dtype).eval()
