"""`plan(cfg)`: will this job fit, what does it cost, what moves: per rank, from the dry run.

Memory per rank (bytes):
- weights: every network the adapter keeps on the device (`Adapter.modules()`), at its dtypes, as
  built on meta from the checkpoint's own configs; replicated on every rank (sequence parallelism
  splits activations, not weights).
- text encoding: the encoder's activations (a phase before the rollout).
- rollout peak: everything live at the busiest moment of the first window, measured by
  `meta.MetaRun` on rank 0's real code path: latents, velocity history, K/V cache, the forward's
  activations (attention as the fused kernels allocate it).
- decode: above the rollout's state, the stream decoder on the first frames.
- peak = weights + the largest phase. `text_on_device: false` takes the text encoder's weights and
  activations off (SkyReels-V2 `model.text_encoder_device: cpu`, the official `--offload` for T5).

FLOPs per video: the adapter's own count for every forward of the plan (Original: every iteration
forwards its compute interval, both branches), and a SCOPE preset's at its measured share of
Original's FLOPs (configs/bench/plan.yaml). Communication: cluster.comm's bytes per iteration per
mesh axis at the longest forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from scopevid.config import ParallelConfig, RunConfig
from scopevid.dryrun.window import WindowRun, run_window
from scopevid.mesh import implied_world

GIB = 2**30
GPU_GB = (24, 48, 80, 141)  # the GPU memory sizes the verdict is given for (RTX 4090 / L40S / H100 / H200)


def module_bytes(m: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))


@dataclass
class Plan:
    config: str
    model: str
    frames: int
    mesh: str
    dtype: str
    weights: dict[str, int]  # role -> bytes
    text_activation_bytes: int
    rollout_peak_bytes: int
    kv_bytes: int
    decode_bytes: int | None  # None: no decoder configured (MAGI-1 without model.vae), not counted
    text_on_device: bool
    flops_original: float
    flops_scope: dict[str, float] = field(default_factory=dict)  # preset -> FLOPs at its measured share
    comm_bytes_per_iteration: dict[str, int] = field(default_factory=dict)
    window: WindowRun | None = None

    @property
    def weight_bytes(self) -> int:
        return sum(v for k, v in self.weights.items() if self.text_on_device or k != "text_encoder")

    @property
    def peak_bytes(self) -> int:
        text = self.text_activation_bytes if self.text_on_device else 0
        state = self.window.state_bytes if self.window else 0
        return self.weight_bytes + max(text, self.rollout_peak_bytes, state + (self.decode_bytes or 0))

    def verdicts(self) -> dict[str, str]:
        need = self.peak_bytes / GIB
        return {f"{g} GB": ("fits" if need <= g * 0.95 else "does not fit") + f" ({need:.1f} of {g} GiB, 5% kept free)" for g in GPU_GB}

    def to_dict(self) -> dict:
        w = self.window
        return {
            "config": self.config, "model": self.model, "frames": self.frames, "mesh": self.mesh, "dtype": self.dtype,
            "weights_gib": {k: v / GIB for k, v in self.weights.items()}, "text_on_device": self.text_on_device,
            "text_activations_gib": self.text_activation_bytes / GIB, "rollout_peak_gib": self.rollout_peak_bytes / GIB,
            "kv_cache_gib": self.kv_bytes / GIB, "decode_gib": None if self.decode_bytes is None else self.decode_bytes / GIB, "peak_gib": self.peak_bytes / GIB,
            "flops_original_pflops": self.flops_original / 1e15,
            "flops_scope_pflops": {k: v / 1e15 for k, v in self.flops_scope.items()},
            "comm_mib_per_iteration": {k: v / 2**20 for k, v in self.comm_bytes_per_iteration.items()},
            "verdicts": self.verdicts(),
            "dry_run": None if w is None else {"iterations": w.iterations, "forwards": w.forwards, "seconds": w.seconds,
                                               "peak_frames": w.peak_frames, "scalar_reads": w.scalar_reads},
        }


def video_flops(cfg: RunConfig, adapter) -> float:
    """Original's FLOPs for the whole video: every iteration of the plan forwards its compute
    interval (with the K/V context a causal model attends), both guidance branches."""
    from scopevid.engine import runner

    plan = runner.build_plan(cfg, adapter)
    branches = 2 if cfg.guidance > 1.0 else 1
    causal = adapter.capabilities.causal
    total = 0.0
    for it in plan.iterations():
        lo, hi = it.compute
        total += adapter.flops(hi - lo, len(it.context) if causal else 0, None, branches)
    return total


def plan(cfg: RunConfig, *, config_name: str = "", mesh: ParallelConfig | None = None, steps: int | None = None,
         shares: dict[str, float] | None = None, text_on_device: bool | None = None) -> Plan:
    from scopevid import adapters
    from scopevid.cluster import comm

    given = mesh or cfg.parallel
    mesh = adapters.preflight(cfg, implied_world(given), parallel=given)  # the one check of a mesh (one video's ranks)
    adapter, w = run_window(cfg, mesh=mesh, steps=steps)
    weights = {role: module_bytes(m) for role, m in adapter.modules().items()}
    if text_on_device is None:
        text_on_device = str(cfg.model.get("text_encoder_device") or "").lower() != "cpu"
    guided = cfg.guidance > 1.0
    original = video_flops(cfg, adapter)
    n_pad, _ = mesh.shard(w.peak_frames, 0)
    frame_elems = adapter.latent_channels * adapter.latent_hw[0] * adapter.latent_hw[1]
    traffic = comm.forward_bytes(adapter.attention_shape(), mesh, n_pad, stores=adapter.capabilities.causal,
                                 frame_elems=frame_elems, guided=guided) if n_pad else {}
    name = mesh.label if mesh.world > 1 else "1 GPU"
    return Plan(config=config_name, model=str(cfg.model.get("kind")), frames=cfg.frames, mesh=name, dtype=cfg.dtype,
                weights=weights, text_activation_bytes=w.text_peak_bytes, rollout_peak_bytes=w.rollout_peak_bytes,
                kv_bytes=w.kv_bytes, decode_bytes=w.decode_peak_bytes, text_on_device=text_on_device,
                flops_original=original, flops_scope={k: original * v for k, v in (shares or {}).items()},
                comm_bytes_per_iteration={k: v for k, v in traffic.items() if v}, window=w)
