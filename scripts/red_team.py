"""Hostile inputs and events against the `scopevid` CLI (generate, batch, train), as a markdown table.

Each case runs the real CLI in a fresh process and is judged as a user would: the exit code (2 bad
input, 1 runtime failure, 0 only with a complete video), whether stderr is one line without a
traceback, and the line itself. A case that names its expected exit code is bad when the code
differs; the others are bad when they exit 0. Nothing is mocked; the NaN case writes a real
safetensors file with one poisoned weight, the corrupt SkyReels-V2 case flips real bytes of a real
(tiny) diffusers checkpoint, the full-disk case mounts a real 300 KB tmpfs (needs root; skipped
otherwise). The same behaviours are pinned by tests; this script is the overview.

    .venv/bin/python scripts/red_team.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
BASE["policy_presets"] = str(ROOT / "configs" / "policies" / "tiny.yaml")
BASE["frames"] = 33


def config(tmp: Path, name: str, **over) -> Path:
    d = json.loads(json.dumps(BASE))
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k].update(v)
        else:
            d[k] = v
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def raw(tmp: Path, name: str, data: bytes) -> Path:
    p = tmp / name
    p.write_bytes(data)
    return p


def nan_weights(tmp: Path) -> str:
    from safetensors.torch import load_file, save_file

    src = ROOT / "scopevid" / "weights" / "tiny.safetensors"
    state = load_file(str(src))
    name = next(k for k in state if k.endswith("weight") and state[k].dim() == 2)
    state[name][0, 0] = float("nan")
    dst = tmp / "nan.safetensors"
    save_file(state, str(dst))
    shutil.copy(src.with_suffix(".json"), dst.with_suffix(".json"))
    return str(dst)


def tiny_json(tmp: Path, name: str, over: dict) -> str:
    """The bundled tiny weights beside a copy of their JSON with `over` set in it ("model.dim": "big")."""
    src = ROOT / "scopevid" / "weights" / "tiny.safetensors"
    d = tmp / name
    d.mkdir(exist_ok=True)
    shutil.copy(src, d / "tiny.safetensors")
    meta = json.loads(src.with_suffix(".json").read_text())
    for key, value in over.items():
        *parents, last = key.split(".")
        node = meta
        for k in parents:
            node = node[k]
        node[last] = value
    (d / "tiny.json").write_text(json.dumps(meta))
    return str(d / "tiny.safetensors")


def skyreels(tmp: Path) -> Path:
    """The tiny random SkyReels-V2 diffusers checkpoint the tests build (tests/test_skyreels_v2.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_skyreels_v2 import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp / "skyreels")


def sky_config(tmp: Path, name: str, path: Path, **model) -> Path:
    raw = {"model": {"kind": "skyreels_v2", "path": str(path), "height": 32, "width": 32, "max_sequence_length": 16, **model},
           "prompt": "a red fox runs in the snow", "guidance": 5.0, "frames": 29, "fps": 16, "seed": 0, "solver": "unipc",
           "schedule": {"kind": "diffusion_forcing", "steps": 6, "base_num_frames": 13, "overlap_history": 5, "ar_step": 2,
                        "causal_block_size": 2, "selective": "off"},
           "policy": "original", "policy_presets": str(ROOT / "configs" / "policies" / "skyreels_v2.yaml")}
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def sky_variant(src: Path, tmp: Path, name: str, flip: int = 0, scheduler: dict | None = None) -> Path:
    """A copy of the SkyReels-V2 checkpoint with `flip` bytes of its DiT weights inverted (seeded: the
    red team's draw, finite but absurd velocities) or its scheduler config updated."""
    import random
    import struct

    d = Path(shutil.copytree(src, tmp / name))
    if flip:
        w = d / "transformer" / "diffusion_pytorch_model.safetensors"
        data = bytearray(w.read_bytes())
        start = 8 + struct.unpack("<Q", data[:8])[0]  # after the header: tensor bytes only
        for i in random.Random(1).sample(range(start, len(data)), flip):
            data[i] ^= 0xFF
        w.write_bytes(bytes(data))
    if scheduler:
        f = d / "scheduler" / "scheduler_config.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), **scheduler}))
    return d


def magi_hf_cache(tmp: Path, entry: str | None = None) -> Path:
    """The MAGI-1 test checkpoint laid out as a Hugging Face cache snapshot: every file a symlink to
    ../../../blobs/<sha256>. `entry`: one weight_map entry replaced (e.g. a path out of the checkpoint)."""
    import hashlib

    src = ROOT / "tests" / "fixtures" / "magi1" / "dit" / "inference_weight.distill"
    repo = tmp / ("hub-bad" if entry else "hub") / "models--sand-ai--MAGI-1-tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abcd" / "inference_weight.distill"
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        data = f.read_bytes()
        if entry and f.name.endswith(".index.json"):
            index = json.loads(data)
            index["weight_map"][next(iter(index["weight_map"]))] = entry
            data = json.dumps(index).encode()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snap / f.name).symlink_to(Path("..", "..", "..", "blobs", blob))
    return snap.parent


def magi_config(tmp: Path, name: str, **model) -> Path:
    fx = ROOT / "tests" / "fixtures" / "magi1"
    raw = yaml.safe_load((ROOT / "configs" / "bench" / "magi1_tiny_fixture.yaml").read_text())
    raw["model"].update({"arch": str(fx / "tiny_4.5B_style.json"), "weights": str(fx / "dit"),
                         "special_tokens": str(fx / "special_tokens.npz"), "vae": str(fx / "vae"), **model})
    raw.update(policy_presets=str(ROOT / "configs" / "policies" / "magi1.yaml"), frames=24, policy="original")
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def pickled_t5(tmp: Path) -> Path:
    """A T5 encoder directory (config, tokenizer) whose pytorch_model.bin pickles an object besides
    its tensors: torch.load(weights_only=True), which transformers uses, refuses it."""
    import argparse

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config

    d = tmp / "t5"
    T5Config(vocab_size=8, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2).save_pretrained(d)
    tok = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, "fox": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(d)
    torch.save({"shared.weight": torch.zeros(8, 8), "note": argparse.Namespace(trained="elsewhere")}, d / "pytorch_model.bin")
    return d


def pickled_train_checkpoint(tmp: Path) -> Path:
    """A training run directory whose ckpt.pt pickles an object: a file from elsewhere, not ours."""
    import argparse

    import torch

    d = tmp / "train-pickle"
    d.mkdir()
    torch.save({"model": {}, "args": argparse.Namespace(lr=1.0)}, d / "ckpt.pt")
    return d


def run(args: list[str], *, signal_after: float | None = None, sig=signal.SIGTERM) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "scopevid", *args]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if signal_after is not None:
        time.sleep(signal_after)
        p.send_signal(sig)
    _, err = p.communicate(timeout=600)
    return p.returncode, err


def cases(tmp: Path):
    good = config(tmp, "good")
    gen = lambda cfg, out, *a: ["generate", "--config", str(cfg), "--out", str(tmp / out), "--no-progress", *a]  # noqa: E731
    yield "top-level typo `promt:`", gen(config(tmp, "typo", promt="x"), "o1"), {}
    yield "model typo `weigths:`", gen(config(tmp, "wtypo", model={"weigths": "x"}), "o2"), {}
    yield "SkyReels-V2 `heigth:`", gen(config(tmp, "sky", model={"kind": "skyreels_v2", "path": "x", "heigth": 544}), "o3"), {}
    yield "MAGI-1 height 100", gen(config(tmp, "magi", model={"kind": "magi1", "weights": "random", "height": 100}), "o4"), {}
    yield "binary config file", gen(raw(tmp, "bin.yaml", bytes(range(256))), "o5"), {}
    yield "non-UTF-8 config", gen(raw(tmp, "latin.yaml", "prompt: \"caf\xe9\"\n".encode("latin-1")), "o6"), {}
    yield "empty config file", gen(raw(tmp, "empty.yaml", b""), "o7"), {}
    yield "config is a directory", gen(tmp, "o8"), {}
    yield "policy_presets not a mapping", gen(config(tmp, "ppcfg", policy_presets=str(raw(tmp, "list.yaml", b"- a\n- b\n"))), "o9"), {}
    yield "--steps 1e9", gen(good, "o10", "--steps", "1000000000"), {}
    yield "--frames 1e9", gen(good, "o11", "--frames", "1000000000"), {}
    yield "--frames 0", gen(good, "o12", "--frames", "0"), {}
    yield "--seed abc", gen(good, "o13", "--seed", "abc"), {}
    yield "unknown policy", gen(good, "o14", "--policy", "scope-fastest"), {}
    yield "prompt word not in vocabulary", gen(good, "o15", "--prompt", "purple square"), {}
    yield "guidance: .inf", gen(config(tmp, "inf", guidance=float("inf")), "o16"), {}
    yield "guidance: 1e30", gen(config(tmp, "big", guidance=1e30), "o17"), {}
    yield "NaN in a model weight", gen(config(tmp, "nan", model={"weights": nan_weights(tmp)}), "o18"), {}
    yield "dtype bfloat16 (CPU)", gen(config(tmp, "bf16", dtype="bfloat16"), "o19"), {}
    yield "dtype float16 (CPU)", gen(config(tmp, "fp16", dtype="float16"), "o20"), {}
    yield "device cuda without a GPU", gen(config(tmp, "cuda", device="cuda"), "o21"), {}
    yield "--out names a file", gen(good, raw(tmp, "afile", b"x").name), {}
    yield "--compare with tau_c > tau_p", gen(config(tmp, "tau", policies={"bad": {"kind": "scope", "tau_c": 0.5, "tau_p": 0.1, "decay": 0.75, "horizon": 5}},
                                                     policy="bad"), "o23", "--compare"), {}
    yield "--resume with nothing to resume", gen(good, "o24", "--resume"), {}
    (tmp / "o25").mkdir()
    (tmp / "o25" / "video.mp4").write_bytes(b"old")
    yield "non-empty --out without --overwrite", gen(good, "o25"), {}
    yield "SIGTERM mid-run", gen(config(tmp, "long", frames=257), "o26"), {"signal_after": 3.0}
    yield "SIGINT mid-run", gen(config(tmp, "long2", frames=257), "o27"), {"signal_after": 3.0, "sig": signal.SIGINT}
    # issue 21: training options, absurd velocities, seeds, typed sections, checkpoint files (expected exit codes)
    train = lambda out, *a: ["train", "--out", str(tmp / out), "--steps", "1", *a]  # noqa: E731
    yield "train --steps -5", ["train", "--out", str(tmp / "t1"), "--steps", "-5"], {"expect": 2}
    yield "train --lr nan", train("t2", "--lr", "nan"), {"expect": 2}
    yield "train --seed -1", train("t3", "--seed", "-1"), {"expect": 2}
    yield "train --dim 30 --heads 4", train("t4", "--dim", "30", "--heads", "4"), {"expect": 2}
    yield "train --dim 32 --heads 8 (head dim 4)", train("t5", "--dim", "32", "--heads", "8"), {"expect": 2}
    yield "train --resume, ckpt.pt pickles an object", ["train", "--out", str(pickled_train_checkpoint(tmp)), "--resume"], {"expect": 2}
    sky = skyreels(tmp)
    yield "SkyReels-V2 fixture (control)", gen(sky_config(tmp, "sky-ok", sky), "s1"), {"expect": 0}
    yield "SkyReels-V2, 4000 flipped weight bytes", gen(sky_config(tmp, "sky-flip", sky_variant(sky, tmp, "sky-flip", flip=4000)), "s2"), {"expect": 1}
    yield "SkyReels-V2 flow_shift: -1 (scheduler)", gen(sky_config(tmp, "sky-fs", sky_variant(sky, tmp, "sky-fs", scheduler={"flow_shift": -1.0})), "s3"), {"expect": 2}
    yield "SkyReels-V2 model shift: -1", gen(sky_config(tmp, "sky-shift", sky, shift=-1.0), "s4"), {"expect": 2}
    yield "--seed 2**64", gen(good, "s5", "--seed", str(2**64)), {"expect": 2}
    prompts = raw(tmp, "seeds.jsonl", (json.dumps({"prompt": "blue square moving left", "seed": 2**64}) + "\n").encode())
    yield "batch row seed 2**64", ["batch", "--config", str(good), "--prompts", str(prompts), "--out", str(tmp / "s6"), "--frames", "9"], {"expect": 2}
    yield "stability: {clip: 'x'}", gen(config(tmp, "clipx", stability={"clip": "x"}), "s7"), {"expect": 2}
    yield "tiny JSON model.dim: \"big\"", gen(config(tmp, "jdim", model={"weights": tiny_json(tmp, "jdim", {"model.dim": "big"})}), "s8"), {"expect": 2}
    yield "tiny JSON shift: 0", gen(config(tmp, "jshift", model={"weights": tiny_json(tmp, "jshift", {"shift": 0})}), "s9"), {"expect": 2}
    yield "MAGI-1 weights in a HF cache snapshot", gen(magi_config(tmp, "magi-hf", weights=str(magi_hf_cache(tmp))), "s10"), {"expect": 0}
    yield "MAGI-1 index entry ../../etc/passwd", gen(magi_config(tmp, "magi-bad", weights=str(magi_hf_cache(tmp, "../../etc/passwd"))), "s11"), {"expect": 2}
    yield "MAGI-1 T5 .bin pickles an object", gen(magi_config(tmp, "magi-t5", text_encoder=str(pickled_t5(tmp))), "s12"), {"expect": 2}


def full_disk(tmp: Path):
    disk = tmp / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)], capture_output=True).returncode:
        return None
    try:
        return run(["generate", "--config", str(config(tmp, "disk", frames=257)), "--out", str(disk / "o"), "--no-progress",
                    "--checkpoint"])
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def judge(rc: int, err: str) -> tuple[str, str]:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    one = "yes" if len(lines) <= 1 and "Traceback" not in err else f"NO ({len(lines)} lines)"
    return one, (lines[-1][:150] if lines else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="keep the run directories here (default: a temporary directory)")
    a = ap.parse_args()
    tmp = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="redteam"))
    tmp.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, args, kw in cases(tmp):
        expect = kw.pop("expect", None)
        rc, err = run(args, **kw)
        rows.append((name, rc, expect, *judge(rc, err)))
    res = full_disk(tmp)
    if res is not None:
        rows.append(("full disk (300 KB tmpfs)", res[0], None, *judge(*res)))
    print("| case | exit | expected | one line | message |\n|---|---|---|---|---|")
    bad = []
    for name, rc, expect, one, msg in rows:
        wrong = rc != expect if expect is not None else rc == 0 and name not in ("dtype bfloat16 (CPU)", "dtype float16 (CPU)")
        if one != "yes" or wrong:
            bad.append(name)
        print(f"| {name} | {rc} | {'-' if expect is None else expect} | {one} | {msg.replace('|', '/')} |")
    print(f"\n{len(bad)} bad case(s) of {len(rows)}" + (f": {'; '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
