"""Typed validation of config sections with pydantic, errors as one ConfigError line.

A section is a pydantic model with `extra="forbid"` (a typo is an error, never ignored) and strict
types (a string is not a number); the first problem becomes `field.path: what is wrong (got VALUE)`.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from scopevid.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class Section(BaseModel):
    """Base of a config section: unknown keys refused, no silent type coercion."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def parse(model: type[M], raw: object, prefix: str, owner: str = "") -> M:
    """`raw` as `model`, or a ConfigError naming the first bad field under `prefix` (e.g. "model."),
    and `owner` (e.g. "tiny") for an unknown one."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.')}: must be a mapping, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        allowed = ", ".join(model.model_fields) if err["type"] == "extra_forbidden" else None
        what = f"unknown field{' for ' + owner if owner else ''}; allowed: {allowed}" if allowed else err["msg"]
        got = "" if err["type"] == "extra_forbidden" else f" (got {err.get('input')!r})"
        raise ConfigError(f"{prefix}{loc}: {what}{got}") from None
