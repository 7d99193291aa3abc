"""`scopevid bench memory`: one fresh `scopevid generate` child per length, its peak RSS from os.wait4,
and one import-only baseline child per config."""

from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq

from scopevid import cli


def test_bench_memory_table_and_bad_frames(tiny_config, tmp_path, capsys):
    cfg = str(tiny_config())
    out = tmp_path / "mem"
    rc = cli.main(["bench", "memory", "--config", cfg, "--frames", "25,9", "--policy", "scope-fast", "--steps", "4",
                   "--out", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    rows = pq.read_table(out / "memory.parquet").to_pylist()
    assert [r["frames"] for r in rows] == [9, 25]  # sorted: the smallest is the baseline
    assert all(r["exit_code"] == 0 and r["peak_rss_mb"] > 50 and r["wall_seconds"] > 0 for r in rows), rows
    assert [r["latent_frames"] for r in rows] == [9, 25] and {r["model"] for r in rows} == {"tiny"}
    assert rows[0]["ratio_to_first"] == 1.0 and rows[1]["ratio_to_first"] > 0
    floor = rows[0]["baseline_mb"]  # one import-only child per config: the same for every row
    assert floor > 50 and all(r["baseline_mb"] == floor for r in rows), rows
    assert all(r["above_baseline_mb"] == r["peak_rss_mb"] - floor for r in rows), rows
    # the growth ratio needs the smallest run to add something measurable above the import-only child
    # (a tiny random model may add less than the allocator's noise)
    if rows[0]["above_baseline_mb"] > 0:
        assert rows[0]["ratio_above_first"] == 1.0
        assert rows[1]["ratio_above_first"] == rows[1]["above_baseline_mb"] / rows[0]["above_baseline_mb"]
    else:
        assert rows[0]["ratio_above_first"] is None and rows[1]["ratio_above_first"] is None
    assert (out / "runs" / "tiny_test-baseline.err").is_file()
    assert (out / "runs" / "tiny_test-25" / "summary.json").is_file()
    md = (out / "memory.md").read_text()
    assert md.startswith("| config | model | policy | frames |") and md in printed.out

    bad = subprocess.run([sys.executable, "-m", "scopevid", "bench", "memory", "--config", cfg, "--frames", "9,x",
                          "--out", str(tmp_path / "bad")], capture_output=True, text=True, timeout=60)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "--frames" in lines[0] and "Traceback" not in bad.stderr, bad.stderr
    assert not (tmp_path / "bad").exists()
    for argv, what in [(["--config", str(tmp_path / "nope.yaml"), "--frames", "9"], "no such file"),
                       (["--config", cfg, "--frames", "0,9"], "--frames"),
                       (["--config", cfg, "--frames", "9", "--policy", "nope"], "policy"),
                       (["--config", cfg, "--frames", "9", "--out", str(out)], "not empty")]:
        argv = ["bench", "memory", *argv] + ([] if "--out" in argv else ["--out", str(tmp_path / "bad2")])
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and what in err[0], (argv, err)
