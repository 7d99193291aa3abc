"""Step policies behind one interface; `build` makes one from a policy preset."""

from __future__ import annotations

from scopevid.errors import ConfigError
from scopevid.validation import build as build_config
from scopevid.scheduler.policies.base import ChunkState, Decision, Discrepancy, Mode, Policy, StepContext
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
    return _make(Scope, ScopeConfig, params, name)


def build(spec: dict, name: str) -> Policy:
    spec = dict(spec)
    kind = spec.pop("kind", None)
    if kind not in _BUILDERS:
        raise ConfigError(f"policy {name}: kind {kind!r} unknown; allowed: {', '.join(sorted(_BUILDERS))}")
    return _BUILDERS[kind](spec, name)


def _make(cls, cfg_cls, params: dict, name: str) -> Policy:
    """`cls` with its config checked field by field: one line naming policies.NAME.FIELD."""
    return cls(build_config(cfg_cls, params, f"policies.{name}.", cls.__name__), name=name)


# The paper's baselines (one file each beside Scope; engine/reuse.py acts on their decisions).
from scopevid.scheduler.policies.deltadit import DeltaDiT, DeltaDiTConfig  # noqa: E402
from scopevid.scheduler.policies.flowcache import FlowCache, FlowCacheConfig  # noqa: E402
from scopevid.scheduler.policies.taylorseer import TaylorSeer, TaylorSeerConfig  # noqa: E402
from scopevid.scheduler.policies.teacache import TeaCache, TeaCacheConfig  # noqa: E402

register("teacache")(lambda params, name: _make(TeaCache, TeaCacheConfig, params, name))
register("taylorseer")(lambda params, name: _make(TaylorSeer, TaylorSeerConfig, params, name))
register("flowcache")(lambda params, name: _make(FlowCache, FlowCacheConfig, params, name))
register("deltadit")(lambda params, name: _make(DeltaDiT, DeltaDiTConfig, params, name))
__all__ += ["ChunkState", "TeaCache", "TeaCacheConfig", "TaylorSeer", "TaylorSeerConfig", "FlowCache", "FlowCacheConfig",
            "DeltaDiT", "DeltaDiTConfig"]

# SCOPE deciding per chunk (chunk-causal schedules, MAGI-1): an additive variant beside Scope.
from scopevid.scheduler.policies import scope_chunk as _scope_chunk  # noqa: E402

register("scope_chunk")(_scope_chunk._build)
