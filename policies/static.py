"""static: fixed worker limits, set once at start (the "cgroups-only" baseline).

Sets every model's workers to `cpu` and `memory_high` when the daemon starts and holds
them there. It is the baseline of shared/research/000, where a static 50 % quota made
p95 latency 20-40x worse under load: use it to compare, or where predictability matters
more than latency.

    [[policies]]
    name = "static"
    cpu = "50%"
    memory_high = "max"
"""

from __future__ import annotations

from ..placement.limits import parse_bytes, parse_cpu
from .base import Action, Event, Param, Policy, SetLimits, Snapshot


class Static(Policy):
    name = "static"
    events = frozenset({"tick"})
    params = {
        "cpu": Param(str, "max", "CPU quota of each worker: 50%, 1.5 or max", valid=parse_cpu),
        "memory_high": Param(str, "max", "memory.high of each worker: 600M or max",
                             valid=lambda text: parse_bytes(text, "memory_high")),
    }

    def __init__(self, **settings: object) -> None:
        super().__init__(**settings)
        self.applied = False

    def configure(self, **settings: object) -> None:
        super().configure(**settings)
        self.applied = False  # new values are applied on the next event

    def on_event(self, event: Event, snap: Snapshot) -> list[Action]:
        if self.applied:
            return []
        self.applied = True
        models = sorted({w.model for w in snap.workers})
        s = self.settings
        return [SetLimits(m, cpu=s["cpu"], memory_high=s["memory_high"], reason="static limits")
                for m in models]
