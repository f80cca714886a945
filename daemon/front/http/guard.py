"""One HTTP connection's guard around aiohttp's protocol object.

aiohttp bounds idle keep-alive time but not how long headers may trickle in, nor how many
connections are open; it also cannot tell which requests a vanished peer had. The guard
sits between asyncio and aiohttp's RequestHandler (every call is passed on) and adds:
a connection limit (daemon.max_connections, refused with a 503), a deadline of
http.header_timeout from a request's first byte (or from connect) to its handler, and the
cancellation of the connection's requests when it closes (like the msgpack socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

import structlog

from ...wire.protocol import ProtocolError

log = structlog.get_logger()


def refusal_bytes(message: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "server_error", "param": None,
                                 "code": "too_many_connections"}}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body)


class Guard(asyncio.Protocol):
    def __init__(self, guards: dict[Any, Guard], stop_request: Callable[[str, str, str], Any],
                 inner: Any, limit: int, header_timeout: float) -> None:
        self.guards = guards  # every open connection's guard, by transport (shared)
        self.stop_request = stop_request  # Service.stop_request
        self.inner = inner
        self.limit = limit
        self.header_timeout = header_timeout
        self.transport: asyncio.Transport | None = None
        self.refused = False
        self.busy = 0
        self.timer: asyncio.TimerHandle | None = None
        self.requests: set[str] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if len(self.guards) >= self.limit:
            self.refused = True
            log.warning("http_connection_refused", code="too_many_connections",
                        limit=self.limit)
            transport.write(refusal_bytes(f"the daemon serves at most {self.limit} HTTP "
                                          "connections at once (daemon.max_connections)"))
            transport.close()
            return
        self.guards[transport] = self
        self._arm()
        self.inner.connection_made(transport)

    def _arm(self) -> None:
        if self.timer is None and not self.busy:
            loop = asyncio.get_running_loop()
            self.timer = loop.call_later(self.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _too_slow(self) -> None:
        self.timer = None
        if not self.busy and self.transport is not None:
            log.info("http_slow_client", header_timeout=self.header_timeout)
            self.transport.abort()

    def request_started(self) -> None:
        self.busy += 1
        self._disarm()

    def request_finished(self) -> None:
        self.busy -= 1

    def data_received(self, data: bytes) -> None:
        if not self.busy:
            self._arm()  # a new request begins: its headers must come in time
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return None if self.refused else self.inner.eof_received()

    def pause_writing(self) -> None:
        if not self.refused:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if not self.refused:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.refused:
            return
        self._disarm()
        self.guards.pop(self.transport, None)
        for request_id in list(self.requests):  # the peer is gone: stop its work now
            with contextlib.suppress(ProtocolError):
                self.stop_request(request_id, "cancelled", "the HTTP client disconnected")
        self.requests.clear()
        self.inner.connection_lost(exc)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
