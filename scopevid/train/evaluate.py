"""Sampling and evaluation of the tiny model, independent of the engine.

- `sigmas(T, shift)`: the tiny adapter's schedule, sigma = shift*s / (1 + (shift-1)*s), s = 1..0.
- `sample_joint`: F frames denoised together at one shared level (block-causal, as in training).
- `sample_rollout`: chunk-causal rollout: each chunk is denoised with the last `window - chunk`
  clean frames as context (level 0), absolute frame positions kept (RoPE).
Both use flow-matching Euler and classifier-free guidance (cond and null prompt in one packed call).

    python -m scopevid.train.evaluate --weights scopevid/weights --run /work/runs/tiny --docs docs
writes the detector table (JSON), docs/img/tiny_samples.png and docs/img/tiny_loss.png.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from scopevid.adapters.tiny.model import TinyDiT
from scopevid.train import detector as D
from scopevid.train import world as W
from scopevid.train.loop import PackedAttention, packed_forward, prompt_vectors


def sigmas(steps: int, shift: float) -> torch.Tensor:
    s = torch.linspace(1.0, 0.0, steps + 1)
    return shift * s / (1 + (shift - 1) * s)


@torch.no_grad()
def guided_velocity(model: TinyDiT, x: torch.Tensor, sig: torch.Tensor, prompts: torch.Tensor, guidance: float, offset: int, attn: PackedAttention) -> torch.Tensor:
    """x [F, C, H, W], sig [F], prompts [2, dim] (cond, null) -> guided v [F, C, H, W]."""
    xb = torch.stack([x, x])
    v = packed_forward(model, xb, torch.stack([sig, sig]), prompts, [offset, offset], attn)
    return v[1] + guidance * (v[0] - v[1])


@torch.no_grad()
def sample_rollout(
    model: TinyDiT,
    prompt: str,
    frames: int,
    chunk: int = 4,
    window: int = 16,
    steps: int = 20,
    guidance: float = 2.0,
    shift: float = 1.0,
    seed: int = 0,
    first_chunk: int | None = None,
) -> torch.Tensor:
    """Frames [frames, C, H, W] in [-1, 1]. With chunk >= frames this is joint sampling."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    tok = W.tokenize(prompt, cfg.vocab, cfg.max_prompt)
    pv = prompt_vectors(model, torch.stack([tok, torch.zeros_like(tok)]))
    sg = sigmas(steps, shift)
    out: list[torch.Tensor] = []
    attn_cache: dict[int, PackedAttention] = {}
    n0 = first_chunk or chunk
    while len(out) < frames:
        n = min(n0 if not out else chunk, frames - len(out))
        ctx = out[max(0, len(out) - (window - n)) :]
        start = len(out) - len(ctx)
        f = len(ctx) + n
        attn = attn_cache.setdefault(f, PackedAttention(2, f))
        x = torch.randn(n, cfg.channels, cfg.size, cfg.size, generator=g)
        c = torch.stack(ctx) if ctx else x[:0]
        for k in range(steps):
            sig = torch.cat([torch.zeros(len(ctx)), torch.full((n,), float(sg[k]))])
            v = guided_velocity(model, torch.cat([c, x]), sig, pv, guidance, start, attn)[len(ctx) :]
            x = x + v * float(sg[k + 1] - sg[k])
        out.extend(x.clamp(-1, 1))
    return torch.stack(out)


def sample_joint(model: TinyDiT, prompt: str, frames: int = 16, **kw) -> torch.Tensor:
    return sample_rollout(model, prompt, frames, chunk=frames, window=frames, **kw)


def all_prompts(wcfg: W.WorldConfig) -> list[str]:
    return [W.prompt_text(c, d) for c in wcfg.colours for d in wcfg.directions]


def evaluate(model: TinyDiT, wcfg: W.WorldConfig, shift: float, guidance: float, per_prompt: int = 2, frames: int = 16, mode: str = "joint", steps: int = 20, seed: int = 0, **kw) -> tuple[dict, list]:
    clips = []
    for i, p in enumerate(all_prompts(wcfg)):
        for j in range(per_prompt):
            s = seed + 1000 * i + j
            if mode == "joint":
                x = sample_joint(model, p, frames, steps=steps, guidance=guidance, shift=shift, seed=s)
            else:
                x = sample_rollout(model, p, frames, steps=steps, guidance=guidance, shift=shift, seed=s, **kw)
            clips.append((x, p))
    return D.score_many(clips, wcfg), clips


def real_scores(wcfg: W.WorldConfig, n: int = 64, frames: int = 16, seed: int = 99) -> dict:
    return D.score_many([(c.frames, c.prompt) for c in W.clips(seed, n, frames, wcfg)], wcfg)


def contact_sheet(clips: list, path: str, frames: int = 12, scale: int = 3) -> None:
    """One row per clip (prompt on the left), `frames` frames each, upscaled with nearest."""
    from PIL import Image, ImageDraw

    rows = []
    for x, p in clips:
        rgb = (D.to_rgb01(x[:frames]) * 255).round().astype(np.uint8)  # [F, H, W, 3]
        pad = np.full((rgb.shape[1], 2, 3), 255, np.uint8)
        rows.append((np.concatenate([np.concatenate([f, pad], 1) for f in rgb], 1), p))
    h, w = rows[0][0].shape[:2]
    label_w = 150
    sheet = Image.new("RGB", (label_w + w * scale, len(rows) * (h * scale + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (r, p) in enumerate(rows):
        y = i * (h * scale + 4)
        sheet.paste(Image.fromarray(r).resize((w * scale, h * scale), Image.NEAREST), (label_w, y))
        draw.text((4, y + h * scale // 2 - 6), p, fill="black")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    sheet.save(path)


def loss_plot(run: str, path: str) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow.parquet as pq

    t = pq.read_table(os.path.join(run, "loss.parquet")).to_pydict()
    cfg_path = os.path.join(run, "config.json")
    init = json.loads(Path(cfg_path).read_text())["train"].get("init", {}) if os.path.exists(cfg_path) else {}
    offset = int(init.get("steps", 0))  # a warm-started run counts on from the steps of its weights
    step, loss = np.asarray(t["step"]) + offset, np.asarray(t["loss"])
    k = 50
    sm = np.convolve(loss, np.ones(k) / k, mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot(step, loss, lw=0.4, alpha=0.35, label="per step")
    ax.plot(step[k - 1 :], sm, lw=1.5, label=f"{k}-step mean")
    if offset:
        ax.axvline(offset, color="grey", ls=":", lw=1, label=f"warm start from step {offset:,}")
    ax.set_yscale("log")
    ax.set_xlabel("step (total)")
    ax.set_ylabel("flow-matching loss (MSE of v)")
    ax.set_title("tiny DiT, diffusion forcing")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return {"steps": int(step[-1]), "wall": float(t["wall"][-1]) + float(init.get("wall_seconds", 0.0)),
            "loss_last50": float(loss[-50:].mean()), "warm_start_steps": offset}


def main() -> None:
    from scopevid.train.command import load_exported

    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default="scopevid/weights")
    ap.add_argument("--run", default=None)
    ap.add_argument("--docs", default="docs")
    ap.add_argument("--shifts", default="1.0")
    ap.add_argument("--guidance", default="2.0")
    ap.add_argument("--per-prompt", type=int, default=2)
    ap.add_argument("--rollout", type=int, default=48)
    ap.add_argument("--long", type=int, default=0, help="also roll out this many frames (2 prompts), scored per window")
    ap.add_argument("--engine", type=int, default=0, help="also score this many frames of `scopevid generate` output per policy")
    ap.add_argument("--engine-policies", default="original,scope-slow,scope-fast")
    ap.add_argument("--config", default="configs/tiny.yaml", help="--engine: the run config")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, meta = load_exported(a.weights)
    wcfg = W.WorldConfig.from_dict(meta["world"])
    res: dict = {"step": meta["train"]["steps"], "real_16": real_scores(wcfg, frames=16), "real_rollout": real_scores(wcfg, frames=a.rollout)}
    best = None
    for sh in map(float, a.shifts.split(",")):
        for gd in map(float, a.guidance.split(",")):
            t0 = time.perf_counter()
            sc, clips = evaluate(model, wcfg, sh, gd, a.per_prompt)
            sc["seconds_per_clip"] = (time.perf_counter() - t0) / sc["clips"]
            res[f"joint16_shift{sh}_cfg{gd}"] = sc
            print(sh, gd, sc, flush=True)
            if best is None or sc["ok"] + sc["object"] > best[0]:
                best = (sc["ok"] + sc["object"], sh, gd, clips)
    _, sh, gd, clips = best
    res["chosen"] = {"shift": sh, "guidance": gd}
    if a.rollout:
        t0 = time.perf_counter()
        sc, rclips = evaluate(model, wcfg, sh, gd, 1, frames=a.rollout, mode="rollout", chunk=4, window=16)
        sc["seconds_per_clip"] = (time.perf_counter() - t0) / sc["clips"]
        res[f"rollout{a.rollout}_chunk4_window16"] = sc
        print("rollout", sc, flush=True)
        contact_sheet(rclips[::2], os.path.join(a.docs, "img", "tiny_rollout.png"), frames=a.rollout // 2 if a.rollout <= 32 else 24)
    contact_sheet(clips[:: a.per_prompt], os.path.join(a.docs, "img", "tiny_samples.png"))
    if a.long:
        longs = []
        for i, p in enumerate(["red square moving right", "blue square moving down"]):
            t0 = time.perf_counter()
            x = sample_rollout(model, p, a.long, chunk=4, window=16, guidance=gd, shift=sh, seed=7 + i)
            ws = D.window_scores(x, p, 16, wcfg)
            ok = [w["ok"] for w in ws]
            res[f"long{a.long}_{p.replace(' ', '_')}"] = {
                "seconds": time.perf_counter() - t0, "windows": len(ws), "ok_mean": float(np.mean(ok)),
                "object_mean": float(np.mean([w["object"] for w in ws])), "motion_mean": float(np.mean([w["motion"] for w in ws])),
                "ok_last4": float(np.mean(ok[-4:])), "per_window_ok": ok,
            }
            print("long", p, res[f"long{a.long}_{p.replace(' ', '_')}"], flush=True)
            longs.append((x[:: max(1, a.long // 48)][:48], p))
        contact_sheet(longs, os.path.join(a.docs, "img", "tiny_long.png"), frames=48, scale=2)
    if a.engine:
        from scopevid.train.engine_eval import engine_scores

        res[f"engine{a.engine}"] = engine_scores(a.config, a.engine_policies.split(","), a.engine)
        print("engine", json.dumps(res[f"engine{a.engine}"]), flush=True)
    if a.run:
        res["loss"] = loss_plot(a.run, os.path.join(a.docs, "img", "tiny_loss.png"))
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
