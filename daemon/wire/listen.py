"""What an operator writes to open the HTTP API to TCP: the listen address ("HOST:PORT")
and the API-key file ("NAME KEY" lines). The config checks them at load; the HTTP front
uses them to listen and to tell who a peer is."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
MIN_KEY = 16


def split_listen(listen: str) -> tuple[str, int]:
    """ "127.0.0.1:11435" or "[::1]:11435" into host and port."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{listen!r} is not HOST:PORT (port 0 to 65535; 0 picks a free one)")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host:
        raise ValueError(f"{listen!r} has no host (use 127.0.0.1 for this machine only)")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Only literal loopback addresses and "localhost" count: a name could resolve anywhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_keys(path: Path) -> dict[str, str]:
    """API keys by name from lines "NAME KEY"; blank lines and # comments are skipped.

    Keys are at least 16 characters; names and keys are unique.
    """
    keys: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or not _NAME.fullmatch(parts[0]):
            raise ValueError(f"{path}:{number}: expected \"NAME KEY\" (NAME of letters, digits, "
                             "'_.@-')")
        name, key = parts
        if len(key) < MIN_KEY:
            raise ValueError(f"{path}:{number}: the key of {name!r} is shorter than "
                             f"{MIN_KEY} characters")
        if name in keys or key in keys.values():
            raise ValueError(f"{path}:{number}: {name!r} or its key is listed twice")
        keys[name] = key
    if not keys:
        raise ValueError(f"{path}: no keys")
    return keys
