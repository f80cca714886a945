"""What the policies see: one Snapshot of PSI, the workers (their limits, cgroup stats,
threads, CPU cap and load) and the waiting and running requests; and the kernel side of
`status`. Reads the kernel, at most every KERNEL_VIEW_TTL, and never writes."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import cgroupstats, psi
from .policies import Snapshot
from .policies.base import Pressure, RequestView, WorkerView
from .scheduler import Request

if TYPE_CHECKING:
    from .service import Service
    from .workers import Worker

KERNEL_VIEW_TTL = 0.25  # PSI and cgroup reads shared by the events of a burst
# system PSI, PSI outside the workers' cgroups, each worker's cgroup stats
KernelView = tuple[dict[str, Pressure], dict[str, Pressure], dict[str, dict[str, Any]]]


class Observer:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.own_cgroup = cgroupstats.cgroup_of(os.getpid())  # read once: it does not move
        self._kernel_view: tuple[float, KernelView] | None = None

    def snapshot(self) -> Snapshot:
        s = self.service
        now = time.monotonic()
        system, outside, cgroups = self._kernel(now)
        workers = []
        for w in s.all_workers():
            stats = cgroups.get(w.name, {})
            limits = s.limits[w.model.name]
            cap = s.cpu.caps.get(w.name)
            workers.append(WorkerView(
                name=w.name, model=w.model.name, state=w.state, threads=w.threads,
                cpu=limits.cpu, memory_high=limits.memory_high,
                memory_current=stats.get("memory.current"),
                pressure=_pressures(stats.get("pressure") or {}),
                n_ctx=w.n_ctx, n_ctx_max=w.model.n_ctx, threads_asked=w.threads_asked,
                threads_pinned=bool(w.model.threads),
                allowed_cpus=cap.allowed if cap else 0, quota=cap.quota if cap else None,
                slots=w.slots, slots_busy=len(w.running), batch_limit=s.slots.limit(w)))
        queued = tuple(_view(r, now, deferred=s.engine.is_deferred(r.id))
                       for q in s.queues.values() for r in q)
        running = tuple(_view(r, now, w.name, kv_cells=w.batch.cells.get(r.id, 0))
                        for w in s.all_workers() for r in w.running.values())
        return Snapshot(now=now, system=system, workers=tuple(workers), queued=queued,
                        running=running, outside=outside, cpu=s.cpu.view())

    def _kernel(self, now: float) -> KernelView:
        """System and outside PSI and the workers' cgroup stats, read at most every
        KERNEL_VIEW_TTL: a burst of trigger events would otherwise reread every file for
        each event."""
        cached = self._kernel_view
        if cached is None or now - cached[0] >= KERNEL_VIEW_TTL:
            cgroups = {w.name: self.cgroup_stats(w) or {} for w in self.service.all_workers()}
            cached = self._kernel_view = (now, (_pressures(psi.system_pressure()),
                                                _pressures(self.outside()), cgroups))
        return cached[1]

    def scoped(self) -> list[Path]:
        """The workers' cgroups; empty without scopes."""
        return [w.scope.cgroup for w in self.service.all_workers()
                if w.scope and w.scope.cgroup]

    def outside(self) -> dict[str, Any]:
        """PSI outside the workers' cgroups (cgroupstats.outside_pressure); {} without scopes."""
        inside = self.scoped()
        return cgroupstats.outside_pressure(inside, self.own_cgroup) if inside else {}

    def outside_cgroups(self) -> list[Path]:
        """The top-level cgroups that hold no worker; [] without scopes."""
        inside = self.scoped()
        return cgroupstats.outside_cgroups(inside, self.own_cgroup) if inside else []

    @staticmethod
    def cgroup_stats(worker: Worker) -> dict[str, Any] | None:
        """What the kernel reports for the worker's cgroup; None without one."""
        cgroup = worker.scope.cgroup if worker.scope else None
        return cgroupstats.read(cgroup) if cgroup is not None else None


def _pressures(parsed: dict[str, Any]) -> dict[str, Pressure]:
    out = {}
    for resource, values in parsed.items():
        if values:
            out[resource] = Pressure(some_avg10=values["some"]["avg10"],
                                     full_avg10=values.get("full", {}).get("avg10", 0.0),
                                     some_total=int(values["some"]["total"]))
    return out


def _view(req: Request, now: float, worker: str = "", deferred: bool = False,
          kv_cells: int = 0) -> RequestView:
    return RequestView(req.id, req.model, req.priority, req.prompt_chars,
                       req.params.get("max_tokens", 0), now - req.accepted_at, worker=worker,
                       tokens=req.tokens_sent, preemptions=req.preemptions, deferred=deferred,
                       kv_cells=kv_cells)
