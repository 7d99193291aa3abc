"""`scopevid batch`: many prompts through the real CLI, the model loaded once.

Each finished video equals what `scopevid generate` makes of the same prompt and seed byte for byte
(so nothing of one video leaks into the next through the shared model), a bad row fails alone, the
manifest reads at any moment, and `--resume` after SIGKILL or SIGTERM finishes what is missing
without touching what was done.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from conftest import ROOT, write_tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]
FRAMES = 17
PROMPTS = ["blue square moving left", "red square moving right", "purple square", "green square moving right"]


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "scopevid", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, **kw)


def _batch(cfg, prompts, out, *extra):
    return _cli("batch", "--config", str(cfg), "--prompts", str(prompts), "--out", str(out), "--frames", str(FRAMES), *extra)


def _manifest(out) -> list[dict]:
    """The newest state: the Parquet snapshot (readable at any moment) and the journal after it."""
    from dataclasses import asdict

    from scopevid.jobs.manifest import Manifest

    pq.read_table(out / "manifest.parquet")  # the snapshot alone reads too, whenever the batch was stopped
    return [asdict(e) for e in Manifest.read(out).entries]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batch")
    cfg = write_tiny_config(tmp, frames=FRAMES, policy="scope-fast")
    prompts = tmp / "prompts.txt"
    prompts.write_text("# a batch\n" + "\n\n".join(PROMPTS) + "\n")
    out = tmp / "batch"
    r = _batch(cfg, prompts, out)
    return tmp, cfg, prompts, out, r


def test_batch_runs_every_prompt_and_a_bad_row_fails_alone(setup):
    tmp, cfg, prompts, out, r = setup
    assert r.returncode == 1, r.stderr[-3000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "1 video(s) failed" in err[0], r.stderr
    rows = _manifest(out)
    assert [x["prompt"] for x in rows] == PROMPTS
    assert [x["status"] for x in rows] == ["ok", "ok", "failed", "ok"]
    assert "unknown word(s) ['purple']" in rows[2]["error"]
    assert all(x["frames"] == FRAMES and x["seed"] == 0 and x["policy"] == "scope-fast" for x in rows)
    assert all(x["seconds"] > 0 and x["frames_per_second"] > 0 for x in rows if x["status"] == "ok")
    assert "loaded once" in r.stdout
    # every video as `generate` makes it alone: the shared model carries nothing from one video to the next
    for x in (rows[1], rows[3]):
        ref = tmp / f"ref-{x['index']}"
        g = _cli("generate", "--config", str(cfg), "--prompt", x["prompt"], "--frames", str(FRAMES), "--out", str(ref),
                 "--no-progress")
        assert g.returncode == 0, g.stderr[-2000:]
        assert (out / x["out"] / "video.mp4").read_bytes() == (ref / "video.mp4").read_bytes(), x["out"]
        a = json.loads((out / x["out"] / "summary.json").read_text())
        b = json.loads((ref / "summary.json").read_text())
        assert a["decision_digest"] == b["decision_digest"]


def test_jsonl_rows_set_seed_frames_policy_and_name(setup, tmp_path):
    _, cfg, _, _, _ = setup
    rows = [{"prompt": "blue square moving left", "seed": 3, "frames": 9, "policy": "original", "name": "first"},
            {"prompt": "red square moving right"}]
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = _batch(cfg, f, tmp_path / "b")
    assert r.returncode == 0, r.stderr[-2000:]
    m = _manifest(tmp_path / "b")
    assert [(x["out"], x["seed"], x["frames"], x["policy"]) for x in m] == [
        ("00000-first", 3, 9, "original"), ("00001-red-square-moving-right", 0, FRAMES, "scope-fast")]
    assert json.loads((tmp_path / "b" / "00000-first" / "summary.json").read_text())["frames"] == 9
    # a typo in a row is bad input: one line naming the line and the field, exit 2, nothing run
    f.write_text(json.dumps({"prompt": "blue square", "sede": 1}) + "\n")
    r = _batch(cfg, f, tmp_path / "c")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "scopevid batch: error: prompts line 1: sede: unknown field; allowed: prompt, seed, frames, policy, name"]


def test_seeds_beyond_signed_64_bit_are_bad_input_before_any_work(tmp_path):
    """A row's seed (JSONL, or a Parquet uint64 column) and --seed fit a signed 64-bit integer, as
    `generate`'s `seed:` must: 2**64 used to reach an OverflowError when the manifest was written."""
    import pyarrow as pa

    from scopevid.jobs import requests

    cfg = write_tiny_config(tmp_path, frames=FRAMES)
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "blue square moving left", "seed": 2**64}) + "\n")
    r = _batch(cfg, f, tmp_path / "a")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "scopevid batch: error: prompts line 1: seed: Input should be less than or equal to 9223372036854775807 "
        "(got 18446744073709551616)"], r.stderr[-2000:]
    assert not (tmp_path / "a").exists()
    table = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a"], "seed": pa.array([2**64 - 1], pa.uint64())}), table)
    with pytest.raises(requests.ConfigError, match=r"^prompts row 0: seed: Input should be less than or equal to"):
        requests.read(table)
    f.write_text(json.dumps({"prompt": "a", "seed": 2**63 - 1}) + "\n" + json.dumps({"prompt": "b", "seed": -(2**63)}) + "\n")
    assert [x.seed for x in requests.read(f)] == [2**63 - 1, -(2**63)]
    f.write_text("blue square moving left\n")
    r = _batch(cfg, f, tmp_path / "b", "--seed", str(2**64))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "scopevid batch: error: seed: must be an integer from -9223372036854775808 to 9223372036854775807 (signed 64-bit, "
        "as the batch manifest stores it), got 18446744073709551616"], r.stderr[-2000:]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=lambda s: s.name)
def test_interrupted_batch_resumes_and_skips_what_is_done(setup, tmp_path, sig):
    tmp, cfg, _, ref_out, _ = setup
    prompts = tmp_path / "p.txt"
    good = [p for p in PROMPTS if "purple" not in p]
    prompts.write_text("\n".join(good) + "\n")
    out = tmp_path / "b"
    p = subprocess.Popen([sys.executable, "-m", "scopevid", "batch", "--config", str(cfg), "--prompts", str(prompts),
                          "--out", str(out), "--frames", str(FRAMES)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "00000-blue-square-moving-left" / "summary.json").is_file():  # the first video is done
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.05)
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    rows = _manifest(out)  # readable whatever the signal
    assert rows[0]["status"] in ("ok", "running")  # "running": killed after its summary, before the manifest
    if sig == signal.SIGTERM:
        assert p.returncode == 1 and err.strip().splitlines()[-1].startswith("scopevid batch: stopped: the batch was stopped ")  # during a video, or between two
        statuses = [x["status"] for x in rows]
        if "between two videos" in err:  # stopped after one video's manifest row, before the next started
            assert statuses[0] == "ok" and "running" not in statuses and "stopped" not in statuses, statuses
        else:  # during a video: that one is recorded as stopped
            assert "stopped" in statuses or all(x == "ok" for x in statuses), statuses
    first = (out / rows[0]["out"] / "video.mp4").stat().st_mtime_ns
    r = _batch(cfg, prompts, out, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "already done" in r.stdout
    assert [x["status"] for x in _manifest(out)] == ["ok"] * len(good)
    assert (out / rows[0]["out"] / "video.mp4").stat().st_mtime_ns == first, "a finished video was run again"
    by_prompt = {x["prompt"]: x["out"] for x in _manifest(ref_out)}
    for x in _manifest(out):
        assert (out / x["out"] / "video.mp4").read_bytes() == (ref_out / by_prompt[x["prompt"]] / "video.mp4").read_bytes()
    # a resume with other prompts is refused in one line
    prompts.write_text("\n".join(reversed(good)) + "\n")
    r = _batch(cfg, prompts, out, "--resume")
    assert r.returncode == 2 and "the prompts differ" in r.stderr.strip().splitlines()[-1]


def test_a_video_that_fails_inside_generate_is_failed_in_the_manifest(tmp_path):
    """NaN from the model (a word whose embedding is NaN) ends that video inside `generate`; the
    manifest says failed with the one-line cause, the next video still runs, and the batch exits 1."""
    from conftest import write_poisoned_tiny

    cfg = write_poisoned_tiny(tmp_path, frames=9)
    prompts = tmp_path / "p.txt"
    prompts.write_text("blue square moving left\nred square moving right\n")
    r = _batch(cfg, prompts, tmp_path / "out")
    assert r.returncode == 1 and "1 video(s) failed" in r.stderr.strip().splitlines()[-1], r.stderr[-2000:]
    rows = _manifest(tmp_path / "out")
    assert [x["status"] for x in rows] == ["failed", "ok"], rows
    assert "NaN or inf velocities" in rows[0]["error"] and rows[1]["error"] is None


def test_the_manifest_is_a_snapshot_plus_a_journal(tmp_path):
    """A change is appended to manifest.jsonl, not a rewrite of the whole Parquet snapshot (10,000 rows
    cost about 0.4 s a write); `Manifest.read` gives the newest state, a line cut by a kill is skipped,
    and the snapshot alone always reads."""
    from scopevid.jobs.manifest import Entry, Manifest, Status

    entries = [Entry(index=i, prompt=f"p{i}", seed=i, frames=1, policy="original", out=f"{i:05d}") for i in range(10_000)]
    m = Manifest(tmp_path, entries, every_s=3600.0)
    m.start()
    snapshot = (tmp_path / "manifest.parquet").stat().st_mtime_ns
    for i in range(300):
        m.set(i, status=Status.RUNNING)
        m.set(i, status=Status.OK, seconds=0.1, frames=1)
    assert (tmp_path / "manifest.parquet").stat().st_mtime_ns == snapshot  # no rewrite per change
    with open(tmp_path / "manifest.jsonl", "a") as f:
        f.write('{"index": 300, "status": "o')  # a kill in the middle of an append
    got = Manifest.read(tmp_path).entries
    assert [e.status for e in got[:301]] == ["ok"] * 300 + ["pending"] and got[299].seconds == 0.1
    assert set(pq.read_table(tmp_path / "manifest.parquet").column("status").to_pylist()) == {"pending"}
    m.write()  # the snapshot now includes the journal: reading it gives the same state
    assert [e.status for e in Manifest.read(tmp_path).entries] == [e.status for e in got]
