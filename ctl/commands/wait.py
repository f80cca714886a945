"""llmctl wait: until the daemon answers and the models serve (for scripts that start
it). wait_ready is the same wait for tests and benchmarks."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ..client import Client, LlmctlError
from ..output import emit_json
from . import EXIT_OK, Command


def wait_ready(path: str | None, model: str | None, timeout: float) -> int:
    """Poll until the daemon answers and the model (or every model) is ready."""
    ready_models(path, model, timeout)
    return EXIT_OK


def ready_models(path: str | None, model: str | None, timeout: float) -> list[dict[str, Any]]:
    """The models once they are all ready; raises LlmctlError if one cannot be, or on timeout."""
    deadline = time.monotonic() + timeout
    last = "the daemon did not answer"
    while time.monotonic() < deadline:
        try:
            with Client(path, timeout=5) as client:
                models = [m for m in client.models() if model in (None, m["name"])]
        except LlmctlError as exc:
            if exc.code not in ("not_running", "connection_lost", "client_timeout"):
                raise
            last = exc.message
        else:
            if not models:
                raise LlmctlError("no_such_model", f"no model {model!r}")
            bad = [m for m in models if m["state"] == "unavailable"]
            if bad:
                raise LlmctlError("model_unavailable", bad[0]["error"])
            # An unloaded model serves too: its first request loads it.
            if all(m["state"] in ("ready", "unloaded") for m in models):
                return models
            last = ", ".join(f"{m['name']} is {m['state']}" for m in models)
        time.sleep(0.2)
    raise LlmctlError("client_timeout", f"not ready after {timeout:g} s: {last}")


def cmd_wait(args: argparse.Namespace) -> int:
    models = ready_models(args.socket or args.global_socket, args.model, args.timeout)
    if args.json:
        emit_json({"ok": True, "models": {m["name"]: m["state"] for m in models}})
    return EXIT_OK


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", nargs="?", help="the model to wait for")
    parser.add_argument("--timeout", type=float, default=60, metavar="S", help="default 60")


COMMAND = Command(
    "wait", help="wait until the daemon can serve",
    description="Wait until the daemon answers and MODEL (default: every model) is loaded. "
    "Exit 0 when ready, 1 if a model cannot be loaded, 4 on timeout. For scripts that "
    "start the daemon.", run_alone=cmd_wait, arguments=_arguments)
