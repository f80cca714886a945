"""cancel: stop a queued or running request.

Access: the request's owner (the uid that submitted it, from any connection) or root;
others get `forbidden`.

Request: {"op": "cancel", "request": "r7"}
Reply:   {"request": "r7", "cancelled": true}
The request's own stream ends with an error event of code cancelled. Only its owner
(the same uid) or root may cancel it; others get forbidden.
"""

from __future__ import annotations

from typing import Any

from .base import Context, Op, Param, register


@register
class Cancel(Op):
    name = "cancel"
    params = {"request": Param(str, help="the request id that submit returned", required=True,
                               max=64)}

    def execute(self, ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
        req = ctx.service.cancel(args["request"], ctx.uid)
        return {"request": req.id, "cancelled": True}
