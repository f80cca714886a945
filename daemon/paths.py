"""Default locations of the control socket and the state directory."""

from __future__ import annotations

import os
from pathlib import Path

SOCKET_ENV = "LLM_RESIDENTD_SOCKET"
SYSTEM_SOCKET = Path("/run/llm-residentd/llm.sock")
SYSTEM_HTTP_SOCKET = Path("/run/llm-residentd/http.sock")
SYSTEM_STATE = Path("/var/lib/llm-residentd")


def default_socket() -> Path:
    """$LLM_RESIDENTD_SOCKET, else the system socket for root, else one in $XDG_RUNTIME_DIR."""
    if os.environ.get(SOCKET_ENV):
        return Path(os.environ[SOCKET_ENV])
    if os.geteuid() == 0:
        return SYSTEM_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/llm-residentd-{os.geteuid()}"
    return Path(runtime) / "llm-residentd.sock"


def default_http_socket() -> Path:
    """The HTTP API's Unix socket: the system one for root, else one in $XDG_RUNTIME_DIR."""
    if os.geteuid() == 0:
        return SYSTEM_HTTP_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/llm-residentd-{os.geteuid()}"
    return Path(runtime) / "llm-residentd-http.sock"


def client_socket() -> Path:
    """Where a client connects: default_socket(), except that a user without a daemon of
    their own uses the system daemon's socket (e.g. a member of group llm)."""
    path = default_socket()
    if not os.environ.get(SOCKET_ENV) and not path.exists() and SYSTEM_SOCKET.exists():
        return SYSTEM_SOCKET
    return path


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return SYSTEM_STATE
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "llm-residentd"
