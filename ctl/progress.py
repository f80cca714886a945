"""What `llmctl submit` tells a person at a terminal while the text has not started: a
transient status line on stderr (queue position, model loading, elapsed time), and why
an answer stopped short. Nothing here is used with --json or when stderr is not a tty."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any, TextIO

from .client import Client, LlmctlError, Stream

POLL_S = 1.0  # how often the line is refreshed while waiting
CLEAR = "\r\x1b[K"  # back to the start of the line, erase to its end


class StatusLine:
    """One line of stderr that is rewritten in place and erased before anything else."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.shown = False

    def show(self, text: str) -> None:
        try:
            width = os.get_terminal_size(self.out.fileno()).columns - 1
        except (OSError, ValueError):
            width = 0
        width = width if width > 10 else 79  # a pty may report 0 columns
        self.out.write(CLEAR + text[:width])
        self.out.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.out.write(CLEAR)
            self.out.flush()
            self.shown = False


def describe_wait(status: dict[str, Any], stream: Stream, elapsed: float) -> str:
    """"queued: 3 ahead (1 running, 2 queued), 12 s" from the status op's reply."""
    model = status.get("models", {}).get(stream.model, {})
    parts = []
    if model.get("waiting"):  # a load waiting for busy models to make room
        parts.append(f"model {stream.model} is {model['waiting']}")
    elif model.get("state") in ("loading", "unloaded"):
        parts.append(f"loading model {stream.model}")
    queued = model.get("queued") or []
    if stream.request in queued:
        before, running = queued.index(stream.request), model.get("running", 0)
        parts.append(f"queued: {before + running} ahead ({running} running, {before} queued)")
    elif model.get("state") not in ("loading", "unloaded"):
        parts.append("processing the prompt")
    return f"llmctl: {', '.join(parts)}, {elapsed:.0f} s"


def events_with_status(client: Client, stream: Stream, line: StatusLine | None,
                       accepted_at: float) -> Iterator[dict[str, Any]]:
    """The stream's events; until the first one arrives, the status line (if any) says
    where the request is, from the status op polled on the same connection."""
    if line is None:
        yield from stream.events()
        return
    try:
        while not stream.finished:
            event = stream.next_event(POLL_S)
            if event is None:
                with contextlib.suppress(LlmctlError):  # a status that fails only costs the line
                    line.show(describe_wait(client.status(), stream,
                                            time.monotonic() - accepted_at))
                continue
            line.clear()
            yield event
            break
        yield from stream.events()
    finally:
        line.clear()


def stop_notice(client: Client, stream: Stream, asked: int | None) -> str | None:
    """Why the answer ended short, if it ended by a limit rather than by the model."""
    stats = stream.stats or {}
    if stats.get("finish_reason") != "length":
        return None
    limit, n_ctx = asked, None
    with contextlib.suppress(LlmctlError):
        model = next((m for m in client.models() if m["name"] == stream.model), None)
        if model is not None:
            n_ctx = model["n_ctx"]
            limit = limit or min(model["max_tokens"], n_ctx)
    if limit is not None and stats.get("completion_tokens", 0) >= limit:
        return f"llmctl: stopped at max_tokens {limit}; use -n to allow more"
    return (f"llmctl: stopped: the context of model {stream.model} is full"
            + (f" ({n_ctx} tokens)" if n_ctx else ""))
