"""llmctl load and unload: a model into memory now, or out of it. Their options are the
load and unload ops' fields."""

from __future__ import annotations

import argparse

from llm_residentd.front.ops.load import LOAD_WAIT_S, Load
from llm_residentd.front.ops.unload import Unload

from ..client import Client
from ..output import fmt_bytes, show
from . import EXIT_OK, Command
from .params import Flag, op_arguments, op_fields

LOAD_FLAGS = {
    "keep_alive": Flag("DURATION", checked=True),
    "timeout": Flag("S", f"seconds to wait for room and the load (default {LOAD_WAIT_S:g})"),
}
UNLOAD_FLAGS = {"force": Flag(help="fail its running requests (root)")}


def cmd_load(client: Client, args: argparse.Namespace) -> int:
    client.timeout = (args.timeout or LOAD_WAIT_S) + 10  # the daemon answers once it loaded
    show(args, client.call("load", **op_fields(args, Load)),
         lambda r: f"{r['name']} loaded: {fmt_bytes(r['memory_bytes'])}, keep_alive "
                   f"{r['keep_alive']}")
    return EXIT_OK


def cmd_unload(client: Client, args: argparse.Namespace) -> int:
    client.timeout = None  # the daemon answers once the running requests are done
    show(args, client.call("unload", **op_fields(args, Unload)),
         lambda r: f"{r['model']} unloaded")
    return EXIT_OK


LOAD = Command(
    "load", help="load a model now",
    description="Load MODEL and return once it serves. Idle models are unloaded first if "
    "it does not fit (least recently used first); it waits for busy ones up to --timeout. "
    "Exit 1 with insufficient_memory if it cannot fit even with every other model "
    "unloaded.", run=cmd_load, arguments=op_arguments(Load, LOAD_FLAGS, ("model",)))
UNLOAD = Command(
    "unload", help="unload a model, freeing its memory",
    description="Stop MODEL's workers and free their memory. Running requests finish "
    "first; with --force (root only) they fail with model_unloaded. Queued requests stay "
    "queued and load it again. Exit 1 with not_loaded if it is not loaded.",
    run=cmd_unload, arguments=op_arguments(Unload, UNLOAD_FLAGS, ("model",)))
