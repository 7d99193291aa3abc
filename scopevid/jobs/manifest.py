"""DIR/manifest.parquet: one row per requested video, rewritten atomically whenever a row changes,
so it reads at any moment (a kill leaves the previous version) and `--resume` knows what is done."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from enum import Enum
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from scopevid.engine.files import atomic_write_table

NAME = "manifest.parquet"


class Status(str, Enum):
    PENDING = "pending"  # not started yet
    RUNNING = "running"  # started; a manifest that still says so after the job ended was killed
    OK = "ok"  # video.mp4 and summary.json complete
    FAILED = "failed"  # the error column says why (a bad row, NaN from the model, ...)
    STOPPED = "stopped"  # SIGTERM / SIGINT while it ran; --resume starts it again


@dataclass
class Entry:
    index: int
    prompt: str
    seed: int
    frames: int
    policy: str
    out: str  # the video's directory, relative to the batch's
    status: str = Status.PENDING.value
    seconds: float | None = None  # wall time of the video (generate, decode and writes)
    frames_per_second: float | None = None
    error: str | None = None
    group: int | None = None  # the rank group that made it (0 for a local batch)
    peak_rss_mb: float | None = None  # the largest peak resident memory of that group's ranks so far


SCHEMA = pa.schema([
    ("index", pa.int64()), ("prompt", pa.string()), ("seed", pa.int64()), ("frames", pa.int64()),
    ("policy", pa.string()), ("out", pa.string()), ("status", pa.string()), ("seconds", pa.float64()),
    ("frames_per_second", pa.float64()), ("error", pa.string()), ("group", pa.int64()), ("peak_rss_mb", pa.float64()),
])


class Manifest:
    def __init__(self, directory: Path, entries: list[Entry]):
        self.path = Path(directory) / NAME
        self.entries = entries

    @classmethod
    def read(cls, directory: Path) -> "Manifest":
        table = pq.read_table(str(Path(directory) / NAME))
        names = {f.name for f in fields(Entry)}
        return cls(directory, [Entry(**{k: v for k, v in row.items() if k in names}) for row in table.to_pylist()])

    def set(self, index: int, **kw) -> None:
        e = self.entries[index]
        for k, v in kw.items():
            setattr(e, k, v.value if isinstance(v, Status) else v)
        self.write()

    def write(self) -> None:
        atomic_write_table(self.path, pa.Table.from_pylist([asdict(e) for e in self.entries], schema=SCHEMA))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.status] = out.get(e.status, 0) + 1
        return out
