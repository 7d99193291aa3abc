"""WHAT model: one module per family behind the protocol of adapters.base; `load` picks one by kind."""

from __future__ import annotations

import torch

from scopevid.adapters.weights import WeightSource
from scopevid.errors import ConfigError

KINDS = ("tiny", "skyreels_v2", "magi1")


def load(spec: dict, device: str = "cpu", dtype: torch.dtype = torch.float32, weights: WeightSource | None = None):
    """The adapter of `spec` on `device`; `weights` (adapters.weights.WeightSource, default this process's
    own reads) says who reads the checkpoint files: a rank group's topology passes one reader per node."""
    _check_device(str(device))
    require_extras(spec)
    kind = spec.get("kind")
    if kind == "tiny":
        from scopevid.adapters.tiny.adapter import TinyAdapter

        return TinyAdapter.from_config(spec, device, dtype)
    if kind == "skyreels_v2":
        from scopevid.adapters.skyreels_v2 import SkyReelsV2Adapter

        return SkyReelsV2Adapter.from_config(spec, device, dtype, weights=weights)
    if kind == "magi1":
        from scopevid.adapters.magi1 import Magi1Adapter

        return Magi1Adapter.from_config(spec, device, dtype, weights=weights)
    raise ConfigError(f"model.kind: unknown {kind!r}; allowed: {', '.join(KINDS)}")


def preflight(cfg, world: int = 1, *, batch: bool = False, parallel=None):
    """Checks that need the model's metadata but not its weights, done before any placement or load,
    and the mesh of the job: the model section, the prompt against the vocabulary (tiny), and
    `parallel` (default the config's) on `world` ranks against the model's attention heads and its
    guidance branches (scopevid.mesh.MeshLayout.resolve, the one check every entry point runs).
    Returns the validated MeshLayout; a ConfigError line otherwise, so a cluster job fails before it
    starts."""
    from scopevid.mesh import MeshLayout

    check_spec(cfg.model)
    require_extras(cfg.model)
    heads, words = _metadata(cfg.model)
    layout = MeshLayout.resolve(parallel or cfg.parallel, world, heads=tuple(heads or ()), guided=cfg.guided, batch=batch)
    if words is not None:
        check_prompt(cfg.model, cfg.prompt)
    return layout


def require_extras(spec: dict) -> None:
    """The optional packages the model's spec needs, or one line naming the extra to install
    (scopevid.extras): SkyReels-V2 is diffusers' transformer and VAE with transformers' UMT5; MAGI-1
    needs transformers only for a T5 text encoder read from a directory; the tiny model needs neither."""
    from scopevid.extras import require

    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "skyreels_v2":
        for module in ("diffusers", "transformers"):
            require(module, "skyreels", "model.kind: skyreels_v2 (SkyReels-V2)")
    elif kind == "magi1" and spec.get("text_encoder") not in (None, "random"):
        require("transformers", "magi1", "model.text_encoder (MAGI-1's T5 encoder from a directory)")


def check_prompt(spec: dict, prompt: str) -> None:
    """The prompt against the model's vocabulary (tiny; other models take any text)."""
    _, words = _metadata(spec)
    if words is not None:
        from scopevid.adapters.tiny.adapter import check_prompt as check_words

        check_words(prompt, words)


def check_spec(spec: dict) -> None:
    """The `model:` section against its adapter's typed spec (unknown keys, types, ranges), without
    reading any file: a typo fails before placement or a weights load."""
    from scopevid.validation import parse

    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind == "tiny":
        from scopevid.adapters.tiny.adapter import TinySpec as model
    elif kind == "skyreels_v2":
        from scopevid.adapters.skyreels_v2.adapter import SkyReelsV2Spec as model
    elif kind == "magi1":
        from scopevid.adapters.magi1.adapter import Magi1Spec as model
    else:
        raise ConfigError(f"model.kind: unknown {kind!r}; allowed: {', '.join(KINDS)}")
    parse(model, spec, "model.", kind)


def _metadata(spec: dict) -> tuple[tuple[int, ...] | None, tuple[str, ...] | None]:
    """(query and K/V head counts, vocabulary or None) from the model spec and its small files only."""
    kind = spec.get("kind")
    if kind == "tiny":
        from scopevid.adapters.tiny.adapter import tiny_metadata

        return tiny_metadata(spec)
    if kind == "skyreels_v2":
        from scopevid.adapters.skyreels_v2.loader import transformer_heads

        return transformer_heads(spec), None
    if kind == "magi1":
        from scopevid.adapters.magi1.adapter import arch_heads

        return arch_heads(spec), None
    raise ConfigError(f"model.kind: unknown {kind!r}; allowed: {', '.join(KINDS)}")


def _check_device(device: str) -> None:
    """Refuse a device this torch cannot use before any weights load (one line, not a traceback)."""
    kind = device.split(":")[0]
    if kind in ("cpu", "meta"):  # meta: the real modules without weights (the planner and the dry run)
        return
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {device} is not available (this torch build has no CUDA or sees no GPU); use cpu")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device: {device} is not available ({torch.cuda.device_count()} CUDA devices)")
        return
    raise ConfigError(f"device: {device!r} is not supported; allowed: cpu, cuda, cuda:N")
