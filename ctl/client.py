"""Client library for the llm-residentd control socket.

    with Client() as c:
        stream = c.submit("Why is the sky blue?", max_tokens=64)
        for text in stream.text():
            print(text, end="")
        print(stream.stats)
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llm_residentd import __version__
from llm_residentd.paths import client_socket
from llm_residentd.wire.protocol import PROTOCOL_VERSION, FrameReader, ProtocolError, send_frame

CONNECT_TIMEOUT = 10.0


class LlmctlError(Exception):
    """A failure with a stable code: the daemon's error code, or one of the client's own
    (not_running, connection_lost, client_timeout)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message


class Stream:
    """The events of one submitted request: tokens, then done or error."""

    def __init__(self, client: Client, msg_id: int, accepted: dict[str, Any]) -> None:
        self.client = client
        self.msg_id = msg_id
        self.request: str = accepted["request"]
        self.model: str = accepted["model"]
        self.position: int = accepted["position"]
        self.stats: dict[str, Any] | None = None
        self.finished = False
        self.client_printed = False  # for the CLI: text went to the terminal

    def events(self) -> Iterator[dict[str, Any]]:
        """Every event; the last is done or error (which is yielded, not raised)."""
        while not self.finished:
            event = self.next_event()
            if event is not None:
                yield event

    def next_event(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next event, or None if none came within timeout seconds (the connection
        stays usable: other calls, such as status, may run in between)."""
        try:
            event = self.client._next(self.msg_id, timeout)
        except LlmctlError as exc:
            if exc.code == "client_timeout" and timeout is not None:
                return None
            raise
        if event.get("event") in ("done", "error"):
            self.finished = True
            self.stats = event.get("stats")
        return event

    def text(self) -> Iterator[str]:
        """The generated text piece by piece; raises LlmctlError if the request fails."""
        for event in self.events():
            if event["event"] == "token":
                yield event["text"]
            elif event["event"] == "error":
                raise LlmctlError(event["error"]["code"], event["error"]["message"])

    def cancel(self) -> None:
        self.client.call("cancel", request=self.request)


class Client:
    def __init__(self, path: str | Path | None = None, timeout: float | None = 30.0) -> None:
        self.path = Path(path) if path else client_socket()
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._pending: dict[Any, list[dict[str, Any]]] = {}
        self.sock = self._connect()
        self._frames = FrameReader(self.sock, 64 << 20)
        self.server = self.call("hello", protocol=PROTOCOL_VERSION, client=f"llmctl/{__version__}")

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(str(self.path))
        except FileNotFoundError:
            sock.close()
            raise LlmctlError("not_running", f"no socket at {self.path}: is llm-residentd "
                              "running? (systemctl status llm-residentd; or pass --socket)") from None
        except ConnectionRefusedError:
            sock.close()
            raise LlmctlError("not_running", f"nothing listens on {self.path}: llm-residentd "
                              "is not running or died") from None
        except PermissionError:
            sock.close()
            raise LlmctlError("forbidden", f"no permission to connect to {self.path}: "
                              "join the group that owns it (usually 'llm')") from None
        except OSError as exc:
            sock.close()
            raise LlmctlError("not_running", f"cannot connect to {self.path}: {exc}") from None
        return sock

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _recv(self, timeout: float | None) -> dict[str, Any]:
        if self.sock.gettimeout() != timeout:
            self.sock.settimeout(timeout)
        try:
            msg = self._frames.read()
        except TimeoutError:
            raise LlmctlError("client_timeout", f"no answer from the daemon within {timeout} s; "
                              "it may be overloaded or stuck (see llmctl status, the journal)"
                              ) from None
        except ProtocolError as exc:
            raise LlmctlError("connection_lost", f"bad data from the daemon: {exc}") from None
        except OSError as exc:
            raise LlmctlError("connection_lost", f"connection to the daemon failed: {exc}") from None
        if msg is None:
            raise LlmctlError("connection_lost", "the daemon closed the connection")
        return msg

    def _next(self, msg_id: Any, timeout: float | None = None) -> dict[str, Any]:
        """The next message for msg_id; others are kept for their own readers."""
        if self._pending.get(msg_id):
            return self._pending[msg_id].pop(0)
        while True:
            msg = self._recv(timeout)
            if msg.get("id") == msg_id:
                return msg
            if msg.get("id") is None and msg.get("ok") is False:
                err = msg["error"]
                raise LlmctlError(err["code"], err["message"])
            self._pending.setdefault(msg.get("id"), []).append(msg)

    def _request(self, op: str, args: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        msg_id = next(self._ids)
        try:
            send_frame(self.sock, {"id": msg_id, "op": op, **args})
        except OSError as exc:
            raise LlmctlError("connection_lost", f"cannot send to the daemon: {exc}") from None
        reply = self._next(msg_id, self.timeout)
        if not reply.get("ok"):
            err = reply.get("error") or {"code": "internal", "message": repr(reply)}
            raise LlmctlError(err["code"], err["message"])
        return msg_id, reply

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Run one op and return its reply; raises LlmctlError on an error reply."""
        reply = self._request(op, {k: v for k, v in args.items() if v is not None})[1]
        return {k: v for k, v in reply.items() if k not in ("id", "ok")}

    def submit(self, prompt: str | None = None, **params: Any) -> Stream:
        """Submit a prompt; params are the submit op's other fields (model, max_tokens,
        ...), or messages instead of the prompt."""
        args = {"prompt": prompt, **params}
        args = {k: v for k, v in args.items() if v is not None}
        msg_id, reply = self._request("submit", args)
        return Stream(self, msg_id, reply)

    def status(self) -> dict[str, Any]:
        return self.call("status")

    def models(self) -> list[dict[str, Any]]:
        return self.call("models")["models"]

    def cancel(self, request: str) -> dict[str, Any]:
        return self.call("cancel", request=request)
