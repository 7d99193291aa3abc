"""SkyReels-V2 diffusion forcing behind the adapter protocol, with the semantics of diffusers'
`SkyReelsV2DiffusionForcingPipeline` (0.42) and the official SkyworkAI/SkyReels-V2 code.

What the pipeline does per forward, and where it lives here:
- per-frame timesteps from the step matrix: 999 for frames not started, the scheduler's timestep
  while denoising, 0 once clean. The engine hands per-frame sigmas; `prepare` returns the
  scheduler's own sigma table with the not-started and clean levels, and `_timesteps` maps each
  sigma back to exactly the integer timestep the pipeline would pass;
- addnoise_condition: the clean overlap-history prefix of a later window (its length per window
  origin comes with the video's facts in `prepare`) enters every forward as x (1 - a/1000) + n a/1000
  with timestep a;
- classifier-free guidance as two forwards (cond, uncond) when guidance > 1, combined in model dtype;
- the fps embedding (0 for 16 fps, 1 otherwise) of models trained with inject_sample_info;
- attention: bidirectional within the forward (official default). `causal_attention: N` gives the
  block-causal mask over blocks of N latent frames that the official `--causal_attention` flag
  sets, and that diffusers' pipeline sets whenever it is called with `causal_block_size=N`.
Decoding streams through the Wan VAE's causal cache (`vae.StreamDecoder`).
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from scopevid.adapters.base import (Adapter, Attention, AttentionShape, Capabilities, Conditioning, Feature, ForwardSpec, HookPoint,
                                    NoiseSchedule, VideoFacts, local_attention)
from scopevid.adapters.skyreels_v2.loader import Components, build_on_meta, load_checkpoint
from scopevid.adapters.skyreels_v2.model import DFTransformer
from scopevid.adapters.skyreels_v2.vae import LatentNorm, StreamDecoder
from scopevid.adapters.weights import WeightSource
from scopevid.errors import CheckpointError, ConfigError
from scopevid.validation import Section, parse

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NOT_STARTED_T, CLEAN_T = 999, 0  # the step matrix's boundary timesteps
MAX_SHIFT = 1e3  # flow shifts beyond this leave no step at low noise

Dtype = Literal["float32", "bfloat16", "float16"]


class SkyReelsV2Spec(Section):
    """`model:` of the SkyReels-V2 adapter (unknown keys and mistyped values are one ConfigError line)."""

    kind: Literal["skyreels_v2"]
    path: str = Field(min_length=1, description="the SkyReels-V2 checkpoint directory, diffusers layout (see docs/skyreels_v2.md)")
    height: int = Field(544, ge=16, le=4096, multiple_of=16)  # pixels (540P: 544)
    width: int = Field(960, ge=16, le=4096, multiple_of=16)  # pixels (540P: 960)
    shift: float | None = Field(None, gt=0, le=MAX_SHIFT)  # flow shift (T2V: 8); default: the scheduler config's
    fps: int = Field(24, ge=1, le=240)  # fps embedding input (16 -> 0, else 1); 24 like both pipelines
    addnoise_condition: float = Field(0.0, ge=0, lt=1000)  # noise level a (timesteps) on the overlap prefix; official 20
    # 'frame': seeded per frame and window iteration (deterministic, shard- and call-independent);
    # 'global': torch's global RNG as diffusers (each forward draws, so it depends on their order)
    addnoise_rng: Literal["frame", "global"] = "frame"
    addnoise_seed: int = 0  # seed of the addnoise stream ('global': torch.manual_seed(it) when the video starts)
    causal_attention: int | None = Field(None, ge=0, le=1024)  # 0 bidirectional; N block-causal over N latent frames; default: the checkpoint's num_frame_per_block
    max_sequence_length: int = Field(512, ge=1, le=4096)  # prompt tokens
    vae_dtype: Dtype = "float32"
    text_encoder_dtype: Dtype | None = None  # default: the run dtype (float32 when that is float16: T5 overflows in fp16)
    text_encoder_device: str | None = None  # default: the run device




def _flow_shift(value: object, override: bool, path: Path) -> float:
    """The scheduler's flow shift as a number > 0 (the spec's bound): a negative or zero shift makes
    the sigma table non-monotone or divide by zero deep inside diffusers. Names where it came from."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= MAX_SHIFT:
        return float(value)
    where = "model.shift" if override else f"{Path(path) / 'scheduler' / 'scheduler_config.json'}: flow_shift"
    error = ConfigError if override else CheckpointError
    raise error(f"{where}: must be a number > 0 and at most {MAX_SHIFT:g} (SkyReels-V2 T2V uses 8), got {value!r}")


@dataclass
class Prompt:
    embeds: torch.Tensor  # [1, L, text_dim] encoder states, zero-padded after the prompt (as the pipeline)
    context: torch.Tensor  # [1, L, D] after the DiT's text projection


def clean_prompt(text: str) -> str:
    """The pipelines' prompt cleaning: ftfy repair, HTML unescape (twice), whitespace collapse."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


class SkyReelsV2Adapter(Adapter):
    name = "skyreels_v2"
    NOISE_SIGMA, CLEAN_SIGMA = 1.0, 0.0  # map to timesteps 999 and 0

    def __init__(
        self,
        parts: Components,
        *,
        height: int = 544,
        width: int = 960,
        shift: float | None = None,
        fps: int = 24,
        addnoise_condition: float = 0.0,
        addnoise_rng: str = "frame",
        addnoise_seed: int = 0,
        causal_attention: int | None = None,
        max_sequence_length: int = 512,
    ):
        self.parts = parts
        self.net = DFTransformer(parts.transformer)
        self.vae = parts.vae
        self.norm = LatentNorm(parts.vae)
        self.device = parts.transformer.patch_embedding.weight.device
        self.dtype = self.net.dtype
        vae_cfg = parts.vae.config
        self.temporal_compression = 2 ** sum(vae_cfg.temperal_downsample)
        spatial = 2 ** len(vae_cfg.temperal_downsample)
        if height % 16 or width % 16:
            raise ConfigError(f"model.height/width: must be multiples of 16, got {height}x{width}")
        self.latent_hw = (height // spatial, width // spatial)
        self.latent_channels = parts.transformer.config.in_channels
        _, ph, pw = self.net.patch
        self.tokens_per_frame = (self.latent_hw[0] // ph) * (self.latent_hw[1] // pw)
        self.fps_id = 0 if int(fps) == 16 else 1
        self.addnoise = float(addnoise_condition)
        if addnoise_rng not in ("frame", "global"):
            raise ConfigError(f"model.addnoise_rng: must be 'frame' or 'global', got {addnoise_rng!r}")
        self.addnoise_rng, self.addnoise_seed = addnoise_rng, int(addnoise_seed)
        if causal_attention is None:
            n = int(parts.transformer.config.num_frame_per_block)
            causal_attention = n if n > 1 else 0
        self.block_causal = int(causal_attention)
        # Bidirectional within the window (the official default): the engine never serves K/V context.
        # Block-causal (causal_attention N > 1): a block attends itself and earlier blocks only, so clean
        # blocks are served as cached K/V (selective computation exact, FlowCache's per-chunk K/V
        # buffers). Hooks for the baselines; TeaCache's signals e and e0.
        self.capabilities = Capabilities(
            causal=self.block_causal > 1,
            hook_points=frozenset({HookPoint.STACK, HookPoint.BLOCK}),
            features=frozenset({Feature.TEMB, Feature.TEMB_MOD}),
        )
        self.max_sequence_length = int(max_sequence_length)
        from diffusers import UniPCMultistepScheduler

        overrides = {} if shift is None else {"flow_shift": float(shift)}
        self.scheduler = UniPCMultistepScheduler.from_config(parts.scheduler_config, **overrides)
        sc = self.scheduler.config
        if not (sc.use_flow_sigmas and sc.prediction_type == "flow_prediction"):
            raise ConfigError("model: the scheduler config must use flow sigmas with flow_prediction (SkyReels-V2 DF)")
        self.shift = _flow_shift(sc.flow_shift, shift is not None, parts.path)
        # per video (prepare):
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None  # (sigmas float64, timesteps long)
        self._prefix_len: dict[int, int] = {}  # window origin -> clean prefix frames
        self._last_inputs = None  # (x, spec, inputs) of the forward in progress (see _forward_inputs)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, spec: dict, device: str = "cpu", dtype: torch.dtype = torch.float32,
                    weights: WeightSource | None = None) -> "SkyReelsV2Adapter":
        sp = parse(SkyReelsV2Spec, spec, "model.", "skyreels_v2")
        text_default = torch.float32 if dtype == torch.float16 else dtype
        load = partial(load_checkpoint, weights=weights) if str(device) != "meta" else lambda path, **kw: build_on_meta(
            path, dtype=kw["dtype"], vae_dtype=kw["vae_dtype"], text_dtype=kw["text_dtype"])
        parts = load(
            Path(sp.path),
            device=device,
            dtype=dtype,
            vae_dtype=DTYPES[sp.vae_dtype],
            text_dtype=DTYPES[sp.text_encoder_dtype] if sp.text_encoder_dtype else text_default,
            text_device=sp.text_encoder_device or device,
        )
        return cls(parts, height=sp.height, width=sp.width, shift=sp.shift, fps=sp.fps,
                   addnoise_condition=sp.addnoise_condition, addnoise_rng=sp.addnoise_rng,
                   addnoise_seed=sp.addnoise_seed, causal_attention=sp.causal_attention,
                   max_sequence_length=sp.max_sequence_length)

    # --- schedule ------------------------------------------------------------------------------
    def sigmas(self, num_steps: int) -> tuple[float, ...]:
        """The scheduler's T+1 sigmas (last 0), exactly as the pipeline's per-frame schedulers hold them."""
        return tuple(float(x) for x in self._schedule(num_steps)[0])

    def _schedule(self, num_steps: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        from diffusers import UniPCMultistepScheduler

        sched = UniPCMultistepScheduler.from_config(self.scheduler.config)  # a copy: this call changes nothing
        sched.set_timesteps(num_steps)
        sig, ts = sched.sigmas, sched.timesteps
        keys = torch.cat([sig[:-1].double(), torch.tensor([self.NOISE_SIGMA, self.CLEAN_SIGMA], dtype=torch.float64)])
        vals = torch.cat([ts.long().cpu(), torch.tensor([NOT_STARTED_T, CLEAN_T])])
        if len(set(keys.tolist())) != len(keys):
            raise ConfigError(f"steps: {num_steps} steps give coinciding sigmas; choose fewer steps")
        return sig, (keys, vals)

    def prepare(self, video: VideoFacts) -> NoiseSchedule:
        """Per video: the sigma table the timesteps are read from, and each window's clean prefix."""
        sig, self._table = self._schedule(video.num_steps)
        self._prefix_len = dict(video.prefixes)
        if self.addnoise_rng == "global":  # the pipeline's stream: torch's global generator, as after torch.manual_seed
            torch.manual_seed(self.addnoise_seed)
        return NoiseSchedule(sigmas=tuple(float(x) for x in sig), noise=self.NOISE_SIGMA, clean=self.CLEAN_SIGMA)

    def solver_options(self) -> dict:
        """For the engine's UniPC (`solver: unipc`): the scheduler config's multistep settings."""
        sc = self.scheduler.config
        if sc.thresholding or sc.solver_p is not None or not sc.predict_x0:
            raise ConfigError("solver: unipc reproduces UniPC with predict_x0, no thresholding, no solver_p")
        return {"order": int(sc.solver_order), "solver_type": sc.solver_type,
                "lower_order_final": bool(sc.lower_order_final), "disable_corrector": tuple(sc.disable_corrector)}

    def _timesteps(self, sigma: torch.Tensor) -> torch.Tensor:
        """Per-frame sigmas (float32 from the engine) -> the pipeline's integer timesteps [F] (long)."""
        if self._table is None:
            raise RuntimeError("SkyReelsV2Adapter.prepare(video) must be called before a forward")
        keys, vals = self._table
        dist = (sigma.detach().double().cpu()[:, None] - keys[None, :]).abs()
        best, idx = dist.min(dim=1)
        if bool((best > 1e-5).any()):
            bad = float(sigma.flatten()[int(best.argmax())])
            raise ValueError(f"sigma {bad} is not on this run's schedule (shift {self.shift}); was prepare() called with the plan's steps?")
        return vals[idx].to(self.device)

    # --- prompts ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _encode(self, text: str) -> torch.Tensor:
        if self.parts.tokenizer is None:  # built from configs only (meta, or random weights): every position a token
            dev = next(self.parts.text_encoder.parameters()).device
            ids = torch.zeros((1, self.max_sequence_length), dtype=torch.long, device=dev)
            states = self.parts.text_encoder(ids, torch.ones_like(ids)).last_hidden_state
            return states.to(self.device, self.dtype)
        tok = self.parts.tokenizer(
            [clean_prompt(text)], padding="max_length", max_length=self.max_sequence_length, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        te = self.parts.text_encoder
        dev = next(te.parameters()).device
        states = te(tok.input_ids.to(dev), tok.attention_mask.to(dev)).last_hidden_state  # [1, L, text_dim]
        n = int(tok.attention_mask.gt(0).sum())
        out = torch.zeros_like(states)
        out[:, :n] = states[:, :n]  # the pipelines zero the states after the prompt's tokens
        return out.to(self.device, self.dtype)

    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative: str | None = None, guidance: float = 1.0) -> Conditioning:
        emb = self._encode(prompt)
        cond = Prompt(emb, self.net.text_context(emb))
        uncond = None
        if guidance > 1.0:  # the pipeline's do_classifier_free_guidance
            neg = self._encode(negative or "")
            uncond = Prompt(neg, self.net.text_context(neg))
        return Conditioning(cond=cond, uncond=uncond, guidance=float(guidance), branches=2 if uncond is not None else 1)

    # --- the overlap prefix (addnoise_condition) ------------------------------------------------
    def _prefix_frames(self, spec: ForwardSpec) -> set[int]:
        """Frames of `spec` that are the clean overlap history of their window: [origin, origin + prefix)."""
        end = spec.origin + self._prefix_len.get(spec.origin, 0)
        return {f for f in spec.frames if spec.origin <= f < end}

    def _condition_prefix(self, x: torch.Tensor, t: torch.Tensor, spec: ForwardSpec, prefix: set[int]) -> None:
        """addnoise_condition on the prefix frames of this forward (in place on x [F, C, h, w], t [F])."""
        k = spec.step  # the window's iteration: every step of the pipeline draws afresh
        local = spec.local_frames()
        rows = [i for i, f in enumerate(local) if f in prefix]
        a = 0.001 * self.addnoise
        c, h, w = x.shape[1:]
        if self.addnoise_rng == "global":
            # what the pipeline draws: randn_like of the [1, C, P, h, w] prefix slice, in model dtype.
            # Every rank draws all of it (and keeps its own frames), so seeded ranks stay in step.
            ordered = [f for f in spec.frames if f in prefix]
            if not ordered:
                return
            noise = torch.randn((1, c, len(ordered), h, w), dtype=x.dtype, device=x.device)[0].transpose(0, 1)
            if not rows:
                return
            pick = torch.stack([noise[ordered.index(local[i])] for i in rows])
        else:
            if not rows:
                return
            pick = torch.stack([
                torch.randn((c, h, w), generator=torch.Generator().manual_seed(
                    (self.addnoise_seed * 1_000_003 + local[i]) * 10_007 + k), dtype=torch.float32).to(x.device, x.dtype)
                for i in rows
            ])
        idx = torch.tensor(rows, device=x.device)
        x[idx] = x[idx] * (1.0 - a) + pick * a
        t[idx] = int(self.addnoise)

    # --- protocol ------------------------------------------------------------------------------
    def _inputs(self, x: torch.Tensor, sigma: torch.Tensor, spec: ForwardSpec, noise: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.to(self.device, self.dtype).clone()
        t = self._timesteps(sigma)
        if self.addnoise > 0:
            prefix = self._prefix_frames(spec)
            if noise:
                self._condition_prefix(x, t, spec, prefix)
            else:  # the host feature sees the prefix at its timestep, without drawing noise
                rows = [i for i, f in enumerate(spec.local_frames()) if f in prefix]
                if rows:
                    t[torch.tensor(rows, device=t.device)] = int(self.addnoise)
        return x, t

    def _forward_inputs(self, x: torch.Tensor, sigma: torch.Tensor, spec: ForwardSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """The conditioned inputs of one forward, prepared once for both guidance branches: with
        addnoise_rng 'global' the prefix noise comes from torch's RNG, and a second draw for the
        uncond branch would shift the stream the pipeline draws from (once per forward)."""
        last = self._last_inputs
        if last is not None and last[0] is x and last[1] is spec:
            return last[2]
        out = self._inputs(x, sigma, spec, noise=True)
        self._last_inputs = (x, spec, out)
        return out

    @torch.no_grad()
    def host_feature(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, spec: ForwardSpec) -> torch.Tensor:
        """Timestep-modulated input of the first block, per frame: [F, tokens_per_frame, D]."""
        x, t = self._inputs(x, sigma, spec, noise=False)
        return self.net.host_feature(x, t, cond.cond.embeds, self.fps_id)

    def _attention_spec(self, spec: ForwardSpec, branch: str) -> ForwardSpec:
        """What `attention` sees: the model's frame mask as key ranges over the forwarded frames and,
        block-causal only, the cached K/V of `spec.context` (this CFG branch's).

        Bidirectional: every frame attends every forwarded frame. Block-causal: a frame attends the
        context and the forwarded frames up to the end of its own block (blocks of `block_causal`
        frames counted from the window start, as diffusers builds its mask). Key ranges let
        local_attention run one mask-free SDPA per group of frames instead of a dense [S, S] mask."""
        real = [f for f in spec.frames if f >= 0]
        n = self.block_causal
        if n <= 1:
            lo, hi = (min(real), max(real) + 1) if real else (0, 0)
            return replace(spec, key_ranges=((lo, hi),) * len(spec.frames), causal=False, context=[], store=frozenset(), kv=None)
        keys = real + list(spec.context)
        lo, hi = (min(keys), max(keys) + 1) if keys else (0, 0)
        ranges = tuple((lo, min(hi, spec.origin + ((f - spec.origin) // n + 1) * n)) if f >= 0 else (lo, hi) for f in spec.frames)
        kv = spec.kv.branch(branch) if spec.kv is not None else None
        return replace(spec, key_ranges=ranges, causal=False, kv=kv)

    @torch.no_grad()
    def named_feature(self, kind: Feature, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, spec: ForwardSpec) -> torch.Tensor:
        """temb: the timestep embedding per frame [F, D] (TeaCache's `e`); temb_mod: its projection to
        the six adaLN vectors, fps embedding included, [F, 6, D] (`e0`, what SkyReels-V2's own TeaCache
        compares with use_ret_steps)."""
        if kind not in self.capabilities.features:
            return super().named_feature(kind, x, sigma, cond, spec)
        _, t = self._inputs(x, sigma, spec, noise=False)
        temb, e = self.net.time_modulation(t, self.fps_id, cond.cond.embeds)
        return (temb if kind == Feature.TEMB else e)[0]

    @torch.no_grad()
    def branch_velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, branch: str, spec: ForwardSpec,
        attention: Attention = local_attention, hooks=None,
    ) -> torch.Tensor:
        """One branch's flow velocity [F, C, h, w] (model dtype) for exactly the frames given."""
        x, t = self._forward_inputs(x, sigma, spec)
        p = cond.cond if branch == "cond" else cond.uncond
        extra = {} if hooks is None else {"hooks": hooks, "branch": branch}
        return self.net.forward(x, t, p.embeds, p.context, spec.local_positions(), self._attention_spec(spec, branch),
                                attention, self.fps_id, **extra)

    # --- decoding and cost ------------------------------------------------------------------------
    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self.vae, self.norm)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latent frames [F, C, h, w] from the start of a video -> pixels [1 + 4 (F-1), H, W, 3] in [0, 1]."""
        dec = self.stream_decoder()
        return torch.cat([dec.push(z) for z in latents])

    def flops(self, frames: int, context: int = 0, blocks: int | None = None, branches: int = 1) -> float:
        return branches * self.net.flops(frames, self.tokens_per_frame, self.max_sequence_length, blocks, context)

    def modules(self) -> dict[str, torch.nn.Module]:
        p = self.parts
        return {"dit": p.transformer, "text_encoder": p.text_encoder, "vae": p.vae}

    def attention_shape(self) -> AttentionShape:
        n = self.net
        return AttentionShape(n.layers, n.heads, n.heads, n.dim // n.heads, self.tokens_per_frame, self.dtype.itemsize)
