"""Streaming outputs: MP4 frames as they finish, the per-iteration run log, the summary, and a
raw frame store (for --compare references). Each writes incrementally, so a crash keeps what was done.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from scopevid import interrupts
from scopevid.engine.files import atomic_replace_dir, atomic_write_table, atomic_write_text
from scopevid.errors import OutputExistsError, write_error


LOCK_NAME = ".scopevid.lock"
NOT_RESULTS = (LOCK_NAME, "logs")  # a run's lock, and ranks' logs written before rank 0 vets the directory


# what a run directory manages itself (and deletes or rewrites): no other run may live inside them
MANAGED = ("checkpoint", "frames", "latents", "logs", "original_frames", "steps.parquet", "original_steps.parquet")
RUN_MARKS = (LOCK_NAME, "steps.parquet", "job.json", "batch.json")  # files only a scopevid run directory has


def inside_another_run(out: Path) -> tuple[Path, str] | None:
    """(the run directory, its managed part) when `out` lies inside a part another run manages."""
    for d in Path(out).resolve().parents:
        if d.name in MANAGED and any((d.parent / m).exists() for m in RUN_MARKS):
            return d.parent, d.name
    return None


def prepare_out_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Create the output directory; refuse one that already holds results unless told to overwrite
    (a run's lock file alone is not a result), and one inside a part of another run's directory
    (its checkpoint/, frames/, ...: that run deletes or rewrites them)."""
    out = Path(path)
    nested = inside_another_run(out)
    if nested is not None:
        raise OutputExistsError(f"--out: {out} is inside {nested[1]}/ of the run in {nested[0]}, which that run manages "
                                "(and deletes when it finishes); choose another --out")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out: {out} is a file, not a directory; choose another --out")
    if out.exists() and any(p.name not in NOT_RESULTS for p in out.iterdir()) and not overwrite:
        raise OutputExistsError(f"output directory {out} is not empty; pass --overwrite or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputExistsError(f"--out: cannot create {out}: {e.strerror or e}") from None
    return out


class RunLock:
    """An exclusive lock on a run directory for as long as one run writes into it (flock on
    DIR/.scopevid.lock, released by the kernel if the process dies), so a second run into the same
    directory is refused at once instead of both writing one video. The file is removed when the run
    ends, while still locked; a run that then locks the removed file (it opened it just before) sees
    that the path no longer names its file and takes the lock again on the new one, so two runs never
    both hold the directory."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        path = self.out / LOCK_NAME
        for _ in range(10):
            fd = self._open(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown process"
                os.close(fd)
                raise OutputExistsError(f"output directory {self.out} is in use by another scopevid run ({holder}); "
                                        "wait for it to finish or choose another --out") from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
                self.fd = fd
                return self
            os.close(fd)  # the run before us removed it as we opened it: lock the new one
        raise OutputExistsError(f"output directory {self.out}: its lock file keeps changing; another run is starting there")

    def _open(self, path: Path) -> int:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputExistsError(f"--out: cannot write into {self.out}: {e.strerror or e}") from None

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.out / LOCK_NAME)  # still locked: nobody else holds this file
            except OSError:
                pass
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    return (frames.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()


# Fragmented MP4 (a moof per half second, the index up front): the file plays up to its last whole
# fragment even when its end is never written (a full disk, ffmpeg killed), where a plain MP4 keeps
# its index in the trailer and is unreadable without it.
FRAGMENTED = ["-movflags", "+frag_keyframe+empty_moov+default_base_moof", "-frag_duration", "500000"]


class Mp4Sink:
    """H.264 via imageio-ffmpeg; frames are appended (and flushed by ffmpeg) as they arrive. A write
    the disk refuses is one OutputWriteError (ffmpeg's broken pipe names no reason: the disk is the
    usual one, and the message says which file)."""

    def __init__(self, path: Path, fps: int):
        self.path, self.fps, self._w, self.frames = Path(path), fps, None, 0

    def write(self, frames: torch.Tensor) -> None:
        import imageio.v2 as imageio

        if self._w is None:
            h, w = frames.shape[1:3]
            # macro_block_size=1 keeps tiny frames (32x32) at their size; yuv420p needs even sides
            self._w = imageio.get_writer(
                str(self.path), fps=self.fps, codec="libx264", quality=8, macro_block_size=2 if (h % 2 or w % 2) else 1,
                ffmpeg_log_level="fatal", pixelformat="yuv420p", output_params=FRAGMENTED,
            )
        with interrupts.critical():  # a signal mid-frame would make the writer kill ffmpeg
            try:
                for f in to_uint8(frames):
                    self._w.append_data(f)
                    self.frames += 1
            except OSError as e:
                self._w = None  # ffmpeg is gone; close() has nothing left to finish
                raise self._refused(e) from None

    def close(self) -> None:
        if self._w is not None:
            w, self._w = self._w, None
            with interrupts.critical():
                try:
                    w.close()
                except OSError as e:
                    raise self._refused(e) from None

    def _refused(self, e: OSError):
        """ffmpeg died writing the file: almost always a refused write (ENOSPC, EROFS), seen by us
        only as a broken pipe; the free space decides which message is true."""
        if shutil.disk_usage(self.path.parent).free < 1 << 20:
            e = OSError(28, os.strerror(28))
        return write_error(e, self.path)


class FrameStore:
    """Frames as float32 .npy chunks on disk: a reference video that streams back in order, exactly
    (an identical run reads as identical: PSNR inf, LPIPS 0)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.chunks = 0

    def write(self, frames: torch.Tensor) -> None:
        path = self.path / f"{self.chunks:06d}.npy"
        try:
            np.save(path, frames.to(torch.float32).cpu().numpy())
        except OSError as e:
            raise write_error(e, path) from None
        self.chunks += 1

    def read(self):
        for p in sorted(self.path.glob("*.npy")):
            yield torch.from_numpy(np.load(p)).float()


class RunLog:
    """steps.parquet: one row per iteration, as a directory of Parquet parts (part-00000.parquet, ...)
    each written atomically every `every` rows. A streamed single file is unreadable until its footer
    is written, so a SIGKILL or a full disk would lose the whole log; here every part written before
    survives, and `pyarrow.parquet.read_table`, `pandas.read_parquet` and polars' `scan_parquet`
    read the directory as one table, in order."""

    def __init__(self, path: Path, schema: pa.Schema, every: int = 64):
        self.path, self.every, self.schema = Path(path), every, schema
        self.rows: list[dict] = []
        self.total = 0
        self.parts = 0
        # A fresh log (a resumed run replays its rows into it), put in place whole: part 0 holds no rows,
        # only the schema, so the directory reads as a (possibly empty) table from its first moment.
        atomic_replace_dir(self.path, lambda tmp: atomic_write_table(tmp / "part-00000.parquet", schema.empty_table()))
        self.parts = 1

    def add(self, record) -> None:
        self.rows.append(asdict(record) if not isinstance(record, dict) else record)
        if len(self.rows) >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        table = pa.Table.from_pylist(self.rows, schema=self.schema)
        atomic_write_table(self.path / f"part-{self.parts:05d}.parquet", table)
        self.parts += 1
        self.total += len(self.rows)
        self.rows = []

    def close(self) -> None:
        self.flush()


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str))
