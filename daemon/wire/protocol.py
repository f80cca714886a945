"""Wire format shared by the daemon, its workers and llmctl.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack
holding one map. docs/protocol.md is the full specification.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Collection
from typing import Any

import msgpack

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME = 1 << 20
HEADER = struct.Struct(">I")

# Stable error codes; clients match on these strings.
ERROR_CODES: dict[str, str] = {
    "bad_frame": "the frame is not valid msgpack or does not hold a map",
    "frame_too_large": "the frame is longer than the server's max_frame",
    "handshake_required": "the first request on a connection must be hello",
    "unsupported_protocol": "the client's protocol version is not served",
    "bad_request": "a field is missing, of the wrong type or out of range",
    "unknown_op": "no such op",
    "no_such_model": "no model of that name is configured",
    "model_exists": "a model of that name is configured already (add_model)",
    "model_unavailable": "the model is configured but cannot be loaded",
    "too_long": "the prompt does not fit the model's context",
    "insufficient_memory": "the model does not fit in the memory that could be free, even "
                           "with every other model unloaded",
    "not_loaded": "the model is not loaded",
    "model_unloaded": "the request's model was unloaded with --force while it ran",
    "queue_full": "the model's queue is full; try again later",
    "too_many_requests": "the peer's uid already has max_queue_per_uid requests waiting for "
                         "the model; submit more when one of them has started",
    "no_such_request": "no queued or running request has that id",
    "forbidden": "the peer may not do this",
    "scope_error": "the scope backend (systemd or cgroupfs) could not apply a change",
    "cancelled": "the request was cancelled",
    "timeout": "the request's deadline passed",
    "deferred_timeout": "the request's deadline passed while a policy held it back",
    "worker_died": "the worker process running the request died",
    "worker_hung": "the worker running the request stopped answering and was killed",
    "handover_failed": "the request could not be handed to a worker (a daemon fault; the "
                       "daemon log has the details); the worker serves on",
    "shutting_down": "the daemon is stopping",
    "too_many_connections": "the daemon is at its connection limit, or the peer's uid at its own",
    "internal": "an unexpected server error; details are in the daemon log",
}


class ProtocolError(Exception):
    """An error that becomes an error reply or event with a stable code; param names the
    request field it is about, if one (the HTTP front's error bodies show it)."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        assert code in ERROR_CODES, code
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.param = param

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def check_model(name: str, known: Collection[str]) -> None:
    """no_such_model, naming the models there are, unless name is one of them."""
    if name not in known:
        raise ProtocolError("no_such_model", f"no model {name!r} "
                            f"(configured: {', '.join(sorted(known))})")


def encode(msg: dict[str, Any]) -> bytes:
    """One frame: length header plus msgpack body."""
    body = msgpack.packb(msg, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def decode(body: bytes) -> dict[str, Any]:
    """Parse a frame body; raise ProtocolError(bad_frame) unless it is one map."""
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError("bad_frame", f"not valid msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(msg, dict):
        raise ProtocolError("bad_frame", f"expected a map, got {type(msg).__name__}")
    return msg


def check_length(length: int, max_frame: int) -> None:
    if length > max_frame:
        raise ProtocolError(
            "frame_too_large", f"frame of {length} bytes exceeds max_frame {max_frame}"
        )


async def read_frame(reader: asyncio.StreamReader, max_frame: int) -> bytes | None:
    """The next frame body, or None at a clean end of stream."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ProtocolError("bad_frame", "stream ended inside a frame header") from None
        return None
    (length,) = HEADER.unpack(header)
    check_length(length, max_frame)
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ProtocolError("bad_frame", "stream ended inside a frame") from None


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            if chunks:
                raise ProtocolError("bad_frame", "stream ended inside a frame")
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_body(sock: socket.socket, max_frame: int = DEFAULT_MAX_FRAME) -> bytes | None:
    """Blocking read of one frame's body; None at end of stream."""
    header = _recv_exactly(sock, HEADER.size)
    if header is None:
        return None
    (length,) = HEADER.unpack(header)
    check_length(length, max_frame)
    body = _recv_exactly(sock, length)
    if body is None:
        raise ProtocolError("bad_frame", "stream ended inside a frame")
    return body


def recv_frame(sock: socket.socket, max_frame: int = DEFAULT_MAX_FRAME) -> dict[str, Any] | None:
    """Blocking read of one decoded frame; None at end of stream."""
    body = read_body(sock, max_frame)
    return None if body is None else decode(body)


class FrameReader:
    """Buffered frames from a blocking socket: one recv() often brings several."""

    def __init__(self, sock: socket.socket, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.sock = sock
        self.max_frame = max_frame
        self.buf = bytearray()

    def read(self) -> dict[str, Any] | None:
        """The next decoded frame; None at a clean end of stream."""
        while True:
            if len(self.buf) >= HEADER.size:
                (length,) = HEADER.unpack_from(self.buf)
                check_length(length, self.max_frame)
                end = HEADER.size + length
                if len(self.buf) >= end:
                    body = bytes(self.buf[HEADER.size:end])
                    del self.buf[:end]
                    return decode(body)
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                if self.buf:
                    raise ProtocolError("bad_frame", "stream ended inside a frame")
                return None
            self.buf += chunk


def send_frame(sock: socket.socket, msg: dict[str, Any]) -> None:
    sock.sendall(encode(msg))
