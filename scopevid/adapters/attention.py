"""Attention kernels, chosen by the run (`attention:` in the config), not by the model.

Every self-attention the engine runs (`adapters.base.local_attention`, between Ulysses'
all-to-alls or alone) calls `kernel(spec.kernel)` with q, k, v as [B, heads, tokens, head_dim] and
an optional boolean mask [queries, keys] (True: attend). Backends:

- sdpa (default): torch's scaled_dot_product_attention, which picks flash / memory-efficient / math
  for the device, dtype and mask itself.
- math: the softmax written out in float32 (a reference; materializes the scores).
- flash: flash-attn's `flash_attn_func` (CUDA, fp16 / bf16) for unmasked calls; a masked call
  (padding, causal frames) goes through torch's SDPA, which runs masks in its memory-efficient kernel.
- xformers: `xformers.ops.memory_efficient_attention`, the mask as an additive bias.

`check(name, device, dtype)` refuses, in one line, a backend that cannot run here (not installed,
no CUDA, wrong dtype) before anything loads. Cross-attention to the text stays inside the adapters
(SDPA): it is a small share of the work and never crosses ranks.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Callable

import torch
import torch.nn.functional as F

from scopevid.errors import ConfigError

BACKENDS = ("sdpa", "math", "flash", "xformers")
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _sdpa(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[None, None])


def _math(q, k, v, mask=None):
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask[None, None], float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype)


def _flash(q, k, v, mask=None):
    if mask is not None:
        return _sdpa(q, k, v, mask)
    from flash_attn import flash_attn_func

    return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _xformers(q, k, v, mask=None):
    import xformers.ops as xops

    bias = None
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        bias = bias[None, None].expand(q.shape[0], q.shape[1], -1, -1)
    return xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_bias=bias).transpose(1, 2)


_KERNELS: dict[str, Kernel] = {"sdpa": _sdpa, "math": _math, "flash": _flash, "xformers": _xformers}


def kernel(name: str) -> Kernel:
    try:
        return _KERNELS[name]
    except KeyError:
        raise ConfigError(f"attention: unknown backend {name!r}; allowed: {', '.join(BACKENDS)}") from None


def unavailable(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> str | None:
    """Why `name` cannot run on `device` in `dtype` here, or None when it can."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; allowed: {', '.join(BACKENDS)}"
    if name == "flash":
        if importlib.util.find_spec("flash_attn") is None:
            return "flash needs the flash-attn package, which is not installed (pip install flash-attn --no-build-isolation, on a CUDA machine)"
        if not str(device).startswith("cuda"):
            return f"flash runs on CUDA GPUs only, not {device}"
        if dtype not in (torch.float16, torch.bfloat16):
            return f"flash runs in float16 or bfloat16, not {str(dtype).replace('torch.', '')}"
    if name == "xformers" and importlib.util.find_spec("xformers") is None:
        return "xformers needs the xformers package, which is not installed (pip install 'scopevid[gpu]')"
    return None


def check(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
    why = unavailable(name, device, dtype)
    if why is not None:
        raise ConfigError(f"attention: {why}; use sdpa (torch picks its fastest kernel itself)")
