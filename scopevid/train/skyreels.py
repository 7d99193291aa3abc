"""Train a tiny SkyReels-V2 DF checkpoint (the real diffusers classes) on the bundled world, for CPU.

    python -m scopevid.train.skyreels all --out runs/skyreels_tiny --minutes 30 --decoder-minutes 12 \
        --dest scopevid/weights/skyreels_v2_tiny

Stages (each resumable; `all` runs them in order; `latents`/`dit`/`decoder`/`export` run one):
1. components: a seeded tokenizer (WordLevel over the world's words), a seeded random UMT5 encoder
   (fixed, as in adapters/skyreels_v2/fixture.py) and a Wan VAE whose ENCODER is seeded random and
   fixed (base_dim 3, the fixture's size) -> RUN/components.pt;
2. latents: world clips (64x64 px, one 16 px square, 97 frames -> 25 latent frames of 8x8) encoded
   once with the fixed encoder -> RUN/latents.pt, with per-channel mean/std (they become the VAE
   config's latents_mean/latents_std, so the DiT sees unit-variance latents);
3. dit: SkyReelsV2Transformer3DModel (2 heads x 64, 4 layers, ffn 256, patch (1,2,2)) trained with
   flow matching x_s = (1-s) x0 + s eps, target eps - x0 (UniPC's flow_prediction: x0 = x - s v),
   timestep = 1000 s per latent frame (999 = not started), diffusion forcing levels (independent,
   non-decreasing with not-started tails, shared, clean prefix at the addnoise level), windows of
   WINDOW latent frames cropped from the 25 (RoPE positions 0..WINDOW-1 as the adapter numbers a
   window), bidirectional attention within the window (num_frame_per_block 1: what the adapter
   does with this checkpoint), 10% prompt dropout to the empty prompt, AdamW + EMA;
4. decoder: the random decoder does not invert the random encoder (decode(encode(x)) ~9 dB), so the
   decoder alone (decoder_base_dim 16, post_quant_conv) is trained on pixels with the encoder fixed:
   the latents the DiT learns are unchanged by it;
5. export: the pipeline's save_pretrained layout (float32) with the EMA transformer.

Checkpoints every --ckpt-minutes (and on SIGTERM); the loss goes to RUN/loss.csv / RUN/decoder_loss.csv.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from scopevid.train import world as W
from scopevid.train.loop import optimizer_step

SPECIALS = ["<pad>", "</s>", "<unk>"]
WORLD = W.WorldConfig(size=64, sprite=16, speeds=(2, 3))
CLIP_FRAMES = 97  # pixel frames per encoded clip -> 25 latent frames
WINDOW = 15  # latent frames per training window (= base_num_frames 57 in configs/skyreels_v2_tiny.yaml)
TEXT_LEN = 16  # max_sequence_length the config uses (the zero-padded context length matters: no mask)
TEXT_DIM = 32


@dataclass
class DiTConfig:
    heads: int = 2
    head_dim: int = 64
    layers: int = 4
    ffn: int = 256
    batch: int = 16
    lr: float = 5e-4
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema: float = 0.999
    prompt_dropout: float = 0.1
    sigma_mean: float = 0.5  # logit-normal location (high noise, where layout is decided, weighted more)
    sigma_std: float = 1.0
    p_shift8: float = 0.25  # share of levels drawn from the inference table's shape (uniform, flow shift 8)
    p_independent: float = 0.3
    p_sorted: float = 0.3
    p_shared: float = 0.15  # rest: clean prefix (addnoise level) + a non-decreasing noisy rest
    p_first: float = 0.3  # windows that start at the video's first latent frame
    addnoise_max: float = 0.03  # prefix levels in [0, this] (addnoise_condition 20 -> 0.02)
    seed: int = 0


def vocabulary() -> list[str]:
    return SPECIALS + [*WORLD.colours, "square", "moving", *WORLD.directions]


def prompts() -> list[str]:
    return [W.prompt_text(c, d) for c in WORLD.colours for d in WORLD.directions]


# --- components ----------------------------------------------------------------------------------
def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = vocabulary()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def build_text_encoder(seed: int = 0):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    return UMT5EncoderModel(UMT5Config(vocab_size=len(vocabulary()), d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2,
                                       num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16)).eval()


def build_vae(seed: int = 0, mean: list[float] | None = None, std: list[float] | None = None):
    """Encoder: the fixture's size (base_dim 3), seeded random, fixed. Decoder: base 16 (trained)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    kw = {} if mean is None else {"latents_mean": list(mean), "latents_std": list(std)}
    return AutoencoderKLWan(base_dim=3, decoder_base_dim=16, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], **kw).eval()


def build_transformer(c: DiTConfig, seed: int):
    from diffusers import SkyReelsV2Transformer3DModel

    torch.manual_seed(seed)
    return SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=c.heads, attention_head_dim=c.head_dim, in_channels=16, out_channels=16,
        text_dim=TEXT_DIM, freq_dim=256, ffn_dim=c.ffn, num_layers=c.layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, inject_sample_info=True)


@torch.no_grad()
def encode_prompt(tokenizer, text_encoder, text: str, max_len: int = TEXT_LEN) -> torch.Tensor:
    """[1, max_len, text_dim], zero after the prompt's tokens: the adapter's `_encode` arithmetic."""
    tok = tokenizer([text], padding="max_length", max_length=max_len, truncation=True, add_special_tokens=True,
                    return_attention_mask=True, return_tensors="pt")
    states = text_encoder(tok.input_ids, tok.attention_mask).last_hidden_state
    n = int(tok.attention_mask.gt(0).sum())
    out = torch.zeros_like(states)
    out[:, :n] = states[:, :n]
    return out


def components(run: Path, seed: int = 0) -> dict:
    path = run / "components.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    run.mkdir(parents=True, exist_ok=True)
    state = {"text_encoder": build_text_encoder(seed).state_dict(), "vae": build_vae(seed).state_dict(), "seed": seed}
    torch.save(state, path)
    return state


def load_parts(run: Path):
    st = components(run)
    te = build_text_encoder(st["seed"])
    te.load_state_dict(st["text_encoder"])
    vae = build_vae(st["seed"])
    vae.load_state_dict(st["vae"])
    dec = run / "decoder.pt"
    if dec.exists():
        vae.load_state_dict(torch.load(dec, weights_only=True)["vae"])
    return build_tokenizer(), te.eval(), vae.eval()


# --- latents -------------------------------------------------------------------------------------
@torch.no_grad()
def encode_clips(vae, frames: torch.Tensor) -> torch.Tensor:
    """[B, F, 3, H, W] in [-1, 1] -> raw latents [B, 16, f, h, w] (the posterior mean)."""
    return vae.encode(frames.permute(0, 2, 1, 3, 4)).latent_dist.mean


def make_latents(run: Path, clips: int, seed: int = 1234, chunk: int = 8) -> dict:
    path = run / "latents.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    _, _, vae = load_parts(run)
    rng = np.random.default_rng(seed)
    zs, ids = [], []
    plist = prompts()
    t0 = time.time()
    for i in range(0, clips, chunk):
        cs = [W.sample_clip(rng, CLIP_FRAMES, WORLD) for _ in range(min(chunk, clips - i))]
        zs.append(encode_clips(vae, torch.stack([c.frames for c in cs])))
        ids += [plist.index(c.prompt) for c in cs]
        print(f"encoded {i + len(cs)}/{clips} clips ({time.time() - t0:.0f} s)", flush=True)
    z = torch.cat(zs)
    mean = z.mean(dim=(0, 2, 3, 4))
    std = z.std(dim=(0, 2, 3, 4))
    state = {"latents": z.half(), "prompt": torch.tensor(ids), "mean": mean, "std": std, "seed": seed,
             "seconds": time.time() - t0}
    torch.save(state, path)
    return state


# --- DiT training --------------------------------------------------------------------------------
def sample_levels(g: torch.Generator, b: int, f: int, c: DiTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame sigmas [B, F] in the diffusion-forcing mix and a loss mask [B, F] (prefix frames: 0)."""

    def draw(*shape):
        ln = torch.sigmoid(c.sigma_mean + c.sigma_std * torch.randn(*shape, generator=g))
        u = torch.rand(*shape, generator=g)
        s8 = 8 * u / (1 + 7 * u)
        return torch.where(torch.rand(*shape, generator=g) < c.p_shift8, s8, ln)

    kind = torch.rand(b, generator=g)
    s = draw(b, f)
    srt = s.sort(dim=1).values
    tail = torch.randint(0, f, (b, 1), generator=g)  # not-started frames (t = 999) at the end, half the time
    has_tail = (torch.rand(b, 1, generator=g) < 0.5)
    srt = torch.where(has_tail & (torch.arange(f)[None] >= f - tail), torch.ones(()), srt)
    shared = draw(b, 1).expand(b, f)
    plen = torch.randint(1, f, (b, 1), generator=g)
    is_prefix = torch.arange(f)[None] < plen
    low = torch.rand(b, f, generator=g) * c.addnoise_max
    prefix = torch.where(is_prefix, low, srt)
    t1, t2, t3 = c.p_independent, c.p_independent + c.p_sorted, c.p_independent + c.p_sorted + c.p_shared
    k = kind[:, None]
    sig = torch.where(k < t1, s, torch.where(k < t2, srt, torch.where(k < t3, shared, prefix)))
    mask = torch.where(k >= t3, (~is_prefix).float(), torch.ones(b, f))
    return sig.contiguous(), mask


def timesteps(sigma: torch.Tensor) -> torch.Tensor:
    """sigma -> the pipeline's timestep (1000 s; the not-started level 1 is 999 as in the step matrix)."""
    return (sigma * 1000).clamp(max=999.0)


class DiTTrainer:
    def __init__(self, run: Path, c: DiTConfig):
        self.run, self.c = run, c
        data = make_latents(run, 0) if (run / "latents.pt").exists() else None
        if data is None:
            raise FileNotFoundError(f"{run / 'latents.pt'}: run the latents stage first")
        self.mean = data["mean"].view(1, 16, 1, 1, 1)
        self.std = data["std"].view(1, 16, 1, 1, 1)
        self.z = (data["latents"].float() - self.mean) / self.std  # normalised: what the DiT sees
        self.pid = data["prompt"]
        tok, te, _ = load_parts(run)
        plist = prompts()
        self.ctx = torch.cat([encode_prompt(tok, te, p) for p in plist] + [encode_prompt(tok, te, "")])  # [P+1, L, 32]
        self.null = len(plist)
        self.model = build_transformer(c, c.seed)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
        rest = [p for n, p in self.model.named_parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                                     lr=c.lr, betas=(0.9, 0.99))
        self.step, self.wall = 0, 0.0
        self.gen = torch.Generator().manual_seed(c.seed + 1)
        ck = run / "dit.pt"
        if ck.exists():
            st = torch.load(ck, weights_only=True)
            self.model.load_state_dict(st["model"])
            self.ema.load_state_dict(st["ema"])
            self.opt.load_state_dict(st["opt"])
            self.step, self.wall = st["step"], st["wall"]
            self.gen.set_state(st["gen"])
            print(f"resumed at step {self.step} ({self.wall:.0f} s)", flush=True)

    def save(self) -> None:
        st = {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
              "step": self.step, "wall": self.wall, "gen": self.gen.get_state(), "config": asdict(self.c)}
        tmp = self.run / "dit.pt.tmp"
        torch.save(st, tmp)
        os.replace(tmp, self.run / "dit.pt")

    def batch(self):
        c, g = self.c, self.gen
        n, _, total = self.z.shape[:3]
        idx = torch.randint(0, n, (c.batch,), generator=g)
        first = torch.rand(c.batch, generator=g) < c.p_first
        start = torch.where(first, torch.zeros(c.batch, dtype=torch.long),
                            torch.randint(1, total - WINDOW + 1, (c.batch,), generator=g))
        x0 = torch.stack([self.z[i, :, s:s + WINDOW] for i, s in zip(idx.tolist(), start.tolist())])  # [B, 16, F, 8, 8]
        pid = self.pid[idx]
        drop = torch.rand(c.batch, generator=g) < c.prompt_dropout
        pid = torch.where(drop, torch.full_like(pid, self.null), pid)
        return x0, self.ctx[pid]

    def loss(self, model, x0, ctx) -> torch.Tensor:
        b, _, f = x0.shape[:3]
        sigma, mask = sample_levels(self.gen, b, f, self.c)
        eps = torch.randn(x0.shape, generator=self.gen)
        s = sigma[:, None, :, None, None]
        xs = (1 - s) * x0 + s * eps
        v = model(xs, timesteps(sigma), ctx, enable_diffusion_forcing=True, fps=[1], return_dict=False)[0]
        err = ((v.float() - (eps - x0)) ** 2).mean(dim=(1, 3, 4))  # [B, F]
        return (err * mask).sum() / mask.sum().clamp(min=1)

    def lr_at(self, step: int) -> float:
        return self.c.lr * min(1.0, (step + 1) / self.c.warmup)

    def train_step(self) -> dict:
        t0 = time.perf_counter()
        x0, ctx = self.batch()
        for gr in self.opt.param_groups:
            gr["lr"] = self.lr_at(self.step)
        self.model.train()
        loss = self.loss(self.model, x0, ctx)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = optimizer_step(self.model, self.ema, self.opt, self.c.grad_clip, self.c.ema, self.step)
        self.step += 1
        dt = time.perf_counter() - t0
        self.wall += dt
        return {"step": self.step, "loss": loss.item(), "grad_norm": float(gn), "lr": self.lr_at(self.step - 1),
                "seconds": dt, "wall": self.wall}


def _loop(minutes: float, steps: int | None, ckpt_minutes: float, step_fn, save_fn, log_path: Path, header: str) -> None:
    stop = {"now": False}

    def handler(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    new = not log_path.exists()
    end = time.time() + 60 * minutes
    last = time.time()
    with open(log_path, "a") as log:
        if new:
            log.write(header + "\n")
        while time.time() < end and not stop["now"]:
            row = step_fn()
            log.write(",".join(f"{row[k]:.6g}" if isinstance(row[k], float) else str(row[k]) for k in header.split(",")) + "\n")
            if row["step"] % 20 == 0:
                log.flush()
            if steps is not None and row["step"] >= steps:
                break
            if time.time() - last > 60 * ckpt_minutes:
                save_fn()
                last = time.time()
    save_fn()


def train_dit(run: Path, minutes: float, steps: int | None = None, ckpt_minutes: float = 3.0, **overrides) -> None:
    cfg_path = run / "dit_config.json"
    c = DiTConfig(**json.loads(cfg_path.read_text())) if cfg_path.exists() else DiTConfig(**overrides)
    cfg_path.write_text(json.dumps(asdict(c), indent=2))
    t = DiTTrainer(run, c)
    _loop(minutes, steps, ckpt_minutes, t.train_step, t.save, run / "loss.csv", "step,loss,grad_norm,lr,seconds,wall")


# --- decoder -------------------------------------------------------------------------------------
def train_decoder(run: Path, minutes: float, ckpt_minutes: float = 3.0, batch: int = 4, frames: int = 13,
                  lr: float = 2e-3, seed: int = 7) -> None:
    """Fit the VAE decoder (and post_quant_conv) to invert the fixed random encoder on world clips."""
    _, _, vae = load_parts(run)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    vae.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    state = {"step": 0, "wall": 0.0}
    path = run / "decoder.pt"
    if path.exists():
        st = torch.load(path, weights_only=True)
        if "opt" in st:
            opt.load_state_dict(st["opt"])
            state.update(step=st["step"], wall=st["wall"])
    rng = np.random.default_rng(seed + state["step"])

    def step():
        t0 = time.perf_counter()
        x = torch.stack([W.sample_clip(rng, frames, WORLD).frames for _ in range(batch)]).permute(0, 2, 1, 3, 4)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        vae.decoder.train()
        y = vae.decode(z).sample
        loss = ((y - x) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state["step"] += 1
        dt = time.perf_counter() - t0
        state["wall"] += dt
        return {"step": state["step"], "loss": loss.item(), "psnr": 10 * math.log10(4 / max(loss.item(), 1e-12)),
                "seconds": dt, "wall": state["wall"]}

    def save():
        tmp = run / "decoder.pt.tmp"
        torch.save({"vae": vae.state_dict(), "opt": opt.state_dict(), **state}, tmp)
        os.replace(tmp, path)

    _loop(minutes, None, ckpt_minutes, step, save, run / "decoder_loss.csv", "step,loss,psnr,seconds,wall")


@torch.no_grad()
def roundtrip_psnr(vae, clips: int = 8, frames: int = 57, seed: int = 99) -> float:
    rng = np.random.default_rng(seed)
    x = torch.stack([W.sample_clip(rng, frames, WORLD).frames for _ in range(clips)]).permute(0, 2, 1, 3, 4)
    y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return 10 * math.log10(4 / float(((y - x) ** 2).mean()))


# --- export --------------------------------------------------------------------------------------
def export(run: Path, dest: Path) -> Path:
    """The diffusers pipeline layout (float32): EMA transformer, VAE with the measured latent
    statistics (and the trained decoder when there is one), the fixed text encoder and tokenizer."""
    from diffusers import SkyReelsV2DiffusionForcingPipeline, UniPCMultistepScheduler

    data = torch.load(run / "latents.pt", weights_only=True)
    tok, te, vae_fit = load_parts(run)
    vae = build_vae(0, data["mean"].tolist(), data["std"].tolist())
    vae.load_state_dict(vae_fit.state_dict())
    c = DiTConfig(**json.loads((run / "dit_config.json").read_text()))
    tr = build_transformer(c, c.seed)
    tr.load_state_dict(torch.load(run / "dit.pt", weights_only=True)["ema"])
    sched = UniPCMultistepScheduler(flow_shift=8.0, use_flow_sigmas=True, prediction_type="flow_prediction")
    SkyReelsV2DiffusionForcingPipeline(tokenizer=tok, text_encoder=te, transformer=tr, vae=vae, scheduler=sched).save_pretrained(dest)
    return Path(dest)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m scopevid.train.skyreels", description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=["all", "latents", "dit", "decoder", "export", "eval"])
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--clips", type=int, default=600, help="world clips to encode (97 frames each)")
    p.add_argument("--minutes", type=float, default=30.0, help="DiT training time (this invocation)")
    p.add_argument("--steps", type=int, default=None, help="stop the DiT at this total step count")
    p.add_argument("--decoder-minutes", type=float, default=12.0)
    p.add_argument("--ckpt-minutes", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dest", default=None, help="export directory (default RUN/export)")
    p.add_argument("--config", default="configs/skyreels_v2_tiny.yaml", help="eval: the generate config")
    p.add_argument("--seeds", default="100,101", help="eval: generation seeds (comma-separated)")
    p.add_argument("--prompts", type=int, default=4, help="eval: prompts per seed")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    run = Path(a.out)
    run.mkdir(parents=True, exist_ok=True)
    if a.stage in ("all", "latents"):
        components(run)
        d = make_latents(run, a.clips)
        print(f"latents {tuple(d['latents'].shape)}; mean {d['mean'].abs().mean():.4f} std {d['std'].mean():.4f}", flush=True)
    if a.stage in ("all", "dit"):
        train_dit(run, a.minutes, a.steps, a.ckpt_minutes)
    if a.stage in ("all", "decoder"):
        train_decoder(run, a.decoder_minutes, a.ckpt_minutes)
    if a.stage in ("all", "export"):
        dest = export(run, Path(a.dest) if a.dest else run / "export")
        _, _, vae = load_parts(run)
        print(f"exported {dest}; decode(encode(x)) PSNR {roundtrip_psnr(vae):.2f} dB", flush=True)
    if a.stage == "eval":
        ck = Path(a.dest) if a.dest else run / "export"
        seeds = [int(x) for x in a.seeds.split(",")]
        res = {"latent_probe": latent_probe(run), "heldout_loss": heldout_loss(ck), "real": real_scores(run), "trained": evaluate(run, Path(a.config), ck, seeds, a.prompts),
               "random": evaluate(run, Path(a.config), ck, seeds, a.prompts, random_seed=0)}
        (run / "eval.json").write_text(json.dumps(res, indent=2))
        print(json.dumps({"latent_probe": res["latent_probe"], "heldout_loss": res["heldout_loss"], "real": res["real"], "trained": res["trained"]["summary"], "random": res["random"]["summary"]}, indent=2))



# --- quality check -------------------------------------------------------------------------------
def _decode_frames(vae, latents: torch.Tensor) -> torch.Tensor:
    """Engine latents [F, C, h, w] (normalised) -> pixel frames [f, 3, H, W] in [-1, 1] (adapter decode)."""
    from scopevid.adapters.skyreels_v2.vae import LatentNorm, StreamDecoder

    dec = StreamDecoder(vae, LatentNorm(vae))
    px = torch.cat([dec.push(z) for z in latents])  # [f, H, W, 3] in [0, 1]
    return px.permute(0, 3, 1, 2) * 2 - 1


def _nn_distance(bank: torch.Tensor, q: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Per query row, the RMS distance to its nearest bank row."""
    out = []
    for i in range(0, q.shape[0], chunk):
        out.append(torch.cdist(q[i:i + chunk], bank).min(dim=1).values)
    return torch.cat(out) / math.sqrt(bank.shape[1])


def evaluate(run: Path, config: Path, ckpt: Path, seeds: list[int], n_prompts: int = 4, policy: str = "original",
             random_seed: int | None = None) -> dict:
    """Generate with `scopevid generate` (the SkyReels-V2 adapter) for n_prompts x seeds, then score:
    the world's sprite detector on decoded frames (object / motion / ok, per 16-frame window), and in
    latent space the nearest-neighbour RMS distance of each generated latent frame (after the first) to
    the encoded real clips, against held-out real clips (the floor) and unit noise (the ceiling).
    `random_seed` swaps in a random transformer of the same config (the random-weights reference)."""
    import shutil
    import tempfile

    import yaml
    from diffusers import AutoencoderKLWan, SkyReelsV2Transformer3DModel
    from safetensors.torch import load_file

    from scopevid import cli
    from scopevid.train import detector as D

    ckpt = Path(ckpt).resolve()
    tmp = Path(tempfile.mkdtemp(prefix="skyreels_eval_"))
    if random_seed is not None:  # the same checkpoint with re-initialised transformer weights
        shutil.copytree(ckpt, tmp / "ckpt")
        ckpt = tmp / "ckpt"
        cfg = SkyReelsV2Transformer3DModel.load_config(str(ckpt / "transformer"))
        torch.manual_seed(random_seed)
        SkyReelsV2Transformer3DModel.from_config(cfg).save_pretrained(str(ckpt / "transformer"))
    vae = AutoencoderKLWan.from_pretrained(str(ckpt / "vae")).eval()
    data = torch.load(run / "latents.pt", weights_only=True)
    z = ((data["latents"].float() - data["mean"].view(1, 16, 1, 1, 1)) / data["std"].view(1, 16, 1, 1, 1))
    z = z[:, :, 1:].permute(0, 2, 1, 3, 4)  # non-first latent frames [N, f, C, h, w]
    nh = max(1, min(40, z.shape[0] // 5))  # held-out real clips (the floor of the distance)
    held = z[-nh:].reshape(-1, z[0, 0].numel())
    bank = z[:-nh].reshape(-1, z[0, 0].numel())
    base = yaml.safe_load(Path(config).read_text())
    plist = prompts()
    chosen = [plist[(i * 5) % len(plist)] for i in range(n_prompts)]  # spread over colours and directions
    rows, walls = [], []
    for p in chosen:
        for s in seeds:
            raw = copy.deepcopy(base)
            raw["model"]["path"] = str(ckpt)
            raw["policy_presets"] = str((Path(config).parent / raw["policy_presets"]).resolve())
            raw.update(prompt=p, seed=s, policy=policy)
            (tmp / "run.yaml").write_text(yaml.safe_dump(raw))
            out = tmp / f"out_{len(rows)}"
            t0 = time.time()
            assert cli.main(["generate", "--config", str(tmp / "run.yaml"), "--out", str(out), "--no-progress"]) == 0
            walls.append(time.time() - t0)
            lat = load_file(str(out / "latents.safetensors"))["latents"].float()
            with torch.no_grad():
                frames = _decode_frames(vae, lat)
            win = D.window_scores(frames, p, 16, WORLD)
            sc = D.score_clip(frames[:16], p, WORLD)
            nn = _nn_distance(bank, lat[1:].reshape(lat.shape[0] - 1, -1))
            rows.append({"prompt": p, "seed": s, "first16": sc, "windows_object": float(np.mean([w["object"] for w in win])),
                         "windows_motion": float(np.mean([w["motion"] for w in win])),
                         "windows_ok": float(np.mean([w["ok"] for w in win])), "nn": float(nn.mean()),
                         "temporal_rms": float((lat[2:] - lat[1:-1]).pow(2).mean().sqrt()),
                         "colour": _colour_share(frames, p)})
    summary = {k: float(np.mean([r[k] for r in rows])) for k in ("windows_object", "windows_motion", "windows_ok", "nn", "temporal_rms", "colour")}
    summary.update({f"first16_{k}": float(np.mean([r["first16"][k] for r in rows])) for k in ("object", "motion", "start", "ok")})
    summary["nn_real_heldout"] = float(_nn_distance(bank, held[::7]).mean())
    summary["nn_noise"] = float(_nn_distance(bank, torch.randn(200, bank.shape[1])).mean())
    summary["temporal_rms_real"] = float((z[:, 1:] - z[:, :-1]).pow(2).mean().sqrt())
    summary["generate_seconds"] = float(np.mean(walls))
    shutil.rmtree(tmp, ignore_errors=True)
    return {"summary": summary, "rows": rows}


def _colour_share(frames: torch.Tensor, prompt: str) -> float:
    """Share of the non-background pixels (far from the background colour) that are close to the
    prompt's colour: 1 when the only object is the prompt's colour."""
    colour, _ = W.parse_prompt(prompt, WORLD)
    rgb = ((frames.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
    bg = torch.tensor(WORLD.background)
    fg = (rgb - bg).abs().amax(-1) > 0.25
    near = (rgb - torch.tensor(W.COLOURS[colour])).abs().amax(-1) < 0.25
    return float((near & fg).sum() / fg.sum().clamp(min=1))


@torch.no_grad()
def heldout_loss(ckpt: Path, clips: int = 8, seed: int = 4321, sigmas=(0.1, 0.25, 0.5, 0.75, 0.9, 0.98),
                 random_seed: int = 0) -> dict:
    """Flow-matching loss |v - (eps - x0)|^2 on fresh world clips (not in the training set), first
    window (15 latent frames), shared level per row, conditioned on the clip's prompt: the trained
    transformer, a random one of the same config, and the best constant predictor of eps - x0 given
    nothing (E|eps - x0 - 0|^2 = 1 + E x0^2, about 2)."""
    from diffusers import AutoencoderKLWan, SkyReelsV2Transformer3DModel

    ckpt = Path(ckpt)
    vae = AutoencoderKLWan.from_pretrained(str(ckpt / "vae")).eval()
    trained = SkyReelsV2Transformer3DModel.from_pretrained(str(ckpt / "transformer")).eval()
    torch.manual_seed(random_seed)
    rand = SkyReelsV2Transformer3DModel.from_config(trained.config).eval()
    tok, te = build_tokenizer(), _text_encoder(ckpt)
    rng = np.random.default_rng(seed)
    cs = [W.sample_clip(rng, 4 * WINDOW - 3, WORLD) for _ in range(clips)]
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    x0 = (encode_clips(vae, torch.stack([c.frames for c in cs])) - mean) / std
    ctx = torch.cat([encode_prompt(tok, te, c.prompt) for c in cs])
    g = torch.Generator().manual_seed(seed)
    out = {"x0_var": float(x0.var())}
    for s in sigmas:
        eps = torch.randn(x0.shape, generator=g)
        xs = (1 - s) * x0 + s * eps
        t = torch.full(x0.shape[:1] + x0.shape[2:3], s * 1000)
        for name, m in (("trained", trained), ("random", rand)):
            v = m(xs, t, ctx, enable_diffusion_forcing=True, fps=[1], return_dict=False)[0]
            out[f"{name}@{s}"] = float(((v - (eps - x0)) ** 2).mean())
        out[f"zero@{s}"] = float(((eps - x0) ** 2).mean())
    return out


def _text_encoder(ckpt: Path):
    from transformers import UMT5EncoderModel

    return UMT5EncoderModel.from_pretrained(str(Path(ckpt) / "text_encoder")).eval()


@torch.no_grad()
def latent_probe(run: Path, held: int = 40, lam: float = 10.0) -> dict:
    """How much of the sprite the fixed encoder keeps: a ridge regression from one normalised latent
    frame (all 1,024 values, after the first frame) to the clip's colour (one-hot) and the sprite's
    position at the latent frame's last pixel frame, fitted on the run's clips but the last `held`,
    scored on those. Chance: colour 1 / 4; position error ~12 px (predicting the middle)."""
    data = torch.load(run / "latents.pt", weights_only=True)
    z = ((data["latents"].float() - data["mean"].view(1, 16, 1, 1, 1)) / data["std"].view(1, 16, 1, 1, 1))
    z = z[:, :, 1:].permute(0, 2, 1, 3, 4)  # [N, f, C, h, w]
    n, f = z.shape[:2]
    rng = np.random.default_rng(data["seed"])  # the clips make_latents encoded, in order
    cs = [W.sample_clip(rng, CLIP_FRAMES, WORLD) for _ in range(n)]
    col = torch.tensor([WORLD.colours.index(c.colour) for c in cs])
    span = WORLD.size - WORLD.sprite
    pos = torch.tensor([[c.positions[4 * k] for k in range(1, f + 1)] for c in cs]).float() / span
    x = torch.cat([z.reshape(n * f, -1), torch.ones(n * f, 1)], 1)
    y = torch.cat([torch.nn.functional.one_hot(col, 4)[:, None].expand(-1, f, -1).reshape(-1, 4).float(), pos.reshape(-1, 2)], 1)
    m = (n - held) * f
    a = x[:m]
    w = torch.linalg.solve(a.T @ a + lam * torch.eye(a.shape[1]), a.T @ y[:m])
    p = x[m:] @ w
    err = ((p[:, 4:] - y[m:, 4:]) * span).abs().mean(0)
    chance = ((y[m:, 4:] - 0.5) * span).abs().mean(0)
    return {"colour_accuracy": float((p[:, :4].argmax(1) == y[m:, :4].argmax(1)).float().mean()),
            "position_error_px": err.tolist(), "position_error_px_predicting_middle": chance.tolist()}


@torch.no_grad()
def real_scores(run: Path, clips: int = 4, seed: int = 99) -> dict:
    """The detector's ceiling through this VAE: real clips, decode(encode(x)), scored as generated ones."""
    from scopevid.train import detector as D

    _, _, vae = load_parts(run)
    rng = np.random.default_rng(seed)
    cs = [W.sample_clip(rng, 137, WORLD) for _ in range(clips)]
    res = []
    for c in cs:
        y = vae.decode(vae.encode(c.frames.permute(1, 0, 2, 3)[None]).latent_dist.mean).sample[0].permute(1, 0, 2, 3)
        win = D.window_scores(y.clamp(-1, 1), c.prompt, 16, WORLD)
        res.append({"object": np.mean([w["object"] for w in win]), "motion": np.mean([w["motion"] for w in win]),
                    "ok": np.mean([w["ok"] for w in win]), "colour": _colour_share(y, c.prompt),
                    "raw_ok": np.mean([w["ok"] for w in D.window_scores(c.frames, c.prompt, 16, WORLD)])})
    return {k: float(np.mean([r[k] for r in res])) for k in res[0]}


if __name__ == "__main__":
    main()
