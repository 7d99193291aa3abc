"""Durable outputs of a resumable run: every decoded frame and every clean latent, as numbered Parquet
parts each written atomically, so a kill at any moment loses at most what was produced since the
last flush (the checkpoint flushes them) and a resume cuts them back to the checkpoint.

    OUT/frames/part-NNNNN.parquet    decoded frames, uint8 [H, W, 3] per row
    OUT/latents/part-NNNNN.parquet   clean latents, float per row (exact bytes)
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from scopevid.engine.files import atomic_write_table, parts as _parts
from scopevid.errors import CheckpointError

FRAME_SCHEMA = pa.schema(
    [("frame", pa.int64()), ("height", pa.int32()), ("width", pa.int32()), ("channels", pa.int32()),
     ("pixels", pa.binary())]
)
LATENT_SCHEMA = pa.schema(
    [("frame", pa.int64()), ("shape", pa.list_(pa.int32())), ("dtype", pa.string()), ("data", pa.binary())]
)


class ShardWriter:
    """Rows appended in order and written as numbered Parquet parts (each part written atomically).

    `flush` makes everything added so far durable and returns the number of parts; `truncate(n)`
    removes parts numbered n and later (what a killed run wrote after its last checkpoint).
    """

    def __init__(self, directory: Path, schema: pa.Schema, rows_per_part: int = 64):
        self.dir, self.schema, self.rows_per_part = Path(directory), schema, rows_per_part
        self.dir.mkdir(parents=True, exist_ok=True)
        self.parts = len(_parts(self.dir))
        self.rows: list[dict] = []
        self.count = 0  # rows added in this process (after any truncate)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.count += 1
        if len(self.rows) >= self.rows_per_part:
            self.flush()

    def flush(self) -> int:
        if self.rows:
            table = pa.Table.from_pylist(self.rows, schema=self.schema)
            atomic_write_table(self.dir / f"part-{self.parts:05d}.parquet", table)
            self.parts += 1
            self.rows = []
        return self.parts

    def truncate(self, parts: int) -> None:
        for p in _parts(self.dir):
            if int(p.stem.split("-")[1]) >= parts:
                p.unlink()
        for p in self.dir.glob(".part-*"):  # temporaries of a killed write
            p.unlink()
        self.parts, self.rows = parts, []


def count_rows(directory: Path, parts: int) -> int:
    """Rows in the first `parts` shards, each one opened (its footer read): a missing or truncated
    shard is a CheckpointError naming it, never a silent short video."""
    files = _parts(directory)[:parts]
    if len(files) != parts:
        raise CheckpointError(f"{directory}: {len(files)} shard parts, the checkpoint says {parts}; the run directory "
                              "was damaged: start the job over (--overwrite)")
    n = 0
    for p in files:
        try:
            n += pq.ParquetFile(str(p)).metadata.num_rows
        except Exception as e:  # pyarrow raises several types for truncated files
            raise CheckpointError(f"{p}: unreadable shard ({e}); start the job over (--overwrite)") from None
    return n


def read_frames(directory: Path, parts: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(absolute pixel frame index, uint8 [H, W, C]) in order, from frame shards."""
    for p in _parts(directory)[:parts]:
        t = pq.read_table(str(p)).to_pydict()
        for f, h, w, c, b in zip(t["frame"], t["height"], t["width"], t["channels"], t["pixels"]):
            yield f, np.frombuffer(b, dtype=np.uint8).reshape(h, w, c)


def read_latents(directory: Path, parts: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(absolute latent index, tensor) in order, from latent shards (exact values)."""
    for p in _parts(directory)[:parts]:
        t = pq.read_table(str(p)).to_pydict()
        for f, shape, dt, b in zip(t["frame"], t["shape"], t["dtype"], t["data"]):
            arr = np.frombuffer(b, dtype=np.dtype(dt)).reshape(shape)
            yield f, torch.from_numpy(arr.copy())


class OutputShards:
    """Rank 0's frame and latent shards of one run, with the counts a checkpoint records."""

    def __init__(self, out: Path, rows_per_part: int = 64):
        self.out = Path(out)
        self.frames = ShardWriter(self.out / "frames", FRAME_SCHEMA, rows_per_part)
        self.latents = ShardWriter(self.out / "latents", LATENT_SCHEMA, rows_per_part)

    @property
    def pixel_frames(self) -> int:
        return self.frames.count

    @property
    def latent_frames(self) -> int:
        return self.latents.count

    def add_latent(self, frame: int, latent: torch.Tensor) -> None:
        x = latent.detach().to("cpu")
        if x.dtype == torch.bfloat16:
            x = x.float()
        a = np.ascontiguousarray(x.numpy())
        self.latents.add({"frame": frame, "shape": list(a.shape), "dtype": str(a.dtype), "data": a.tobytes()})

    def add_frames(self, pixels: torch.Tensor) -> None:
        """Decoded frames [F, H, W, 3] in [0, 1]."""
        from scopevid.engine.sinks import to_uint8

        for px in to_uint8(pixels):
            h, w, c = px.shape
            self.frames.add({"frame": self.frames.count, "height": h, "width": w, "channels": c,
                             "pixels": np.ascontiguousarray(px).tobytes()})

    def flush(self) -> tuple[int, int]:
        """(frame parts, latent parts), everything added so far durable."""
        return self.frames.flush(), self.latents.flush()

    def start(self) -> None:
        """A fresh run: no part of an older run's shards survives."""
        self.frames.truncate(0)
        self.latents.truncate(0)

    @staticmethod
    def check(out: Path, latest: dict) -> None:
        """The shards hold what a checkpoint says they do (read-only: their footers)."""
        for what, parts, want in (("latents", latest["latent_parts"], latest["latent_frames"]),
                                  ("frames", latest["frame_parts"], latest["pixel_frames"])):
            got = count_rows(Path(out) / what, parts)
            if got != want:
                raise CheckpointError(f"{Path(out) / what}: {got} rows in the shards, the checkpoint says {want}; "
                                      "the run directory was damaged: start the job over (--overwrite)")

    def restore(self, latest: dict) -> None:
        """Cut the shards back to a checkpoint (after `check`)."""
        self.frames.truncate(latest["frame_parts"])
        self.latents.truncate(latest["latent_parts"])
        self.frames.count, self.latents.count = int(latest["pixel_frames"]), int(latest["latent_frames"])

    def replay_frames(self, parts: int, batch: int = 64) -> Iterator[torch.Tensor]:
        """The frames of the first `parts` parts as [n, H, W, 3] float batches in [0, 1] (to re-encode)."""
        buf: list[torch.Tensor] = []
        for _, px in read_frames(self.out / "frames", parts):
            buf.append(torch.from_numpy(px.copy()))
            if len(buf) == batch:
                yield torch.stack(buf).float() / 255.0
                buf = []
        if buf:
            yield torch.stack(buf).float() / 255.0
