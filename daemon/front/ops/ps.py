"""ps: the models in memory (loaded, loading or unloading), as `ollama ps` lists them.

Access: any peer.

Request: {"op": "ps"}
Reply:   {"models": [{"name", "state", "loaded", "workers", "pids", "slots", "slots_busy",
                      "memory_bytes", "estimate_bytes", "estimate", "keep_alive",
                      "keep_alive_s", "idle_s", "unload_in_s", "loaded_s", "waiting",
                      "prompt_cache"}]}
memory_bytes is measured (each worker's anonymous memory, plus the mapped model file
once); estimate is what the daemon expected before the load. unload_in_s is null while
the model is busy or kept forever. prompt_cache is the model's prompt cache, its
workers summed (as in status): entries and bytes in memory and on disk, their limits,
hits (disk_hits of them from disk), misses, tokens_reused, restore_s, and disk_error.
"""

from __future__ import annotations

from typing import Any

from .. import views
from .base import Context, Op, register


@register
class Ps(Op):
    name = "ps"

    def execute(self, ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
        service = ctx.service
        return {"models": [views.loaded_model(service, model.name) for model in service.models
                           if model.life.phase != "unloaded"]}
