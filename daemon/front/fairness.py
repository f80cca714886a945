"""Fair access to the socket: who may open one more connection.

One member of the socket's group must not lock everyone else out, so connections are
counted per uid as well as in total; root keeps a small reserve above the total so that
an admin can always connect (status, cancel, limits) when the daemon is full.
"""

from __future__ import annotations

import collections

ROOT_RESERVE = 8  # connections above max_connections that only uid 0 may use


class ConnectionSlots:
    """Open connections by peer uid; refusal() decides on a new one."""

    def __init__(self) -> None:
        self.by_uid: collections.Counter[int] = collections.Counter()

    def __len__(self) -> int:
        return sum(self.by_uid.values())

    def refusal(self, uid: int, max_connections: int, per_uid: int) -> str | None:
        """Why a connection from uid must be refused now, or None to accept it.

        Root is not held to per_uid and may go ROOT_RESERVE past max_connections.
        """
        total = len(self)
        if uid == 0:
            if total >= max_connections + ROOT_RESERVE:
                return (f"the daemon serves {max_connections} connections at once, and "
                        f"{ROOT_RESERVE} more for root; all are in use")
            return None
        if total >= max_connections:
            return f"the daemon serves {max_connections} connections at once (max_connections)"
        if self.by_uid[uid] >= per_uid:
            return (f"uid {uid} already has {self.by_uid[uid]} connections open "
                    f"(max_connections_per_uid {per_uid})")
        return None

    def opened(self, uid: int) -> None:
        self.by_uid[uid] += 1

    def closed(self, uid: int) -> None:
        self.by_uid[uid] -= 1
        if self.by_uid[uid] <= 0:
            del self.by_uid[uid]
