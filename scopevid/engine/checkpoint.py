"""Resumable rollouts: atomic checkpoints at window boundaries, durable outputs, exact resume.

A long job must resume after a kill (preemption, a lost node) and finish with the same video as an
uninterrupted run of the same seed. Three things make that exact:

1. Rollout state is saved at *boundaries* (`BoundaryRule`): before the first iteration of a
   diffusion forcing window, or (plans without windows, e.g. chunk-causal) before an iteration that
   follows one where frames left the window. The state is everything the rest of the rollout reads
   (engine.state.RolloutState); a restored rollout skips the plan's iterations before that serial
   and goes on bit for bit.
2. Outputs are durable as they are produced (engine.shards: every clean latent and decoded frame,
   flushed at each checkpoint). On resume the shards are cut back to the checkpoint, the MP4 is
   re-encoded from the frame shards (lossless uint8 fed to one encoder in the same order, so the
   bytes equal an uninterrupted run's), the run log is replayed from the log parts to the other
   observers, and the decoder's pending latents come back from the checkpoint.
3. Commits are atomic across ranks (`CheckpointStore`): every rank writes its own file (tmp +
   rename), the ranks meet (a float64 all-reduce, so no rank can commit before all have written),
   then rank 0 replaces `checkpoint/LATEST`. A kill at any moment leaves either the old or the new
   checkpoint complete.

Layout under the output directory (which must be shared by all ranks' nodes):
    frames/, latents/                     engine.shards
    checkpoint/settings.json              the resolved config the checkpoints are valid for
    checkpoint/LATEST                     JSON: which checkpoint is complete, output counters
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
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from scopevid.engine.files import atomic_torch_save, atomic_write_bytes, atomic_write_table, parts as _parts
from scopevid.engine.rollout import STEP_SCHEMA, RolloutObserver, StepRecord
from scopevid.engine.shards import OutputShards, read_frames, read_latents  # noqa: F401  (re-exported)
from scopevid.engine.state import compact, to_device
from scopevid.config import describe_differences, differences
from scopevid.errors import CheckpointError, ConfigError, StopRequested, load_reason

FORMAT = 2  # 2: the rollout state is engine.state.RolloutState (format 1 is not read)
LATEST = "LATEST"
LATEST_KEYS = ("tag", "serial", "world", "total_iterations", "next_emit", "pixel_frames", "latent_frames", "frame_parts",
               "latent_parts", "log_parts")


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


# --- the directory --------------------------------------------------------------------------------
class CheckpointStore:
    """OUT/checkpoint: the settings a checkpoint is valid for, the committed LATEST, each rank's state
    file, the run-log parts, and what a killed run left after its last commit."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.dir = self.out / "checkpoint"

    def bind_settings(self, settings: dict, resume: bool) -> None:
        """Record the run's resolved config with a fresh job; on resume, refuse a different one."""
        path = self.dir / "settings.json"
        text = json.dumps(settings, sort_keys=True, default=str)
        if not resume:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, text.encode())
            return
        if not path.is_file():
            if (self.dir / LATEST).is_file():
                raise CheckpointError(f"resume: {path} is missing while {self.dir / LATEST} is there: the run directory "
                                      "was damaged; start the job over (--overwrite)")
            if (self.out / "summary.json").is_file():
                raise CheckpointError(f"resume: the run in {self.out} finished (summary.json); nothing to resume")
            raise CheckpointError(f"resume: {self.out} holds no resumable run (it was not started with --checkpoint, "
                                  "or stopped before its first checkpoint: start it again without --resume)")
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable ({e}); start the job over (--overwrite)") from None
        diff = differences(saved, json.loads(text))
        if diff:
            raise ConfigError(f"resume: {describe_differences(diff)}; resume with the same config, options and weights, "
                              "or start over with --overwrite")

    def read_latest(self) -> dict | None:
        path = self.dir / LATEST
        if not path.is_file():
            return None
        try:
            latest = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e}); start the job over (--overwrite)") from None
        if not isinstance(latest, dict):
            raise CheckpointError(f"{path}: not a checkpoint record (a JSON {type(latest).__name__}, not an object); "
                                  "start the job over (--overwrite)")
        if latest.get("format") != FORMAT:
            raise CheckpointError(f"{path}: format {latest.get('format')!r}, this build reads {FORMAT}")
        missing = [k for k in LATEST_KEYS if not isinstance(latest.get(k), int if k != "tag" else str)]
        if missing:
            raise CheckpointError(f"{path}: damaged ({', '.join(missing)} missing or not of its type); start the job over "
                                  "(--overwrite)")
        return latest

    def prepare(self, latest: dict | None, resume: bool) -> None:
        """Rank 0, before the rollout: the directories, and nothing of a killed run after its commit."""
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "log").mkdir(exist_ok=True)
        if not resume:  # a fresh run in a reused directory: an older job's checkpoint is not ours
            (self.dir / LATEST).unlink(missing_ok=True)
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

    def load_rank(self, latest: dict, rank: int) -> dict:
        path = self.dir / latest["tag"] / f"rank-{rank:05d}.pt"
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (checkpoint {latest['tag']} is incomplete for rank {rank})")
        return _load(path)

    def load_output(self, latest: dict) -> dict:
        return _load(self.dir / latest["tag"] / "output.pt", "; start the job over (--overwrite)")

    def save_rank(self, tag: str, rank: int, state: dict) -> None:
        d = self.dir / tag
        d.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(d / f"rank-{rank:05d}.pt", state)

    def save_output(self, tag: str, output: dict) -> None:
        atomic_torch_save(self.dir / tag / "output.pt", compact(output))

    def save_log(self, part: int, rows: list[dict]) -> None:
        atomic_write_table(self.dir / "log" / f"part-{part:05d}.parquet", pa.Table.from_pylist(rows, schema=STEP_SCHEMA))

    def log_records(self, parts: int) -> list[StepRecord]:
        files = _parts(self.dir / "log")[:parts]
        if len(files) != parts:
            raise CheckpointError(f"{self.dir / 'log'}: {len(files)} run-log parts, the checkpoint says {parts}")
        return [StepRecord(**row) for p in files for row in pq.read_table(str(p)).to_pylist()]

    def commit(self, latest: dict) -> None:
        """Make checkpoint `latest['tag']` the one a resume reads, then drop the older ones."""
        atomic_write_bytes(self.dir / LATEST, json.dumps(latest, indent=2).encode())
        for old in self.dir.glob("it*"):
            if old.name != latest["tag"]:
                shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        """LATEST and settings.json first: a kill during the removal leaves nothing a resume mistakes for a run."""
        for name in (LATEST, "settings.json"):
            (self.dir / name).unlink(missing_ok=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def _load(path: Path, advice: str = "") -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for corrupt files, with long advice of its own
        raise CheckpointError(f"{path}: cannot read ({load_reason(e)}){advice}") from None


# --- when to save ---------------------------------------------------------------------------------
class BoundaryRule:
    """Which iterations start at a boundary, and which boundaries are saved: every `every`-th (0:
    none), and with `min_seconds` only when the last save is older (decided on every rank alike by
    one all-reduce)."""

    def __init__(self, every: int = 1, min_seconds: float = 0.0):
        self.every, self.min_seconds = every, min_seconds
        self.after_serial = 0  # boundaries before a restored checkpoint are not boundaries again
        self.last_emit = 0
        self.boundaries = 0
        self.last_save = time.perf_counter()

    def due(self, rollout, it, next_emit: int) -> bool:
        boundary = self.every > 0 and it.serial > self.after_serial and (
            it.window != rollout.state.window  # a new diffusion forcing window
            or (rollout.plan.chunked and next_emit > self.last_emit))  # a sliding window: frames left it
        self.last_emit = next_emit
        if not boundary:
            return False
        self.boundaries += 1
        if self.boundaries % self.every:
            return False
        if self.min_seconds > 0:  # a time-based choice must be the same on every rank
            ready = float(time.perf_counter() - self.last_save >= self.min_seconds)
            return rollout.topo.allreduce([ready])[0] >= rollout.topo.world
        return True


# --- the job-level observer -----------------------------------------------------------------------
class Checkpointer(RolloutObserver):
    """Makes one rollout (one rank's part of a job) resumable; `runner.run_once(checkpoint=...)`.

    Every rank holds one. `attach` restores from `checkpoint/LATEST` when resuming and registers it
    as an observer of the Rollout; rank 0 (the writer) also streams the output shards and restores
    the decoder, MP4 and run log. `every`, `min_seconds`: the BoundaryRule.
    `on_iteration(serial, total, next_emit, pixel_frames)` is called before every iteration, and
    `stop_requested()` too (a driver's stop request): if any rank's answer is yes, every rank raises
    StopRequested before the same iteration.
    """

    def __init__(self, out: str | Path, *, resume: bool = False, every: int = 1, min_seconds: float = 0.0,
                 on_iteration: Callable[[int, int, int, int], None] | None = None,
                 stop_requested: Callable[[], bool] | None = None, rows_per_part: int = 64):
        self.out = Path(out)
        self.store = CheckpointStore(self.out)
        self.dir = self.store.dir
        self.resume, self.rows_per_part = resume, rows_per_part
        self.rule = BoundaryRule(every, min_seconds)
        self.on_iteration, self.stop_requested = on_iteration, stop_requested
        self.rollout = None
        self.shards: OutputShards | None = None
        self.saves = 0
        self.restored_serial = 0
        self.wall_before = 0.0
        self._t0 = time.perf_counter()
        self._log_rows: list[dict] = []
        self._log_parts = 0
        self._decoder = None
        self._total = 0
        self._pixels_seen = 0  # frames counted when no shards are written (ranks other than 0)
        self._latest = self._state = self._output = None  # what verify read, for attach

    @property
    def _verified(self) -> bool:
        return not self.resume or self._latest is not None

    @property
    def writes(self) -> bool:
        return self.shards is not None

    @property
    def pixel_frames(self) -> int:
        return self.shards.pixel_frames if self.shards else self._pixels_seen

    @property
    def latent_frames(self) -> int:
        return self.shards.latent_frames if self.shards else 0

    def bind_settings(self, settings: dict) -> None:
        """Rank 0: record the run's resolved config, or on resume refuse a different one."""
        self.store.bind_settings(settings, self.resume)

    # --- set-up -------------------------------------------------------------------------------
    def verify(self, world: int, rank: int, writes: bool) -> None:
        """Before a resumed run touches any output (the run log, the MP4, the shards): every check a
        resume makes, read-only, so a refused resume leaves the killed run's files as they were."""
        self._latest = latest = self.store.read_latest() if self.resume else None
        if latest is None:
            return
        if latest["world"] != world:
            raise CheckpointError(f"{self.dir}: checkpoint was written by {latest['world']} ranks, this job has "
                                  f"{world}; resume with the same --world-size")
        self._state = self.store.load_rank(latest, rank)
        if (self._state.get("rank"), self._state.get("world")) != (rank, world):
            raise CheckpointError(f"checkpoint is of rank {self._state.get('rank')} of {self._state.get('world')}, this "
                                  f"process is rank {rank} of {world}: resume with the world size the job was started with")
        if writes:
            self._output = self.store.load_output(latest)
            OutputShards.check(self.out, latest)
            self.store.log_records(int(latest["log_parts"]))

    def attach(self, rollout, *, writes: bool, decoder=None, sink=None) -> tuple[int, float]:
        """Register on `rollout` (before it runs); restore when resuming. The run log is replayed to
        the rollout's other observers. Returns (pixel frames already written, wall seconds before the kill)."""
        self.rollout, self._decoder = rollout, decoder
        self._total = rollout.plan.num_iterations()
        if not self._verified:
            self.verify(rollout.topo.world, rollout.topo.rank, writes)
        latest = self._latest
        if writes:
            self.store.prepare(latest, self.resume)
            self.shards = OutputShards(self.out, self.rows_per_part)
        others = list(rollout.observers)
        rollout.observers.append(self)
        if latest is None:
            if self.shards:
                self.shards.start()
            return 0, 0.0
        load_rollout_state(rollout, self._state)
        self.restored_serial = self.rule.after_serial = latest["serial"]
        self.rule.last_emit = rollout.state.next_emit
        self.wall_before = float(latest.get("wall_seconds", 0.0))
        self.saves = int(latest.get("saves", 0))
        self._log_parts = int(latest["log_parts"])
        if writes:
            self._restore_outputs(latest, decoder, sink, others)
        return self.pixel_frames, self.wall_before

    def _restore_outputs(self, latest: dict, decoder, sink, others: list[RolloutObserver]) -> None:
        self.shards.restore(latest)
        out_state = self._output
        if decoder is not None and out_state.get("decoder") is not None:
            decoder.load_state_dict(to_device(out_state["decoder"], self.rollout.device))
        if sink is not None:  # re-encode what was written before the kill, then carry on appending
            n = 0
            for batch in self.shards.replay_frames(latest["frame_parts"]):
                sink.write(batch)
                n += batch.shape[0]
            if n != self.pixel_frames:
                raise CheckpointError(f"{self.out / 'frames'}: {n} frames in the shards, the checkpoint says {self.pixel_frames}")
        for rec in self.store.log_records(self._log_parts):  # the run log up to the checkpoint, to the other observers
            for o in others:
                o.after_iteration(rec)

    # --- the observer -------------------------------------------------------------------------
    def before_iteration(self, it, next_emit: int) -> None:
        topo = self.rollout.topo
        if self.stop_requested is not None:  # asked on every rank, decided together (one tiny allreduce)
            if topo.allreduce([float(self.stop_requested())])[0] > 0:
                raise StopRequested(f"stop requested before iteration {it.serial}")
        if self.on_iteration is not None:
            self.on_iteration(it.serial, self._total, next_emit, self.pixel_frames)
        if self.rule.due(self.rollout, it, next_emit):
            self.save(it, next_emit)

    def after_iteration(self, record: StepRecord) -> None:
        if self.writes:  # the run-log rows since the last checkpoint
            self._log_rows.append(asdict(record))

    def latent(self, frame: int, latent: torch.Tensor) -> None:
        """A clean latent left the rollout (rank 0)."""
        if self.shards is not None:
            self.shards.add_latent(frame, latent)

    def frames(self, pixels: torch.Tensor) -> None:
        """Decoded frames [F, H, W, 3] in [0, 1] went to the video (rank 0)."""
        if self.shards is not None:
            self.shards.add_frames(pixels)
        else:
            self._pixels_seen += pixels.shape[0]

    def save(self, it, next_emit: int) -> None:
        r = self.rollout
        tag = f"it{it.serial:08d}"
        self.store.save_rank(tag, r.topo.rank, rollout_state(r, window_reset=it.window != r.state.window))
        if self.writes:
            self.store.save_output(tag, {"decoder": self._decoder.state_dict() if self._decoder is not None else None})
            frame_parts, latent_parts = self.shards.flush()
            if self._log_rows:
                self.store.save_log(self._log_parts, self._log_rows)
                self._log_parts += 1
                self._log_rows = []
        r.topo.allreduce([1.0])  # every rank has written its file before rank 0 commits (the all-reduce is the barrier)
        self.saves += 1
        if self.writes:
            self.store.commit({
                "format": FORMAT, "tag": tag, "serial": it.serial, "window": it.window, "total_iterations": self._total,
                "next_emit": next_emit, "world": r.topo.world, "pixel_frames": self.pixel_frames,
                "latent_frames": self.latent_frames, "frame_parts": frame_parts, "latent_parts": latent_parts,
                "log_parts": self._log_parts, "wall_seconds": self.wall_before + (time.perf_counter() - self._t0),
                "saves": self.saves, "time": time.time(),
            })
        self.rule.last_save = time.perf_counter()

    # --- the end ------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        r = self.rollout
        return r is not None and r.state.stats.iterations >= self._total

    def close(self) -> None:
        """Flush the shards (always: a failed run keeps what it finished)."""
        if self.shards is not None:
            self.shards.flush()

    def discard(self) -> None:
        """Remove the checkpoint of a completed run (rank 0), once its summary.json is written: a stop
        before that keeps the checkpoint whole, so --resume still works. The latent shards go too once
        latents.safetensors holds every latent (they were its copy for a resume); the frame shards stay,
        the video's lossless frames."""
        if self.writes and self.complete:
            self.store.discard()
            if (self.out / "latents.safetensors").is_file():
                shutil.rmtree(self.out / "latents", ignore_errors=True)


def checkpoint_info(out: str | Path) -> dict | None:
    """The committed checkpoint of an output directory (LATEST), or None."""
    path = Path(out) / "checkpoint" / LATEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
