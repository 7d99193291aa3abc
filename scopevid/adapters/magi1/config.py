"""MAGI-1 configuration: the DiT architecture (what a checkpoint's shapes follow) and the inference
recipe (how the official chunk pipeline drives it), as two frozen dataclasses.

`Magi1Arch` carries the same fields, under the same names, as the `model_config` block of the official
example configs (example/4.5B/*.json, example/24B/*.json in SandAI-org/MAGI-1), so an official
config file can be read as is. `Magi1Recipe` carries the runtime/engine knobs that our pipeline uses.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from scopevid.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class Magi1Arch:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # K/V heads (GQA): 8 in every released model
    kv_channels: int  # head dimension
    layernorm_epsilon: float = 1e-6
    apply_layernorm_1p: bool = True  # the q/k norms and post norms store weight - 1 ("zero-centred gamma")
    x_rescale_factor: float = 1.0  # latents are multiplied by it on the way in, divided on the way out
    half_channel_vae: bool = False  # 24B: 16 VAE channels are duplicated to 32 inputs, 16 of 32 outputs kept
    patch_size: int = 2
    t_patch_size: int = 1
    in_channels: int = 16
    out_channels: int = 16
    cond_hidden_ratio: float = 0.25  # width of the timestep / caption conditioning vector, x hidden
    caption_channels: int = 4096  # T5-XXL width
    caption_max_length: int = 800
    xattn_cond_hidden_ratio: float = 1.0
    cond_gating_ratio: float = 1.0
    gated_linear_unit: bool = False  # 24B: SwiGLU MLP

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"model.arch.{name}: {why}")

        need(self.num_layers >= 1, "num_layers", f"must be >= 1, got {self.num_layers}")
        need(self.num_attention_heads % self.num_query_groups == 0, "num_query_groups",
             f"{self.num_query_groups} K/V groups must divide {self.num_attention_heads} heads")
        need(self.t_patch_size == 1, "t_patch_size", f"only 1 is supported (every release), got {self.t_patch_size}")
        # the output projection regroups the concatenated [self-attn, cross-attn] outputs in 8 groups
        need((self.num_attention_heads * self.kv_channels) % 8 == 0, "num_attention_heads",
             "heads x kv_channels must be divisible by 8 (the official layout of linear_proj's input)")
        need((self.hidden_size // self.num_attention_heads) % 8 == 0 and self.hidden_size // self.num_attention_heads >= 8,
             "hidden_size", "hidden_size / heads must be a positive multiple of 8 (rotary bands = that / 8)")
        if self.half_channel_vae:
            need(self.in_channels % 2 == 0 and self.out_channels % 2 == 0, "in_channels", "must be even with half_channel_vae")

    # --- derived sizes ------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.kv_channels

    @property
    def kv_size(self) -> int:
        return self.num_query_groups * self.kv_channels

    @property
    def cond_dim(self) -> int:
        return int(self.hidden_size * self.cond_hidden_ratio)

    @property
    def rope_dim(self) -> int:
        """The official rotary embedding is sized by hidden_size / heads (== kv_channels in every release)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE latent the pipeline works in."""
        return self.in_channels // 2 if self.half_channel_vae else self.in_channels

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Magi1Arch":
        """From our YAML or an official `model_config` block; unknown keys are a clear error, the
        official bookkeeping keys (model_name, params_dtype) are ignored."""
        d = {k: v for k, v in d.items() if k not in ("model_name", "params_dtype")}
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"model.arch.{unknown[0]}: unknown field; allowed: {', '.join(sorted(names))}")
        try:
            return cls(**d)
        except TypeError as e:
            raise ConfigError(f"model.arch: {e}") from None


# The released DiTs (example/4.5B/4.5B_*_config.json and example/24B/24B_*_config.json).
PRESETS: dict[str, Magi1Arch] = {
    "4.5B": Magi1Arch(num_layers=34, hidden_size=3072, ffn_hidden_size=12288, num_attention_heads=24,
                      num_query_groups=8, kv_channels=128),
    "24B": Magi1Arch(num_layers=48, hidden_size=6144, ffn_hidden_size=16384, num_attention_heads=48,
                     num_query_groups=8, kv_channels=128, x_rescale_factor=0.1, half_channel_vae=True,
                     in_channels=32, out_channels=32, gated_linear_unit=True),
}


@dataclass(frozen=True)
class Magi1Recipe:
    """The official inference recipe (runtime_config / engine_config of the example JSONs)."""

    chunk_width: int = 6  # latent frames per chunk (24 video frames)
    window_size: int = 4  # chunks denoised together, one per stage
    shift: float = 3.0  # sd3-style shift of the squared t grid
    clean_t: float = 0.9999  # t of the clean re-forward that writes a finished chunk's K/V
    noise2clean_kvrange: tuple[int, ...] = (5, 4, 3, 2)  # chunks attended (incl. own) by stage
    clean_chunk_kvrange: int = 1  # chunks attended by a clean re-forward: only itself
    distill: bool = True  # step-size embedding + nearly-clean chunk blending
    distill_nearly_clean_chunk_threshold: float = 0.3  # t of the first noisy chunk above which to blend
    prev_chunks_scale: float = 0.7  # blend: 0.7 * with context + 0.3 * without
    special_tokens: tuple[str, ...] = ("HQ_TOKEN", "DURATION_TOKEN")  # PAD_HQ=1 PAD_DURATION=1 (run.sh)
    null_token_length: int = 50  # tokens of the null caption a clean re-forward attends
    fps: int = 24
    temporal_downsample_factor: int = 4
    scale_factor: float = 0.18215  # VAE latent scale

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"model.recipe.{name}: {why}")

        need(self.chunk_width >= 1, "chunk_width", f"must be >= 1, got {self.chunk_width}")
        need(len(self.noise2clean_kvrange) >= 1 and all(r >= 1 for r in self.noise2clean_kvrange),
             "noise2clean_kvrange", f"must be a non-empty list of ranges >= 1, got {self.noise2clean_kvrange}")
        need(self.clean_chunk_kvrange >= 1, "clean_chunk_kvrange", f"must be >= 1, got {self.clean_chunk_kvrange}")
        need(0.0 < self.clean_t <= 1.0, "clean_t", f"must be in (0, 1], got {self.clean_t}")
        need(0.0 <= self.prev_chunks_scale <= 1.0, "prev_chunks_scale", f"must be in [0, 1], got {self.prev_chunks_scale}")
        known = {"HQ_TOKEN", "DURATION_TOKEN", "STATIC_FIRST_FRAMES_TOKEN", "DYNAMIC_FIRST_FRAMES_TOKEN",
                 "BORDERNESS_TOKEN", "THREE_D_MODEL_TOKEN", "TWO_D_ANIME_TOKEN"}
        bad = [t for t in self.special_tokens if t not in known]
        need(not bad, "special_tokens", f"unknown {bad}; allowed: {', '.join(sorted(known))}")

    @property
    def max_context_chunks(self) -> int:
        """Clean chunks before a chunk that any stage attends."""
        return max(max(self.noise2clean_kvrange), self.clean_chunk_kvrange) - 1

    @classmethod
    def from_dict(cls, d: dict) -> "Magi1Recipe":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"model.recipe.{unknown[0]}: unknown field; allowed: {', '.join(sorted(names))}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)


def read_official_config(path: str | Path) -> tuple[Magi1Arch, dict]:
    """An official example JSON -> (arch, its runtime+engine settings as one flat dict)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"MAGI-1 config not found: {path}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if "model_config" not in raw:
        raise CheckpointError(f"{path}: no `model_config` block (not an official MAGI-1 config)")
    flat = {**raw.get("runtime_config", {}), **raw.get("engine_config", {})}
    return Magi1Arch.from_dict(raw["model_config"]), flat


def recipe_from_official(flat: dict, **over) -> Magi1Recipe:
    """The subset of an official runtime/engine config our recipe uses."""
    keep = {f.name for f in fields(Magi1Recipe)}
    d = {k: v for k, v in flat.items() if k in keep}
    d.update(over)
    return Magi1Recipe.from_dict(d)

