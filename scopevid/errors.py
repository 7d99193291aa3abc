"""Errors a user can act on. Each carries a one-line message that names the offending thing."""


class ScopevidError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero, never as a traceback.
    `exit_code`: 2 for bad input the user can fix (the default), 1 for a run that failed."""

    exit_code = 2


class ConfigError(ScopevidError, ValueError):
    """A config field or argument has a bad value; the message names the field and what is allowed."""


class CheckpointError(ScopevidError):
    """A checkpoint directory or file is missing, partial, corrupt or of the wrong shape."""


class OutputExistsError(ScopevidError):
    """The output directory already holds results; we never overwrite them silently."""


class DistributedError(ScopevidError):
    """A rank died, timed out, or ranks disagreed on a decision."""

    exit_code = 1


class NonFiniteError(ScopevidError):
    """The model produced NaN or inf: the run stops there (what was finished is kept), never writing
    a black video with exit 0."""

    exit_code = 1


class Stopped(ScopevidError):
    """SIGTERM or SIGINT (Ctrl-C) ended the run: outputs were closed on the way out (the MP4 and the
    run log are readable up to there)."""

    exit_code = 1


class RanksDisagree(DistributedError):
    """Every rank raises this together, after a collective that succeeded: all peers are alive, so the
    group can still be torn down with a barrier (destroying it without one can abort the process).
    Exit code 2: the ranks were given different inputs (config, prompt, seed)."""

    exit_code = 2
