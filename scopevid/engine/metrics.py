"""Quality and cost metrics.

Convention (stated once, used everywhere): frames are float in [0, 1]; PSNR is computed per frame
(capped at 100 dB for identical frames) and averaged over frames; SSIM per frame with an 11x11
Gaussian window (sigma 1.5) on each RGB channel, averaged over channels, then frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-frame PSNR of [F, H, W, 3] frames in [0, 1] -> [F]."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    out = 10 * torch.log10(1.0 / mse.clamp_min(1e-10))
    return out.clamp(max=100.0)


def latent_snr(a: torch.Tensor, b: torch.Tensor) -> float:
    """10 log10(|b|^2 / |a - b|^2) in dB over the whole latent video, b the reference; capped at 100 dB.

    Quality where decoded frames cannot tell (a decoder that keeps little of the latent): the
    signal-to-error ratio of the clean latents themselves."""
    err = (a.double() - b.double()).pow(2).sum()
    ref = b.double().pow(2).sum()
    if float(err) == 0.0:
        return 100.0
    return min(100.0, float(10 * torch.log10(ref / err)))


def _gauss(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-frame SSIM of [F, H, W, 3] frames in [0, 1] -> [F] (valid-region convolution)."""
    x = a.double().permute(0, 3, 1, 2)
    y = b.double().permute(0, 3, 1, 2)
    c = x.shape[1]
    win = min(11, x.shape[-1], x.shape[-2])
    k = _gauss(win)[None, None].repeat(c, 1, 1, 1).to(x.device)
    mu_x, mu_y = F.conv2d(x, k, groups=c), F.conv2d(y, k, groups=c)
    sxx = F.conv2d(x * x, k, groups=c) - mu_x**2
    syy = F.conv2d(y * y, k, groups=c) - mu_y**2
    sxy = F.conv2d(x * y, k, groups=c) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


class RunningQuality:
    """Streams frame pairs and keeps per-frame PSNR/SSIM sums, so long videos never sit in memory."""

    def __init__(self) -> None:
        self.n, self.psnr_sum, self.ssim_sum = 0, 0.0, 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.n += a.shape[0]
        self.psnr_sum += float(psnr(a, b).sum())
        self.ssim_sum += float(ssim(a, b).sum())

    def result(self) -> dict:
        if self.n == 0:
            return {"psnr": None, "ssim": None, "frames_compared": 0}
        return {"psnr": self.psnr_sum / self.n, "ssim": self.ssim_sum / self.n, "frames_compared": self.n}
