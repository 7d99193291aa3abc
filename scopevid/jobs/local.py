"""A batch on this machine: the model is loaded once, then every requested video runs in turn.

A video that fails (a bad row, NaN from the model) is recorded as failed in the manifest and the
batch goes on; SIGTERM / SIGINT or a disk that refuses writes stop the batch (the manifest says
where), and `--resume` runs again what is not done, skipping finished videos.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from scopevid import adapters
from scopevid.config import RunConfig
from scopevid.engine.files import atomic_write_text
from scopevid.engine.runner import DTYPES, generate
from scopevid.engine.sinks import RunLock, prepare_out_dir
from scopevid.errors import CheckpointError, ConfigError, OutputWriteError, ScopevidError, Stopped
from scopevid.jobs import requests as requests_lib
from scopevid.jobs.manifest import Entry, Manifest, Status
from scopevid.jobs.requests import VideoRequest

BATCH_FILE = "batch.json"


def resolve(cfg: RunConfig, req: VideoRequest) -> RunConfig:
    """The run config of one request: the batch's config with the row's overrides, checked."""
    row = cfg.with_overrides(prompt=req.prompt, seed=req.seed, frames=req.frames, policy=req.policy)
    row.policy_spec()  # the policy exists
    adapters.check_prompt(row.model, row.prompt)  # e.g. a word the tiny model does not know
    return row


def open_batch(cfg: RunConfig, reqs: list[VideoRequest], out: Path, *, resume: bool, overwrite: bool) -> Manifest:
    """The batch directory (checked against batch.json on resume, else new or --overwrite) and its
    manifest; call under RunLock(out). Shared by the local queue and the Ray driver's."""
    manifest = _manifest(cfg, reqs, out, resume)
    atomic_write_text(out / BATCH_FILE, json.dumps(_settings(cfg, reqs), indent=2, default=str))
    return manifest


def _settings(cfg: RunConfig, reqs: list[VideoRequest]) -> dict:
    """What a resume must match: the config (but the mesh: a video does not depend on it) and the requests."""
    return {"config": {k: v for k, v in cfg.to_dict().items() if k not in ("source", "prompt", "parallel")},
            "requests": requests_lib.digest(reqs), "videos": len(reqs)}


def check_batch_dir(cfg: RunConfig, reqs: list[VideoRequest], out: Path, *, resume: bool, overwrite: bool) -> None:
    """Before the lock: a resumable batch with these prompts and settings, or a directory to start in."""
    if resume:
        _check_resumable(out, _settings(cfg, reqs))
    else:
        prepare_out_dir(out, overwrite)


def run_batch(cfg: RunConfig, reqs: list[VideoRequest], out: str | Path, *, resume: bool = False,
              overwrite: bool = False, say: Callable[[str], None] = print) -> Manifest:
    out = Path(out)
    check_batch_dir(cfg, reqs, out, resume=resume, overwrite=overwrite)
    with RunLock(out):
        manifest = open_batch(cfg, reqs, out, resume=resume, overwrite=overwrite)
        adapters.preflight(cfg.with_overrides(prompt=cfg.prompt or reqs[0].prompt), 1)  # one process: its mesh is 1
        adapter = adapters.load(cfg.model, cfg.device, DTYPES[cfg.dtype])  # once for every video
        todo = [e for e in manifest.entries if e.status != Status.OK.value]
        say(f"{len(reqs)} videos, {len(reqs) - len(todo)} already done; model {adapter.name} loaded once")
        try:
            for k, entry in enumerate(todo, 1):
                _run_one(cfg, reqs[entry.index], entry, manifest, adapter, out)
                e = manifest.entries[entry.index]
                what = (f"{e.frames} frames in {e.seconds:.1f} s" if e.status == Status.OK.value else e.error)
                say(f"[{k}/{len(todo)}] {e.status} {e.out}: {what}")
        except Stopped as e:  # SIGTERM / SIGINT, during a video or between two
            running = [x for x in manifest.entries if x.status == Status.RUNNING.value]
            for x in running:
                manifest.set(x.index, status=Status.STOPPED, error=str(e))
            where = f"during {running[0].out}" if running else "between two videos"
            raise Stopped(f"the batch was stopped {where} ({_done(manifest)}); the finished videos are kept and "
                          "the manifest says which they are; continue with --resume") from None
    return manifest


def _run_one(cfg, req, entry: Entry, manifest: Manifest, adapter, out: Path) -> None:
    try:
        row = resolve(cfg, req)
    except ScopevidError as e:
        manifest.set(entry.index, status=Status.FAILED, error=str(e))
        return
    manifest.set(entry.index, status=Status.RUNNING, error=None)
    t0 = time.perf_counter()
    try:
        summary = generate(row, out / entry.out, overwrite=True, progress=False, adapter=adapter)
    except (Stopped, OutputWriteError):
        raise  # the batch ends (run_batch records a stop); the next video would hit the same full disk
    except ScopevidError as e:
        manifest.set(entry.index, status=Status.FAILED, error=str(e), seconds=time.perf_counter() - t0)
        return
    seconds = time.perf_counter() - t0
    manifest.set(entry.index, status=Status.OK, seconds=seconds, frames=int(summary["frames"]),
                 frames_per_second=summary["frames"] / max(summary["wall_seconds"], 1e-9), group=0,
                 peak_rss_mb=peak_rss_mb())


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def done_line(manifest: Manifest) -> str:
    return _done(manifest)


def _done(manifest: Manifest) -> str:
    c = manifest.counts()
    return f"{c.get(Status.OK.value, 0)} of {len(manifest.entries)} done"


def _manifest(cfg: RunConfig, reqs: list[VideoRequest], out: Path, resume: bool) -> Manifest:
    if resume:
        m = Manifest.read(out)
        for e in m.entries:  # a video is done if and only if its outputs say so (generate writes summary.json last)
            summary = out / e.out / "summary.json"
            if e.status == Status.OK.value and not summary.is_file():
                e.status, e.error = Status.PENDING.value, "summary.json missing at resume"
            elif e.status != Status.OK.value and summary.is_file():  # killed after the video, before the manifest
                s = json.loads(summary.read_text())
                e.status, e.error = Status.OK.value, None
                e.frames_per_second = s["frames"] / max(s["wall_seconds"], 1e-9)
        m.write()
        return m
    entries = [Entry(index=r.index, prompt=r.prompt, seed=cfg.seed if r.seed is None else r.seed,
                     frames=cfg.frames if r.frames is None else r.frames, policy=r.policy or cfg.policy, out=r.dirname)
               for r in reqs]
    m = Manifest(out, entries)
    m.write()
    return m


def _check_resumable(out: Path, settings: dict) -> None:
    path = out / BATCH_FILE
    if not path.is_file():
        raise CheckpointError(f"resume: {out} holds no batch ({BATCH_FILE} missing); start it without --resume")
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"resume: {path} is unreadable ({e})") from None
    if saved.get("requests") != settings["requests"]:
        raise ConfigError(f"resume: the prompts differ from the batch in {out} (rows, order or their fields); "
                          "a batch resumes with its own prompt file")
    old, new = saved.get("config", {}), json.loads(json.dumps(settings["config"], default=str))
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        raise ConfigError(f"resume: {', '.join(diff)} differ(s) from the batch in {out}; resume with the same config and options")
