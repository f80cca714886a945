"""add_model: serve one more model without a restart (root only).

Access: root (uid 0); others get `forbidden`.

Request: {"op": "add_model", "name": "gemma", "path": "/srv/models/gemma.gguf",
          "options": {"n_ctx": 4096, "parallel": 2}}
Reply:   {"model": {...}}  (its entry as the models op lists it)
options holds keys of a [models.NAME] table of the config file (docs/configuration.md),
each checked as the config file's are: a bad key or value is bad_request naming
models.NAME.KEY. The path must be absolute, a GGUF file, and readable by the workers'
user (daemon.worker_user when the daemon runs as root: every directory on the way
searchable by it, the file readable; mode bits, not ACLs); else bad_request saying
which. A name that is configured already is model_exists. Checks, in this order: the
fields' shapes, then authorization, then the options, the file, the name.

The model joins the running config as a reload that finds it in the file adds it (its
workers start as such a model's do). It lasts until the daemon restarts: a reload of
the config file (SIGHUP) keeps it, unless the file now has a model of that name, whose
settings then win (logged as runtime_model_replaced).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import structlog

from ...catalog import modeladmin
from ...wire.protocol import ProtocolError
from .. import views
from .base import Context, Op, Param, register

log = structlog.get_logger()


@register
class AddModel(Op):
    name = "add_model"
    params = {
        "name": Param(str, help="the new model's name: letters, digits, '-', '_', '.'",
                      required=True, min=1, max=200),
        "path": Param(str, help="absolute path of its GGUF file", required=True, min=1, max=4096),
        "options": Param(dict, help="keys of a [models.NAME] table (n_ctx, parallel, workers, "
                         "threads, ...) with values of their types"),
    }

    async def execute(self, ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
        if ctx.uid != 0:
            raise ProtocolError("forbidden", "adding a model needs root (uid 0); this peer "
                                f"is uid {ctx.uid}")
        service = ctx.service
        model = modeladmin.build(args["name"], args["path"], args.get("options", {}))
        await asyncio.to_thread(modeladmin.check_file, Path(model.path),
                                service.config.daemon.worker_user)
        await service.reloader.add_model(model)
        log.info("model_added", model=model.name, path=model.path, by_uid=ctx.uid,
                 options=args.get("options", {}))
        entry = next(m for m in views.models(service) if m["name"] == model.name)
        return {"model": entry}
