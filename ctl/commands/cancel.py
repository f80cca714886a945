"""llmctl cancel: cancel a queued or running request by its id."""

from __future__ import annotations

import argparse

from ..client import Client
from ..output import show
from . import EXIT_OK, Command


def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    show(args, client.cancel(args.request), lambda r: f"cancelled {r['request']}")
    return EXIT_OK


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("request", metavar="REQUEST", help="request id, e.g. r7")


COMMAND = Command(
    "cancel", help="cancel a queued or running request",
    description="Cancel a request by the id that submit printed (llmctl submit -v, or "
    "--json). Only its owner or root may cancel it.", run=cmd_cancel, arguments=_arguments)
