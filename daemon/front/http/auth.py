"""Who an HTTP peer is: its uid on the Unix socket, the name of its API key on TCP."""

from __future__ import annotations

import hmac
import socket
import struct
from dataclasses import dataclass

TCP_UID = -1  # requests that come over TCP belong to no local user; the key name says whose


@dataclass(frozen=True)
class Peer:
    uid: int
    gid: int
    pid: int
    name: str  # "uid 1000" on the Unix socket, the API key's name on TCP

    @property
    def log_fields(self) -> dict[str, object]:
        return {"peer_uid": self.uid, "peer": self.name}


def key_name(keys: dict[str, str], authorization: str | None) -> str | None:
    """The name of the key in an "Authorization: Bearer KEY" header, else None.

    Every key is compared, in constant time each, so the time taken does not tell
    which key matched nor how much of one. The key is what follows the one space, exactly:
    HTTP already dropped the spaces and tabs around the header's value, and anything else
    (a no-break space) is not part of any key.
    """
    if not authorization or not authorization.startswith("Bearer "):
        return None
    try:  # the header's bytes as they came (aiohttp keeps undecodable ones as surrogates)
        given = authorization[len("Bearer "):].encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return None
    found = None
    for name, key in keys.items():
        if hmac.compare_digest(given, key.encode()):
            found = name
    return found


def unix_peer(sock: socket.socket) -> Peer:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return Peer(uid=uid, gid=gid, pid=pid, name=f"uid {uid}")
