"""Write the cold-start benchmark's fixtures into DIR: a small random SkyReels-V2 checkpoint in the released
diffusers layout (4 heads x 64, 4 layers, UMT5 d_model 256: about 34 MB) with DIR/skyreels_v2.yaml, and
DIR/magi1.yaml, the tiny MAGI-1 checkpoint of tests/fixtures with absolute paths (docs/BENCHMARKS.md).

    python scripts/coldstart_fixtures.py out/coldstart_fixtures
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(out: Path) -> None:
    from scopevid.adapters.skyreels_v2.fixture import build_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    ckpt = build_checkpoint(out / "SkyReels-V2-small", heads=4, head_dim=64, layers=4, ffn=1024, text_dim=256,
                            text_layers=4, text_ff=1024)
    sky = {
        "model": {"kind": "skyreels_v2", "path": str(ckpt), "height": 32, "width": 32, "max_sequence_length": 16,
                  "addnoise_condition": 20},
        "prompt": "a red fox runs in the snow", "negative_prompt": "blue sky", "guidance": 5.0, "frames": 29, "seed": 0,
        "solver": "unipc",
        "schedule": {"kind": "diffusion_forcing", "steps": 4, "base_num_frames": 13, "overlap_history": 5, "ar_step": 1,
                     "causal_block_size": 1, "selective": "off"},
        "policy": "original", "policy_presets": str(ROOT / "configs" / "policies" / "skyreels_v2.yaml"),
    }
    (out / "skyreels_v2.yaml").write_text(yaml.safe_dump(sky))
    magi = yaml.safe_load((ROOT / "configs" / "bench" / "magi1_tiny_fixture.yaml").read_text())
    for key in ("arch", "weights", "special_tokens", "vae"):
        magi["model"][key] = str(ROOT / magi["model"][key])
    magi["policy_presets"] = str(ROOT / "configs" / "policies" / "magi1.yaml")
    magi["policy"] = "original"
    (out / "magi1.yaml").write_text(yaml.safe_dump(magi))
    print(f"{out}/skyreels_v2.yaml, {out}/magi1.yaml")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "out/coldstart_fixtures"))
