"""Files that survive a kill at any moment: written to a temporary name, fsynced, renamed into place
(atomic on POSIX), and their directory fsynced. A reader sees the old file or the new one, never half.
Every file the package writes whole goes through here (checkpoints, shards, run-log parts, configs,
summaries, latents, the bundled model's exports and training checkpoints); a write the filesystem
refuses (full disk, read-only, quota) leaves no temporary behind and becomes one OutputWriteError."""

from __future__ import annotations

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq

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


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextmanager
def _refused_write(path: Path):
    """A write the filesystem refuses removes its temporary file (it would hold on to the space) and
    becomes one OutputWriteError naming `path`; the old file, if any, is untouched."""
    try:
        yield
    except OSError as e:
        _discard(_tmp(path))
        if refused_errno(e) is not None:
            raise write_error(e, path) from None
        raise
    except BaseException:
        _discard(_tmp(path))
        raise


def _discard(tmp: Path) -> None:
    if tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` creates the whole file at a temporary path; it then replaces `path` atomically.
    No signal interrupts it (scopevid.interrupts): a stop requested meanwhile acts after the rename."""
    path = Path(path)
    tmp = _tmp(path)
    with interrupts.critical(), _refused_write(path):
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(path: Path, obj) -> None:
    import torch

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as e:  # torch's zip writer reports a failed write as its own error after it
                if isinstance(e.__context__, OSError):
                    raise e.__context__ from None
                raise

    atomic_write(path, write)


def atomic_write_table(path: Path, table: pa.Table) -> None:
    atomic_write(path, lambda tmp: pq.write_table(table, str(tmp)))


def atomic_save_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except OSError:
            raise
        except Exception as e:  # SafetensorError: "IoError(Os { code: 28, kind: StorageFull, ... })"
            m = re.search(r"code: (\d+)", str(e))
            if m is None:
                raise
            raise OSError(int(m.group(1)), os.strerror(int(m.group(1)))) from None

    atomic_write(path, write)


def atomic_replace_dir(path: Path, fill: Callable[[Path], None]) -> None:
    """A directory put in place whole: `fill(tmp_dir)` writes its files (each atomically), then the old
    directory (or a file of that name) is removed and the new one renamed into place."""
    path = Path(path)
    tmp = _tmp(path)
    with interrupts.critical(), _refused_write(path):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        fill(tmp)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        os.replace(tmp, path)
        _fsync_dir(path.parent)


def parts(directory: Path) -> list[Path]:
    """A directory's numbered Parquet parts (part-NNNNN.parquet), in order."""
    return sorted(Path(directory).glob("part-*.parquet"))
