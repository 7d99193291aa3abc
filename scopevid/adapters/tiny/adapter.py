"""Adapter for the bundled tiny DiT: weights loading (checked), prompts, guidance, decoding.

Pixel space: a latent frame is an RGB frame in [-1, 1], so decoding is a rescale and there is no
temporal compression.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field

import torch
from safetensors.torch import load_file

from scopevid.adapters.base import (Adapter, Attention, AttentionShape, Capabilities, Conditioning, Feature, ForwardSpec, HookPoint,
                                    NoiseSchedule, VideoFacts, local_attention)
from scopevid.adapters.rows import fixed_rows
from scopevid.adapters.tiny.model import TinyDiT, TinyDiTConfig
from scopevid.errors import CheckpointError, ConfigError
from scopevid.validation import Section, build, parse

BUNDLED = Path(__file__).resolve().parents[2] / "weights"  # scopevid/weights
SHIFT_RANGE = (1e-3, 1e3)  # flow time shifts the noise table is built for (0 would divide by zero)


class TinySpec(Section):
    """`model:` of the tiny adapter."""

    kind: Literal["tiny"]
    weights: str = Field("bundled", min_length=1)  # bundled | random | path to a .safetensors with its .json
    init_seed: int = 0  # seed of `weights: random`
    shift: float | None = Field(None, ge=SHIFT_RANGE[0], le=SHIFT_RANGE[1])  # flow time shift; default: the weights' own (3 for random)
    arch: dict | None = None  # TinyDiTConfig fields of `weights: random`


def shifted_sigmas(num_steps: int, shift: float) -> tuple[float, ...]:
    """T+1 flow-matching noise levels 1 -> 0 with the usual time shift s' = k s / (1 + (k - 1) s)."""
    out = []
    for i in range(num_steps + 1):
        s = 1.0 - i / num_steps
        out.append(shift * s / (1.0 + (shift - 1.0) * s))
    return tuple(out)


class TinyAdapter(Adapter):
    name = "tiny"
    temporal_compression = 1
    # frame-level block-causal (selective computation is exact with the KV cache); hooks for the
    # baselines; TeaCache's and FlowCache's signals
    capabilities = Capabilities(
        causal=True,
        hook_points=frozenset({HookPoint.STACK, HookPoint.BLOCK}),
        features=frozenset({Feature.TEMB, Feature.TEMB_MOD, Feature.EMBED}),
        batched_branches=True,
    )

    def __init__(self, model: TinyDiT, shift: float = 3.0, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.cfg = model.cfg
        self.shift = shift
        self.device, self.dtype = torch.device(device), dtype
        self.latent_channels = self.cfg.channels
        self.latent_hw = (self.cfg.size, self.cfg.size)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, raw: dict, device: str = "cpu", dtype: torch.dtype = torch.float32) -> "TinyAdapter":
        spec = parse(TinySpec, raw, "model.", "tiny")  # a typo (`weigths:`) must not silently run the bundled weights
        weights = spec.weights
        if weights == "random":
            cfg = tiny_arch(spec.arch or {}, "model.arch.")
            torch.manual_seed(spec.init_seed)
            model = TinyDiT(cfg)
            with torch.no_grad():  # adaLN-zero would make a random model output zero: perturb
                for p in model.parameters():
                    if p.dim() > 0 and float(p.abs().sum()) == 0.0:
                        torch.nn.init.normal_(p, std=0.02)
            return cls(model, spec.shift if spec.shift is not None else 3.0, device, dtype)
        model, meta = load_tiny(weights_path(raw))
        return cls(model, spec.shift if spec.shift is not None else float(meta.get("shift", 3.0)), device, dtype)

    # --- protocol -----------------------------------------------------------------------------
    def prepare(self, video: VideoFacts) -> NoiseSchedule:
        sig = shifted_sigmas(video.num_steps, self.shift)
        return NoiseSchedule(sigmas=sig, noise=sig[0], clean=0.0)

    def tokenize(self, prompt: str) -> torch.Tensor:
        check_prompt(prompt, self.cfg.vocab[1:])
        vocab = {w: i for i, w in enumerate(self.cfg.vocab)}
        words = prompt.lower().split()
        ids = [vocab[w] for w in words][: self.cfg.max_prompt]
        ids += [0] * (self.cfg.max_prompt - len(ids))
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative: str | None = None, guidance: float = 1.0) -> Conditioning:
        cond = self.model.prompt_vector(self.tokenize(prompt))
        uncond = self.model.prompt_vector(self.tokenize(negative or ""))
        return Conditioning(cond=cond, uncond=uncond, guidance=float(guidance), branches=1 if guidance == 1.0 else 2)

    def host_feature(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, spec: ForwardSpec) -> torch.Tensor:
        return self.model.host_feature(x.to(self.dtype), sigma, cond.cond)

    def named_feature(self, kind: Feature, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, spec: ForwardSpec) -> torch.Tensor:
        """temb: timestep embedding per frame [F, dim] (TeaCache's e on Wan/SkyReels); temb_mod: block 0's
        adaLN projection of the per-frame conditioning [F, 6 dim] (TeaCache's e0; here it also carries the
        prompt vector, which the tiny model adds to the time embedding); embed: patch-embedded input [F, T, dim]."""
        m = self.model
        if kind == Feature.TEMB:
            from scopevid.adapters.tiny.model import timestep_embedding

            return fixed_rows(m.time_mlp, timestep_embedding(sigma, self.cfg.dim))
        if kind == Feature.TEMB_MOD:
            return fixed_rows(lambda c: m.blocks[0].ada(torch.nn.functional.silu(c)), m.conditioning(sigma, cond.cond))
        if kind == Feature.EMBED:
            return m.patch_embed(m.patchify(x.to(self.dtype)))
        return super().named_feature(kind, x, sigma, cond, spec)

    def branch_velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, branch: str, spec: ForwardSpec,
        attention: Attention = local_attention, hooks=None,
    ) -> torch.Tensor:
        extra = {} if hooks is None else {"hooks": hooks, "branch": branch}
        text = cond.cond if branch == "cond" else cond.uncond
        return self.model(x.to(self.dtype), sigma, text, _with_branch(spec, spec.kv, branch), attention, **extra)

    def branches_velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, spec: ForwardSpec,
        attention: Attention = local_attention,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        v_c, v_u = self.model.forward_branches(x.to(self.dtype), sigma, [cond.cond, cond.uncond],
                                               [_with_branch(spec, spec.kv, b) for b in ("cond", "uncond")], attention)
        return v_c, v_u

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)

    def flops(self, frames: int, context: int, blocks: int | None = None, branches: int = 1) -> float:
        return branches * self.model.flops(frames, context, blocks)

    def modules(self) -> dict[str, torch.nn.Module]:
        return {"dit": self.model}

    def attention_shape(self) -> AttentionShape:
        c = self.cfg
        return AttentionShape(c.depth, c.heads, c.heads, c.head_dim, (c.size // c.patch) ** 2, self.dtype.itemsize)


def _with_branch(spec: ForwardSpec, kv, name: str) -> ForwardSpec:
    if kv is None:
        return spec
    from dataclasses import replace

    return replace(spec, kv=kv.branch(name))


def check_prompt(prompt: str, vocab) -> None:
    """The tiny model knows only its vocabulary's words (index 0 is padding, not passed here)."""
    unknown = [w for w in prompt.lower().split() if w not in set(vocab)]
    if unknown:
        raise ConfigError(f"prompt: unknown word(s) {unknown} for the tiny model; its vocabulary: {' '.join(sorted(vocab))}")


def tiny_metadata(raw: dict) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(heads,), vocabulary of a tiny spec from its JSON (or arch), without loading weights."""
    spec = parse(TinySpec, raw, "model.", "tiny")
    if spec.weights == "random":
        cfg = tiny_arch(spec.arch or {}, "model.arch.")
    else:
        meta_path = weights_path(raw).with_suffix(".json")
        try:
            cfg = tiny_arch(json.loads(meta_path.read_text())["model"], "")
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ConfigError):
            return None, None  # the load names the problem with the weights
    return (cfg.heads,), tuple(cfg.vocab[1:])


def tiny_arch(raw: object, where: str) -> TinyDiTConfig:
    """TinyDiTConfig from a mapping (a weights JSON's `model`, or `arch:`), typed and shape-checked,
    so a bad value is one line naming `where` + the field, not a traceback from inside the network."""
    cfg = build(TinyDiTConfig, raw, where, "the tiny model")
    problem = cfg.problem()
    if problem:
        raise ConfigError(f"{where}{problem[0]}: {problem[1]}")
    return cfg


def check_shift(shift: object, where: str) -> float:
    """A weights JSON's flow time shift: a number in SHIFT_RANGE (0 divides by zero in shifted_sigmas)."""
    lo, hi = SHIFT_RANGE
    ok = isinstance(shift, (int, float)) and not isinstance(shift, bool) and lo <= shift <= hi
    if not ok:
        raise ConfigError(f"{where}: must be a number from {lo:g} to {hi:g} (the flow time shift), got {shift!r}")
    return float(shift)


def weights_path(spec: dict) -> Path:
    """The safetensors file a `model:` spec names (`weights: bundled` or a path); its config is beside it."""
    weights = spec.get("weights", "bundled")
    if weights == "random":
        raise ConfigError("model.weights: random names no weights file")
    return BUNDLED / "tiny.safetensors" if weights == "bundled" else Path(weights)


def load_tiny(path: Path) -> tuple[TinyDiT, dict]:
    """Load tiny weights + their JSON config, checking every tensor's name, shape and dtype."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.is_file():
        raise CheckpointError(f"tiny weights not found: {path} (train them with `scopevid train`, or set model.weights: random)")
    if not meta_path.is_file():
        raise CheckpointError(f"tiny weights {path} lack their config {meta_path}")
    try:
        meta = json.loads(meta_path.read_text())
        section = meta["model"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{meta_path}: not a tiny model config ({e})") from None
    try:
        cfg = tiny_arch(section, f"{meta_path}: model.")
        check_shift(meta.get("shift", 3.0), f"{meta_path}: shift")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"{path}: cannot read safetensors ({e})") from None
    model = TinyDiT(cfg)
    expected = model.state_dict()
    for name, ref in expected.items():
        if name not in state:
            raise CheckpointError(f"{path}: missing tensor {name!r}")
        got = state[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
        if got.dtype != ref.dtype:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {got.dtype}, expected {ref.dtype}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor {extra[0]!r}")
    model.load_state_dict(state)
    return model, meta
