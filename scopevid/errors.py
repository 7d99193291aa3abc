"""Errors a user can act on. Each carries a one-line message that names the offending thing."""

import errno


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


class AbsurdVelocityError(NonFiniteError):
    """The model returned finite velocities far beyond any healthy flow-matching model's (over
    `stability.max_velocity`): corrupt weights as surely as a NaN is, so the run stops the same way."""


class Stopped(ScopevidError):
    """SIGTERM or SIGINT (Ctrl-C) ended the run: outputs were closed on the way out (the MP4 and the
    run log are readable up to there). `reported`: its one line was already printed (a driver says it
    as soon as the stop is decided)."""

    exit_code = 1
    reported = False


class OutputWriteError(ScopevidError):
    """The disk refused a write (full, read-only, no permission, quota): what was already written
    stays readable; the message names the file and the reason."""

    exit_code = 1


# errno values that mean the filesystem refused a write, not a bug in the program
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG})


def refused_errno(e: OSError) -> int | None:
    """The errno of an OSError if it says the filesystem refused a write, else None. pyarrow's
    errors carry no errno attribute, only "[errno 28]" in their text."""
    import re

    code = e.errno
    if code is None:
        m = re.search(r"[Ee]rrno (\d+)", str(e))
        code = int(m.group(1)) if m else None
    return code if code in WRITE_ERRNOS else None


def write_error(e: OSError, what: object = None) -> OutputWriteError:
    """One line for a refused write: `cannot write FILE: REASON; what survives and how to go on`."""
    import os

    name = what or e.filename or "a file"
    code = refused_errno(e)
    reason = os.strerror(code) if code is not None else (e.strerror or str(e))
    return OutputWriteError(f"cannot write {name}: {reason}; what was written before is kept (the run log "
                            "and the video up to their last whole part); free space, then continue a --checkpoint "
                            "run with --resume or start over with --overwrite")


def load_reason(e: BaseException) -> str:
    """Why a file did not load, in one short line. torch.load's refusal of a pickle (weights_only) is
    a page of advice that ends in trying weights_only=False, which would run the file's code: say
    instead what the file is not, and what it holds."""
    import re

    text = str(e)
    if "Weights only load failed" in text:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            return f"not a plain tensor checkpoint: it pickles an object of class {found.group(1)} (not unpickled, as that could run code)"
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
        return f"not a plain tensor checkpoint ({detail.group(1).strip() if detail else 'unreadable as one'})"
    if isinstance(e, EOFError):
        return "the file ends early (empty or truncated)"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


class StopRequested(Stopped):
    """Every rank of a job stops together at one iteration because its driver was told to stop
    (SIGTERM from scancel or `ray job stop`): agreed through a collective, so the group's teardown
    keeps its barrier and each rank closes its outputs."""


class RanksDisagree(DistributedError):
    """Every rank raises this together, after a collective that succeeded: all peers are alive, so the
    group can still be torn down with a barrier (destroying it without one can abort the process).
    Exit code 2: the ranks were given different inputs (config, prompt, seed)."""

    exit_code = 2
