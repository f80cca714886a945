"""llmctl events: the policies' recent actions."""

from __future__ import annotations

import argparse
import time
from typing import Any

from llm_residentd.front.ops.events import Events

from ..client import Client
from ..output import show, table
from . import EXIT_OK, Command
from .params import Flag, op_arguments, op_fields


def _text(events: list[dict[str, Any]]) -> str:
    return table(["TIME", "POLICY", "ACTION", "TARGET", "VALUES", "RESULT", "REASON"],
                 [[time.strftime("%H:%M:%S", time.localtime(e["at"])), e["policy"], e["action"],
                   e["target"], " ".join(f"{k}={v}" for k, v in e["values"].items()) or "-",
                   e["result"], e["reason"]] for e in events])


def cmd_events(client: Client, args: argparse.Namespace) -> int:
    show(args, client.call("events", **op_fields(args, Events))["events"], _text)
    return EXIT_OK


COMMAND = Command(
    "events", help="the actions the policies took",
    description="The policies' recent actions (admit, defer, set_limits, set_threads, "
    "disable) with their targets, results and reasons.", run=cmd_events,
    arguments=op_arguments(Events, {"limit": Flag("N", "default 50", default=50)}))
