"""A batch's prompt file as `VideoRequest`s: plain text (one prompt a line), JSONL or Parquet rows.

Rows may set `prompt` (required), `seed`, `frames`, `policy` and `name`; what a row leaves out comes
from the command's defaults (the config plus `--seed/--frames/--policy`). Anything else in a row is
an error naming the line, never ignored.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from pydantic import Field

from scopevid.config import SEED_MAX, SEED_MIN
from scopevid.errors import ConfigError
from scopevid.validation import Section, parse

MAX_REQUESTS = 100_000


class Row(Section):
    """One row of a JSONL or Parquet prompt file."""

    prompt: str = Field(min_length=1, description="the text prompt")
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)  # signed 64-bit, like `seed:` (the manifest's int64 column)
    frames: int | None = Field(None, ge=1)
    policy: str | None = Field(None, min_length=1)
    name: str | None = Field(None, min_length=1, max_length=80, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class VideoRequest(Row):
    """A row with its position; the unset fields stay None (the batch's defaults fill them)."""

    index: int = Field(ge=0)

    @property
    def dirname(self) -> str:
        """The video's directory under the batch's --out: NNNNN-name, or NNNNN-prompt-slug."""
        slug = self.name or re.sub(r"[^a-z0-9]+", "-", self.prompt.lower()).strip("-")[:40] or "video"
        return f"{self.index:05d}-{slug}"


def read(path: str | Path) -> list[VideoRequest]:
    """Requests of a prompt file, by its suffix: .jsonl, .parquet, anything else plain text."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompts: no such file {path}")
    if path.suffix == ".parquet":
        rows = _parquet(path)
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"prompts: {path} is not UTF-8 text (byte {e.start}); is it a binary file?") from None
        rows = _jsonl(path, text) if path.suffix == ".jsonl" else _text(text)
    if not rows:
        raise ConfigError(f"prompts: {path} holds no prompts")
    if len(rows) > MAX_REQUESTS:
        raise ConfigError(f"prompts: {path} holds {len(rows)} prompts; at most {MAX_REQUESTS} per batch (split the file)")
    out = []
    for i, (where, raw) in enumerate(rows):
        row = parse(Row, raw, f"prompts {where}: ")
        out.append(VideoRequest(index=i, **row.model_dump()))
    names = [r.dirname for r in out]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"prompts: two rows would write the same directory {dup!r}; give them different `name`s")
    return out


def digest(requests: list[VideoRequest]) -> str:
    """What a resumed batch must match: the requests, in order."""
    return hashlib.sha256(json.dumps([r.model_dump() for r in requests], sort_keys=True).encode()).hexdigest()


def _text(text: str) -> list[tuple[str, dict]]:
    """One prompt a line; blank lines and lines starting with # are skipped."""
    return [(f"line {n}", {"prompt": line.strip()}) for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")]


def _jsonl(path: Path, text: str) -> list[tuple[str, dict]]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise ConfigError(f"prompts: {path} line {n} is not JSON ({e.msg})") from None
    return rows


def _parquet(path: Path) -> list[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(str(path))
    except Exception as e:  # pyarrow raises several kinds for a file that is not Parquet
        raise ConfigError(f"prompts: {path} is not a readable Parquet file ({str(e).splitlines()[0]})") from None
    rows = table.to_pylist()
    return [(f"row {i}", {k: v for k, v in r.items() if v is not None}) for i, r in enumerate(rows)]
