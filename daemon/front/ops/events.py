"""events: the actions the policies took, newest last.

Access: any peer.

Request: {"op": "events", "limit": 50}
Reply:   {"events": [{"at": UNIX_TIME, "policy", "action", "target", "values", "reason",
                      "result"}]}
Oldest first; the daemon keeps the last 500. action is admit, defer, set_limits,
set_threads, set_batch, preempt, trim_kv, shrink_kv, grow_kv (a worker's own), or disable (a policy
switched off by an error or an admin); result is "done", "asked", "failed: WHY", or what
the worker reported for a KV change.
"""

from __future__ import annotations

from typing import Any

from .base import Context, Op, Param, register


@register
class Events(Op):
    name = "events"
    params = {"limit": Param(int, help="most events to return (default 50)", min=1, max=500)}

    def execute(self, ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
        events = list(ctx.service.engine.actions)
        return {"events": events[-args.get("limit", 50):]}
