"""Typed validation of config sections with pydantic, errors as one ConfigError line.

A section is a pydantic model with `extra="forbid"` (a typo is an error, never ignored) and strict
types (a string is not a number); the first problem becomes `field.path: what is wrong (got VALUE)`.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

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
        errs = e.errors()
        err = next((x for x in errs if x["type"] == "extra_forbidden"), errs[0])  # a typo explains what is "missing"
        loc = ".".join(str(x) for x in err["loc"])
        kind = err["type"]
        if kind == "extra_forbidden":
            what = f"unknown field{' for ' + owner if owner else ''}; allowed: {', '.join(model.model_fields)}"
        elif kind == "missing":
            field = model.model_fields.get(str(err["loc"][0]))
            what = "required" + (f": {field.description}" if field is not None and field.description else "")
        else:
            what = err["msg"]
        got = "" if kind in ("extra_forbidden", "missing") else f" (got {err.get('input')!r})"
        raise ConfigError(f"{prefix}{loc}: {what}{got}") from None


D = TypeVar("D")
_FIELDS: dict[type, type[Section]] = {}


def build(cls: type[D], params: dict, prefix: str, owner: str = "") -> D:
    """A config dataclass (e.g. a policy's) from a mapping, its fields checked as a Section's are
    (unknown keys refused, strict types; YAML lists become the tuples the fields hold) before the
    dataclass's own checks in __post_init__ run."""
    model = _FIELDS.get(cls)
    if model is None:
        hints = typing.get_type_hints(cls)
        spec = {f.name: (hints[f.name], ... if f.default is dataclasses.MISSING else f.default)
                for f in dataclasses.fields(cls) if f.init}
        model = _FIELDS[cls] = create_model(f"{cls.__name__}Fields", __base__=Section, **spec)
    raw = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()} if isinstance(params, dict) else params
    checked = parse(model, raw, prefix, owner)
    return cls(**dict(checked))
