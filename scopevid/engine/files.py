"""Files that survive a kill at any moment: written to a temporary name, fsynced, renamed into place
(atomic on POSIX), and their directory fsynced. A reader sees the old file or the new one, never half.
Used for checkpoints, shards and the run log's parts."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from scopevid import interrupts
from scopevid.errors import refused_errno, write_error


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def _refused_write(path: Path):
    """A write the filesystem refuses (full disk, read-only, quota) removes its temporary file (it
    would hold on to the space) and becomes one OutputWriteError naming `path`; the old file, if any,
    is untouched."""
    path = Path(path)
    try:
        yield
    except OSError as e:
        for tmp in path.parent.glob(f".{path.name}.tmp{os.getpid()}"):
            tmp.unlink(missing_ok=True)
        if refused_errno(e) is not None:
            raise write_error(e, path) from None
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with interrupts.critical(), _refused_write(path):
        _write_bytes(path, data)


def _write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_torch_save(path: Path, obj) -> None:
    with interrupts.critical(), _refused_write(path):
        _torch_save(path, obj)


def _torch_save(path: Path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:  # torch's zip writer reports a failed write as its own error after it
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_table(path: Path, table: pa.Table) -> None:
    with interrupts.critical(), _refused_write(path):
        _write_table(path, table)


def _write_table(path: Path, table: pa.Table) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pq.write_table(table, str(tmp))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def parts(directory: Path) -> list[Path]:
    """A directory's numbered Parquet parts (part-NNNNN.parquet), in order."""
    return sorted(Path(directory).glob("part-*.parquet"))
