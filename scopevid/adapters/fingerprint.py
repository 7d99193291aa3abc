"""What a model spec reads from disk, and a fingerprint of it: the weights a resumed run must find
unchanged (a resume with other weights would finish one video with two models).

The fingerprint hashes file contents, not names or times (a checkpoint copied to a node's local disk
keeps its fingerprint): every byte of files up to FULL_HASH_BYTES in all; beyond that (tens of GB) the
safetensors headers (every tensor's name, dtype, shape and offset) plus SAMPLES blocks of 1 MiB
spread over each file, read in a few seconds.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

FULL_HASH_BYTES = 8 << 30
SAMPLES = 256
BLOCK = 1 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".npz")


def weight_files(spec: dict) -> list[Path]:
    """Every weights file the `model:` spec reads (none for random weights)."""
    kind = spec.get("kind")
    if kind == "tiny":
        from scopevid.adapters.tiny.adapter import weights_path

        if spec.get("weights", "bundled") == "random":
            return []
        p = weights_path(spec)
        return [p, p.with_suffix(".json")]
    roots = []
    if kind == "skyreels_v2":
        roots = [spec.get("path")]
    elif kind == "magi1":
        roots = [spec.get("weights"), spec.get("vae"), spec.get("text_encoder"), spec.get("special_tokens")]
    files: list[Path] = []
    for r in roots:
        if not r or r == "random":
            continue
        root = Path(r)
        if root.is_file():
            files.append(root)
        elif root.is_dir():
            files += sorted(p for p in root.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    return files


def fingerprint(spec: dict) -> dict[str, str]:
    """{file (relative to the spec's paths as given): hex digest} of the spec's weights."""
    files = weight_files(spec)
    total = sum(p.stat().st_size for p in files)
    return {str(p): _digest(p, full=total <= FULL_HASH_BYTES) for p in files}


def _digest(path: Path, full: bool) -> str:
    h = hashlib.blake2b(digest_size=16)
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if full:
            for chunk in iter(lambda: f.read(8 * BLOCK), b""):
                h.update(chunk)
            return h.hexdigest()
        if path.suffix == ".safetensors":  # the header: every tensor's name, dtype, shape, offsets
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(min(n, 100 << 20)))
        for i in range(SAMPLES):
            f.seek(max(0, size - BLOCK) * i // max(1, SAMPLES - 1))
            h.update(f.read(BLOCK))
    return "sampled:" + h.hexdigest()
