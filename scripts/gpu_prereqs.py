"""The device check's self-test of its own prerequisites (scripts/gpu_check.sh runs it first).

A GPU image comes with its own Python and torch and no registry. Missing packages travel as wheels in the
repository's ignored folder `.whl/` (scripts/gpu_wheels.sh downloads them, docs/GPU.md). This script
1. unpacks into SITE every carried wheel whose distribution is absent here or installed at an older
   release (SITE goes on PYTHONPATH, ahead of site-packages: a newer installed one is never shadowed);
2. imports everything the device check needs, the repository on the path (no install), and prints ONE
   line: what it found, or everything that is missing and how to bring it; exit 3 when anything is.

Standard library only: it must run where nothing else is known to import.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import re
import shutil
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH_FLOOR = (2, 11)  # pyproject.toml's lower bound
# (module to import, distribution providing it, what needs it)
NEEDS = [
    ("torch", "torch", "everything"),
    ("numpy", "numpy", "everything"),
    ("yaml", "pyyaml", "configs"),
    ("pydantic", "pydantic", "config validation"),
    ("safetensors", "safetensors", "weights"),
    ("pyarrow.parquet", "pyarrow", "the result table"),
    ("diffusers", "diffusers", "the SkyReels-V2 check"),
    ("transformers", "transformers", "the SkyReels-V2 check"),
    ("ftfy", "ftfy", "SkyReels-V2 prompts"),
    ("scopevid.adapters.skyreels_v2.loader", None, "the project on PYTHONPATH"),
    ("scopevid.cluster.groups", None, "the project on PYTHONPATH"),
]


def _dist_name(wheel: Path) -> str:
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:4])


def _wanted(dist: str, carried: str) -> bool:
    """Absent, or installed at an older release than the carried wheel."""
    try:
        return _release(md.version(dist)) < _release(carried)
    except md.PackageNotFoundError:
        return True


def unpack(wheels: Path, site: Path) -> list[str]:
    """Unpack the wheels in `wheels` that `_wanted` says are needed; returns 'name version' of each.
    A wheel is a zip of the installed tree (plus *.data/{purelib,platlib} for the rare split ones)."""
    done: list[str] = []
    if not wheels.is_dir():
        return done
    site.mkdir(parents=True, exist_ok=True)
    for whl in sorted(wheels.glob("*.whl")):
        dist, version = _dist_name(whl), whl.name.split("-")[1]
        if not _wanted(dist, version):
            continue
        with zipfile.ZipFile(whl) as z:
            z.extractall(site)
        for data in site.glob("*.data"):
            for part in ("purelib", "platlib"):
                if (data / part).is_dir():
                    for item in (data / part).iterdir():
                        shutil.move(str(item), str(site / item.name))
            shutil.rmtree(data)
        done.append(f"{dist} {version}")
    importlib.invalidate_caches()
    return done


def check(dry: bool) -> tuple[list[str], list[str]]:
    """(found, missing) as short phrases."""
    found, missing = [f"python {sys.version.split()[0]}"], []
    if sys.version_info < (3, 10):
        missing.append(f"python >= 3.10 (this is {sys.version.split()[0]})")
    for module, dist, why in NEEDS:
        try:
            m = importlib.import_module(module)
        except Exception as e:  # an ImportError, or a package that breaks on import: both stop the check
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
            hint = "carry its wheel in .whl/" if dist else "run from the repository root with it on PYTHONPATH"
            missing.append(f"{dist or module} for {why} ({first}; {hint})")
            continue
        if module == "torch":
            version = m.__version__
            nums = tuple(int(x) for x in re.findall(r"\d+", version)[:2])
            found.append(f"torch {version}" + (f" CUDA {m.version.cuda}" if m.version.cuda else ""))
            if nums < TORCH_FLOOR:
                missing.append(f"torch >= {'.'.join(map(str, TORCH_FLOOR))} (this is {version})")
            if not dry and not m.cuda.is_available():
                missing.append("a CUDA device (torch sees none; --dry runs on the CPU)")
        elif dist in ("diffusers", "transformers", "pydantic"):
            found.append(f"{dist} {md.version(dist)}")
    return found, missing


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--wheels", default=str(ROOT / ".whl"), help="folder of carried wheels (default .whl/)")
    p.add_argument("--site", required=True, help="where missing wheels are unpacked (put on PYTHONPATH by the caller)")
    p.add_argument("--dry", action="store_true")
    args = p.parse_args()
    site = Path(args.site)
    unpacked = unpack(Path(args.wheels), site)
    for path in (str(site), str(ROOT)):
        if path not in sys.path:
            sys.path.insert(0, path)
    found, missing = check(args.dry)
    carried = f"; unpacked from {args.wheels}: {', '.join(unpacked)}" if unpacked else ""
    if missing:
        print(f"gpu_check: cannot start, missing: {'; '.join(missing)}{carried} (docs/GPU.md: carrying wheels)", flush=True)
        return 3
    print(f"gpu_check: prerequisites ok: {', '.join(found)}{carried}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
