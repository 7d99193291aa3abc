"""The optional integrations and the one line that refuses a missing one.

The core (the engine, the tiny model, one process or a torchrun / Slurm mesh on torch.distributed, the
planner, the MAGI-1 adapter with random or no text encoder) needs torch and a few light packages. The rest
are extras of the package, installed only where they are used (pyproject.toml):

    skyreels   diffusers, transformers, accelerate, tokenizers, sentencepiece, ftfy   (SkyReels-V2)
    magi1      transformers, sentencepiece                   (MAGI-1's T5 text encoder from a directory)
    ray        ray[default]          (python -m scopevid.cluster.driver, bench scaling)
    gpu        xformers              (a CUDA attention kernel; flash-attn is built against the local CUDA)
    all        skyreels, magi1, ray

`require` imports a module of an extra or raises MissingExtra, whose one line names the extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from scopevid.errors import ScopevidError

# extra -> what it brings (the refusal's hint)
EXTRAS = {
    "skyreels": "diffusers, transformers, accelerate, tokenizers, sentencepiece, ftfy",
    "magi1": "transformers, sentencepiece",
    "ray": "ray[default]",
    "gpu": "xformers",
}


class MissingExtra(ScopevidError):
    """An optional integration is not installed (or does not import): the user installs the extra."""


def require(module: str, extra: str, what: str) -> ModuleType:
    """`module` imported, or MissingExtra: '<what> needs <package> (not installed): pip install "scopevid[extra]"'.
    An ImportError from inside an installed package (a broken or incompatible install) says so instead."""
    if extra not in EXTRAS and extra != "flash-attn":
        raise ValueError(f"unknown extra {extra!r}")
    hint = ("pip install flash-attn --no-build-isolation (built against this machine's CUDA)" if extra == "flash-attn"
            else f"pip install 'scopevid[{extra}]'")
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if e.name is not None and e.name.split(".")[0] == top:
            raise MissingExtra(f"{what} needs {top}, which is not installed here: {hint}") from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MissingExtra(f"{what} needs {top}, which is installed but does not import ({first}): {hint}") from None


def available(module: str) -> bool:
    """Whether `module` imports here (tests and the device check's self-test use it)."""
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False
