"""Files that survive a kill at any moment: written to a temporary name, fsynced, renamed into place
(atomic on POSIX), and their directory fsynced. A reader sees the old file or the new one, never half.
Used for checkpoints, shards and the run log's parts."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from scopevid import interrupts


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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with interrupts.critical():
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
    with interrupts.critical():
        _torch_save(path, obj)


def _torch_save(path: Path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_table(path: Path, table: pa.Table) -> None:
    with interrupts.critical():
        _write_table(path, table)


def _write_table(path: Path, table: pa.Table) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pq.write_table(table, str(tmp))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)




def parts(directory: Path) -> list[Path]:
    """A directory's numbered Parquet parts (part-NNNNN.parquet), in order."""
    return sorted(Path(directory).glob("part-*.parquet"))
