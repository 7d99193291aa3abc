"""Resumable rollouts: atomic checkpoints at window boundaries and durable frame / latent shards.

A long job must resume after a kill (preemption, a lost node) and finish with the same video as an
uninterrupted run of the same seed. Three things make that exact:

1. Rollout state is saved at *boundaries*: before the first iteration of a diffusion forcing window,
   or (plans without windows, e.g. chunk-causal) before an iteration that follows one where frames
   left the window. The state is everything the rest of the rollout reads: latents in flight, clean
   latents still needed, velocity history and host features per absolute frame, KV cache, policy and
   solver state, noise-source and torch RNG state, stats, the next serial and the next frame to emit.
   A restored rollout skips the plan's iterations before that serial and goes on bit for bit.
2. Outputs are durable as they are produced: rank 0 writes every clean latent and every decoded
   frame into Parquet shards (pyarrow), flushed at each checkpoint. On resume the shards are cut
   back to the checkpoint, the MP4 is re-encoded from the frame shards (lossless uint8, fed to one
   encoder in the same order, so the bytes equal an uninterrupted run's), the run log is rebuilt from
   the log parts, and the decoder's pending latents come back from the checkpoint.
3. Commits are atomic across ranks: every rank writes its own file (tmp + rename), the ranks meet
   (a float64 all-reduce, so no rank can commit before all have written), then rank 0 replaces
   `checkpoint/LATEST`. A kill at any moment leaves either the old or the new checkpoint complete.

Layout under the output directory (which must be shared by all ranks' nodes):
    frames/part-NNNNN.parquet    decoded frames, uint8 [H, W, 3] per row
    latents/part-NNNNN.parquet   clean latents, float per row (exact bytes)
    checkpoint/LATEST            JSON: which checkpoint is complete, output counters
    checkpoint/itNNNNNNNN/rank-RRRRR.pt   rollout state per rank (+ output.pt on rank 0)
    checkpoint/log/part-NNNNN.parquet     run-log rows up to each checkpoint
The checkpoint directory is deleted once the run is complete and its summary.json written.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from scopevid.engine.files import atomic_torch_save, atomic_write_bytes, atomic_write_table, parts as _parts
from scopevid.engine.state import compact, to_device
from scopevid.errors import CheckpointError, ConfigError, StopRequested

FORMAT = 2  # 2: the rollout state is engine.state.RolloutState (format 1 is not read)
LATEST = "LATEST"

FRAME_SCHEMA = pa.schema(
    [("frame", pa.int64()), ("height", pa.int32()), ("width", pa.int32()), ("channels", pa.int32()),
     ("pixels", pa.binary())]
)
LATENT_SCHEMA = pa.schema(
    [("frame", pa.int64()), ("shape", pa.list_(pa.int32())), ("dtype", pa.string()), ("data", pa.binary())]
)



# --- shards ---------------------------------------------------------------------------------------
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


# --- rollout state --------------------------------------------------------------------------------
def rollout_state(rollout, *, window_reset: bool = False) -> dict:
    """The rollout's state (engine.state.RolloutState) plus the rank it belongs to."""
    state = rollout.state.state_dict(window_reset=window_reset)
    state["rank"], state["world"] = rollout.topo.rank, rollout.topo.world
    state["topology"] = dict(rollout.topo.state_dict())  # hand-over counters: a resumed job reports the whole job
    return state


def load_rollout_state(rollout, state: dict) -> None:
    """Restore a fresh Rollout (same adapter, plan, policy, seed, topology) from `rollout_state`."""
    if (state.get("rank"), state.get("world")) != (rollout.topo.rank, rollout.topo.world):
        raise CheckpointError(
            f"checkpoint is of rank {state.get('rank')} of {state.get('world')}, this process is rank {rollout.topo.rank} "
            f"of {rollout.topo.world}: resume with the world size the job was started with"
        )
    rollout.state.load_state_dict(state, rollout.device)
    if state.get("topology"):
        rollout.topo.load_state_dict(state["topology"])


# --- the job-level hook ---------------------------------------------------------------------------
class Checkpointer:
    """Makes one rollout (one rank's part of a job) resumable; `runner.run_once(checkpoint=...)`.

    Every rank holds one. `attach` restores from `checkpoint/LATEST` when resuming and installs the
    boundary hook on the Rollout; rank 0 (the writer) also streams latent / frame shards and restores
    the decoder, MP4 and run log. `every`: save at every `every`-th boundary (0: never save; progress
    callbacks still run). `min_seconds`: additionally skip a boundary when the last save is more recent
    (decided on rank 0 and shared with one all-reduce, so every rank saves at the same boundary).
    `on_iteration(serial, total, next_emit, pixel_frames)` is called before every iteration.
    `stop_requested()` too (a driver's stop request); if any rank's answer is yes, every rank raises
    StopRequested before the same iteration.
    """

    def __init__(
        self,
        out: str | Path,
        *,
        resume: bool = False,
        every: int = 1,
        min_seconds: float = 0.0,
        shards: bool = True,
        on_iteration: Callable[[int, int, int, int], None] | None = None,
        stop_requested: Callable[[], bool] | None = None,
        rows_per_part: int = 64,
    ):
        self.out = Path(out)
        self.dir = self.out / "checkpoint"
        self.resume, self.every, self.min_seconds = resume, every, min_seconds
        self.shards, self.on_iteration, self.rows_per_part = shards, on_iteration, rows_per_part
        self.stop_requested = stop_requested
        self.rollout = None
        self.writes = False
        self.frames_w: ShardWriter | None = None
        self.latents_w: ShardWriter | None = None
        self.pixel_frames = 0
        self.latent_frames = 0
        self.saves = 0
        self.restored_serial = 0
        self.wall_before = 0.0
        self._t0 = time.perf_counter()
        self._last_save = time.perf_counter()
        self._boundaries = 0
        self._last_emit = 0
        self._log_rows: list[dict] = []
        self._log_parts = 0
        self._decoder = None
        self._total = 0

    # --- set-up -------------------------------------------------------------------------------
    def bind_settings(self, settings: dict) -> None:
        """Record the run's resolved config with a fresh job; on resume, refuse a different one (the
        checkpoint's state is only valid for the settings that produced it). Rank 0 calls this."""
        path = self.dir / "settings.json"
        text = json.dumps(settings, sort_keys=True, default=str)
        if not self.resume:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, text.encode())
            return
        if not path.is_file():
            raise CheckpointError(f"resume: {self.out} holds no resumable run (it finished, or was not started with "
                                  "--checkpoint)")
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable ({e}); start the job over (--overwrite)") from None
        now = json.loads(text)
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if changed:
            k = changed[0]
            raise ConfigError(f"resume: {k} was {saved.get(k)!r} when the run started and is {now.get(k)!r} now; "
                              "resume with the same config and options, or start over with --overwrite")

    def attach(self, rollout, *, writes: bool, decoder=None, sink=None) -> tuple[int, float]:
        """Install on `rollout` (before it runs); restore when resuming. Returns (pixel frames already
        written, wall seconds spent before the kill)."""
        self.rollout, self.writes, self._decoder = rollout, writes, decoder
        self._total = rollout.plan.num_iterations()
        rank = rollout.topo.rank
        latest = self._read_latest() if self.resume else None
        if latest is not None and latest["world"] != rollout.topo.world:
            raise CheckpointError(
                f"{self.dir}: checkpoint was written by {latest['world']} ranks, this job has {rollout.topo.world}; "
                "resume with the same --world-size"
            )
        if writes:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "log").mkdir(exist_ok=True)
            if self.shards:
                self.frames_w = ShardWriter(self.out / "frames", FRAME_SCHEMA, self.rows_per_part)
                self.latents_w = ShardWriter(self.out / "latents", LATENT_SCHEMA, self.rows_per_part)
            if not self.resume:  # a fresh run in a reused directory: an older job's checkpoint is not ours
                (self.dir / LATEST).unlink(missing_ok=True)
            self._clean_stale(latest)
        self._wrap_on_step(rollout)
        if latest is not None:
            tag = self.dir / latest["tag"]
            path = tag / f"rank-{rank:05d}.pt"
            if not path.is_file():
                raise CheckpointError(f"{path}: missing (checkpoint {latest['tag']} is incomplete for rank {rank})")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # torch raises several types for corrupt files
                raise CheckpointError(f"{path}: cannot read ({e})") from None
            load_rollout_state(rollout, state)
            self.restored_serial = latest["serial"]
            self._last_emit = state["next_emit"]
            self.wall_before = float(latest.get("wall_seconds", 0.0))
            self.saves = int(latest.get("saves", 0))
            self._log_parts = int(latest["log_parts"])
            if writes:
                self._restore_outputs(latest, tag, decoder, sink)
        elif writes and self.shards:
            self.frames_w.truncate(0)
            self.latents_w.truncate(0)
        rollout.before_iteration = self._before_iteration
        return self.pixel_frames, self.wall_before

    def _wrap_on_step(self, rollout) -> None:
        """Collect the run-log rows between checkpoints (rank 0), then call the runner's on_step."""
        inner = rollout.on_step

        def on_step(rec) -> None:
            if self.writes:
                self._log_rows.append(asdict(rec))
            if inner is not None:
                inner(rec)

        rollout.on_step = on_step
        self._inner_on_step = inner

    def _restore_outputs(self, latest: dict, tag: Path, decoder, sink) -> None:
        from scopevid.engine.rollout import StepRecord

        if self.shards:
            self.frames_w.truncate(latest["frame_parts"])
            self.latents_w.truncate(latest["latent_parts"])
            # every shard the resumed job relies on must hold what the checkpoint says it does
            for what, parts, want in (("latents", latest["latent_parts"], latest["latent_frames"]),
                                      ("frames", latest["frame_parts"], latest["pixel_frames"])):
                got = count_rows(self.out / what, parts)
                if got != want:
                    raise CheckpointError(f"{self.out / what}: {got} rows in the shards, the checkpoint says {want}; "
                                          "the run directory was damaged: start the job over (--overwrite)")
        try:
            out_state = torch.load(tag / "output.pt", map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for corrupt files
            raise CheckpointError(f"{tag / 'output.pt'}: cannot read ({e}); start the job over (--overwrite)") from None
        if decoder is not None and out_state.get("decoder") is not None:
            decoder.load_state_dict(to_device(out_state["decoder"], self.rollout.device))
        self.pixel_frames = int(latest["pixel_frames"])
        self.latent_frames = int(latest["latent_frames"])
        if self.shards:
            self.frames_w.count, self.latents_w.count = self.pixel_frames, self.latent_frames
        if sink is not None:  # re-encode what was written before the kill, then carry on appending
            if not self.shards:
                raise CheckpointError("resuming a video needs the frame shards (shards=False)")
            n, batch = 0, []
            for _, px in read_frames(self.out / "frames", latest["frame_parts"]):
                batch.append(torch.from_numpy(px.copy()))
                n += 1
                if len(batch) == 64:
                    sink.write(torch.stack(batch).float() / 255.0)
                    batch = []
            if batch:
                sink.write(torch.stack(batch).float() / 255.0)
            if n != self.pixel_frames:
                raise CheckpointError(f"{self.out / 'frames'}: {n} frames in the shards, the checkpoint says {self.pixel_frames}")
        # the run log up to the checkpoint, replayed through the runner's own on_step (its record
        # list, the streaming steps.parquet, a progress bar)
        parts = _parts(self.dir / "log")[: self._log_parts]
        if len(parts) != self._log_parts:
            raise CheckpointError(f"{self.dir / 'log'}: {len(parts)} run-log parts, the checkpoint says {self._log_parts}")
        for p in parts:
            for row in pq.read_table(str(p)).to_pylist():
                if self._inner_on_step is not None:
                    self._inner_on_step(StepRecord(**row))

    def _clean_stale(self, latest: dict | None) -> None:
        """Remove what a killed run left after its last commit: partial checkpoint dirs, log parts."""
        keep = latest["tag"] if latest else None
        for d in self.dir.glob("it*"):
            if d.name != keep:
                shutil.rmtree(d, ignore_errors=True)
        n = int(latest["log_parts"]) if latest else 0
        for p in _parts(self.dir / "log"):
            if int(p.stem.split("-")[1]) >= n:
                p.unlink()
        for p in self.dir.glob(".*tmp*"):
            p.unlink()

    def _read_latest(self) -> dict | None:
        path = self.dir / LATEST
        if not path.is_file():
            return None
        try:
            latest = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        if latest.get("format") != FORMAT:
            raise CheckpointError(f"{path}: format {latest.get('format')!r}, this build reads {FORMAT}")
        return latest

    # --- during the rollout -------------------------------------------------------------------
    def latent(self, frame: int, latent: torch.Tensor) -> None:
        """A clean latent left the rollout (rank 0)."""
        if self.latents_w is not None:
            x = latent.detach().to("cpu")
            if x.dtype == torch.bfloat16:
                x = x.float()
            a = np.ascontiguousarray(x.numpy())
            self.latents_w.add({"frame": frame, "shape": list(a.shape), "dtype": str(a.dtype), "data": a.tobytes()})
        self.latent_frames += 1

    def frames(self, pixels: torch.Tensor) -> None:
        """Decoded frames [F, H, W, 3] in [0, 1] went to the video (rank 0)."""
        if self.frames_w is not None:
            from scopevid.engine.sinks import to_uint8

            for px in to_uint8(pixels):
                h, w, c = px.shape
                self.frames_w.add({"frame": self.pixel_frames, "height": h, "width": w, "channels": c,
                                   "pixels": np.ascontiguousarray(px).tobytes()})
                self.pixel_frames += 1
        else:
            self.pixel_frames += pixels.shape[0]

    def _is_boundary(self, it, next_emit: int) -> bool:
        r = self.rollout
        if it.serial <= self.restored_serial:
            return False
        if it.window != r.state.window:
            return True  # a new diffusion forcing window
        if r.plan.chunked and next_emit > self._last_emit:
            return True  # a sliding window (chunk-causal): frames left it
        return False

    def _before_iteration(self, it, next_emit: int) -> None:
        if self.stop_requested is not None:  # asked on every rank, decided together (one tiny allreduce)
            if self.rollout.topo.allreduce([float(self.stop_requested())])[0] > 0:
                raise StopRequested(f"stop requested before iteration {it.serial}")
        if self.on_iteration is not None:
            self.on_iteration(it.serial, self._total, next_emit, self.pixel_frames)
        boundary = self.every > 0 and self._is_boundary(it, next_emit)
        self._last_emit = next_emit
        if not boundary:
            return
        self._boundaries += 1
        if self._boundaries % self.every:
            return
        if self.min_seconds > 0:  # a time-based choice must be the same on every rank
            due = float(time.perf_counter() - self._last_save >= self.min_seconds)
            if self.rollout.topo.allreduce([due])[0] < self.rollout.topo.world:
                return
        self.save(it, next_emit)

    def save(self, it, next_emit: int) -> None:
        r = self.rollout
        tag = f"it{it.serial:08d}"
        d = self.dir / tag
        d.mkdir(parents=True, exist_ok=True)
        state = rollout_state(r, window_reset=it.window != r.state.window)
        atomic_torch_save(d / f"rank-{r.topo.rank:05d}.pt", state)
        if self.writes:
            dec = self._decoder.state_dict() if self._decoder is not None else None
            atomic_torch_save(d / "output.pt", compact({"decoder": dec}))
            frame_parts = self.frames_w.flush() if self.frames_w else 0
            latent_parts = self.latents_w.flush() if self.latents_w else 0
            if self._log_rows:
                from scopevid.engine.rollout import STEP_SCHEMA

                table = pa.Table.from_pylist(self._log_rows, schema=STEP_SCHEMA)
                atomic_write_table(self.dir / "log" / f"part-{self._log_parts:05d}.parquet", table)
                self._log_parts += 1
                self._log_rows = []
        # every rank has written its file before rank 0 commits (the all-reduce is the barrier)
        r.topo.allreduce([1.0])
        self.saves += 1
        if self.writes:
            latest = {
                "format": FORMAT,
                "tag": tag,
                "serial": it.serial,
                "window": it.window,
                "total_iterations": self._total,
                "next_emit": next_emit,
                "world": r.topo.world,
                "pixel_frames": self.pixel_frames,
                "latent_frames": self.latent_frames,
                "frame_parts": frame_parts,
                "latent_parts": latent_parts,
                "log_parts": self._log_parts,
                "wall_seconds": self.wall_before + (time.perf_counter() - self._t0),
                "saves": self.saves,
                "time": time.time(),
            }
            atomic_write_bytes(self.dir / LATEST, json.dumps(latest, indent=2).encode())
            for old in self.dir.glob("it*"):
                if old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
        self._last_save = time.perf_counter()

    # --- the end ------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        r = self.rollout
        return r is not None and r.state.stats.iterations >= self._total

    def close(self) -> None:
        """Flush the shards (always: a failed run keeps what it finished)."""
        if self.frames_w is not None:
            self.frames_w.flush()
        if self.latents_w is not None:
            self.latents_w.flush()

    def discard(self) -> None:
        """Remove the checkpoint of a completed run (rank 0), once its summary.json is written: a stop
        before that keeps the checkpoint whole, so --resume still works. LATEST and settings.json go
        first, so a kill during the removal leaves a directory that no resume mistakes for a run."""
        if not (self.writes and self.complete):
            return
        for name in (LATEST, "settings.json"):
            (self.dir / name).unlink(missing_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def checkpoint_info(out: str | Path) -> dict | None:
    """The committed checkpoint of an output directory (LATEST), or None."""
    path = Path(out) / "checkpoint" / LATEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
