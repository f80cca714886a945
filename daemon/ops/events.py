"""events: the actions the policies took, newest last.

Request: {"op": "events", "limit": 50}
Reply:   {"events": [{"at": UNIX_TIME, "policy", "action", "target", "values", "reason",
                      "result"}]}
action is admit, defer, set_limits, set_threads, or disable (a policy that failed and
was switched off); result is "done" or "failed: WHY".
"""

from __future__ import annotations

from typing import Any

from . import Context, Op, Param, register


@register
class Events(Op):
    name = "events"
    params = {"limit": Param(int, "most events to return (default 50)", min=1, max=500)}

    def execute(self, ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
        events = list(ctx.service.engine.actions)
        return {"events": events[-args.get("limit", 50):]}
