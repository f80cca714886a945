"""Helpers for the HTTP API tests: a daemon with [http] on, and raw HTTP over its sockets."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import httpx
import openai
from harness import Daemon, wait_for


def http_socket(d: Daemon) -> Path:
    return d.socket.with_name(f"{d.socket.stem}-http.sock")


def tcp_port(d: Daemon) -> int:
    """The TCP port the daemon bound (listen = "127.0.0.1:0"), from its start log."""
    started = wait_for(lambda: [e for e in d.logs() if e.get("event") == "daemon_started"],
                       what="daemon_started")[0]
    tcp = [a for a in started["http"] if not a.startswith("/")]
    return int(tcp[0].rsplit(":", 1)[1])


def unix_client(d: Daemon, **kw: Any) -> openai.OpenAI:
    transport = httpx.HTTPTransport(uds=str(http_socket(d)))
    return openai.OpenAI(base_url="http://localhost/v1", api_key="unused", max_retries=0,
                         http_client=httpx.Client(transport=transport, timeout=60), **kw)


def tcp_client(d: Daemon, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{tcp_port(d)}/v1", api_key=key,
                         max_retries=0, timeout=60)


def unix_http(d: Daemon, method: str, path: str, body: Any = None,
              headers: dict[str, str] | None = None, timeout: float = 60) -> httpx.Response:
    transport = httpx.HTTPTransport(uds=str(http_socket(d)))
    with httpx.Client(transport=transport, timeout=timeout) as c:
        content = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
        return c.request(method, f"http://localhost{path}", content=content,
                         headers=headers or {})


def raw_unix(d: Daemon) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(str(http_socket(d)))
    return sock


def post_bytes(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body
