"""sd_notify without libsystemd: READY=1, RELOADING=1, STATUS=..., WATCHDOG=1, STOPPING=1 to
$NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


def _address(env: Mapping[str, str]) -> str | None:
    """$NOTIFY_SOCKET as a socket address; '@name' is the abstract name '\\0name'."""
    addr = env.get("NOTIFY_SOCKET", "")
    if not addr or addr[0] not in "/@":
        return None
    return "\0" + addr[1:] if addr[0] == "@" else addr


def enabled(env: Mapping[str, str] | None = None) -> bool:
    """True when started by systemd with a notify socket."""
    return _address(os.environ if env is None else env) is not None


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send one datagram such as "READY=1\\nSTATUS=..."; False when not under systemd or it fails."""
    addr = _address(os.environ if env is None else env)
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(addr)
            sock.sendall(state.encode())
    except OSError:
        return False
    return True


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC), or None without a watchdog."""
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):  # meant for another process
        return None
    return int(usec) / 2e6
