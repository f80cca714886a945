"""llmctl's subcommands: one module each (or a small group), each declaring its
subcommand (arguments, help) next to what it runs, as the daemon's ops do. cli.py builds
the parser from these declarations and runs the one asked for.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

from llm_residentd.paths import SOCKET_ENV

from ..client import Client

# Exit codes, documented in --help and docs/llmctl.md.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_TIMEOUT = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130
EXIT_FOR_CODE = {"not_running": EXIT_NOT_RUNNING, "timeout": EXIT_TIMEOUT,
                 "deferred_timeout": EXIT_TIMEOUT, "client_timeout": EXIT_TIMEOUT}


def exit_code(error_code: str) -> int:
    """The exit status for a failure with this error code."""
    return EXIT_FOR_CODE.get(error_code, EXIT_FAILED)


EPILOG = f"""\
environment:
  {SOCKET_ENV}  socket path (overridden by --socket)

exit status:
  0    success
  1    the daemon refused or failed the request (the message names its error code)
  2    usage error (nothing is sent to the daemon)
  3    the daemon is not running or the socket cannot be reached
  4    timed out (the request's --timeout, or no answer from the daemon)
  130  interrupted; a running request was cancelled

With --json, every command prints JSON on stdout, errors too: one object
{{"ok": false, "error": {{"code": ..., "message": ...}}}} (usage errors: code "usage");
the exit status is the same as without --json.
"""
RAW = argparse.RawDescriptionHelpFormatter


def common_options(nested: bool = False) -> argparse.ArgumentParser:
    """--socket and --json. Under `policy` and `models`, both levels take them; the inner
    level must not reset what the outer one set, hence no defaults there."""
    default = {"default": argparse.SUPPRESS} if nested else {}
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", metavar="PATH", help="daemon socket (default: "
                        f"${SOCKET_ENV}, else /run/llm-residentd/llm.sock as root, "
                        "$XDG_RUNTIME_DIR/llm-residentd.sock otherwise if it exists, "
                        "else /run/llm-residentd/llm.sock)", **default)
    common.add_argument("--json", action="store_true", help="machine-readable output, errors "
                        "included", **default)
    return common


@dataclass(frozen=True)
class Command:
    """One subcommand: its help, its arguments, and what it runs."""

    name: str
    help: str
    description: str
    run: Callable[[Client, argparse.Namespace], int] | None = None  # on a daemon connection
    run_alone: Callable[[argparse.Namespace], int] | None = None  # connects itself, or not
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    common: bool = True  # takes --socket and --json
    raw: bool = False  # its description is printed as written, not rewrapped
    epilog: bool = False  # the environment and exit statuses close its help

    def add_to(self, subparsers: argparse._SubParsersAction) -> None:
        extra = {"epilog": EPILOG} if self.epilog else {}
        parser = subparsers.add_parser(
            self.name, parents=[common_options()] if self.common else [],
            formatter_class=RAW if self.raw else argparse.HelpFormatter,
            help=self.help, description=self.description, **extra)
        if self.arguments is not None:
            self.arguments(parser)
        parser.set_defaults(handler=self, **({} if self.common else {"json": False}))
