"""The ``kvmpy`` command: inspect KVM, list and run the bundled micro-VMs, run your own images.

Exit status of ``run`` (documented in ``kvmpy run --help``): the guest's isa-debug-exit
status when it used that device (always odd), 0 for a clean HLT, and even codes of our
own otherwise, so the two never collide. ``demo`` instead says whether the guest kept
the promise its description makes (``images.guests``: an exit status and a line of
output): 0 if it did, else non-zero with the reason in one line, the last on stderr.

The package, in the order a command line meets it:

    __init__.py   main(): parse the line, call the command, turn errors into statuses
    options.py    the argparse parser (only the command given is built)
    running.py    run, demo, restore, receive: build a Machine, drive it, judge how it ended
    linuxdemo.py  demo linux: Debian's kernel and a root disk (kvmpy.images.rootfs), to a shell
    fuzzing.py    fuzz run: one input, or AFL++'s fork server (kvmpy.fuzz.afl)
    commands.py   info, demos, ctl, inspect, bench: the commands that run no guest here
    status.py     the exit statuses and their help text; progress lines

Only the parser is imported up front; ``main`` imports the module of the command given,
and each command imports the parts of kvmpy it uses when it runs, so ``kvmpy run`` starts
fast (tests/integration/test_cli.py checks what it imports).
"""
from __future__ import annotations

import argparse
import os
import sys
from importlib import import_module

from .options import build_parser
from .status import (EXIT_DEMO_FAILED, EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_RESET,
                     EXIT_TIMEOUT, EXIT_TRIPLE_FAULT, EXIT_USAGE, EXIT_VMM_ERROR)

__all__ = ["main", "entry", "command", "build_parser", "COMMANDS", "EXIT_OK", "EXIT_DEMO_FAILED", "EXIT_USAGE",
           "EXIT_VMM_ERROR", "EXIT_RESET", "EXIT_TRIPLE_FAULT", "EXIT_TIMEOUT", "EXIT_INTERNAL_ERROR",
           "EXIT_INTERRUPTED"]

#: Each command and the module whose ``cmd_NAME`` runs it; only that module is imported.
COMMANDS = {"info": "commands", "demos": "commands", "demo": "running", "run": "running",
            "restore": "running", "receive": "running", "ctl": "commands", "inspect": "commands",
            "bench": "commands", "fuzz": "fuzzing"}


def command(name: str):
    """The function that runs command ``name`` (``kvmpy.cli.running.cmd_run`` for ``run``)."""
    return getattr(import_module(f"{__name__}.{COMMANDS[name]}"), f"cmd_{name}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:           # the benchmark parses its own options (and --help)
        name = argv[1] if len(argv) > 1 else None
        return command("bench")(argparse.Namespace(name=name, bench_args=argv[2:]))
    parser = build_parser(argv[0] if argv and argv[0] in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from ..errors import KvmpyError
    try:
        return command(args.command)(args)
    except KvmpyError as e:
        print(f"kvmpy: {e}", file=sys.stderr)
        return EXIT_VMM_ERROR
    except KeyboardInterrupt:            # before the run installed its own handler
        print("kvmpy: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:              # our stdout's reader went away (kvmpy ... | head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def entry() -> None:
    """The ``kvmpy`` command (console script and ``python -m kvmpy``): ``main()``, then exit.

    When a command returns, its machine is closed and its files are written, so the
    interpreter's own teardown (freeing every module, a last garbage collection: ~10-15 ms,
    a tenth of a small guest's whole run) does nothing we need: flush our output and leave
    at once. ``kvmpy bench`` exits the ordinary way (it is not timed from outside).
    """
    code = main()
    if sys.argv[1:2] == ["bench"]:
        sys.exit(code)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:              # our stdout's reader went away (kvmpy ... | head)
        pass
    os._exit(code)
