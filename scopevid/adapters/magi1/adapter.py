"""MAGI-1 behind the adapter protocol: the official chunk pipeline's per-forward rules on our engine.

What the official pipeline (inference/pipeline/video_generate.py, distill configs) does per forward,
and where it lives here:
- t schedule: t = linspace(0, 1, N+1)^2, sd3 shift 3: t' = (t/3) / (1 - (2/3) t); t = 0 is noise.
  `prepare` returns sigma = 1 - t (the engine's convention) and remembers each level's t exactly
  (float32, as upstream computes it) so conditioning and stage decisions see the official values;
  it also takes the video's chunk count, which sets the duration tokens of the captions.
- chunk staircase (chunk 6, window 4, N/4 steps per stage): scheduler.schedules.ChunkCausalPlan.
- clean re-forward at t = 0.9999 of the chunk that just finished, writing its K/V: the engine fills
  missing context frames with a clean forward before the forward that needs them (never skipped by a
  policy); such frames arrive at `clean_sigma` (and in `spec.store`, which only asks for their K/V)
  and are conditioned as upstream: t = clean_t, the null caption, attention to their own chunk only
  (clean_chunk_kvrange 1). A frame is clean by its level, never by `spec.store`: FlowCache also
  stores noisy frames' K/V.
- kv_range per chunk: a chunk at stage s attends noise2clean_kvrange[s] chunks ending with itself
  (5, 4, 3, 2); set as `spec.key_ranges`, honoured by the attention backend (bidirectional in a chunk).
- distill: a step-size embedding (t_emb(N / 4 * 2)) is added to the condition; when the first noisy
  chunk of a forward has t > 0.3, its velocity is 0.7 * (with context) + 0.3 * (the same chunk forwarded
  alone, attending only itself).
- captions: per chunk, T5 tokens with the special tokens prepended (text.py).
The velocity returned is -dx/dt = dx/dsigma.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from scopevid.adapters.base import (Adapter, Attention, AttentionShape, Capabilities, Conditioning, Feature, ForwardSpec, HookPoint,
                                    GroupDecoder, NoiseSchedule, VideoFacts, local_attention)
from scopevid.adapters.magi1 import checkpoint as ckpt
from scopevid.adapters.magi1.config import PRESETS, Magi1Arch, Magi1Recipe, read_official_config, recipe_from_official
from scopevid.adapters.magi1.model import Magi1DiT
from scopevid.adapters.magi1.text import Magi1Prompt, SpecialTokens, chunk_caption, make_text_encoder
from scopevid.adapters.magi1.vae import WEIGHTS as VAE_WEIGHTS
from scopevid.adapters.magi1.vae import Tiling, decoder_on_meta, load_decoder, tiled_decode
from scopevid.adapters.weights import Files, WeightSource
from scopevid.errors import CheckpointError, ConfigError
from scopevid.validation import Section, parse

HOST_FEATURES = ("embed", "modulated")


class Magi1Spec(Section):
    """`model:` of the MAGI-1 adapter (unknown keys and mistyped values are one ConfigError line)."""

    kind: Literal["magi1"]
    arch: str | dict = "4.5B"  # a preset (4.5B, 24B), a mapping of model_config fields, or an official config .json
    weights: str = Field(min_length=1, description="a MAGI-1 checkpoint directory, or 'random' for a random model")
    recipe: dict | None = None  # Magi1Recipe fields (the official runtime/engine settings)
    special_tokens: str | None = None  # the official special_tokens.npz
    text_encoder: str = Field("random", min_length=1)  # T5 directory, or random
    vae: str | None = Field(None, min_length=1)  # the official vae/ folder (config.json + safetensors); loaded and checked with the model
    height: int = Field(480, ge=16, le=4096, multiple_of=16)  # pixels (8x VAE, 2x patch)
    width: int = Field(480, ge=16, le=4096, multiple_of=16)
    host_feature: Literal["embed", "modulated"] = "embed"  # SCOPE's signal
    init_seed: int = 0  # seed of `weights: random`


def official_t(num_steps: int, shift: float) -> torch.Tensor:
    """The official init_t (sd3 schedule) in float32, [N+1] from 0 (noise) to 1 (clean)."""
    if num_steps == 12:
        raise ConfigError("schedule.steps: 12 selects MAGI-1's shortcut schedule, which is not supported; use a multiple of 4")
    t = torch.linspace(0, 1, num_steps + 1) ** 2
    inv = 1.0 / shift
    return inv * t / (1 + (inv - 1) * t)


class Magi1Adapter(Adapter):
    name = "magi1"
    # chunk-causal with a KV cache (selective computation and lazy KV fill are exact); hooks for the
    # baselines; FlowCache's MAGI-1 signal (embed) and the per-frame condition (temb)
    capabilities = Capabilities(
        causal=True,
        hook_points=frozenset({HookPoint.STACK, HookPoint.BLOCK}),
        features=frozenset({Feature.EMBED, Feature.TEMB}),
    )

    def __init__(
        self,
        model: Magi1DiT,
        recipe: Magi1Recipe = Magi1Recipe(),
        *,
        text_encoder=None,
        special_tokens: SpecialTokens | None = None,
        vae_path: str | Path | None = None,
        latent_hw: tuple[int, int] = (60, 60),
        host_feature: str = "embed",
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if host_feature not in HOST_FEATURES:
            raise ConfigError(f"model.host_feature: must be one of {', '.join(HOST_FEATURES)}, got {host_feature!r}")
        bands = model.rope.bands.detach().float().clone()  # kept exact: a cast through bf16 would round them
        self.model = model.to(device=device, dtype=dtype).promote_high_precision().eval()
        self.model.rope.bands.data = bands.to(device)
        self.arch, self.recipe = model.arch, recipe
        self.device, self.dtype = torch.device(device), dtype
        self.latent_channels = self.arch.latent_channels
        self.latent_hw = tuple(latent_hw)
        p = self.arch.patch_size
        if latent_hw[0] % p or latent_hw[1] % p:
            raise ConfigError(f"model.height/width: latent {latent_hw} must be divisible by the patch size {p}")
        self.temporal_compression = recipe.temporal_downsample_factor
        self.chunk = recipe.chunk_width
        self.text = text_encoder or make_text_encoder("random", self.arch.caption_channels, self.arch.caption_max_length)
        self.special = special_tokens
        if recipe.special_tokens and special_tokens is None:
            raise CheckpointError("MAGI-1: recipe.special_tokens needs the special-token file (model.special_tokens)")
        self.vae_path = vae_path
        self._vae = None
        self.host_kind = host_feature
        self.clean_sigma = 1.0 - float(np.float32(recipe.clean_t))
        # per video (prepare):
        self._levels: dict[float, tuple[int, float]] = {}  # float32(sigma) -> (step index, exact t)
        self._t_table = None
        self.num_steps: int | None = None
        self.num_chunks: int | None = None

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, spec: dict, device: str = "cpu", dtype: torch.dtype = torch.float32,
                    weights: WeightSource | None = None) -> "Magi1Adapter":
        """model: {kind: magi1, arch: 4.5B | 24B | {fields} | path/to/official.json, weights: DIR | random,
        recipe: {...}, special_tokens: NPZ, text_encoder: T5 DIR | random, vae: DIR, height, width (pixels),
        host_feature: embed | modulated, init_seed}"""
        sp = parse(Magi1Spec, spec, "model.", "magi1")
        arch, arch_name, flat = _arch(sp.arch)
        recipe = recipe_from_official(flat, **(sp.recipe or {})) if flat else Magi1Recipe.from_dict(sp.recipe or {})
        if not recipe.distill:
            raise ConfigError("model.recipe.distill: only the distill pipeline (1 CFG pass) is implemented; base models need 3-pass CFG")
        if str(device) == "meta":  # the real module tree without weights (planner, dry run): nothing read
            with torch.device("meta"):
                model = Magi1DiT(arch).to(dtype)
            return cls(model, recipe, special_tokens=SpecialTokens.on_meta(arch.caption_channels) if recipe.special_tokens else None,
                       latent_hw=(sp.height // 8, sp.width // 8), host_feature=sp.host_feature, device="meta", dtype=dtype)
        source = weights or Files()
        vae = None
        if sp.vae:  # problems show at load, not at the first decode
            vae = source.module("vae", lambda: load_decoder(sp.vae, dtype=dtype, device=str(device)),
                                lambda: decoder_on_meta(sp.vae, dtype), [Path(sp.vae) / VAE_WEIGHTS])
        if sp.weights == "random":  # every rank draws the same weights from the seed: nothing to read or share
            model = build_model(arch, sp.weights, dtype, arch_name=arch_name, init_seed=sp.init_seed, distill=recipe.distill)
        else:
            model = source.module(
                "dit", lambda: build_model(arch, sp.weights, dtype, arch_name=arch_name, init_seed=sp.init_seed, distill=recipe.distill),
                lambda: _meta_dit(arch, dtype), sorted(set(ckpt.weight_map(ckpt.resolve_dir(sp.weights, recipe.distill)).values())))
        special = None
        if recipe.special_tokens:
            if sp.special_tokens is None:
                raise ConfigError("model.special_tokens: path to the official special_tokens.npz is required "
                                  "(or set model.recipe.special_tokens: [])")
            special = SpecialTokens.load(sp.special_tokens, arch.caption_channels)
        text = make_text_encoder(sp.text_encoder, arch.caption_channels, arch.caption_max_length, weights=source)
        ad = cls(model, recipe, text_encoder=text, special_tokens=special, vae_path=sp.vae,
                 latent_hw=(sp.height // 8, sp.width // 8), host_feature=sp.host_feature, device=device, dtype=dtype)
        ad._vae = vae
        return ad

    # --- schedule -----------------------------------------------------------------------------
    def prepare(self, video: VideoFacts) -> NoiseSchedule:
        """Per video: the t table of its steps (exact float32 levels) and its chunk count."""
        num_steps = video.num_steps
        t = official_t(num_steps, self.recipe.shift)
        if num_steps % len(self.recipe.noise2clean_kvrange):
            raise ConfigError(f"schedule.steps: {num_steps} steps do not split into {len(self.recipe.noise2clean_kvrange)} kv-range stages")
        if video.chunked and video.unit != self.chunk:
            raise ConfigError(f"schedule.chunk_width: {video.unit} differs from the model recipe's chunk_width {self.chunk}")
        clean_t = float(torch.ones(1) * self.recipe.clean_t)
        levels = {}
        for k, tk in enumerate(t.tolist()):
            key = float(np.float32(1.0 - tk))
            if key in levels:
                raise ConfigError(f"schedule.steps: {num_steps} steps give noise levels closer than float32 resolution")
            levels[key] = (k, tk)
        levels[float(np.float32(1.0 - clean_t))] = (num_steps, clean_t)
        self.num_steps, self._t_table, self._levels = num_steps, t, levels
        self.num_chunks = -(-video.latent_frames // self.chunk)
        return NoiseSchedule(sigmas=tuple(1.0 - tk for tk in t.tolist()), noise=1.0, clean=self.clean_sigma)

    def _level(self, sigma: float) -> tuple[int | None, float]:
        """(step index or None, MAGI t) of a noise level the engine passes back."""
        got = self._levels.get(float(np.float32(sigma)))
        if got is not None:
            return got
        return None, float(np.float32(1.0 - sigma))

    # --- prompt -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative: str | None = None, guidance: float = 1.0) -> Conditioning:
        if guidance not in (1, 1.0):
            raise ConfigError("guidance: the MAGI-1 distill model runs without classifier-free guidance; set guidance: 1.0")
        tokens = self.text(prompt).float() if prompt and prompt.strip() else None
        return Conditioning(cond=Magi1Prompt(tokens, prompt), uncond=None, guidance=1.0)

    def _null_caption(self) -> torch.Tensor:
        return self.model.y_embedder.null_caption_embedding[: self.recipe.null_token_length].float()

    def _captions(self, prompt: Magi1Prompt, chunks: list[int], clean: list[bool]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Distinct caption token sets and, per entry of `chunks`, the index of the one it attends."""
        if prompt.tokens is not None and self.num_chunks is None:
            raise RuntimeError("Magi1Adapter.prepare(video) must be called before a forward (it gives the chunk count)")
        caps: list[torch.Tensor] = []
        keys: dict[object, int] = {}
        idx = []
        for c, is_clean in zip(chunks, clean):
            if is_clean or prompt.tokens is None or c < 0:
                key = "null"
            else:
                key = max(self.num_chunks - c - 1, 0) if "DURATION_TOKEN" in self.recipe.special_tokens else "text"
            if key not in keys:
                keys[key] = len(caps)
                if key == "null":
                    caps.append(self._null_caption())
                else:
                    remaining = key if isinstance(key, int) else 0
                    caps.append(chunk_caption(prompt.tokens.to(self.device), self.special, self.recipe.special_tokens,
                                              remaining, self.arch.caption_max_length))
            idx.append(keys[key])
        return caps, torch.tensor(idx, dtype=torch.long, device=self.device)

    # --- per-forward plan ---------------------------------------------------------------------
    def _frame_levels(self, spec: ForwardSpec, sigma: torch.Tensor) -> list[tuple[int | None, float, bool]]:
        """(step index, t, is clean re-forward) for every frame of the full sequence."""
        sig = spec.sigmas
        if sig is None:
            if spec.shard is not None and spec.shard != (0, len(spec.frames)):
                raise ValueError("MAGI-1 on a sharded forward needs ForwardSpec.sigmas (the full sequence's noise levels)")
            sig = tuple(float(s) for s in sigma.tolist())
        out = []
        for f, s in zip(spec.frames, sig):
            k, t = self._level(s)
            clean = f >= 0 and k == self.num_steps
            out.append((k, t, clean))
        return out

    def _key_ranges(self, spec: ForwardSpec, levels) -> tuple[tuple[int, int], ...]:
        cw, r = self.chunk, self.recipe
        sps = (self.num_steps or len(r.noise2clean_kvrange)) // len(r.noise2clean_kvrange)
        out = []
        for f, (k, t, clean) in zip(spec.frames, levels):
            if f < 0:
                out.append((0, 0))
                continue
            c = f // cw
            if clean:
                span = r.clean_chunk_kvrange
            else:
                if k is None:  # a level outside our table: its stage from t
                    k = int(torch.searchsorted(self._t_table, torch.tensor(t), right=True)) - 1
                span = r.noise2clean_kvrange[min(k // sps, len(r.noise2clean_kvrange) - 1)]
            out.append((max(0, c + 1 - span) * cw, (c + 1) * cw))
        return tuple(out)

    def _step_size(self) -> float | None:
        if not self.recipe.distill:
            return None
        return self.num_steps / 4 * 2  # upstream: num_steps / 4 * distill_dt_scalar (2), for num_steps != 12

    # --- protocol -----------------------------------------------------------------------------
    def host_feature(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, spec: ForwardSpec) -> torch.Tensor:
        """SCOPE's signal, per frame [F, T, D]: the patch-embedded input ("embed"), or that input scaled
        by (1 + the first layer's attention gate) of the frame's noise level ("modulated")."""
        with torch.no_grad():
            h = self.model.embed(x.to(self.device, self.dtype)).float()
            if self.host_kind == "modulated":
                t = torch.tensor([self._level(float(s))[1] for s in sigma.tolist()], dtype=torch.float32, device=self.device)
                ada = self.model.videodit_blocks.layers[0].ada_modulate_layer
                c = self.model.condition(t, self._step_size()).to(ada.proj[0].weight.dtype)
                gate = ada(c).chunk(2, dim=-1)[0]
                h = h * (1 + gate[:, None, :])
        return h

    def named_feature(self, kind: Feature, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, spec: ForwardSpec) -> torch.Tensor:
        """embed: the patch-embedded input [F, T, D] (FlowCache's MAGI-1 signal); temb: the per-frame
        condition [F, cond] (timestep, distill step size and caption adaLN embeddings)."""
        if kind == Feature.EMBED:
            with torch.no_grad():
                return self.model.embed(x.to(self.device, self.dtype)).float()
        if kind == Feature.TEMB:
            t = torch.tensor([self._level(float(s))[1] for s in sigma.tolist()], dtype=torch.float32, device=self.device)
            with torch.no_grad():
                return self.model.condition(t, self._step_size()).float()
        return super().named_feature(kind, x, sigma, cond, spec)

    def branch_velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, branch: str, spec: ForwardSpec,
        attention: Attention = local_attention, hooks=None,
    ) -> torch.Tensor:
        """dx/dsigma for the given frames (model dtype). The distill model has one branch (no CFG).
        `hooks` (the baselines) act on the main forward; the distill recipe's context-free copy of a
        nearly clean chunk is always computed in full."""
        if branch != "cond":
            raise ConfigError("guidance: the MAGI-1 distill model has no unconditional branch")
        x = x.to(self.device, self.dtype)
        levels = self._frame_levels(spec, sigma)
        lo, hi = spec.shard if spec.shard is not None else (0, len(spec.frames))
        local = spec.frames[lo:hi]
        key_ranges = self._key_ranges(spec, levels)
        need = min((a for (a, b), f in zip(key_ranges, spec.frames) if f >= 0), default=0)
        kv = spec.kv.branch("cond") if spec.kv is not None else None
        main = replace(spec, key_ranges=key_ranges, context=[f for f in spec.context if f >= need], kv=kv)

        t_loc = torch.tensor([levels[lo + i][1] for i in range(len(local))], dtype=torch.float32, device=self.device)
        clean_loc = [levels[lo + i][2] for i in range(len(local))]
        caps, cap_idx = self._captions(cond.cond, [f // self.chunk if f >= 0 else -1 for f in local], clean_loc)
        pos = torch.tensor([float(f) if f >= 0 else 0.0 for f in local], dtype=torch.float32)
        step = self._step_size()
        extra = {} if hooks is None else {"hooks": hooks, "branch": "cond"}
        out = self.model(x, t_loc, caps, cap_idx, main, attention, positions=pos, step_size=step, **extra)

        # distill: the first noisy chunk, when nearly clean, is blended with a context-free copy of itself
        first = next((i for i, (f, lv) in enumerate(zip(spec.frames, levels)) if f >= 0 and not lv[2]), None)
        if self.recipe.distill and first is not None and levels[first][1] > self.recipe.distill_nearly_clean_chunk_threshold:
            c0 = spec.frames[first] // self.chunk
            members = [j for j, f in enumerate(spec.frames) if f >= 0 and f // self.chunk == c0 and not levels[j][2]]
            out = self._blend_context_free(x, out, t_loc, caps, cap_idx, spec, members, attention, step)
        return -out

    def _blend_context_free(self, x, out, t_loc, caps, cap_idx, spec, members, attention, step):
        """0.7 * out + 0.3 * (the chunk forwarded alone). The copy's positions follow the forward's last
        frame, as upstream appends it to the sequence. On one process only the chunk is forwarded; on a
        shard, the same layout is forwarded with every other frame as padding (correct, not cheaper)."""
        lo, hi = spec.shard if spec.shard is not None else (0, len(spec.frames))
        cw = self.chunk
        end = max(f for f in spec.frames if f >= 0) + 1
        end = -(-end // cw) * cw  # upstream forwards whole chunks
        span = (spec.frames[members[0]] // cw * cw, spec.frames[members[0]] // cw * cw + cw)
        copy_pos = {spec.frames[j]: float(end + spec.frames[j] - span[0]) for j in members}
        sharded = spec.shard is not None and spec.shard != (0, len(spec.frames))
        mem = set(members)
        if not sharded:
            sel = torch.tensor(members, dtype=torch.long)
            frames = [spec.frames[j] for j in members]
            cspec = ForwardSpec(frames=frames, key_ranges=tuple(span for _ in frames), kernel=spec.kernel)
            pos = torch.tensor([copy_pos[f] for f in frames])
            alone = self.model(x[sel], t_loc[sel], caps, cap_idx[sel], cspec, attention, positions=pos, step_size=step)
            out[sel] = self.recipe.prev_chunks_scale * out[sel] + (1 - self.recipe.prev_chunks_scale) * alone
            return out
        frames = [f if j in mem else -1 for j, f in enumerate(spec.frames)]
        cspec = ForwardSpec(frames=frames, shard=spec.shard, key_ranges=tuple(span if f >= 0 else (0, 0) for f in frames),
                            kernel=spec.kernel)
        pos = torch.tensor([copy_pos.get(f, 0.0) for f in frames[lo:hi]])
        alone = self.model(x, t_loc, caps, cap_idx, cspec, attention, positions=pos, step_size=step)
        sel = torch.tensor([i for i in range(hi - lo) if (lo + i) in mem], dtype=torch.long)
        if sel.numel():
            out[sel] = self.recipe.prev_chunks_scale * out[sel] + (1 - self.recipe.prev_chunks_scale) * alone[sel]
        return out

    # --- output -------------------------------------------------------------------------------
    def vae(self):
        if self._vae is None:
            if self.vae_path is None:
                raise CheckpointError("MAGI-1 VAE: no weights configured (model.vae: the official `vae/` folder with "
                                      "config.json and diffusion_pytorch_model.safetensors); cannot decode latents to pixels")
            self._vae = load_decoder(self.vae_path, dtype=self.dtype, device=str(self.device))
        return self._vae

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latent frames [F, C, H, W] (a chunk) -> pixels [4F, 8H, 8W, 3] in [0, 1], tiled as upstream."""
        dec = self.vae()
        z = latents.to(self.device, self.dtype).permute(1, 0, 2, 3)[None] / self.recipe.scale_factor
        px = tiled_decode(dec, z, Tiling(sample_t=self.recipe.fps // 2))
        return ((px[0].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0)

    def stream_decoder(self) -> GroupDecoder:
        """Decodes finished latents one chunk at a time (the official per-chunk decode). Asked for
        before the rollout: a run without a VAE fails here, not after its first chunk's work."""
        self.vae()
        return GroupDecoder(self.decode, self.chunk)

    def modules(self) -> dict[str, torch.nn.Module]:
        """The DiT, and the VAE once loaded (T5 runs in float32 on the CPU, off the device)."""
        vae = getattr(self._vae, "module", self._vae)
        return {"dit": self.model, **({"vae": vae} if isinstance(vae, torch.nn.Module) else {})}

    def attention_shape(self) -> AttentionShape:
        a = self.arch
        hp, wp = self.latent_hw[0] // a.patch_size, self.latent_hw[1] // a.patch_size
        return AttentionShape(a.num_layers, a.num_attention_heads, a.num_query_groups, a.kv_channels, hp * wp,
                              self.dtype.itemsize)

    def flops(self, frames: int, context: int, blocks: int | None = None, branches: int = 1) -> float:
        hp, wp = self.latent_hw[0] // self.arch.patch_size, self.latent_hw[1] // self.arch.patch_size
        return branches * self.model.flops(frames, frames + context, hp * wp, caption_tokens=0, blocks=blocks)


# --- helpers ------------------------------------------------------------------------------------
def arch_heads(spec: dict) -> tuple[int, ...] | None:
    """Query heads and K/V groups of a MAGI-1 spec's arch (both are split by Ulysses)."""
    try:
        arch = _arch(spec.get("arch", "4.5B"))[0]
    except (ConfigError, CheckpointError, OSError, ValueError):
        return None  # the load names the problem
    return arch.num_attention_heads, arch.num_query_groups


def _arch(spec) -> tuple[Magi1Arch, str, dict]:
    """model.arch: a preset name, a mapping of fields, or an official example JSON."""
    if isinstance(spec, str) and spec in PRESETS:
        return PRESETS[spec], spec, {}
    if isinstance(spec, dict):
        return Magi1Arch.from_dict(spec), "configured", {}
    if isinstance(spec, str) and spec.endswith(".json"):
        arch, flat = read_official_config(spec)
        return arch, Path(spec).name, flat
    raise ConfigError(f"model.arch: one of {', '.join(PRESETS)}, a mapping of MAGI-1 model_config fields, or an official config .json; got {spec!r}")


def _meta_dit(arch: Magi1Arch, dtype: torch.dtype) -> Magi1DiT:
    with torch.device("meta"):
        return Magi1DiT(arch).to(dtype)


def expected_shapes(arch: Magi1Arch) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor an `arch` checkpoint holds (built on the meta device: free)."""
    with torch.device("meta"):
        m = Magi1DiT(arch)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def build_model(arch: Magi1Arch, weights, dtype: torch.dtype, *, arch_name: str = "configured", init_seed: int = 0,
                distill: bool = True) -> Magi1DiT:
    """A Magi1DiT with checked checkpoint weights (`weights` = directory) or random ones ('random')."""
    if weights == "random":
        torch.manual_seed(init_seed)
        model = Magi1DiT(arch)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name == "rope.bands":
                    continue
                std = 0.02 if p.dim() > 1 else 0.1
                p.normal_(0.0, std)
        return model.to(dtype)
    state = ckpt.load_state(weights, expected_shapes(arch), dtype, arch_name=arch_name, distill=distill)
    with torch.device("meta"):
        model = Magi1DiT(arch)
    model.load_state_dict(state, assign=True)
    return model
