"""Bad input gets one line that names the field and what is allowed; the CLI exits 2 without a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from scopevid import config as config_lib
from scopevid.cli import main
from scopevid.config import ParallelConfig
from scopevid.errors import ConfigError


def _edit(path, **changes):
    data = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        if "." in key:
            a, b = key.split(".")
            data[a][b] = value
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "change, field, allowed",
    [
        ({"schedule.selective": "sometimes"}, "schedule.selective", "off, paper, causal"),
        ({"schedule.kind": "bidirectional"}, "schedule.kind", "diffusion_forcing, chunk_causal"),
        ({"solver": "rk4"}, "solver", "euler, unipc"),
        ({"frames": 0}, "frames", "positive integer"),
        ({"schedule.steps": -3}, "schedule.steps", "positive integer"),
        ({"policy": "turbo"}, "policy", "original"),
        ({"dtype": "int8"}, "dtype", "float32"),
        ({"bogus": 1}, "bogus", "unknown field"),
        ({"schedule.bogus": 1}, "schedule.bogus", "unknown field"),
        ({"seed": 2**64}, "seed", "from -9223372036854775808 to 9223372036854775807 (signed 64-bit"),
        ({"seed": -(2**63) - 1}, "seed", "signed 64-bit"),
        ({"stability": {"clip": "x"}}, "stability.clip", "must be a finite ratio > 0, got 'x'"),
        ({"stability": {"explode": None}}, "stability.explode", "must be a finite ratio > 0, got None"),
        ({"stability": {"max_velocity": 0}}, "stability.max_velocity", "must be a finite number > 0, got 0"),
        ({"stability": {"max_velocity": True}}, "stability.max_velocity", "must be a finite number > 0, got True"),
        ({"stability": {"bogus": 1}}, "stability.bogus", "unknown field; allowed: clip, explode, max_velocity"),
    ],
)
def test_bad_values_name_the_field(tiny_config, change, field, allowed):
    path = _edit(tiny_config(), **change)
    with pytest.raises(ConfigError) as e:
        config_lib.load(path)
    msg = str(e.value)
    assert msg.startswith(field), msg
    assert allowed in msg, msg
    assert "\n" not in msg


def test_seeds_at_the_signed_64_bit_edges_are_accepted(tiny_config):
    for seed in (-(2**63), 2**63 - 1):
        assert config_lib.load(_edit(tiny_config(), seed=seed)).seed == seed


def _tiny_weights_with(tmp_path, **changes) -> str:
    """The bundled tiny weights beside a copy of their JSON, `changes` set in it ("model__dim" -> model.dim)."""
    import json
    import shutil
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "scopevid" / "weights" / "tiny.safetensors"
    shutil.copy(src, tmp_path / "tiny.safetensors")
    meta = json.loads(src.with_suffix(".json").read_text())
    for key, value in changes.items():
        *parents, last = key.split("__")
        node = meta
        for k in parents:
            node = node[k]
        node[last] = value
    (tmp_path / "tiny.json").write_text(json.dumps(meta))
    return str(tmp_path / "tiny.safetensors")


@pytest.mark.parametrize("changes, says", [
    ({"model__dim": "big"}, "model.dim: Input should be a valid integer (got 'big')"),
    ({"model__heads": 5}, "model.heads: dim 128 must divide by heads 5"),
    ({"model__depth": 0}, "model.depth: must be a positive integer, got 0"),
    ({"model__colour": 1}, "model.colour: unknown field for the tiny model; allowed: channels, size"),
    ({"shift": 0}, "shift: must be a number from 0.001 to 1000 (the flow time shift), got 0"),
    ({"shift": "3"}, "shift: must be a number from 0.001 to 1000 (the flow time shift), got '3'"),
])
def test_tiny_weights_json_is_typed_and_names_file_and_field(tmp_path, capsys, changes, says):
    """The JSON beside tiny weights (architecture and shift) is checked before the network is built:
    `dim: "big"` and `shift: 0` used to end in a traceback from torch or from the noise table."""
    from scopevid import adapters
    from scopevid.errors import CheckpointError

    weights = _tiny_weights_with(tmp_path, **changes)
    with pytest.raises(CheckpointError) as e:
        adapters.load({"kind": "tiny", "weights": weights})
    assert str(e.value).startswith(f"{tmp_path / 'tiny.json'}: {says}"), str(e.value)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"kind": "tiny", "weights": weights}, "prompt": "red square moving left",
                                   "frames": 5, "schedule": {"steps": 2}}))
    assert main(["generate", "--config", str(cfg), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("scopevid generate: error: ") and says in err, err


@pytest.mark.parametrize("arch, says", [
    ({"dim": 30, "heads": 4}, r"^model.arch.heads: dim 30 must divide by heads 4 "),
    ({"dim": 32, "heads": 8}, r"^model.arch.heads: the head dim \(dim 32 / heads 8 = 4\) must be even and at least 6"),
    ({"size": 18}, r"^model.arch.patch: frame size 18 must be a multiple of patch 4$"),
    ({"dim": "big"}, r"^model.arch.dim: Input should be a valid integer \(got 'big'\)$"),
])
def test_random_tiny_arch_is_checked(arch, says):
    from scopevid import adapters

    with pytest.raises(ConfigError, match=says):
        adapters.load({"kind": "tiny", "weights": "random", "arch": arch})


def test_plan_level_errors_name_the_field(tiny_config, tmp_path):
    from scopevid.engine.runner import generate

    cfg = config_lib.load(_edit(tiny_config(), **{"schedule.causal_block_size": 3}))
    with pytest.raises(ConfigError, match="^causal_block_size"):
        generate(cfg, tmp_path / "o", progress=False)


def test_unknown_prompt_word_lists_vocabulary(tiny_config, tmp_path):
    cfg = config_lib.load(_edit(tiny_config(), prompt="purple dragon"))
    from scopevid.engine.runner import generate

    with pytest.raises(ConfigError, match="prompt: unknown word"):
        generate(cfg, tmp_path / "o", progress=False)


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        config_lib.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config_lib.load(bad)


def test_cli_prints_one_line_and_exits_2(tiny_config, tmp_path, capsys):
    path = _edit(tiny_config(), **{"schedule.selective": "maybe"})
    code = main(["generate", "--config", str(path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "schedule.selective" in err and "Traceback" not in err


def test_cli_refuses_non_empty_out(tiny_config, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "video.mp4").write_bytes(b"earlier result")
    proc = subprocess.run(
        [sys.executable, "-m", "scopevid", "generate", "--config", str(tiny_config()), "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "not empty" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "video.mp4").read_bytes() == b"earlier result"


def test_shipped_presets_load():
    """Every preset in configs/ loads and names policies that build."""
    from pathlib import Path

    from scopevid.scheduler.policies import build

    root = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(root.glob("*.yaml")):
        cfg = config_lib.load(path)
        for name in cfg.policies:
            build(cfg.policy_spec(name), name)


@pytest.mark.parametrize("name, content, field, says", [
    ("binary", bytes(range(256)) * 4, "config", "not UTF-8 text"),
    ("latin1", "model: {kind: tiny}\nprompt: \"caf\xe9\"\n".encode("latin-1"), "config", "not UTF-8 text"),
    ("list", b"- a\n- b\n", "config", "must hold a mapping at top level, not a list"),
    ("presets-list", b"model: {kind: tiny}\npolicy_presets: list.yaml\n", "policy_presets", "not a list"),
    ("presets-binary", b"model: {kind: tiny}\npolicy_presets: bin.yaml\n", "policy_presets", "not UTF-8 text"),
    ("presets-number", b"model: {kind: tiny}\npolicy_presets: 3\n", "policy_presets", "must be a file path"),
    ("policies-list", b"model: {kind: tiny}\npolicies: [a]\n", "policies", "must be a mapping"),
    ("policy-number", b"model: {kind: tiny}\npolicies: {x: 3}\n", "policies.x", "must be a mapping with a `kind`"),
])
def test_unreadable_config_files_are_one_line(tmp_path, name, content, field, says):
    (tmp_path / "list.yaml").write_bytes(b"- a\n")
    (tmp_path / "bin.yaml").write_bytes(bytes(range(128, 256)))
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(content)
    proc = subprocess.run([sys.executable, "-m", "scopevid", "generate", "--config", str(path), "--out",
                           str(tmp_path / "o"), "--no-progress"], capture_output=True, text=True, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-1500:]
    assert f"error: {field}:" in lines[0] and says in lines[0], lines[0]
    assert not (tmp_path / "o").exists()


def test_every_preset_is_checked_before_any_work(tiny_config, tmp_path):
    """A bad value in a preset other than the chosen one (here: the one --compare or a later --policy
    would use) fails at load, naming the preset and the field, before the Original reference runs."""
    presets = {"bad": {"kind": "scope", "tau_c": 0.5, "tau_p": 0.1, "decay": 0.75, "horizon": 5}}
    with pytest.raises(ConfigError, match=r"^policy bad: tau_c/tau_p: need 0 <= tau_c <= tau_p"):
        config_lib.load(tiny_config(policies=presets))
    proc = subprocess.run([sys.executable, "-m", "scopevid", "generate", "--config", str(tiny_config(policies=presets)),
                           "--compare", "--out", str(tmp_path / "o"), "--no-progress"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "policy bad: tau_c/tau_p" in proc.stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize("change, field", [({"frames": 10**9}, "frames"), ({"schedule.steps": 10**9}, "schedule.steps")])
def test_sizes_beyond_memory_are_refused_with_the_estimate(tiny_config, change, field):
    """Before any allocation: a billion frames or steps used to reach 3-6 GB before the first iteration."""
    import time

    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=rf"^{field}: .* need about [\d.]+ GiB .* of this machine's \d+ GiB"):
        config_lib.load(_edit(tiny_config(), **change))
    assert time.monotonic() - t0 < 5
    config_lib.load(_edit(tiny_config(), **{k: 1000 for k in change}))  # ordinary sizes pass


def test_preflight_names_bad_prompts_and_world_sizes_before_any_load(tiny_config):
    """The prompt against the vocabulary and the rank count against the heads, from metadata only: a
    cluster job fails before placement instead of inside rank 0 after it."""
    from scopevid import adapters

    cfg = config_lib.load(tiny_config())  # TINY_ARCH: 2 heads, guidance 3 (two branches)
    assert adapters.preflight(cfg, 2).label == "ulysses=2"
    assert adapters.preflight(cfg, 4, parallel=ParallelConfig(cfg=2)).label == "cfg=2,ulysses=2"
    four = cfg.with_overrides(model={**cfg.model, "arch": {**cfg.model["arch"], "heads": 4}})
    with pytest.raises(ConfigError, match=r"ulysses: 8 ranks cannot split .* 4 attention heads.*: cfg=2,ulysses=4, "
                                          r"cfg=2,ring=2,ulysses=2, cfg=2,ring=4, ring=2,ulysses=4$"):
        adapters.preflight(four, 8, parallel=ParallelConfig(ulysses=8))
    with pytest.raises(ConfigError, match=r"parallel.ulysses: 3 ranks cannot split this model's 2 attention heads.*: ring=3$"):
        adapters.preflight(cfg, 3)
    with pytest.raises(ConfigError, match=r"prompt: unknown word\(s\) \['purple'\]"):
        adapters.preflight(cfg.with_overrides(prompt="purple square"), 1)
    assert adapters._metadata({"kind": "magi1", "arch": "24B"})[0] == (48, 8)  # both query and K/V heads are split
