"""`scopevid bench comm [--config configs/bench/comm_projection.yaml] --out DIR`: the communication
model at published sizes, projected to 8-64 GPUs. Not a measurement: a projection.

For every model of the YAML, the real adapter is built on torch's meta device (its modules at full
size, nothing allocated) for its AttentionShape and FLOPs; `cluster.comm.forward_bytes` gives the
bytes each rank sends per denoising iteration on every mesh axis (the formulas the gloo tests match
byte for byte against counted collectives), and the YAML's links turn bytes into seconds
(bandwidth, and latency per collective call; NVLink inside a node, InfiniBand between nodes; no
overlap of communication with compute). Every mesh this engine runs on N GPUs is scored for one
video's latency (iteration seconds) and for throughput over many videos (videos per GPU-hour
against one GPU per video). Memory is not modelled here: a mesh with dp = N needs the model to fit
one GPU (`scopevid plan` says whether it does).

DIR/comm.parquet (one row per model, GPU count and mesh), DIR/comm.md (the tables of
docs/COMM_MODEL.md), and the tables on stdout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from scopevid.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/bench/comm_projection.yaml", help="models, links and compute rate")
    p.add_argument("--out", required=True, help="output directory (must be new or empty)")
    p.add_argument("--overwrite", action="store_true")


def _spec(model: dict, base: Path) -> dict:
    out = dict(model)
    if "path" in out:
        out["path"] = str((base / out["path"]).resolve())
    return out


def rows_for(entry: dict, base: Path, cfg: dict) -> list[dict]:
    import torch

    from scopevid import adapters
    from scopevid.cluster import comm

    a = adapters.load(_spec(entry["model"], base), "meta", torch.bfloat16)
    shape = a.attention_shape()
    frame_elems = a.latent_channels * a.latent_hw[0] * a.latent_hw[1]
    links = {k: comm.Link(v["name"], float(v["bandwidth_gb_s"]), float(v["latency_us"])) for k, v in cfg["links"].items()}
    rows = []
    for n in cfg["gpu_counts"]:
        for mesh in comm.meshes_for(int(n), shape, bool(entry["guided"])):
            r = comm.project(shape, lambda f, c, b: a.flops(f, c, None, b), mesh, window=int(entry["window_frames"]),
                             context=int(entry.get("context_frames", 0)), guided=bool(entry["guided"]),
                             stores=bool(entry["stores"]), frame_elems=frame_elems, links=links,
                             gpus_per_node=int(cfg["gpus_per_node"]), tflops=float(cfg["compute_tflops"]))
            rows.append({"model": entry["name"], "heads": shape.heads, "kv_heads": shape.kv_heads,
                         "tokens_per_frame": shape.tokens_per_frame, "window_frames": int(entry["window_frames"]), **r})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        r0 = mine[0]
        lines += [f"### {model} ({r0['heads']} heads / {r0['kv_heads']} K/V, {r0['tokens_per_frame']} tokens a frame, "
                  f"{r0['window_frames']} frames a window)", "",
                  "Bytes each rank sends per iteration (both guidance branches), 8 GPUs on one video:", "",
                  "| mesh | ulysses all-to-all | ring K/V | ring store | velocity gather | cfg exchange | total | "
                  "comm s | compute s |", "|---|---|---|---|---|---|---|---|---|"]
        eight = sorted((r for r in mine if r["gpus"] == 8 and r["gpus_per_video"] == 8), key=lambda r: r["iteration_seconds"])
        for r in eight[:6]:
            lines.append(f"| {_short(r['mesh'])} | {_mb(r['bytes_ulysses'])} | {_mb(r['bytes_ring'])} | "
                         f"{_mb(r['bytes_ring_store'])} | {_mb(r['bytes_gather'])} | {_mb(r['bytes_cfg'])} | "
                         f"{_mb(r['bytes_per_rank'])} | {r['comm_seconds']:.3f} | {r['compute_seconds']:.3f} |")
        lines += ["", "Best mesh per GPU count (one video: lowest iteration time; many videos: most videos per GPU-hour; "
                  "(IB): some traffic crosses nodes):", "",
                  "| GPUs | fastest one video | iteration s | speedup vs 1 GPU | most throughput | efficiency | "
                  "best sequence-parallel-only mesh | its efficiency |", "|---|---|---|---|---|---|---|---|"]
        for n in sorted({r["gpus"] for r in mine}):
            at = [r for r in mine if r["gpus"] == n]
            fast = min(at, key=lambda r: r["iteration_seconds"])
            thr = max(at, key=lambda r: r["throughput_efficiency"])
            one = max((r for r in at if r["gpus_per_video"] == n), key=lambda r: r["throughput_efficiency"])
            lines.append(f"| {n} | {_short(fast['mesh'])}{_ib(fast)} | {fast['iteration_seconds']:.3f} | {fast['latency_speedup']:.1f}x | "
                         f"{_short(thr['mesh'])} | {thr['throughput_efficiency']:.2f} | {_short(one['mesh'])}{_ib(one)} | "
                         f"{one['throughput_efficiency']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def _ib(r: dict) -> str:
    return " (IB)" if r["crosses_nodes"] else ""


def _short(mesh: str) -> str:
    return "1 GPU" if mesh == "1" else mesh


def _mb(b: float) -> str:
    return "-" if not b else f"{b / 2**20:.0f} MiB" if b >= 2**20 else f"{b / 2**10:.0f} KiB"


def main(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from scopevid.engine.sinks import prepare_out_dir

    path = Path(args.config)
    if not path.is_file():
        raise ConfigError(f"--config: no such file {path}")
    cfg = yaml.safe_load(path.read_text())
    for key in ("gpus_per_node", "gpu_counts", "compute_tflops", "links", "models"):
        if key not in cfg:
            raise ConfigError(f"{path}: missing {key!r}")
    out = prepare_out_dir(args.out, args.overwrite)
    rows = [r for entry in cfg["models"] for r in rows_for(entry, path.parent, cfg)]
    pq.write_table(pa.Table.from_pylist(rows), out / "comm.parquet")
    text = markdown(rows)
    (out / "comm.md").write_text(text + "\n")
    print(text)
    return 0
