"""llmctl: the command line of llm-residentd. The parser is built from the commands'
declarations (commands/); failures become exit codes and error messages here."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from llm_residentd import __version__

from . import completion
from .client import Client, LlmctlError
from .commands import (
    EPILOG,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    RAW,
    Command,
    cancel,
    chat,
    events,
    exit_code,
    limits,
    load,
    models,
    policy,
    ps,
    status,
    submit,
    wait,
)
from .commands import completion as completion_command
from .output import emit_json, error_json

# In the order --help lists them.
COMMANDS = (submit.COMMAND, chat.COMMAND, status.COMMAND, ps.COMMAND, load.LOAD, load.UNLOAD,
            models.COMMAND, cancel.COMMAND, limits.COMMAND, policy.COMMAND, events.COMMAND,
            wait.COMMAND, completion_command.COMMAND)


class Parser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are JSON on stdout when --json was given."""

    json_errors = False  # set by main from the command line, before parsing

    def error(self, message: str) -> Any:
        if Parser.json_errors:
            emit_json(error_json("usage", f"{self.prog}: {message}"))
            sys.exit(EXIT_USAGE)
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="llmctl", description="Control llm-residentd: submit prompts, watch "
               "workers and queues.", epilog=EPILOG, formatter_class=RAW)
    p.add_argument("--version", action="version", version=f"llmctl {__version__}")
    p.add_argument("--socket", dest="global_socket", metavar="PATH", help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_to(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if argv[:1] == ["__complete"]:  # the completion scripts ask here; not a command
        return completion.complete(parser, argv[1:])
    Parser.json_errors = "--json" in argv[:argv.index("--")] if "--" in argv else "--json" in argv
    args = parser.parse_args(argv)
    command: Command = args.handler
    try:
        if command.run_alone is not None:
            return command.run_alone(args)
        with Client(args.socket or args.global_socket) as client:
            return command.run(client, args)
    except LlmctlError as exc:
        if args.json:
            extra = {"event": "error"} if args.command == "submit" else {}
            emit_json(error_json(exc.code, exc.message, **extra))
        else:
            print(f"llmctl: {exc.message} ({exc.code})", file=sys.stderr)
        return exit_code(exc.code)
    except KeyboardInterrupt:
        if args.json:
            emit_json(error_json("interrupted", "interrupted"))
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
