"""status: the daemon, its workers, and per-model queues and latency percentiles.

Access: any peer.

Request: {"op": "status"}
Reply:   {"daemon": {...}, "workers": [...], "pressure": {...}, "cpu": {...},
          "models": {NAME: {...}}}
docs/protocol.md lists every field.
"""

from __future__ import annotations

from typing import Any

from .. import views
from .base import Context, Op, register


@register
class Status(Op):
    name = "status"

    def execute(self, ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
        return views.status(ctx.service)
