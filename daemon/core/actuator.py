"""The daemon's hands for the policy engine: what the policies see (a Snapshot of the
workers, their limits and kernel stats, and the waiting and running requests) and the
actions carried out on workers and slots. control/policyengine.py decides; this acts."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..control.cpumonitor import CpuMonitor
from ..control.observer import Observer, pressures
from ..policies import Snapshot
from ..policies.base import RequestView, WorkerView
from .fleet import Fleet
from .models import Models
from .requests import Request
from .slots import Slots


class Actuator:
    def __init__(self, models: Models, slots: Slots, fleet: Fleet, observer: Observer,
                 cpu: CpuMonitor, deferred: Callable[[str], bool]) -> None:
        self.models = models
        self.slots = slots
        self.fleet = fleet
        self.observer = observer
        self.cpu = cpu
        self.deferred = deferred  # the engine's admission: whether a request is held back

    def snapshot(self) -> Snapshot:
        now = time.monotonic()
        system, outside, cgroups = self.observer.kernel(now)
        workers = []
        for w in self.models.workers():
            stats = cgroups.get(w.name, {})
            limits = self.models[w.model.name].limits
            cap = self.cpu.caps.get(w.name)
            workers.append(WorkerView(
                name=w.name, model=w.model.name, state=w.state, threads=w.threads,
                cpu=limits.cpu, memory_high=limits.memory_high,
                memory_current=stats.get("memory.current"),
                pressure=pressures(stats.get("pressure") or {}),
                n_ctx=w.n_ctx, n_ctx_max=w.model.n_ctx, threads_asked=w.threads_asked,
                threads_pinned=bool(w.model.threads),
                allowed_cpus=cap.allowed if cap else 0, quota=cap.quota if cap else None,
                slots=w.slots, slots_busy=len(w.running), batch_limit=self.slots.limit(w),
                prompt_cache_bytes=w.cache.now.bytes))
        queued = tuple(_view(r, now, deferred=self.deferred(r.id))
                       for model in self.models for r in model.queue)
        running = tuple(_view(r, now, w.name, kv_cells=w.batch.cells.get(r.id, 0))
                        for w in self.models.workers() for r in w.running.values())
        return Snapshot(now=now, system=system, workers=tuple(workers), queued=queued,
                        running=running, outside=outside, cpu=self.cpu.view())

    def set_threads(self, worker: str, threads: int, why: str) -> str:
        found = self.models.worker(worker)
        if found is None:
            return "no such worker"
        found.set_threads(threads, why)
        return "done"

    async def set_limits(self, model: str, **changes: Any) -> dict[str, Any]:
        return await self.fleet.set_limits(model, **changes)

    def preempt(self, request_id: str, state_min_tokens: int) -> str:
        return self.slots.preempt(request_id, state_min_tokens)

    def set_batch(self, target: str, sequences: int) -> str:
        return self.slots.set_batch(target, sequences)

    def kv_op(self, worker: str, kind: str, values: dict[str, Any]) -> str:
        return self.slots.kv_op(worker, kind, values)


def _view(req: Request, now: float, worker: str = "", deferred: bool = False,
          kv_cells: int = 0) -> RequestView:
    return RequestView(req.id, req.model, req.priority, req.prompt_chars,
                       req.params.max_tokens, now - req.accepted_at, worker=worker,
                       tokens=req.tokens_sent, preemptions=req.preemptions, deferred=deferred,
                       kv_cells=kv_cells)
