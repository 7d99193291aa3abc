"""Load a local diffusers-format SkyReels-V2 diffusion forcing checkpoint, checked before it is read.

Expected layout (what `Skywork/SkyReels-V2-DF-1.3B-540P-Diffusers` holds once downloaded):

    DIR/model_index.json                       (optional here; checked when present)
    DIR/transformer/config.json                SkyReelsV2Transformer3DModel
    DIR/transformer/diffusion_pytorch_model.safetensors       (or *.safetensors.index.json + shards)
    DIR/vae/config.json                        AutoencoderKLWan
    DIR/vae/diffusion_pytorch_model.safetensors
    DIR/text_encoder/config.json               UMT5EncoderModel (or T5EncoderModel)
    DIR/text_encoder/model.safetensors                         (or model.safetensors.index.json + shards)
    DIR/tokenizer/tokenizer.json | spiece.model (+ tokenizer_config.json)
    DIR/scheduler/scheduler_config.json        UniPCMultistepScheduler

Every problem becomes one CheckpointError naming the file or tensor: a missing folder or file, a
config that is not JSON or names another class, a shard listed in an index but absent, a safetensors
file whose header cannot be read, a tensor missing or of the wrong shape. Nothing touches the network.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from scopevid.adapters.hub import quiet_progress
from scopevid.adapters.paths import shard_path
from scopevid.adapters.weights import Files, WeightSource
from scopevid.errors import CheckpointError, load_reason

TRANSFORMER_CLASS = "SkyReelsV2Transformer3DModel"
VAE_CLASS = "AutoencoderKLWan"
TEXT_CLASSES = ("UMT5EncoderModel", "T5EncoderModel")
SCHEDULER_CLASSES = ("UniPCMultistepScheduler",)
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


@dataclass
class Components:
    transformer: torch.nn.Module  # diffusers SkyReelsV2Transformer3DModel
    vae: torch.nn.Module  # diffusers AutoencoderKLWan
    text_encoder: torch.nn.Module  # transformers UMT5EncoderModel
    tokenizer: object
    scheduler_config: dict
    path: Path


def load_checkpoint(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype = torch.float32,
    text_dtype: torch.dtype | None = None,
    text_device: str | torch.device | None = None,
    weights: WeightSource | None = None,
) -> Components:
    """Check the directory completely, then load every component (eval mode, no grad). `weights` says who
    reads the weight files (adapters.weights: this process, or one rank per node for its peers)."""
    root = Path(path).expanduser()
    check_checkpoint(root)
    from diffusers import AutoencoderKLWan, SkyReelsV2Transformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    text_cfg = _json(root / "text_encoder" / "config.json")
    text_cls = UMT5EncoderModel
    if "T5EncoderModel" in (text_cfg.get("architectures") or []):
        from transformers import T5EncoderModel

        text_cls = T5EncoderModel
    source = weights or Files()
    meta: list[Components] = []

    def skeleton(role: str) -> torch.nn.Module:  # the module trees on meta, built once, only by ranks that receive
        if not meta:
            meta.append(build_on_meta(root, dtype=dtype, vae_dtype=vae_dtype, text_dtype=text_dtype or dtype))
        return getattr(meta[0], role)

    def part(role: str, cls, dt: torch.dtype, dev, single: str) -> torch.nn.Module:
        m = source.module(role, lambda: _load(cls, root / role, dt).to(dev), lambda: skeleton(role),
                          _weight_files(root / role, single))
        return m.eval().requires_grad_(False)

    transformer = part("transformer", SkyReelsV2Transformer3DModel, dtype, device, DIFFUSERS_WEIGHTS)
    vae = part("vae", AutoencoderKLWan, vae_dtype, device, DIFFUSERS_WEIGHTS)
    text_encoder = part("text_encoder", text_cls, text_dtype or dtype, text_device or device, TRANSFORMERS_WEIGHTS)
    try:
        with quiet_progress():
            tokenizer = AutoTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
    except Exception as e:  # tokenizers raise many types
        raise CheckpointError(f"{root / 'tokenizer'}: cannot load the tokenizer ({_first_line(e)})") from None
    sched = _json(root / "scheduler" / "scheduler_config.json")
    return Components(transformer, vae, text_encoder, tokenizer, sched, root)


def build_on_meta(path: str | Path, dtype: torch.dtype = torch.bfloat16, vae_dtype: torch.dtype = torch.float32,
                  text_dtype: torch.dtype | None = None) -> Components:
    """The components a checkpoint's configs describe, on torch's meta device: the real module tree,
    shapes and dtypes, with no weight read and nothing allocated (the planner and the dry run).
    `path` is a checkpoint or a configuration-only copy of its layout (configs/arch/); no tokenizer."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"SkyReels-V2 configs: {root} is not a directory (a checkpoint or configs/arch/<model>)")
    from diffusers import AutoencoderKLWan, SkyReelsV2Transformer3DModel
    import transformers

    def diffusers_model(cls, folder: Path, want: str, dt: torch.dtype):
        cfg = _json(folder / "config.json")
        if cfg.get("_class_name") != want:
            raise CheckpointError(f"{folder / 'config.json'}: class {cfg.get('_class_name')!r}, expected {want}")
        with torch.device("meta"):
            model = cls.from_config(cfg)
        keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())  # as from_pretrained(torch_dtype=) keeps them
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point() and not any(k in name.split(".") for k in keep):
                t.data = t.data.to(dt)
        return model.eval().requires_grad_(False)

    transformer = diffusers_model(SkyReelsV2Transformer3DModel, root / "transformer", TRANSFORMER_CLASS, dtype)
    vae = diffusers_model(AutoencoderKLWan, root / "vae", VAE_CLASS, vae_dtype)
    text_cfg = _json(root / "text_encoder" / "config.json")
    umt5 = text_cfg.get("model_type") == "umt5"
    config = (transformers.UMT5Config if umt5 else transformers.T5Config).from_dict(
        {k: v for k, v in text_cfg.items() if not k.startswith("_")})
    with torch.device("meta"):
        text_encoder = (transformers.UMT5EncoderModel if umt5 else transformers.T5EncoderModel)(config)
    text_encoder = text_encoder.to(text_dtype or dtype).eval().requires_grad_(False)
    sched = _json(root / "scheduler" / "scheduler_config.json")
    return Components(transformer, vae, text_encoder, None, sched, root)


def check_checkpoint(root: Path) -> None:
    """Raise CheckpointError naming the first thing that is missing or unreadable."""
    if not root.exists():
        raise CheckpointError(f"SkyReels-V2 checkpoint directory not found: {root}")
    if not root.is_dir():
        raise CheckpointError(f"SkyReels-V2 checkpoint must be a directory (diffusers format), got a file: {root}")
    index = root / "model_index.json"
    if index.exists():
        meta = _json(index)
        for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
            if name in meta and not isinstance(meta[name], list):
                raise CheckpointError(f"{index}: entry {name!r} is not a [library, class] pair")
    missing = [n for n in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler") if not (root / n).is_dir()]
    if missing:
        raise CheckpointError(
            f"{root}: missing component folder(s) {', '.join(m + '/' for m in missing)} "
            "(expected the diffusers layout of Skywork/SkyReels-V2-DF-*-Diffusers: transformer/, vae/, "
            "text_encoder/, tokenizer/, scheduler/)"
        )
    _check_diffusers_model(root / "transformer", (TRANSFORMER_CLASS,))
    _check_diffusers_model(root / "vae", (VAE_CLASS,))
    _check_text_encoder(root / "text_encoder")
    tok = root / "tokenizer"
    if not any((tok / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(f"{tok}: no tokenizer file (need one of {', '.join(TOKENIZER_FILES)})")
    sched = _json(root / "scheduler" / "scheduler_config.json")
    if sched.get("_class_name") not in SCHEDULER_CLASSES:
        raise CheckpointError(
            f"{root / 'scheduler' / 'scheduler_config.json'}: scheduler {sched.get('_class_name')!r}; "
            f"this engine reproduces {', '.join(SCHEDULER_CLASSES)}"
        )


# --- helpers ---------------------------------------------------------------------------------
def transformer_heads(spec: dict) -> tuple[int, ...] | None:
    """The DiT's attention heads from DIR/transformer/config.json (None when it cannot be read: the
    load then names the problem)."""
    try:
        cfg = json.loads((Path(spec["path"]) / "transformer" / "config.json").read_text())
        return (int(cfg["num_attention_heads"]),)
    except (KeyError, TypeError, ValueError, OSError):
        return None


def _json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"missing file {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _first_line(e: Exception) -> str:
    return load_reason(e)


def _weight_files(folder: Path, single: str) -> list[Path]:
    """The safetensors file, or every shard its index lists (each must exist)."""
    if (folder / single).is_file():
        return [folder / single]
    index = folder / (single + ".index.json")
    if not index.is_file():
        others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.safetensors"))
        hint = f" (found {', '.join(others)}; only safetensors in the standard name are read)" if others else ""
        raise CheckpointError(f"{folder}: missing weights {single} (or {index.name} with its shards){hint}")
    meta = _json(index)
    wm = meta.get("weight_map") if isinstance(meta, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{index}: weight_map is empty or not a mapping")
    shards = sorted({shard_path(folder, s, index) for s in wm.values()})
    absent = [s.name for s in shards if not s.is_file()]
    if absent:
        raise CheckpointError(f"{folder}: missing weight shard(s) {', '.join(absent)} listed in {index.name}")
    return shards


def _tensor_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        size = f.stat().st_size
        try:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():
                    shapes[name] = tuple(sf.get_slice(name).get_shape())
        except Exception as e:  # safetensors raises several types for corrupt files
            raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({size} bytes; {_first_line(e)})") from None
    return shapes


def _expected_shapes(model_cls, config: dict) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the model the config describes, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = model_cls.from_config(config) if hasattr(model_cls, "from_config") else model_cls(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _compare(folder: Path, got: dict, want: dict, optional: tuple[str, ...] = ()) -> None:
    missing = [k for k in want if k not in got and not k.endswith(optional)]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"{folder}: weights lack tensor(s) {', '.join(missing[:3])}{more} (partial download?)")
    for k, shape in want.items():
        if k in got and got[k] != shape:
            raise CheckpointError(f"{folder}: tensor {k} has shape {got[k]}, its config implies {shape}")


def _check_diffusers_model(folder: Path, classes: tuple[str, ...]) -> None:
    cfg = _json(folder / "config.json")
    if cfg.get("_class_name") not in classes:
        raise CheckpointError(f"{folder / 'config.json'}: class {cfg.get('_class_name')!r}, expected {' or '.join(classes)}")
    files = _weight_files(folder, DIFFUSERS_WEIGHTS)
    import diffusers

    model_cls = getattr(diffusers, cfg["_class_name"])
    try:
        want = _expected_shapes(model_cls, cfg)
    except Exception as e:
        raise CheckpointError(f"{folder / 'config.json'}: does not describe a {cfg['_class_name']} ({_first_line(e)})") from None
    _compare(folder, _tensor_shapes(files), want)


def _check_text_encoder(folder: Path) -> None:
    cfg = _json(folder / "config.json")
    arch = cfg.get("architectures") or []
    if cfg.get("model_type") not in ("umt5", "t5") or (arch and not set(arch) & set(TEXT_CLASSES)):
        raise CheckpointError(f"{folder / 'config.json'}: model {cfg.get('model_type')!r} {arch}, expected a UMT5/T5 encoder")
    files = _weight_files(folder, TRANSFORMERS_WEIGHTS)
    import transformers

    config_cls = transformers.UMT5Config if cfg["model_type"] == "umt5" else transformers.T5Config
    model_cls = transformers.UMT5EncoderModel if cfg["model_type"] == "umt5" else transformers.T5EncoderModel
    try:
        config = config_cls.from_dict({k: v for k, v in cfg.items() if not k.startswith("_")})
        with torch.device("meta"):
            want = {k: tuple(v.shape) for k, v in model_cls(config).state_dict().items()}
    except Exception as e:
        raise CheckpointError(f"{folder / 'config.json'}: does not describe a text encoder ({_first_line(e)})") from None
    # the input embedding is stored once and tied to `shared` (either name may be the stored one)
    got = _tensor_shapes(files)
    tied = ("shared.weight", "encoder.embed_tokens.weight")
    if any(t in got for t in tied):
        for t in tied:
            got.setdefault(t, got.get(tied[0], got.get(tied[1])))
    _compare(folder, got, want)


def _load(model_cls, folder: Path, dtype: torch.dtype):
    try:
        with quiet_progress():
            return model_cls.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"{folder}: cannot load {model_cls.__name__} ({_first_line(e)})") from None
