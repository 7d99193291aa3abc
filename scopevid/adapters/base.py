"""The adapter protocol: the one seam every model family plugs into.

An adapter turns (latents of the frames to forward, their sigmas, prompt conditioning, clean K/V
context) into a guided velocity for those frames, and offers a cheap host feature for SCOPE.
Adapters never import engine or cluster: what they need from them arrives as arguments:

- a `ForwardSpec` says which absolute frames the forward covers, what clean context it attends
  from the KV cache and which of its frames' K/V to store;
- an `Attention` callable does the attention. The default (`local_attention`) runs SDPA on one
  process; cluster.sequence wraps the same function in the Ulysses all-to-all (cluster.ulysses), so the model
  code is identical on one rank or many.

Shapes: latents of one forward are [F, C, H, W] (no batch axis: one video at a time); attention
tensors are [B, S, heads, head_dim] with S = frames * tokens_per_frame.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, ClassVar, Mapping, Protocol

import torch

from scopevid.adapters.attention import kernel as attention_kernel
from scopevid.errors import ConfigError
from scopevid.scheduler.signals import Feature

__all__ = ["Adapter", "Attention", "Capabilities", "Conditioning", "Feature", "ForwardHooks", "ForwardSpec", "GroupDecoder",
           "HookContext", "HookPoint", "KVStore", "NoiseSchedule", "StreamDecoder", "VideoFacts", "local_attention"]


class KVStore(Protocol):
    """Clean-context K/V per CFG branch, layer and absolute frame (engine.kvcache implements it).
    `branch(name)` is the view of one CFG branch ("cond" | "uncond"); get/put act on the current one."""

    def get(self, layer: int, frames: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None: ...

    def put(self, layer: int, frame: int, k: torch.Tensor, v: torch.Tensor) -> None: ...

    def branch(self, name: str) -> "KVStore": ...


@dataclass
class ForwardSpec:
    """What one forward covers. Frame lists are of the full sequence (all shards, in order)."""

    frames: list[int]  # absolute latent index of every forwarded frame; -1 marks padding
    origin: int = 0  # absolute index that gets temporal position 0 (RoPE); positions = frame - origin
    step: int = 0  # the iteration's index within its window (the official pipelines' step counter)
    context: list[int] = field(default_factory=list)  # clean frames attended from `kv`, oldest first
    store: frozenset[int] = frozenset()  # forwarded frames whose K/V go into `kv` (they are clean)
    kv: KVStore | None = None
    causal: bool = True  # block-causal over frames (a frame attends to itself and earlier frames)
    shard: tuple[int, int] | None = None  # [lo, hi) of `frames` held by this process (None: all)
    # Optional, full sequence like `frames` (one entry per forwarded frame, padding included):
    sigmas: tuple[float, ...] | None = None  # each frame's noise level, so every shard knows every frame's
    # (an adapter derives per-frame attention ranges or conditioning from it identically on all ranks)
    key_ranges: tuple[tuple[int, int], ...] | None = None  # absolute [lo, hi) of key frames (cached context
    # or forwarded) each frame may attend; replaces the `causal` rule when set (MAGI-1's per-chunk kv_range)
    kernel: str = "sdpa"  # the self-attention backend of the run (adapters.attention)

    def local_frames(self) -> list[int]:
        lo, hi = self.shard if self.shard is not None else (0, len(self.frames))
        return self.frames[lo:hi]

    def local_positions(self) -> list[int]:
        """Temporal RoPE positions of this process's frames (padding gets 0; its output is dropped)."""
        return [f - self.origin if f >= 0 else 0 for f in self.local_frames()]


Attention = Callable[..., torch.Tensor]  # (q, k, v, layer: int, spec: ForwardSpec) -> out, all [B, S, h, d]


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, spec: ForwardSpec,
                    queries: tuple[int, int] | None = None) -> torch.Tensor:
    """Attention over one process's heads for the whole sequence of `spec.frames`.

    Stores the K/V of `spec.store` frames, prepends the cached K/V of `spec.context` frames, and
    applies the frame mask: with `causal`, a query frame sees key frames with index <= its own. Under
    Ulysses this runs between the two all-to-alls, so the KV cache holds this rank's heads for every
    frame and no K/V ever moves between ranks. `queries`: the [lo, hi) slots of `spec.frames` that q
    holds (a ring part; default all), k/v always hold every slot.

    Padding frames (index -1, at the end: the shard rule pads there) are cut from keys and queries
    before the kernel runs, so every query row meets exactly the keys, and the kernel exactly the
    shapes, of the unsharded forward: a kernel's softmax and P @ V reduce over the key length, and
    masked padding keys changed their rounding, hence a sharded video's bits (issue 24).

    Grouped-query attention: k/v may carry fewer heads than q (a divisor); they are cached as given
    and query head h reads K/V head h // (q heads / K/V heads). With `spec.key_ranges`, query frames
    are grouped by range and each group attends exactly its key frames (no dense mask).
    """
    h = q.shape[2]
    nf = len(spec.frames)
    qlo, qhi = queries if queries is not None else (0, nf)
    tpf = k.shape[1] // nf  # tokens per frame
    if spec.kv is not None and spec.store:
        for i, f in enumerate(spec.frames):
            if f in spec.store:
                sl = slice(i * tpf, (i + 1) * tpf)
                # clones: a view would pin the whole forward's K/V for as long as the frame stays cached
                spec.kv.put(layer, f, k[:, sl].detach().clone(), v[:, sl].detach().clone())
    key_frames = list(spec.frames)
    if spec.context:
        if spec.kv is None:
            raise ValueError("ForwardSpec.context needs a KV store")
        got = spec.kv.get(layer, spec.context)
        if got is None:
            raise KeyError(f"KV cache lacks context frames {spec.context[0]}..{spec.context[-1]} at layer {layer}")
        kc, vc = got
        k = torch.cat([kc.to(k.dtype), k], dim=1)
        v = torch.cat([vc.to(v.dtype), v], dim=1)
        key_frames = list(spec.context) + key_frames
    if k.shape[2] != h:  # GQA: expand K/V heads after the cache, which keeps them compact
        if h % k.shape[2]:
            raise ValueError(f"{h} query heads are not a multiple of {k.shape[2]} key/value heads")
        k = k.repeat_interleave(h // k.shape[2], dim=2)
        v = v.repeat_interleave(h // v.shape[2], dim=2)
    if spec.key_ranges is not None:
        return _ranged_attention(q, k, v, spec, key_frames, tpf, qlo, qhi)
    keys = len(key_frames) - sum(1 for f in spec.frames if f < 0)  # real key frames (padding trails)
    rows = sum(1 for f in spec.frames[qlo:qhi] if f >= 0)  # real query frames of this part
    if rows == 0:
        return torch.zeros_like(q)
    qf = torch.tensor(spec.frames[qlo : qlo + rows], device=q.device).repeat_interleave(tpf)
    kf = torch.tensor(key_frames[:keys], device=q.device).repeat_interleave(tpf)
    allowed = (kf >= 0)[None, :].expand(qf.numel(), -1)
    if spec.causal:
        allowed = allowed & (kf[None, :] <= qf[:, None])
    qs, ks, vs = q[:, : rows * tpf], k[:, : keys * tpf], v[:, : keys * tpf]
    out = attention_kernel(spec.kernel)(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2), allowed).transpose(1, 2)
    if rows * tpf < q.shape[1]:  # padding queries get zeros: their outputs are dropped
        out = torch.cat([out, out.new_zeros(out.shape[0], q.shape[1] - rows * tpf, *out.shape[2:])], dim=1)
    return out


def _ranged_attention(q, k, v, spec: ForwardSpec, key_frames: list[int], tpf: int, qlo: int, qhi: int) -> torch.Tensor:
    """Attention where query frame i (a slot in [qlo, qhi), q's rows) sees the keys of frames in
    spec.key_ranges[i] (padding never). Consecutive query frames with the same range form one SDPA
    call over their key tokens."""
    if len(spec.key_ranges) != len(spec.frames):
        raise ValueError(f"ForwardSpec.key_ranges has {len(spec.key_ranges)} entries for {len(spec.frames)} frames")
    kf = torch.tensor(key_frames, device=q.device)
    out = torch.zeros_like(q)
    i, n = qlo, qhi
    while i < n:
        j = i
        while j < n and spec.key_ranges[j] == spec.key_ranges[i] and (spec.frames[j] < 0) == (spec.frames[i] < 0):
            j += 1
        if spec.frames[i] >= 0:  # padding queries keep zeros: their outputs are dropped
            lo, hi = spec.key_ranges[i]
            sel = ((kf >= lo) & (kf < hi) & (kf >= 0)).nonzero().squeeze(1)
            if sel.numel() == 0:
                raise ValueError(f"frame {spec.frames[i]} attends no key frame in [{lo}, {hi})")
            a, b = int(sel[0]), int(sel[-1]) + 1
            if b - a == sel.numel():  # contiguous key frames (the usual case): a view, no gather
                ks, vs = k[:, a * tpf : b * tpf], v[:, a * tpf : b * tpf]
            else:
                tok = (sel[:, None] * tpf + torch.arange(tpf, device=q.device)[None]).reshape(-1)
                ks, vs = k[:, tok], v[:, tok]
            rows = slice((i - qlo) * tpf, (j - qlo) * tpf)
            qs = q[:, rows].transpose(1, 2)
            o = attention_kernel(spec.kernel)(qs, ks.transpose(1, 2), vs.transpose(1, 2), None)
            out[:, rows] = o.transpose(1, 2)
        i = j
    return out


@dataclass
class Conditioning:
    """Encoded prompt(s). `cond`/`uncond` are model-specific tensors; `guidance` the CFG scale;
    `branches` the forwards one velocity takes: 2 with classifier-free guidance (then `uncond` is set
    and the engine combines the branches with `Adapter.guide`), else 1."""

    cond: Any
    uncond: Any = None
    guidance: float = 1.0
    branches: int = 1


class HookPoint(str, Enum):
    """Where an adapter calls forward hooks (see ForwardHooks below)."""

    STACK = "stack"  # hooks.stack(ctx, h, run_stack) around the whole block stack
    BLOCK = "block"  # hooks.block(ctx, layer, h, run, apply) around every block


@dataclass(frozen=True)
class Capabilities:
    """What an adapter offers beyond the required methods; the engine reads only this, never probes.

    causal: block-causal over frames with a KV cache. The engine then serves clean frames as cached
      K/V context (selective computation is exact) and runs the clean re-forward that fills it.
    hook_points: where `velocity(..., hooks=)` calls ForwardHooks (the baselines' in-forward reuse).
    features: the signals `named_feature` accepts, besides Feature.HOST.
    batched_branches: `branches_velocity` runs the guidance branches as one batch (cfg_mode: batched).
    """

    causal: bool = False
    hook_points: frozenset[HookPoint] = frozenset()
    features: frozenset[Feature] = frozenset()
    batched_branches: bool = False  # `branches_velocity`: both guidance branches in one batched forward


@dataclass(frozen=True)
class AttentionShape:
    """What one forward's self-attention moves per token under sequence parallelism (the comm model,
    cluster.comm, reads only this): q and out carry `heads`, k and v `kv_heads` of `head_dim` each,
    `element_bytes` wide; `layers` self-attentions per forward. Cross-attention keys (text) are
    replicated on every rank and never travel."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tokens_per_frame: int
    element_bytes: int


@dataclass(frozen=True)
class VideoFacts:
    """Everything an adapter may need to know about one video, given once before its first forward."""

    num_steps: int  # T denoising steps
    latent_frames: int
    unit: int  # latent frames per causal block (diffusion forcing) or chunk (chunk-causal)
    chunked: bool  # a chunk-causal plan (MAGI-1's pipeline) rather than diffusion forcing windows
    prefixes: Mapping[int, int] = field(default_factory=dict)  # window origin -> clean prefix frames


@dataclass(frozen=True)
class NoiseSchedule:
    """The model's noise levels for one video (what `Adapter.prepare` returns)."""

    sigmas: tuple[float, ...]  # T+1 levels from pure noise to clean, the model's own (with its shift)
    noise: float  # the level of a frame that has not started (SkyReels-V2: 1.0 -> timestep 999)
    clean: float  # the level a clean frame is forwarded at (clean re-forward; MAGI-1: 1 - 0.9999)


class StreamDecoder(Protocol):
    """Decodes latents as they finish, in order; its state is checkpointed with the rollout."""

    def push(self, latent: torch.Tensor) -> torch.Tensor | None: ...

    def flush(self) -> torch.Tensor | None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class GroupDecoder:
    """The default StreamDecoder: `adapter.decode` on groups of `group` latents (frame-wise decoders)."""

    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor], group: int = 8):
        self.decode, self.group, self.buf = decode, group, []

    def push(self, latent: torch.Tensor) -> torch.Tensor | None:
        self.buf.append(latent)
        return self.flush() if len(self.buf) >= self.group else None

    def flush(self) -> torch.Tensor | None:
        if not self.buf:
            return None
        x, self.buf = torch.stack(self.buf), []
        with torch.no_grad():
            return self.decode(x)

    def state_dict(self) -> dict:
        return {"buf": list(self.buf)}

    def load_state_dict(self, state: dict) -> None:
        self.buf = list(state["buf"])


class Adapter(ABC):
    """What the engine needs from a model family: the whole contract, declared.

    Required: `prepare` (per video, first), `encode_prompt`, `host_feature`, `branch_velocity`, `decode`,
    `flops`, and the attributes below. Optional, with defaults here: `named_feature`,
    `stream_decoder`, `solver_options`, and `capabilities`. Calls carry every per-video fact in
    `prepare` and every per-forward fact in arguments, so no method depends on the order of others
    (encode_prompt is pure; velocity reads only what prepare set).
    """

    name: ClassVar[str]
    capabilities: Capabilities = Capabilities()  # a class default; an adapter may set its own per instance
    latent_channels: int
    latent_hw: tuple[int, int]
    temporal_compression: int  # pixel frames per latent frame after the first

    @abstractmethod
    def prepare(self, video: VideoFacts) -> NoiseSchedule:
        """Start a video: take its facts, return its noise levels. Called once before any forward;
        calling it again starts another video (all per-video state is reset)."""

    @abstractmethod
    def encode_prompt(self, prompt: str, negative: str | None, guidance: float) -> Conditioning:
        """Text -> conditioning. Pure: no adapter state changes."""

    @abstractmethod
    def host_feature(self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, spec: ForwardSpec) -> torch.Tensor:
        """SCOPE's pre-forward signal per frame, [F, ...]: cheap, computed without the block stack."""

    @abstractmethod
    def branch_velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, branch: str, spec: ForwardSpec,
        attention: Attention, hooks: "ForwardHooks | None" = None,
    ) -> torch.Tensor:
        """One guidance branch's velocity [F, C, H, W] in the model dtype, for exactly the frames given:
        `branch` "cond" (the prompt) or "uncond" (the negative prompt). The engine decides where the
        branches run (one after the other here, or on two rank groups) and combines them with `guide`.
        `hooks` only when `capabilities.hook_points` is not empty."""

    def branches_velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, spec: ForwardSpec, attention: Attention,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) velocities of one batched forward, model dtype; only with
        `capabilities.batched_branches`."""
        raise ConfigError(f"parallel.cfg_mode: batched needs a model that batches its guidance branches; {self.name} "
                          "does not (use sequential)")

    def guide(self, v_cond: torch.Tensor, v_uncond: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Classifier-free guidance v_u + g (v_c - v_u), in the model dtype as the pipelines combine."""
        return v_uncond + cond.guidance * (v_cond - v_uncond)

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, spec: ForwardSpec,
        attention: Attention = local_attention, hooks: "ForwardHooks | None" = None,
    ) -> torch.Tensor:
        """Guided velocity [F, C, H, W] float32, both branches here, one after the other."""
        v = self.branch_velocity(x, sigma, cond, "cond", spec, attention, hooks)
        if cond.branches == 2:
            v = self.guide(v, self.branch_velocity(x, sigma, cond, "uncond", spec, attention, hooks), cond)
        return v.float()

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latent frames [F, C, H, W] -> pixels [F', H', W', 3] float in [0, 1]."""

    @abstractmethod
    def modules(self) -> dict[str, "torch.nn.Module"]:
        """The networks that live on the run's device, by role ("dit", "text_encoder", "vae"): what
        the planner sizes. A network kept elsewhere (MAGI-1's T5 runs on the CPU) is not listed."""

    @abstractmethod
    def attention_shape(self) -> AttentionShape:
        """The self-attention's sizes (for the communication model and the planner)."""

    @abstractmethod
    def flops(self, frames: int, context: int, blocks: int | None = None, branches: int = 1) -> float:
        """Analytic FLOPs of one velocity call on `frames` frames attending `context` cached frames,
        `blocks` of the stack run per frame (None: all), `branches` CFG forwards."""

    def named_feature(self, kind: Feature, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning,
                      spec: ForwardSpec) -> torch.Tensor:
        """A signal of `capabilities.features`, per frame [F, ...]."""
        raise ConfigError(f"feature: model {self.name} offers no pre-forward signal besides host, not {Feature(kind).value!r}")

    def stream_decoder(self) -> StreamDecoder:
        """How finished latents become pixels as the video goes (temporal VAEs bring their own)."""
        return GroupDecoder(self.decode)

    def solver_options(self) -> dict | None:
        """Settings of the model's own multistep solver (`solver: unipc`); None: UniPC's defaults."""
        return None


# --- forward hooks (feature/residual reuse inside the model) -------------------------------------
#
# Whole-velocity reuse (SCOPE's Cache/Predict) needs nothing from an adapter. The baselines reuse
# pieces *inside* the forward: TeaCache the block stack's residual, TaylorSeer per-block module
# outputs, Delta-DiT a block range's delta. An adapter that supports this declares the hook points
# it calls in `capabilities.hook_points` (HookPoint.STACK: hooks.stack(ctx, h, run_stack) around its
# block stack; HookPoint.BLOCK: inside run_stack, hooks.block(ctx, layer, h, run, apply) per block),
# accepts `hooks=` in `velocity`, and counts `flops(..., blocks=k)` for a forward that ran k blocks.
# The engine refuses a policy whose needs an adapter does not declare, naming what is missing.
#
# Hidden states given to hooks are frame-major [F, tokens, dim] over `ctx.frames` (this process's
# frames, absolute indices), so hook state can be kept per absolute frame and CFG branch.


@dataclass(frozen=True)
class HookContext:
    branch: str  # CFG branch: "cond" | "uncond"
    frames: tuple[int, ...]  # absolute latent index of each row of h
    depth: int  # blocks in the stack
    modules: tuple[str, ...] = ("attn", "mlp")  # the keys of a block's module outputs (see block)


class ForwardHooks:
    """Base class: both hook points run the model unchanged. Subclasses override one or both.

    stack(ctx, h, run) -> h_out: run(h) runs every block; return its result or a replacement.
    block(ctx, layer, h, run, apply) -> h_out: run(h) -> (h_out, outs) runs block `layer` and also
    returns its module outputs before their gates, one [F, T, D] per name in ctx.modules ({"attn",
    "mlp"} on the tiny model; Wan blocks add "cross", their ungated cross-attention);
    apply(h, outs) adds given module outputs to h with the *current* step's gates.
    """

    partial = False  # True when some blocks may not run (no K/V is written then: see engine.reuse)
    blocks_run: int | None = None  # blocks run per frame by the last forward, for FLOPs (None: all)
    depth: int = 1  # the stack's depth, as seen by the last forward

    def adjust(self, spec: ForwardSpec) -> ForwardSpec:
        """The spec the forward runs with (FlowCache widens context and K/V store); default unchanged."""
        return spec

    def stack(self, ctx: HookContext, h: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return run(h)

    def block(self, ctx: HookContext, layer: int, h: torch.Tensor, run, apply) -> torch.Tensor:
        return run(h)[0]
