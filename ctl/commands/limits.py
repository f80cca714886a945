"""llmctl limits: show or change a model's worker limits live. Its options are the limits
op's fields."""

from __future__ import annotations

import argparse
from typing import Any

from llm_residentd.front.ops.limits import Limits

from ..client import Client
from ..output import show
from . import EXIT_OK, Command
from .params import Flag, op_arguments, op_fields

# The daemon parses and checks the values: a bad one is its bad_request (exit 1).
FLAGS = {
    "cpu": Flag("Q", "CPU quota: 50% of one CPU, 1.5 CPUs, or max"),
    "memory_high": Flag("SIZE", "memory.high: 600M, 2G, or max"),
    "memory_max": Flag("SIZE", "memory.max: 1G, or max"),
    "tasks_max": Flag("N", "most tasks; 0 is no limit"),
    "cpu_weight": Flag("W", "cpu.weight, 1..10000"),
}


def _text(reply: dict[str, Any]) -> str:
    lim = reply["limits"]
    return (f"{reply['model']} ({reply['backend']} backend): cpu {lim['cpu']}, memory.high "
            f"{lim['memory_high']}, memory.max {lim['memory_max']}, tasks {lim['tasks_max']}, "
            f"cpu.weight {lim['cpu_weight']}")


def cmd_limits(client: Client, args: argparse.Namespace) -> int:
    show(args, client.call("limits", **op_fields(args, Limits)), _text)
    return EXIT_OK


COMMAND = Command(
    "limits", help="show or change a model's worker limits live (changes: root)",
    description="Show MODEL's worker limits, or change them live. The daemon applies the "
    "change to each worker's scope (systemd) or cgroup (cgroupfs), reads it back from the "
    "kernel, and sets the workers' thread counts to match the CPU quota. Changing needs "
    "root.", run=cmd_limits, arguments=op_arguments(Limits, FLAGS, ("model",)), raw=True)
