"""What the daemon listens to: PSI triggers on the system, on the slice that holds the
workers and on each worker's scope, and the CPU monitor that reads the workers' CPUs.
It owns the trigger fds (through psi.PsiWatcher) and tells the daemon through the two
callbacks it is given; it decides nothing."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from . import psi
from .cpumonitor import CpuMonitor

log = structlog.get_logger()
PRESSURE_EVENTS_KEPT = 200


class Watches:
    def __init__(self, cpu: CpuMonitor, system_trigger: psi.Trigger | None,
                 scope_trigger: psi.Trigger | None,
                 on_pressure: Callable[[str], None]) -> None:
        self.cpu = cpu
        self.system_trigger = system_trigger
        self.scope_trigger = scope_trigger
        self.on_pressure = on_pressure  # a memory, cpu or io trigger fired: its key
        self.psi: psi.PsiWatcher | None = None  # from start()
        self.events: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=PRESSURE_EVENTS_KEPT)

    def start(self) -> None:
        self.psi = psi.PsiWatcher(asyncio.get_running_loop(), self._fired)
        self.psi.start()
        for resource in psi.RESOURCES if self.system_trigger else ():
            self._watch(f"system/{resource}", psi.SYSTEM / resource, self.system_trigger)
        self.cpu.start(self.psi)

    def stop(self) -> None:
        self.cpu.stop()
        if self.psi is not None:
            self.psi.stop()

    @property
    def counts(self) -> dict[str, int]:
        """Trigger events seen, by key ("system/memory", "WORKER/cpu", ...)."""
        return dict(self.psi.counts) if self.psi is not None else {}

    def watch_scope(self, worker: str, cgroup: Path) -> None:
        """A worker's new scope: its pressure files, and the slice's memory pressure once
        (the lifecycle unloads idle models on it; the slice exists once a scope does)."""
        if self.system_trigger and self.psi is not None and "slice/memory" not in self.psi.counts:
            self._watch("slice/memory", cgroup.parent / "memory.pressure", self.system_trigger)
        for resource in psi.RESOURCES if self.scope_trigger else ():
            self._watch(f"{worker}/{resource}", cgroup / f"{resource}.pressure",
                        self.scope_trigger)
        self.cpu.watch_scope(worker, cgroup)

    def unwatch_scope(self, worker: str) -> None:
        if self.psi is not None:
            for resource in psi.RESOURCES:
                self.psi.remove(f"{worker}/{resource}")
        self.cpu.unwatch_scope(worker)

    def _watch(self, key: str, path: Path, trigger: psi.Trigger) -> None:
        assert self.psi is not None
        try:
            self.psi.add(key, path, trigger)
        except psi.PsiUnavailable as exc:
            log.warning("psi_trigger_unavailable", key=key, error=str(exc))

    def _fired(self, event: psi.PressureEvent) -> None:
        if self.cpu.is_trigger(event.key):
            self.cpu.triggered(event.key)  # it reads the CPUs and tells the policies
            return
        entry = {"key": event.key, "path": event.path, "at": event.at,
                 "trigger": event.trigger.line().decode()}
        self.events.append(entry)
        log.info("pressure_event", **entry)
        self.on_pressure(event.key)
