"""What one rollout produces, as it produces it: the run's observer (run log, totals for the summary,
progress bar) and its output pipeline (clean latents -> decoder -> MP4, lossless frames, checkpoint
shards, quality against a reference, latents.safetensors), then the summary of the run.

Only the writer (rank 0 of a video) writes files; every rank keeps the totals, which are identical
on every rank (the decisions and records are).
"""

from __future__ import annotations

from pathlib import Path

import torch

from scopevid.engine.files import atomic_save_safetensors
from scopevid.engine.metrics import RunningQuality
from scopevid.engine.rollout import STEP_SCHEMA, DigestBuilder, RolloutObserver, StepRecord
from scopevid.engine.sinks import FrameStore, Mp4Sink, RunLog
from scopevid.errors import NonFiniteError


class RunTotals:
    """What the summary needs from the run log, accumulated row by row (no list of records kept)."""

    def __init__(self) -> None:
        self.full_forwards = 0.0
        self.compute = 0
        self.valid = 0
        self.rows = 0
        self.digest = DigestBuilder()

    def add(self, r: StepRecord) -> None:
        self.full_forwards += r.frames_computed / max(1, r.valid_hi - r.valid_lo)
        self.compute += r.compute_hi - r.compute_lo
        self.valid += r.valid_hi - r.valid_lo
        self.rows += 1
        self.digest.add(r)


class RunWatch(RolloutObserver):
    """The run's own observer: totals, the streamed run log (writer only), a progress bar, the records
    when asked to keep them."""

    def __init__(self, *, log: RunLog | None = None, bar=None, keep_records: bool = False):
        self.totals = RunTotals()
        self.log, self.bar = log, bar
        self.records: list[StepRecord] | None = [] if keep_records else None

    def after_iteration(self, record: StepRecord) -> None:
        self.totals.add(record)
        if self.records is not None:
            self.records.append(record)
        if self.log is not None:
            self.log.add(record)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(record.mode[0].upper())


def progress_bar(total: int, name: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=name, unit="it", dynamic_ncols=True, mininterval=0.5)


def open_watch(steps_log: Path | None, writes: bool, progress: bool, total: int, name: str, keep_records: bool) -> RunWatch:
    return RunWatch(log=RunLog(steps_log, STEP_SCHEMA) if (steps_log and writes) else None,
                    bar=progress_bar(total, name) if (progress and writes) else None, keep_records=keep_records)


class OutputPipeline:
    """Clean latents in, in order; decoded frames out to every sink the run has. `frames` caps the
    pixel frames written (a decoder may return a few more than asked for)."""

    def __init__(self, decoder, *, frames: int, fps: int, writes: bool, video: Path | None = None,
                 frames_to: FrameStore | None = None, reference: FrameStore | None = None,
                 latents_to: Path | None = None, checkpoint=None):
        self.decoder, self.frames, self.writes = decoder, frames, writes
        self.sink = Mp4Sink(video, fps) if (video and writes) else None
        self.frames_to = frames_to if writes else None
        self.checkpoint = checkpoint
        self.quality = RunningQuality() if reference is not None else None
        self._ref = reference.read() if reference is not None else None
        self._ref_buf: list[torch.Tensor] = []
        self.latents_to = latents_to if writes else None
        self.kept: list[torch.Tensor] = []  # clean latents for latents_to
        self.pixel_frames = 0

    def attach(self, rollout) -> float:
        """With a checkpoint: restore (or start) the resumable outputs; the wall seconds before a kill."""
        if self.checkpoint is None:
            return 0.0
        self.pixel_frames, wall_before = self.checkpoint.attach(rollout, writes=self.writes, decoder=self.decoder,
                                                                sink=self.sink)
        if self.latents_to is not None and self.checkpoint.latent_frames:
            from scopevid.engine.shards import read_latents

            self.kept = [x for _, x in read_latents(self.checkpoint.out / "latents")][: self.checkpoint.latent_frames]
        return wall_before

    def latent(self, index: int, latent: torch.Tensor) -> None:
        if not self.writes:
            return
        if self.checkpoint is not None:
            self.checkpoint.latent(index, latent)
        if self.latents_to is not None:
            self.kept.append(latent.detach().to("cpu", torch.float32 if latent.element_size() < 4 else latent.dtype))
        self._emit(self.decoder.push(latent))

    def finish(self) -> None:
        if self.writes:
            self._emit(self.decoder.flush())

    def _emit(self, pixels: torch.Tensor | None) -> None:
        if pixels is None or pixels.shape[0] == 0:
            return
        if not bool(torch.isfinite(pixels).all()):
            raise NonFiniteError(f"the decoder returned NaN or inf pixels after {self.pixel_frames} good frames "
                                 "(check the VAE weights); the frames before them are kept")
        pixels = pixels[: max(0, self.frames - self.pixel_frames)]
        self.pixel_frames += pixels.shape[0]
        if self.sink is not None:
            self.sink.write(pixels)
        if self.frames_to is not None:
            self.frames_to.write(pixels)
        if self.checkpoint is not None:
            self.checkpoint.frames(pixels)
        if self.quality is not None:
            self._compare(pixels)

    def _compare(self, pixels: torch.Tensor) -> None:
        need = pixels.shape[0]
        while sum(r.shape[0] for r in self._ref_buf) < need:
            self._ref_buf.append(next(self._ref))
        ref = torch.cat(self._ref_buf)
        self.quality.add(pixels, ref[:need])
        self._ref_buf[:] = [ref[need:]] if ref.shape[0] > need else []

    def salvage(self) -> str:
        """After a failed run: a video.mp4 with no complete fragment (the disk filled before ffmpeg wrote
        its first) is removed, and the note says so; a playable one stays."""
        path = self.sink.path if self.sink is not None else None
        if path is None or not path.is_file():
            return ""
        try:
            import imageio_ffmpeg

            frames, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
            if frames > 0:
                return ""
        except Exception:  # ffmpeg cannot open it: nothing in it plays
            pass
        path.unlink(missing_ok=True)
        kept = " (--resume makes it again from the last checkpoint)" if self.checkpoint is not None else ""
        return f"; video.mp4 held no complete fragment and was removed{kept}"

    def write_latents(self) -> None:
        """latents.safetensors (tensor "latents" [frames, C, h, w]), atomically: a reader never sees half."""
        if self.latents_to is not None and self.kept:
            atomic_save_safetensors(self.latents_to, {"latents": torch.stack(self.kept).contiguous()})


def summarize(policy_name: str, spec: dict, rollout, totals: RunTotals, outputs: OutputPipeline, wall: float) -> dict:
    """summary.json's numbers of one rollout (the writer's frame count; None on other ranks)."""
    st, timings = rollout.state.stats, rollout.runner.timings
    summary = {
        "policy": policy_name,
        "policy_spec": spec,
        "frames": outputs.pixel_frames if outputs.writes else None,
        "latent_frames": rollout.plan.latent_frames,
        "iterations": st.iterations,
        "wall_seconds": wall,
        "full_forwards": totals.full_forwards,
        "frame_forwards": st.frame_forwards,
        "flops": st.flops,
        "counts": dict(st.counts),
        "predict_fallbacks": st.fallbacks,
        "mean_compute_interval": totals.compute / max(1, totals.rows),
        "mean_valid_interval": totals.valid / max(1, totals.rows),
        "decision_digest": totals.digest.hexdigest(),
        "engine_seconds": {"loop": timings.loop, "forward": timings.forward, "feature": timings.feature,
                           "overhead": timings.overhead, "overhead_share": timings.overhead / max(timings.loop, 1e-12)},
    }
    if outputs.quality is not None:
        summary.update(outputs.quality.result())
    return summary
