"""The trace of an HTTP request refused before acceptance: one `http_refused` line at info
with its status, error code, method, path and peer (docs/http.md, "Errors").

A flood of bad requests must not become a flood of log lines: at most RATE lines are
written per second, for all peers together. The lines held back are counted, and the
first line written after them carries the count as `suppressed`.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from typing import Any

import structlog

from . import auth

RATE = 10  # http_refused lines per second, daemon-wide
PATH_CHARS = ERROR_CHARS = 200  # of a path, an error message logged

log = structlog.get_logger()


def peer_fields(transport: Any) -> dict[str, Any]:
    """Who sent the request: uid and pid on a Unix socket (SO_PEERCRED), the address on
    TCP; nothing once the connection is gone."""
    if transport is None:
        return {}
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        with contextlib.suppress(OSError):
            peer = auth.unix_peer(sock)
            return {"peer_uid": peer.uid, "peer_pid": peer.pid}
        return {}
    addr = transport.get_extra_info("peername")
    return {"peer": f"{addr[0]}:{addr[1]}"} if isinstance(addr, tuple) else {}


class Refusals:
    """The rate limit: a window of one second from its first line, RATE lines in it."""

    def __init__(self, rate: int = RATE, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.clock = rate, clock
        self.window = float("-inf")  # when the current second began
        self.written = 0  # lines written in it
        self.suppressed = 0  # lines held back since the last line written

    def log(self, status: int, code: str, method: str | None, path: str | None,
            transport: Any, error: str) -> None:
        """error: the message of the reply (of a request aiohttp could not parse, the
        parser's reason; method and path are then None)."""
        now = self.clock()
        if now - self.window >= 1.0:
            self.window, self.written = now, 0
        if self.written >= self.rate:
            self.suppressed += 1
            return
        self.written += 1
        held = {"suppressed": self.suppressed} if self.suppressed else {}
        self.suppressed = 0
        log.info("http_refused", status=status, code=code, method=method,
                 path=path[:PATH_CHARS] if path else path, **peer_fields(transport),
                 error=error[:ERROR_CHARS], **held)


refusals = Refusals()
