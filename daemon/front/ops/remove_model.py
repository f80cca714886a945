"""remove_model: stop serving a model without a restart; its requests finish (root only).

Access: root (uid 0); others get `forbidden`.

Request: {"op": "remove_model", "name": "gemma"}
Reply:   {"model": "gemma", "requests": 2}  (its queued and running requests, which finish)
The model leaves the running config as a reload that misses it in the file removes it:
new submits get no_such_model at once, its queued and running requests complete, then
its workers stop and their scopes are released (the models op lists it as draining
meanwhile). An unknown name is no_such_model; the only model cannot be removed
(bad_request). It lasts until the daemon restarts: a reload of the config file (SIGHUP)
keeps the name removed even if the file has it; add_model brings it back.
"""

from __future__ import annotations

from typing import Any

import structlog

from ...wire.protocol import ProtocolError
from .base import Context, Op, Param, register

log = structlog.get_logger()


@register
class RemoveModel(Op):
    name = "remove_model"
    params = {"name": Param(str, help="the model to remove", required=True, min=1, max=200)}

    async def execute(self, ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
        if ctx.uid != 0:
            raise ProtocolError("forbidden", "removing a model needs root (uid 0); this peer "
                                f"is uid {ctx.uid}")
        pending = await ctx.service.reloader.remove_model(args["name"])
        log.info("model_remove_requested", model=args["name"], by_uid=ctx.uid,
                 requests=pending)
        return {"model": args["name"], "requests": pending}
