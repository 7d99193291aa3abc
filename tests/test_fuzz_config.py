"""Fuzzing the config and the command line (hypothesis): every case either runs, or ends with one line
and a documented exit code (2 bad input, 1 failed run); never a traceback, never exit 0 without a
finite video. Values are drawn per field from valid ones, edge cases and junk of every YAML type."""

from __future__ import annotations

import math

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import write_tiny_config
from scopevid import cli

JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
FIELDS = {  # field path -> values worth trying besides junk
    "frames": st.sampled_from([1, 2, 5, 9, 0, -1]),
    "guidance": st.sampled_from([1.0, 2.0, 0.0, math.inf, -1.0, 1e30]),
    "seed": st.sampled_from([0, 1, -5, 2**40, 2**63 - 1, 2**64, -(2**63) - 1]),
    "fps": st.sampled_from([1, 8, 0]),
    "prompt": st.sampled_from(["red square moving left", "", "purple dragon", "red " * 40]),
    "policy": st.sampled_from(["original", "scope-fast", "teacache-fast", "nope"]),
    "dtype": st.sampled_from(["float32", "bfloat16", "float16", "int8"]),
    "device": st.sampled_from(["cpu", "cuda", "tpu", "cuda:7"]),
    "solver": st.sampled_from(["euler", "unipc", "rk4"]),
    "schedule.kind": st.sampled_from(["diffusion_forcing", "chunk_causal", "other"]),
    "schedule.steps": st.sampled_from([1, 2, 4, 0, 3]),
    "schedule.base_num_frames": st.sampled_from([1, 4, 8, 0]),
    "schedule.overlap_history": st.sampled_from([0, 2, 7, 8, -1]),
    "schedule.ar_step": st.sampled_from([0, 1, 2, -1]),
    "schedule.causal_block_size": st.sampled_from([1, 2, 3, 0]),
    "schedule.selective": st.sampled_from(["off", "paper", "causal", "sometimes"]),
    "schedule.chunk_width": st.sampled_from([1, 2, 3, 0]),
    "schedule.window_size": st.sampled_from([1, 2, 4, 0]),
    "schedule.context_chunks": st.sampled_from([0, 1, 2, -1]),
    "model.weights": st.sampled_from(["random", "bundled", "/nonexistent.safetensors"]),
    "model.shift": st.sampled_from([3.0, 0.0, -1.0, math.nan]),
    "model.weigths": st.just("typo"),
    "model.arch": st.sampled_from([{"size": 16, "patch": 4, "dim": 24, "depth": 1, "heads": 2}, {"dim": 30, "heads": 4},
                                   {"dim": 32, "heads": 8}, {"dim": "big"}, {"size": 18}]),
    "bogus": st.just(1),
    "stability": st.sampled_from([{"clip": 1.0, "explode": 4.0}, {"clip": 0.0}, {"bogus": 1}, {"explode": math.inf},
                                  {"clip": "x"}, {"explode": None}, {"max_velocity": 0}, {"max_velocity": 20.0}]),
}


@st.composite
def edits(draw):
    keys = draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, max_size=4, unique=True))
    return {k: draw(st.one_of(FIELDS[k], JUNK) if draw(st.integers(0, 3)) == 0 else FIELDS[k]) for k in keys}


def _apply(path, changes: dict) -> None:
    data = yaml.safe_load(path.read_text())
    data["schedule"]["steps"], data["frames"] = 2, 5  # small by default: a case that runs runs fast
    for key, value in changes.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    path.write_text(yaml.safe_dump(data))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=edits(), extra=st.lists(st.sampled_from(["--frames", "--steps", "--seed", "--policy", "--selective"]),
                                         max_size=1), extra_value=st.sampled_from(["3", "0", "-2", "abc", "1e3", "", str(2**64)]))
def test_any_config_runs_or_fails_in_one_line(tmp_path_factory, capsys, changes, extra, extra_value):
    import imageio.v3 as iio
    import numpy as np

    tmp = tmp_path_factory.mktemp("fuzz")
    path = write_tiny_config(tmp)
    _apply(path, changes)
    argv = ["generate", "--config", str(path), "--out", str(tmp / "out"), "--no-progress"]
    for flag in extra:
        argv += [flag, extra_value]
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse: a bad flag value is one usage line, exit 2
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    if rc == 0:
        video = tmp / "out" / "video.mp4"
        frames = iio.imread(video)
        assert frames.shape[0] >= 1 and np.isfinite(frames).all() and (tmp / "out" / "summary.json").is_file()
    else:
        assert rc in (1, 2), (rc, err)
        lines = err.splitlines()
        assert lines and ("error:" in lines[-1]), err
        if rc != 2 or "usage:" not in err:  # our errors are exactly one line (argparse adds its usage line)
            assert len(lines) == 1, err
