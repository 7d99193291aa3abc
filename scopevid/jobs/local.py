"""A batch on this machine: the model is loaded once, then every requested video runs in turn.

A video that fails (a bad row, NaN from the model) is recorded as failed in the manifest and the
batch goes on; SIGTERM / SIGINT or a disk that refuses writes stop the batch (the manifest says
where), and `--resume` runs again what is not done, skipping finished videos.

A batch keeps its own record (`BatchRecord`): DIR/batch.json (what a resume must match, and the
options it ran with), DIR/config.yaml (the resolved config) and DIR/prompts.jsonl (the requests), so
`--resume DIR` alone continues it exactly as it started; anything given again must agree, and a
refusal names the old and the new value.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from scopevid import adapters, interrupts
from scopevid.config import RunConfig, describe_differences, differences
from scopevid.engine.files import atomic_write_text
from scopevid.engine.runner import DTYPES, generate
from scopevid.engine.sinks import RunLock, prepare_out_dir
from scopevid.errors import CheckpointError, ConfigError, OutputWriteError, ScopevidError, Stopped
from scopevid.jobs import requests as requests_lib
from scopevid.jobs.manifest import Entry, Manifest, Status
from scopevid.jobs.requests import VideoRequest

BATCH_FILE = "batch.json"
CONFIG_FILE = "config.yaml"
PROMPTS_FILE = "prompts.jsonl"


@dataclass
class BatchRecord:
    """What a batch is: its config, its requests and the options it was started with."""

    cfg: RunConfig
    requests: list[VideoRequest]
    options: dict = field(default_factory=dict)  # e.g. the Ray driver's world size, mesh, CPUs per rank

    def settings(self) -> dict:
        """What a resume must match: the config (but the mesh: a video does not depend on it) and the requests."""
        cfg = {k: v for k, v in self.cfg.to_dict().items() if k not in ("source", "prompt", "parallel")}
        return json.loads(json.dumps({"config": cfg, "requests": requests_lib.digest(self.requests),
                                      "videos": len(self.requests)}, default=str))

    def save(self, out: Path) -> None:
        atomic_write_text(out / CONFIG_FILE, self.cfg.to_yaml())
        atomic_write_text(out / PROMPTS_FILE, "".join(
            json.dumps({k: v for k, v in r.model_dump().items() if k != "index" and v is not None}) + "\n"
            for r in self.requests))
        atomic_write_text(out / BATCH_FILE, json.dumps({**self.settings(), "options": self.options,
                                                        "config_file": CONFIG_FILE, "prompts_file": PROMPTS_FILE},
                                                       indent=2, default=str))

    @classmethod
    def load(cls, out: Path) -> "BatchRecord":
        """The batch in `out` as it was started (for `--resume DIR` alone)."""
        from scopevid import config as config_lib

        saved = _saved(out)
        for name in (CONFIG_FILE, PROMPTS_FILE):
            if not (out / name).is_file():
                raise CheckpointError(f"resume: {out / name} is missing (a batch of an older version, or a damaged "
                                      "directory); resume with --config and the prompt file it started with")
        return cls(config_lib.load(out / CONFIG_FILE), requests_lib.read(out / PROMPTS_FILE), dict(saved.get("options", {})))


def resolve(cfg: RunConfig, req: VideoRequest) -> RunConfig:
    """The run config of one request: the batch's config with the row's overrides, checked."""
    row = cfg.with_overrides(prompt=req.prompt, seed=req.seed, frames=req.frames, policy=req.policy)
    row.policy_spec()  # the policy exists
    adapters.check_prompt(row.model, row.prompt)  # e.g. a word the tiny model does not know
    return row


def open_batch(record: BatchRecord, out: Path, *, resume: bool) -> Manifest:
    """The batch directory's record and manifest (checked against the record on resume, else new);
    call under RunLock(out). Shared by the local queue and the Ray driver's."""
    manifest = _manifest(record, out, resume)
    record.save(out)
    return manifest


def check_batch_dir(record: BatchRecord, out: Path, *, resume: bool, overwrite: bool) -> None:
    """Before the lock: a resumable batch with these prompts and settings, or a directory to start in."""
    if resume:
        _check_resumable(out, record)
    else:
        prepare_out_dir(out, overwrite)


def resumed(out: Path, cfg: RunConfig | None, reqs: list[VideoRequest] | None) -> BatchRecord:
    """The record of the batch in `out` to resume: its own, or (with a config and prompts given again)
    theirs, once they agree with it."""
    saved = BatchRecord.load(out)
    if cfg is None and reqs is None:
        return saved
    return BatchRecord(cfg or saved.cfg, reqs if reqs is not None else saved.requests, saved.options)


def run_batch(record: BatchRecord, out: str | Path, *, resume: bool = False, overwrite: bool = False,
              say: Callable[[str], None] = print) -> Manifest:
    out = Path(out)
    cfg, reqs = record.cfg, record.requests
    check_batch_dir(record, out, resume=resume, overwrite=overwrite)
    with RunLock(out):
        manifest = open_batch(record, out, resume=resume)
        try:
            adapters.preflight(cfg.with_overrides(prompt=cfg.prompt or reqs[0].prompt), 1)  # one process: its mesh is 1
            with interrupts.interruptible():  # loading writes nothing: a signal may end it at once
                adapter = adapters.load(cfg.model, cfg.device, DTYPES[cfg.dtype])  # once for every video
            todo = [e for e in manifest.entries if e.status != Status.OK.value]
            say(f"{len(reqs)} videos, {len(reqs) - len(todo)} already done; model {adapter.name} loaded once")
            for k, entry in enumerate(todo, 1):
                interrupts.check()  # between two videos: a safe point
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
                          f"the manifest says which they are; continue with: scopevid batch --resume --out {out}") from None
        finally:
            manifest.write()
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


def _manifest(record: BatchRecord, out: Path, resume: bool) -> Manifest:
    cfg, reqs = record.cfg, record.requests
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
            elif e.status == Status.RUNNING.value:  # a killed batch's video: it runs again
                e.status = Status.STOPPED.value
        m.write()
        return m
    entries = [Entry(index=r.index, prompt=r.prompt, seed=cfg.seed if r.seed is None else r.seed,
                     frames=cfg.frames if r.frames is None else r.frames, policy=r.policy or cfg.policy, out=r.dirname)
               for r in reqs]
    m = Manifest(out, entries)
    m.start()
    return m


def _saved(out: Path) -> dict:
    path = out / BATCH_FILE
    if not path.is_file():
        raise CheckpointError(f"resume: {out} holds no batch ({BATCH_FILE} missing); start it without --resume")
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"resume: {path} is unreadable ({e})") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"resume: {path} is not a batch record (a JSON object)")
    return saved


def _check_resumable(out: Path, record: BatchRecord) -> None:
    saved, now = _saved(out), record.settings()
    if saved.get("requests") != now["requests"]:
        raise ConfigError(f"resume: the prompts differ from the batch in {out} (rows, order or their fields); "
                          f"a batch resumes with its own prompts ({out / PROMPTS_FILE}): omit --prompts")
    diff = differences(saved.get("config", {}), now["config"])
    if diff:
        raise ConfigError(f"resume: {describe_differences(diff, 'when the batch started')}; a batch resumes with its own "
                          f"config and options: omit them, or start a new batch")
