"""The communication model: bytes each rank sends per forward on every mesh axis, and what that
costs on a given link.

The byte counts are exact, not estimates: they are what `cluster.sequence` and `cluster.ring` put
on the wire for a forward of `n_pad` frames (the padded sequence), and the gloo tests check them
against the counters of real runs (tests/test_comm_model.py). Evaluated at a published model's
sizes (its `AttentionShape`), they give the per-iteration volumes of docs/COMM_MODEL.md; the times
there are volume / bandwidth + messages x latency on a stated link, a projection, not a measurement.

Kinds (Group.sent_bytes keys):
- ulysses: the four all-to-alls of every self-attention (q, k, v scattered over heads, out back);
  a rank keeps 1/U of each tensor and sends the rest.
- ring: K/V blocks passed one hop per ring step (R - 1 steps per self-attention).
- ring_store: the all-gather of a forward's K/V over the ring when it stores K/V (causal models).
- gather: the all-gather of the guided velocities over the sequence ranks (float32), once a forward.
- cfg: one branch's velocity rows to the other guidance branch's rank, once a forward.
- handover: per-frame state moved when the shard layout changes (data-dependent; measured, not modelled).
"""

from __future__ import annotations

from dataclasses import dataclass

from scopevid.adapters.base import AttentionShape
from scopevid.mesh import MeshLayout, valid_meshes

KINDS = ("ulysses", "ring", "ring_store", "gather", "cfg", "handover")
VELOCITY_BYTES = 4  # the engine gathers guided velocities in float32


def passes(mesh: MeshLayout, guided: bool) -> int:
    """Passes of the block stack per forward on one rank: both guidance branches, or (cfg=2) its own."""
    return (2 if guided else 1) if mesh.cfg == 1 else 1


def forward_bytes(shape: AttentionShape, mesh: MeshLayout, n_pad: int, *, stores: bool, frame_elems: int,
                  guided: bool = True, rows: int | None = None, branch_bytes: int | None = None) -> dict[str, int]:
    """Bytes one rank sends in one forward of `n_pad` frames (divisible by ring x ulysses) under
    `mesh`. `stores`: the forward writes K/V (ring_store); `frame_elems`: velocity elements per
    latent frame; `rows`: query rows (tokens) through self-attention on this rank over the forward,
    by default layers x passes x its tokens (an adapter may run more, e.g. MAGI-1 distill's copy of
    a chunk); `branch_bytes`: the element size of one branch's velocity (default the attention's)."""
    U, R = mesh.ulysses, mesh.ring
    S = U * R
    if n_pad % S:
        raise ValueError(f"n_pad {n_pad} is not divisible by the {S} sequence ranks")
    per = n_pad // S  # frames a rank holds
    if rows is None:
        rows = shape.layers * passes(mesh, guided) * per * shape.tokens_per_frame
    b, hd = shape.element_bytes, shape.head_dim
    out = dict.fromkeys(KINDS[:-1], 0)
    if U > 1:  # per call q and out (heads) and k, v (kv_heads), each rank keeping 1/U: linear in rows
        out["ulysses"] = (U - 1) * rows * hd * (2 * shape.heads + 2 * shape.kv_heads) * b // U
    if R > 1:  # after Ulysses a ring rank holds U x its rows at kv_heads / U heads: rows x kv_heads again
        out["ring"] = (R - 1) * 2 * rows * shape.kv_heads * hd * b
        if stores:
            out["ring_store"] = (R - 1) * 2 * rows * shape.kv_heads * hd * b
    if S > 1:
        out["gather"] = (S - 1) * per * frame_elems * VELOCITY_BYTES
    if mesh.cfg == 2:
        out["cfg"] = per * frame_elems * (branch_bytes or b)
    return out


def messages(shape: AttentionShape, mesh: MeshLayout, *, stores: bool, guided: bool) -> dict[str, int]:
    """Collective calls (each pays the link latency at least once) per forward, by kind."""
    U, R = mesh.ulysses, mesh.ring
    calls = passes(mesh, guided) * shape.layers
    return {
        "ulysses": calls * 4 * (U > 1),
        "ring": calls * (R - 1) if R > 1 else 0,
        "ring_store": calls * 2 * (R > 1 and stores),
        "gather": int(U * R > 1),
        "cfg": int(mesh.cfg == 2),
    }


@dataclass(frozen=True)
class Link:
    """One GPU's share of an interconnect: bandwidth each way and per-message latency."""

    name: str
    bandwidth_gb_s: float
    latency_us: float

    def seconds(self, nbytes: float, calls: int) -> float:
        return nbytes / (self.bandwidth_gb_s * 1e9) + calls * self.latency_us * 1e-6


# --- projection -----------------------------------------------------------------------------------
def meshes_for(gpus: int, shape: AttentionShape, guided: bool) -> list[MeshLayout]:
    """Every mesh of `gpus` ranks this engine runs for the model (scopevid.mesh.valid_meshes: Ulysses
    dividing the query and K/V heads, cfg=2 only with two guidance branches), dp groups included."""
    return valid_meshes(gpus, (shape.heads, shape.kv_heads), guided, batch=True)


def _off_node(size: int, stride: int, gpus_per_node: int) -> float:
    """Share of a rank's peers in a group of `size` ranks `stride` apart that sit on other nodes
    (ranks fill nodes in order, groups aligned)."""
    if size == 1:
        return 0.0
    per_node = max(1, min(size, gpus_per_node // stride)) if stride < gpus_per_node else 1
    return (size - per_node) / (size - 1)


def project(shape: AttentionShape, flops, mesh: MeshLayout, *, window: int, context: int, guided: bool,
            stores: bool, frame_elems: int, links: dict[str, Link], gpus_per_node: int, tflops: float) -> dict:
    """One denoising iteration of one video under `mesh`: bytes and seconds per kind (no overlap of
    communication with compute), compute seconds, and throughput relative to one GPU per video.
    `flops(frames, context, branches)` is the adapter's count."""
    U, R, C = mesh.ulysses, mesh.ring, mesh.cfg
    S = U * R
    n_pad = -(-window // S) * S
    nbytes = forward_bytes(shape, mesh, n_pad, stores=stores, frame_elems=frame_elems, guided=guided)
    calls = messages(shape, mesh, stores=stores, guided=guided)
    nv, ib = links["nvlink"], links["infiniband"]
    off = {"ulysses": _off_node(U, 1, gpus_per_node),
           "ring": 1.0 if U * R > gpus_per_node and R > 1 else 0.0,  # lock-step hops: one crossing sets the pace
           "gather": _off_node(S, 1, gpus_per_node),
           "cfg": 1.0 if C == 2 and 2 * S > gpus_per_node else 0.0}
    off["ring_store"] = off["ring"]
    seconds = {}
    for kind, b in nbytes.items():
        f = off[kind]
        lat = (ib if f > 0 else nv).latency_us * 1e-6
        seconds[kind] = calls[kind] * lat + max(b * (1 - f) / (nv.bandwidth_gb_s * 1e9), b * f / (ib.bandwidth_gb_s * 1e9))
    branches = 2 if guided else 1
    compute = flops(n_pad, context, branches // C) / S / (tflops * 1e12)
    one_gpu = flops(window, context, branches) / (tflops * 1e12)
    comm_s = sum(seconds.values())
    iteration = compute + comm_s
    return {
        "mesh": mesh.label,
        "gpus": mesh.world, "gpus_per_video": C * S, "padded_frames": n_pad,
        "bytes_per_rank": sum(nbytes.values()), **{f"bytes_{k}": v for k, v in nbytes.items()},
        **{f"seconds_{k}": v for k, v in seconds.items()},
        "comm_seconds": comm_s, "compute_seconds": compute, "iteration_seconds": iteration,
        "latency_speedup": one_gpu / iteration,  # one video, against the same iteration on one GPU
        "throughput_efficiency": (mesh.dp / iteration) / (mesh.world / one_gpu),  # videos per GPU-hour vs 1 GPU each
        "crosses_nodes": any(off[k] > 0 for k in nbytes if nbytes[k]),
    }
