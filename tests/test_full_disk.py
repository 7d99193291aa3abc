"""A full or read-only disk under `scopevid generate`: one line naming the file and the reason, exit 1,
what was written before stays readable (run log parts, the fragmented MP4 up to its last fragment),
and after space is freed `--resume` finishes the video byte for byte as an uninterrupted run did.

The disk is a real tmpfs of a few hundred KB (mounting needs root, which this project's CI has).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, write_tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
FRAMES = 257


def _mount(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.strip()}")


def _remount(path: Path, opts: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{opts}", str(path)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _generate(cfg, out, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scopevid", "generate", "--config", str(cfg), "--out", str(out),
                           "--no-progress", *extra], capture_output=True, text=True, cwd=ROOT, timeout=240)


def _readable(out: Path) -> tuple[int, int]:
    """(run log rows, video frames) of a run directory; both must read without error (a video.mp4 that
    is there plays: one with no complete fragment is removed, not left unopenable)."""
    rows = pq.read_table(out / "steps.parquet").num_rows
    video = out / "video.mp4"
    frames = sum(1 for _ in iio.imiter(video)) if video.is_file() else 0
    return rows, frames


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted --checkpoint run that every disk size's resumed video must equal."""
    tmp = tmp_path_factory.mktemp("full_disk_ref")
    cfg = write_tiny_config(tmp, frames=FRAMES, policy="scope-fast")
    ref = _generate(cfg, tmp / "ref", "--checkpoint")
    assert ref.returncode == 0, ref.stderr[-2000:]
    return cfg, tmp / "ref"


@pytest.mark.parametrize("size", ["150k", "300k", "600k"])  # 150k: full before ffmpeg wrote a fragment
def test_full_disk_is_one_line_keeps_output_and_resumes_byte_identical(reference, small_disk, size):
    cfg, ref = reference
    _mount(small_disk, size)
    out = small_disk / "run"
    r = _generate(cfg, out, "--checkpoint")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr[-3000:]
    assert "No space left on device" in lines[0] and str(out) in lines[0] and "--resume" in lines[0]
    _readable(out)
    if "video.mp4 held no complete fragment and was removed" in lines[0]:  # else it plays (checked above) or was not begun
        assert not (out / "video.mp4").exists()
    assert not list(out.rglob(".*.tmp*")), "a failed write left its temporary file"
    _remount(small_disk, "size=64M")
    r = _generate(cfg, out, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "video.mp4").read_bytes() == (ref / "video.mp4").read_bytes()
    assert _readable(out) == _readable(ref)


def test_full_disk_without_checkpoint_keeps_a_readable_log_and_video(tmp_path, small_disk):
    cfg = write_tiny_config(tmp_path, frames=FRAMES, policy="scope-fast")
    _mount(small_disk, "40k")
    out = small_disk / "run"
    r = _generate(cfg, out)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "No space left on device" in lines[0], r.stderr[-3000:]
    rows, frames = _readable(out)
    assert frames < FRAMES and not (out / "summary.json").exists()


def test_read_only_output_is_one_line(tmp_path, small_disk):
    cfg = write_tiny_config(tmp_path, frames=9, policy="original")
    _mount(small_disk, "1M")
    _remount(small_disk, "ro")
    r = _generate(cfg, small_disk / "run")
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "Read-only file system" in lines[0], r.stderr[-2000:]


def test_a_refused_write_removes_its_temporary_file_and_keeps_the_old_one(tmp_path, small_disk):
    from scopevid.engine.files import atomic_write_bytes
    from scopevid.errors import OutputWriteError

    _mount(small_disk, "64k")
    target = small_disk / "state.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(OutputWriteError, match=r"state\.bin: No space left on device"):
        atomic_write_bytes(target, os.urandom(1 << 20))
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in small_disk.iterdir()) == ["state.bin"]
