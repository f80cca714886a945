"""load: load a model now and answer once it serves.

Access: any peer.

Request: {"op": "load", "model": "gemma3", "keep_alive": "10m", "timeout": 600}
Reply:   {"name": "gemma3", ...the model's entry in ps}
Loads the model, evicting idle models (least recently used first) if it does not fit in
the memory that is free. If only busy models could make room, it waits for them, up to
`timeout` seconds (default 600; then timeout). insufficient_memory if the model could not
fit even with every other model unloaded; model_unavailable if its file cannot be loaded.
keep_alive holds until the model unloads, as a request's does. A loaded model answers at
once (its keep_alive changes if given).
"""

from __future__ import annotations

import asyncio
from typing import Any

from ...wire.durations import parse_keep_alive
from ...wire.protocol import ProtocolError, check_model
from .. import views
from .base import Context, Op, Param, register

LOAD_WAIT_S = 600.0


@register
class Load(Op):
    name = "load"
    params = {
        "model": Param(str, help="the model to load", required=True, max=200),
        "keep_alive": Param(str, help="how long it stays loaded once idle: 30s, 5m, 1h, 0, -1 "
                            "(forever); default: the model's keep_alive", max=32,
                            valid=parse_keep_alive),
        "timeout": Param(float, help="seconds to wait for room (busy models) and the load; "
                         "default 600", min=0.001, max=86400),
    }

    async def execute(self, ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
        name = args["model"]
        check_model(name, ctx.service.config.models)
        wait = args.get("timeout", LOAD_WAIT_S)
        try:
            await asyncio.wait_for(ctx.service.lifecycle.load(name, args.get("keep_alive")),
                                   wait)
        except TimeoutError:
            raise ProtocolError("timeout", f"model {name!r} did not load within {wait:g} s "
                                "(llmctl ps says what it waits for)") from None
        return views.loaded_model(ctx.service, name)
