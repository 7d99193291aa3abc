"""`MetaRun`: a dispatch mode under which the engine's real code runs on meta tensors.

Meta tensors have shapes and dtypes but no values, so three kinds of call cannot be answered:
- a scalar read (`bool(t)`, `float(t)`, `int(t)`, `.item()`): answered with a fixed choice
  (True for a bool, 0.0 for a float, 1 for an integer), so value-dependent branches take one path;
  `torch.equal` answers whether the shapes agree;
- a mask's nonzeros (boolean indexing, `nonzero`): every element counts as set (torch's own
  `meta_nonzero_assume_all_nonzero`), the largest shape;
- a copy to a real device (`.cpu()`, as a schedule lookup does with per-frame sigmas): answered
  with zeros of its shape and dtype, up to COPY_LIMIT bytes (a dry run never moves activations off
  the device; a larger copy is a bug in the dry run's scope and raises).

Attention (`F.scaled_dot_product_attention`, ours and diffusers') allocates its output only, as the
fused kernels a GPU runs (flash, memory-efficient) do: on meta, torch would take the math path and
materialize the [heads, queries, keys] scores, which no GPU run does. A mask passed in is an input
and is counted where it was built.

Shape, dtype, device and mask-construction bugs surface as they would at run time; numerical ones
cannot. The mode also keeps the bytes of every storage created under it that is still alive
(`live_bytes`, `peak_bytes`): the activation memory of what ran, measured on the real code path.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_SCALAR = torch.ops.aten._local_scalar_dense.default
_TO_COPY = torch.ops.aten._to_copy.default
_EQUAL = torch.ops.aten.equal.default
COPY_LIMIT = 1 << 20


class _FusedAttention(TorchFunctionMode):
    """SDPA on meta tensors: the output of a fused kernel, nothing else."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value")
            q, v = (args[i] if len(args) > i else kwargs[names[i]] for i in (0, 2))
            if q.device.type != "meta":
                return func(*args, **kwargs)
            return torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device="meta")
        return func(*args, **kwargs)


class MetaRun(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.scalar_reads = 0  # value questions answered by a fixed choice (stats)
        self._refs: dict[int, list] = {}  # storage id -> [tensor refs alive, bytes]
        self._config = None

    def __enter__(self):
        import torch.fx.experimental._config as fx_config

        self._config = fx_config.meta_nonzero_assume_all_nonzero
        fx_config.meta_nonzero_assume_all_nonzero = True
        self._fused = _FusedAttention()
        self._fused.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        import torch.fx.experimental._config as fx_config

        out = super().__exit__(*exc)
        self._fused.__exit__(*exc)
        fx_config.meta_nonzero_assume_all_nonzero = self._config
        return out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SCALAR and args[0].device.type == "meta":
            self.scalar_reads += 1
            t = args[0]
            return True if t.dtype == torch.bool else 0.0 if t.is_floating_point() or t.is_complex() else 1
        if func is _EQUAL and any(isinstance(a, torch.Tensor) and a.device.type == "meta" for a in args):
            self.scalar_reads += 1
            return tuple(args[0].shape) == tuple(args[1].shape)
        if func is _TO_COPY and args[0].device.type == "meta" and kwargs.get("device") not in (None, torch.device("meta")):
            t = args[0]
            nbytes = t.numel() * (kwargs.get("dtype") or t.dtype).itemsize
            if nbytes > COPY_LIMIT:
                raise RuntimeError(f"dry run: a copy of {nbytes} bytes off the meta device ({tuple(t.shape)}): "
                                   "activations never leave the device in a rollout")
            self.scalar_reads += 1
            return torch.zeros(t.shape, dtype=kwargs.get("dtype") or t.dtype, device=kwargs["device"])
        out = func(*args, **kwargs)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "meta":
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        entry = self._refs.get(key)
        if entry is None:
            entry = self._refs[key] = [0, storage.nbytes()]
            self.live_bytes += entry[1]
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        entry[0] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live_bytes -= entry[1]
            del self._refs[key]

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes
