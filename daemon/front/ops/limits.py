"""limits: show or change a model's worker limits live (changes: root only).

Access: any peer may show; a change (any field besides `model`) needs root (uid 0),
others get `forbidden`.

Request: {"op": "limits", "model": "smollm2", "cpu": "50%", "memory_high": "600M"}
Reply:   {"model": "smollm2", "backend": "systemd",
          "limits": {"cpu": "50%", "memory_high": "600M", "memory_max": "max",
                     "tasks_max": "max", "cpu_weight": 100}}
Without change fields it only shows the limits. cpu is a percentage of one CPU ("50%"),
a number of CPUs ("1.5") or "max"; sizes are like "600M", "2G" or "max". A change is
applied to every worker of the model through the backend, read back from the cgroup, and
the workers' thread counts follow the new CPU quota. Bad values get bad_request and
change nothing; a backend failure gets scope_error. Checks run in the order of every op:
the fields' shapes, then authorization (a change by a non-root peer is forbidden, even for
an unknown model), then the model and the values.
"""

from __future__ import annotations

from typing import Any

from ...placement.limits import LimitError, parse_bytes, parse_cpu
from ...wire.protocol import ProtocolError, check_model
from .base import Context, Op, Param, register


@register
class Limits(Op):
    name = "limits"
    params = {
        "model": Param(str, help="the model whose workers change", required=True, max=200),
        "cpu": Param(str, help="CPU quota per worker: 50%, 1.5 or max", max=32),
        "memory_high": Param(str, help="memory.high per worker: 600M, 2G or max", max=32),
        "memory_max": Param(str, help="memory.max per worker: 1G or max", max=32),
        "tasks_max": Param(int, help="most tasks per worker; 0 is no limit", min=0, max=1 << 22),
        "cpu_weight": Param(int, help="cpu.weight per worker", min=1, max=10000),
    }

    async def execute(self, ctx: Context, args: dict[str, Any]) -> dict[str, Any]:
        service, model = ctx.service, args.pop("model")
        if args and ctx.uid != 0:  # authorization before what needs the daemon, as in policy
            raise ProtocolError("forbidden", "changing limits needs root (uid 0); "
                                f"this peer is uid {ctx.uid}")
        check_model(model, service.models.names())  # a draining model's limits still show
        try:
            changes = _parse(args)
        except LimitError as exc:
            raise ProtocolError("bad_request", str(exc)) from None
        limits = (await service.fleet.set_limits(model, **changes) if changes
                  else service.models[model].limits.describe())
        return {"model": model, "backend": service.backend.name, "limits": limits}


def _parse(args: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "cpu" in args:
        out["cpu"] = parse_cpu(args["cpu"])
    for key in ("memory_high", "memory_max"):
        if key in args:
            out[key] = parse_bytes(args[key], key)
    if "tasks_max" in args:
        out["tasks_max"] = args["tasks_max"] or None
    if "cpu_weight" in args:
        out["cpu_weight"] = args["cpu_weight"]
    return out
