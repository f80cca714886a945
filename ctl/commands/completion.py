"""llmctl completion: print the bash or zsh completion script (..completion answers the
scripts' questions)."""

from __future__ import annotations

import argparse
import sys

from .. import completion
from . import EXIT_OK, Command


def cmd_completion(args: argparse.Namespace) -> int:
    sys.stdout.write(completion.script(args.shell))
    return EXIT_OK


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shell", choices=sorted(completion.SCRIPTS))


COMMAND = Command(
    "completion", help="print a shell completion script",
    description="Print the completion script for bash or zsh; e.g. source <(llmctl "
    "completion bash). Model and policy names are asked from the daemon as you type (none "
    "when it is down). The Debian package installs both scripts.",
    run_alone=cmd_completion, arguments=_arguments, common=False)
