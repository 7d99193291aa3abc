"""Shared fixtures: small, fast configs of the tiny model (random weights, so tests never depend on
the shipped checkpoint's quality) and a single-thread torch for reproducible CPU timings."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]

torch.set_num_threads(int(os.environ.get("SCOPEVID_TEST_THREADS", "1")))

TINY_ARCH = {
    "size": 16,
    "patch": 4,
    "dim": 32,
    "depth": 2,
    "heads": 2,
    "vocab": ["<null>", "red", "green", "blue", "square", "moving", "left", "right"],
}


def write_tiny_config(tmp: Path, **over) -> Path:
    """A tiny-model YAML in tmp; `over` updates top-level keys, `schedule` is merged."""
    sched = {
        "kind": "diffusion_forcing",
        "steps": 8,
        "base_num_frames": 8,
        "overlap_history": 2,
        "ar_step": 2,
        "causal_block_size": 1,
        "selective": "causal",
    }
    sched.update(over.pop("schedule", {}))
    cfg = {
        "model": {"kind": "tiny", "weights": "random", "init_seed": 0, "shift": 3.0, "arch": TINY_ARCH},
        "prompt": "red square moving right",
        "guidance": 2.0,
        "frames": 20,
        "fps": 8,
        "seed": 0,
        "schedule": sched,
        "policy": "original",
        "policy_presets": str(ROOT / "configs" / "policies" / "tiny.yaml"),
    }
    cfg.update(over)
    path = tmp / "tiny_test.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def tiny_config(tmp_path):
    return lambda **over: write_tiny_config(tmp_path, **over)


def one_and_two_ranks(suite: str, cases: list, timeout_s: float = 240) -> tuple[list, list]:
    """Every (config path, policy) case on one process, and on a 2-rank gloo group (one start-up) that
    runs `suite` ("module:function", called on every rank with (topology, cases))."""
    from scopevid.cluster.launch import spawn
    from scopevid.cluster.worker import collect_rollout
    from scopevid.engine.topology import LocalTopology

    one = [collect_rollout(LocalTopology(), p, policy, check_decisions=True) for p, policy in cases]
    two = spawn(suite, 2, args=(cases,), timeout_s=timeout_s, threads=1, dist_timeout_s=60,
                env={"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"})
    return one, two


def assert_two_ranks_match_one(ref: dict, r0: dict, r1: dict, tol: float = 1e-4) -> None:
    """Both ranks hold the same latents, within `tol` of one rank's, after identical decisions."""
    assert r0["frames"] == r1["frames"] == ref["frames"] == list(range(ref["latent_frames"]))
    assert torch.equal(r0["latents"], r1["latents"])  # velocities are gathered, the solver step replicated
    diff = float((r0["latents"] - ref["latents"]).abs().max())
    assert diff <= tol, f"2-rank video differs from 1-rank by {diff}"
    assert r0["records"] == r1["records"]  # also checked in-run at every iteration
    assert r0["modes"] == ref["modes"] and r0["digest"] == ref["digest"]


def kill_all(procs) -> None:
    """SIGKILL and reap every process of `procs` still running (a test never leaves one behind)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


# --- a real local Ray cluster -----------------------------------------------------------------------
def ray_env() -> dict:
    """The environment of Ray test clusters and the processes that use them: everything on 127.0.0.1
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray's node address on loopback on a single machine),
    token auth disabled as `ray job submit` needs, this venv's `python` first on PATH."""
    import os
    import sys

    env = dict(os.environ)
    env.update(RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", SCOPEVID_DIST_TIMEOUT="60")
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)
    return env


@contextmanager
def local_ray_head(prefix: str, num_cpus: int = 2):
    """A `ray start --head` of this machine, stopped on exit by its own session and temp dir (never
    `ray stop`, which would stop every Ray cluster on the machine)."""
    import shutil
    import tempfile

    from scopevid.cluster.raycluster import LocalHead

    tmp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # short: Ray's unix sockets live under it
    head = LocalHead(tmp, num_cpus=num_cpus, env=ray_env())
    try:
        head.start()
        yield head
    finally:
        head.stop()
        shutil.rmtree(tmp, ignore_errors=True)



def write_magi_fixture_config(tmp: Path, frames: int = 24) -> Path:
    """configs/bench/magi1_tiny_fixture.yaml (the tiny MAGI-1 checkpoint of tests/fixtures) with
    absolute paths, so it runs from any working directory; `frames` pixel frames."""
    raw = yaml.safe_load((ROOT / "configs" / "bench" / "magi1_tiny_fixture.yaml").read_text())
    for key in ("arch", "weights", "special_tokens", "vae"):
        raw["model"][key] = str(ROOT / raw["model"][key])
    raw["policy_presets"] = str(ROOT / "configs" / "policies" / "magi1.yaml")
    raw["frames"] = frames
    path = tmp / "magi.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def write_poisoned_tiny(tmp: Path, word: str = "blue", **over) -> Path:
    """A tiny-model config whose checkpoint (safetensors + JSON, TINY_ARCH) has the embedding of one
    vocabulary word set to NaN: any prompt with that word makes the model return NaN inside
    `generate` (NonFiniteError); every other prompt runs normally."""
    import json

    from safetensors.torch import save_file

    from scopevid.adapters.tiny.model import TinyDiT, TinyDiTConfig

    torch.manual_seed(0)
    mcfg = TinyDiTConfig.from_dict(TINY_ARCH)
    model = TinyDiT(mcfg)
    with torch.no_grad():
        for p in model.parameters():  # adaLN-zero leaves blocks as the identity: give them weights
            if p.dim() > 0 and float(p.abs().sum()) == 0.0:
                torch.nn.init.normal_(p, std=0.02)
        model.word.weight[mcfg.vocab.index(word)] = float("nan")
    path = tmp / "poisoned.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({"model": mcfg.to_dict(), "shift": 3.0}))
    return write_tiny_config(tmp, model={"kind": "tiny", "weights": str(path)}, **over)


def hf_cache_snapshot(src: Path, repo: Path, subdir: str = "", edit=None) -> Path:
    """`src`'s files laid out as a Hugging Face cache (hub/models--org--name): each file once under
    blobs/<sha256>, and snapshots/<rev>/<subdir>/<name> a relative link to it (../../blobs/<hash>,
    one more ../ per subdir level), as `huggingface_hub` downloads them. `edit(name, bytes) -> bytes`
    changes a file on the way. Returns the snapshot directory (what a user points a config at)."""
    import hashlib
    import os

    snap = repo / "snapshots" / "0123abcd"
    target = snap / subdir if subdir else snap
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    target.mkdir(parents=True)
    for f in sorted(p for p in src.iterdir() if p.is_file()):
        data = f.read_bytes() if edit is None else edit(f.name, f.read_bytes())
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (target / f.name).symlink_to(os.path.relpath(blob, target))
    return snap
