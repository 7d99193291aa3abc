"""Paths named inside checkpoint files stay inside the checkpoint directory.

A safetensors index maps tensor names to shard files by relative name. An entry such as
`../../../../etc/passwd` or an absolute path would make a loader open a file outside the checkpoint;
every loader resolves index entries through `shard_path` instead.

The check is on the path as laid out in the checkpoint directory (`..` folded, links not followed):
a Hugging Face cache snapshot holds every file as a link to `../../blobs/<hash>`, which is where the
layout itself, not the index, sends the loader. Links are the layout's business; the index only
names files in it.
"""

from __future__ import annotations

import os
from pathlib import Path

from scopevid.errors import CheckpointError


def shard_path(folder: Path, entry: object, index: Path) -> Path:
    """`folder / entry` if it names a file inside `folder` (after folding `..`, without following links)."""
    if not isinstance(entry, str) or not entry:
        raise CheckpointError(f"{index}: shard entry {entry!r} is not a file name")
    root = Path(os.path.abspath(folder))
    path = Path(os.path.normpath(root / entry))  # an absolute entry replaces root, and is judged so
    if path == root or root not in path.parents:
        raise CheckpointError(f"{index}: shard {entry!r} points outside the checkpoint directory {folder}")
    return path
