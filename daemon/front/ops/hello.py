"""hello: the handshake; the first request on every connection.

Access: any peer that can connect.

Request: {"op": "hello", "protocol": 1, "client": "llmctl/0.1.0"}
Reply:   {"protocol": 1, "server": "llm-residentd", "version": "0.1.0",
          "max_frame": 1048576, "ops": [...], "uid": 1000}
A protocol the server does not serve is refused with unsupported_protocol and the
connection is closed.
"""

from __future__ import annotations

from typing import Any

import structlog

from ... import __version__
from ...wire.protocol import PROTOCOL_VERSION, ProtocolError
from .base import OPS, Context, Op, Param, register

log = structlog.get_logger()


@register
class Hello(Op):
    name = "hello"
    params = {
        "protocol": Param(int, help="the protocol version the client speaks", required=True),
        "client": Param(str, help="the client's name and version, for the log", max=200),
    }

    def execute(self, ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
        if args["protocol"] != PROTOCOL_VERSION:
            raise ProtocolError("unsupported_protocol",
                                f"client speaks protocol {args['protocol']}, "
                                f"this server speaks {PROTOCOL_VERSION}")
        log.debug("client_hello", client=args.get("client"), peer_uid=ctx.uid, peer_pid=ctx.pid)
        return {"protocol": PROTOCOL_VERSION, "server": "llm-residentd", "version": __version__,
                "max_frame": ctx.service.config.daemon.max_frame, "ops": sorted(OPS),
                "uid": ctx.uid}
