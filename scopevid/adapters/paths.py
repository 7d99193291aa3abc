"""Paths named inside checkpoint files stay inside the checkpoint directory.

A safetensors index maps tensor names to shard files by relative name. An entry such as
`../../../../etc/passwd` or an absolute path would make a loader open a file outside the checkpoint;
every loader resolves index entries through `shard_path` instead.
"""

from __future__ import annotations

from pathlib import Path

from scopevid.errors import CheckpointError


def shard_path(folder: Path, entry: object, index: Path) -> Path:
    """`folder / entry` if it names a file inside `folder` (after resolving `..` and links)."""
    if not isinstance(entry, str) or not entry:
        raise CheckpointError(f"{index}: shard entry {entry!r} is not a file name")
    root = Path(folder).resolve()
    path = (root / entry).resolve()
    if path == root or root not in path.parents:
        raise CheckpointError(f"{index}: shard {entry!r} points outside the checkpoint directory {folder}")
    return path
