"""A batch's record of its videos: one row per requested video.

DIR/manifest.parquet is a snapshot, rewritten atomically (it reads at any moment; a kill leaves the
previous one) at the start, at the end, and in between at most once per `every_s` seconds, or less
often when writing it takes long (a 10,000-row snapshot costs about 0.4 s: rewriting it on every
change cost more than making a short video). Every change is also appended, as it happens, to
DIR/manifest.jsonl (one JSON object a line: the row's index and the fields that changed), so
`Manifest.read` gives the newest state: the snapshot plus the journal lines written after it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, fields
from enum import Enum
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from scopevid.engine.files import atomic_write_table
from scopevid.errors import write_error

NAME = "manifest.parquet"
JOURNAL = "manifest.jsonl"
OFFSET_KEY = b"scopevid.journal_bytes"  # snapshot metadata: how much of the journal it includes


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
FIELDS = {f.name for f in fields(Entry)}


class Manifest:
    def __init__(self, directory: Path, entries: list[Entry], every_s: float = 1.0):
        self.dir = Path(directory)
        self.path = self.dir / NAME
        self.journal = self.dir / JOURNAL
        self.entries = entries
        self.every_s = every_s
        self._last_write = 0.0
        self._write_cost = 0.0

    @classmethod
    def read(cls, directory: Path) -> "Manifest":
        """The newest state: the snapshot, then every complete journal line written after it."""
        directory = Path(directory)
        pf = pq.ParquetFile(str(directory / NAME))
        meta = pf.schema_arrow.metadata or {}
        entries = [Entry(**{k: v for k, v in row.items() if k in FIELDS}) for row in pf.read().to_pylist()]
        m = cls(directory, entries)
        offset = int(meta.get(OFFSET_KEY, b"0"))
        if m.journal.is_file():
            with open(m.journal, "rb") as f:
                f.seek(offset)
                for line in f.read().split(b"\n"):
                    try:
                        change = json.loads(line)
                    except ValueError:  # the empty tail, or a line cut by a kill
                        continue
                    i = int(change.pop("index"))
                    for k, v in change.items():
                        if k in FIELDS and 0 <= i < len(entries):
                            setattr(entries[i], k, v)
        return m

    def set(self, index: int, **kw) -> None:
        e = self.entries[index]
        change = {k: (v.value if isinstance(v, Status) else v) for k, v in kw.items()}
        for k, v in change.items():
            setattr(e, k, v)
        line = json.dumps({"index": index, **change}, default=str) + "\n"
        try:
            with open(self.journal, "a") as f:
                f.write(line)
        except OSError as e2:
            raise write_error(e2, self.journal) from None
        if time.monotonic() - self._last_write >= max(self.every_s, 10 * self._write_cost):
            self.write()

    def write(self) -> None:
        """The snapshot, now (with the journal offset it includes)."""
        t0 = time.monotonic()
        offset = self.journal.stat().st_size if self.journal.is_file() else 0
        schema = SCHEMA.with_metadata({OFFSET_KEY: str(offset).encode()})
        atomic_write_table(self.path, pa.Table.from_pylist([asdict(e) for e in self.entries], schema=schema))
        self._last_write = time.monotonic()
        self._write_cost = self._last_write - t0

    def start(self) -> None:
        """A new batch: the first snapshot, and no journal of an older batch in this directory."""
        if self.journal.exists():
            os.unlink(self.journal)
        self.write()

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.status] = out.get(e.status, 0) + 1
        return out
