"""models: the configured models and whether they can serve.

Access: any peer.

Request: {"op": "models"}
Reply:   {"models": [{"name", "state", "source", "path", "workers", "n_ctx",
                      "max_tokens", "adapters": {NAME: {"path", "error"}}, "error"}]}
"""

from __future__ import annotations

from typing import Any

from .. import views
from .base import Context, Op, register


@register
class Models(Op):
    name = "models"

    def execute(self, ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
        return {"models": views.models(ctx.service)}
