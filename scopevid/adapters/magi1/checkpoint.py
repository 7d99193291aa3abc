"""Reading MAGI-1 DiT weights in the official layout, with every name and shape checked first.

The official release keeps the DiT under `<model>/inference_weight[.fp8][.distill]/` as sharded
safetensors with a `model.safetensors.index.json` (`weight_map`: tensor name -> shard file), or as a
single `model.safetensors`; tensor names are the module paths of the official VideoDiTModel
(`videodit_blocks.layers.0.self_attention.linear_qkv.q.weight`, ...). `Magi1DiT` has the same names,
so loading is: resolve the directory, check that every expected tensor is listed, that every shard
exists and that every shape matches (from the safetensors headers, before reading any data), then
read shard by shard straight into the run dtype. The first problem raises a CheckpointError that
names the tensor (or file), what was found and what the architecture expects.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from scopevid.adapters.paths import shard_path
from scopevid.errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SUBDIRS = ("inference_weight.distill", "inference_weight", "inference_weight.fp8.distill", "inference_weight.fp8")


def resolve_dir(path: str | Path, distill: bool = True) -> Path:
    """The directory holding the DiT shards: `path` itself, or the official subfolder under it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"MAGI-1 checkpoint directory not found: {path}")
    if (path / INDEX).is_file() or (path / SINGLE).is_file():
        return path
    order = SUBDIRS if distill else ("inference_weight", "inference_weight.distill")
    for sub in order:
        d = path / sub
        if (d / INDEX).is_file() or (d / SINGLE).is_file():
            if ".fp8" in sub:
                raise CheckpointError(f"{d}: fp8-quantized MAGI-1 weights are not supported; use the bf16 release")
            return d
    raise CheckpointError(
        f"{path}: no MAGI-1 DiT weights: expected {INDEX} (+ shards) or {SINGLE} here or in one of "
        f"{', '.join(SUBDIRS[:2])}/"
    )


def weight_map(d: Path) -> dict[str, Path]:
    """Tensor name -> shard file, from the index (or the single file's header)."""
    index = d / INDEX
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (needs a `weight_map`; {e})") from None
        if not isinstance(wm, dict):
            raise CheckpointError(f"{index}: `weight_map` must map tensor names to shard files")
        files = {name: shard_path(d, shard, index) for name, shard in wm.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                first = next(n for n, p in files.items() if p == f)
                raise CheckpointError(f"{index}: shard {f.name} (holding {first!r}) is missing from {d}")
        return files
    single = d / SINGLE
    return {name: single for name in _keys(single)}


def _keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"{path}: cannot read safetensors ({e})") from None


def check(files: dict[str, Path], expected: dict[str, tuple[int, ...]], where: Path, arch_name: str) -> None:
    """Every expected tensor present with its shape, nothing unexpected; the first problem raises."""
    for name in expected:
        if name not in files:
            raise CheckpointError(f"MAGI-1 checkpoint {where}: missing tensor {name!r} (expected by the {arch_name} architecture)")
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in sorted(set(files.values())):
        try:
            with safe_open(str(shard), framework="pt") as f:
                present = set(f.keys())
                for name, p in files.items():
                    if p == shard:
                        if name not in present:
                            raise CheckpointError(f"MAGI-1 checkpoint {where}: tensor {name!r} is listed for {shard.name} but not in it")
                        shapes[name] = tuple(f.get_slice(name).get_shape())
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{shard}: cannot read safetensors ({e})") from None
    for name, want in expected.items():
        got = shapes[name]
        if got != tuple(want):
            raise CheckpointError(
                f"MAGI-1 checkpoint {where}: tensor {name!r} has shape {got}, the {arch_name} architecture expects {tuple(want)}"
                f" (in {files[name].name})"
            )
    extra = [n for n in files if n not in expected]
    if extra:
        hint = " (fp8-quantized weights are not supported)" if any(n.endswith(("weight_scale", "input_scale")) for n in extra) else ""
        raise CheckpointError(f"MAGI-1 checkpoint {where}: unexpected tensor {extra[0]!r}{hint}; is `arch` right?")


def load_state(
    path: str | Path, expected: dict[str, tuple[int, ...]], dtype: torch.dtype, device: str | torch.device = "cpu",
    arch_name: str = "configured", distill: bool = True,
) -> dict[str, torch.Tensor]:
    """Checked tensors, converted to `dtype` on `device` (float32 for the rotary bands, as upstream)."""
    d = resolve_dir(path, distill)
    files = weight_map(d)
    check(files, expected, d, arch_name)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(files.values())):
        with safe_open(str(shard), framework="pt", device="cpu") as f:
            for name, p in files.items():
                if p == shard:
                    t = f.get_tensor(name)
                    state[name] = t.to(device=device, dtype=torch.float32 if name == "rope.bands" else dtype)
    return state


def save_official(state: dict[str, torch.Tensor], out: str | Path, shards: int = 2, dtype: torch.dtype | None = None) -> Path:
    """Write `state` in the official layout: `out/inference_weight.distill/` with `shards` files and an
    index. Used to build small test checkpoints; the real ones come from the release."""
    from safetensors.torch import save_file

    d = Path(out) / "inference_weight.distill"
    d.mkdir(parents=True, exist_ok=True)
    names = list(state)
    per = -(-len(names) // shards)
    wm = {}
    for i in range(shards):
        part = names[i * per : (i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: (state[n].to(dtype) if dtype is not None and n != "rope.bands" else state[n]).contiguous() for n in part}, str(d / fname))
        wm.update({n: fname for n in part})
    (d / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": wm}, indent=1))
    return d
