"""Step policies behind one interface; `build` makes one from a policy preset."""

from __future__ import annotations

from scopevid.errors import ConfigError
from scopevid.scheduler.policies.base import Decision, Discrepancy, Mode, Policy, StepContext
from scopevid.scheduler.policies.original import Original
from scopevid.scheduler.policies.scope import Scope, ScopeConfig

__all__ = ["Decision", "Discrepancy", "Mode", "Policy", "StepContext", "Original", "Scope", "ScopeConfig", "build", "register"]

_BUILDERS = {}


def register(kind: str):
    """Decorator: make a policy kind buildable from a preset dict ({'kind': KIND, ...params})."""

    def wrap(fn):
        _BUILDERS[kind] = fn
        return fn

    return wrap


@register("original")
def _original(params: dict, name: str) -> Policy:
    return Original()


@register("scope")
def _scope(params: dict, name: str) -> Policy:
    try:
        return Scope(ScopeConfig(**params), name=name)
    except TypeError as e:
        raise ConfigError(f"policy {name}: {e}") from None


def build(spec: dict, name: str) -> Policy:
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in _BUILDERS:
        raise ConfigError(f"policy {name}: kind {kind!r} unknown; allowed: {', '.join(sorted(_BUILDERS))}")
    return _BUILDERS[kind](spec, name)
