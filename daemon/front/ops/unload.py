"""unload: stop a model's workers and free its memory.

Access: any peer; force needs root (uid 0), for it fails other users' requests.

Request: {"op": "unload", "model": "gemma3", "force": false}
Reply:   {"model": "gemma3", "unloaded": true}
Answers once the workers have stopped and their scopes are gone. Running requests finish
first; with force they fail at once with model_unloaded. Queued requests stay queued and
load the model again. not_loaded if the model is not loaded (nothing changes).
"""

from __future__ import annotations

from typing import Any

from ...wire.protocol import ProtocolError, check_model
from .base import Context, Op, Param, register


@register
class Unload(Op):
    name = "unload"
    params = {
        "model": Param(str, help="the model to unload", required=True, max=200),
        "force": Param(bool, help="fail its running requests (model_unloaded) instead of letting "
                       "them finish; root only"),
    }

    async def execute(self, ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
        force = args.get("force", False)
        if force and ctx.uid != 0:
            raise ProtocolError("forbidden", "unload --force fails other users' requests and "
                                f"needs root (uid 0); this peer is uid {ctx.uid}")
        name = args["model"]
        check_model(name, ctx.service.config.models)
        await ctx.service.lifecycle.unload(name, force)
        return {"model": name, "unloaded": True}
