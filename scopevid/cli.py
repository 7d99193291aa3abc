"""`scopevid generate | batch | train | bench | calibrate | plan`: thin argument parsing over the engine.

Errors (ScopevidError, and writes the disk refuses) print as one line on stderr: exit code 2 for bad
input, 1 for a failed run; `scopevid --debug COMMAND` adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from scopevid import interrupts
from scopevid.errors import ScopevidError, refused_errno, write_error

# subcommand -> module with add_arguments(parser) and main(args) -> int; imported lazily
COMMANDS = {
    "generate": ("scopevid.commands.generate", "generate a video: DIR/video.mp4, steps.parquet, summary.json"),
    "batch": ("scopevid.commands.batch", "many videos from a prompt file, the model loaded once; DIR/manifest.parquet"),
    "train": ("scopevid.train.command", "train the bundled tiny model"),
    "bench": ("scopevid.commands.bench", "side-by-side policy benchmarks to Parquet and PNG"),
    "calibrate": ("scopevid.commands.calibrate", "search SCOPE thresholds for a speed or quality target"),
    "plan": ("scopevid.commands.plan", "will a job fit: per-rank memory, FLOPs and traffic from a full-size dry run"),
}


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line like every other error (argparse prints its usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    entry = argv is None  # called as the program (console script, python -m), not by a caller
    argv = sys.argv[1:] if argv is None else argv
    parser = OneLineParser(prog="scopevid", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="print a traceback with an error's one line")
    sub = parser.add_subparsers(dest="command", required=True)
    name = next((a for a in argv if not a.startswith("-")), None)
    for cmd, (mod, help_) in COMMANDS.items():
        p = sub.add_parser(cmd, help=help_)
        if cmd == name:  # import only the command that runs
            try:
                module = importlib.import_module(mod)
            except ModuleNotFoundError as e:
                parser.error(f"{cmd}: not available in this build ({e.name})")
            module.add_arguments(p)
            p.set_defaults(_main=module.main)
    args = parser.parse_args(argv)
    restore = _stop_on_signals()
    try:
        rc = int(args._main(args) or 0)
    except ScopevidError as e:
        rc = _report(args, e)
    except OSError as e:
        if refused_errno(e) is None:  # not the disk refusing a write: a bug, with its traceback
            raise
        rc = _report(args, write_error(e))
    finally:
        restore()
    groups = sys.modules.get("scopevid.cluster.groups")
    if entry and groups is not None and groups.TORN_DOWN:  # the process's own entry point, a rank of a group
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)  # a torn-down gloo group may abort a normal exit (see cluster.groups.TORN_DOWN)
    return rc


def _report(args, e: ScopevidError) -> int:
    if args.debug:
        import traceback

        traceback.print_exception(e.__context__ or e)
    from scopevid.errors import Stopped

    word = "stopped" if isinstance(e, Stopped) else "error"  # a user's stop is not an error
    print(f"scopevid {args.command}: {word}: {e}", file=sys.stderr)
    return e.exit_code


def _stop_on_signals():
    """SIGTERM (scancel, `kill`) and SIGINT (Ctrl-C) raise Stopped instead of ending the process at
    once (SIGTERM) or with a traceback (SIGINT): every `finally` on the way out closes what it writes,
    so the MP4 gets its trailer and the run log its last part (never in the middle of a write: see
    scopevid.interrupts). A second signal ends the process."""
    interrupts.reset()

    def stop(signum, frame):
        signal.signal(signum, signal.SIG_DFL)
        interrupts.request(signal.Signals(signum).name)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    return lambda: [signal.signal(s, h) for s, h in previous.items()]


if __name__ == "__main__":
    sys.exit(main())
