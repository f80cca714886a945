"""Watch what the workers' CPUs are doing: cpuload readings on a timer and right after a
CPU PSI trigger; the threads policy decides from the view (policies/threads.py).

Where the kernel takes a PSI trigger on /proc/pressure/cpu, the trigger wakes the monitor
the moment tasks start waiting for a CPU, and it takes a reading at once: the runnable
count of that instant and, for a trigger on a worker's own scope, the kernel's word that
the worker's threads waited are what the threads policy decides on. (A burst of three
readings 10 ms apart took 300-400 ms under a hog in the emulated guest: the daemon was
starved by the very contention it measured.) The same trigger goes on each worker
scope's cpu.pressure: it fires when the worker's own threads wait, and carries none of
the rest of the machine's noise, which on the system file can use up the kernel's one
event per window just before a neighbour starts. Between triggers it reads every
`SLOW_PERIOD_S`, enough to see CPUs become free again. Where triggers are refused (this
project's development hosts answer EINVAL), it reads every `daemon.cpu_poll_interval`
seconds instead, and says so in the log and in `llmctl status`.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from ..placement.cpus import cgroup_cpu_quota
from ..policies.base import CPU_TRIGGER_PREFIX, CpuView, cpu_trigger_key
from . import cpuload, psi

log = structlog.get_logger()
TRIGGER_KEY = cpu_trigger_key("cpu")  # the system file's; a scope's is named after its worker
SLOW_PERIOD_S = 1.0  # between readings while a PSI trigger watches
WINDOW_S = 1.0  # readings older than this leave the view
CAPS_EVERY_S = 1.0  # affinity and cgroup quota change rarely


@dataclass(frozen=True)
class Cap:
    """What bounds a worker's threads whatever the load: its CPU affinity and quota."""

    allowed: int  # CPUs in its affinity mask
    quota: float | None  # its cgroup CPU quota in CPUs (v2 cpu.max or v1 cfs), None: none


class CpuMonitor:
    """Owns the readings; `on_reading` runs after each reading."""

    def __init__(self, pids: Callable[[], dict[str, int]], movable: Callable[[], set[str]],
                 outside: Callable[[], list[Path]], on_reading: Callable[[], None],
                 poll_interval: float, trigger: psi.Trigger | None) -> None:
        self.pids = pids  # live workers: name -> pid
        self.movable = movable  # the workers whose count a policy may change
        self.outside = outside  # the top-level cgroups without workers ([] without scopes)
        self.on_reading = on_reading
        self.poll_interval = poll_interval
        self.trigger = trigger
        self.readings: collections.deque[cpuload.Reading] = collections.deque()
        self.caps: dict[str, Cap] = {}
        self.cpus: set[int] = os.sched_getaffinity(0)  # the CPUs any worker may use
        self.mode = "stopped"
        self.why_polling = ""
        self.triggers = 0
        self._caps_at = -CAPS_EVERY_S
        self._caps_pids: dict[str, int] = {}
        self._watcher: psi.PsiWatcher | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def period(self) -> float:
        """Fast only where a count could move: a worker pinned, or held to one thread by
        its affinity or quota, gives nothing to decide (and under a quota every
        reading would be paid from the model's CPU time)."""
        if self.mode == "psi-trigger" or not self._could_move():
            return SLOW_PERIOD_S
        return self.poll_interval

    def _could_move(self) -> bool:
        movable = self.movable()
        return any(cap.allowed > 1 and (cap.quota is None or cap.quota >= 2)
                   for name, cap in self.caps.items() if name in movable)

    def start(self, watcher: psi.PsiWatcher | None) -> None:
        """Register the CPU trigger if the kernel takes it, else poll; start reading."""
        self.mode, self.why_polling = "polling", "no PSI trigger configured"
        if self.trigger is not None and watcher is not None:
            try:
                watcher.add(TRIGGER_KEY, psi.SYSTEM / "cpu", self.trigger)
                self.mode, self.why_polling = "psi-trigger", ""
                self._watcher = watcher
            except psi.PsiUnavailable as exc:
                self.why_polling = str(exc)
        if self.mode == "polling":
            log.warning("cpu_load_polling", every_s=self.poll_interval, why=self.why_polling)
        else:
            log.info("cpu_load_trigger", trigger=self.trigger.line().decode() if self.trigger
                     else None, every_s=SLOW_PERIOD_S)
        self._tick()

    @staticmethod
    def is_trigger(key: str) -> bool:
        return key.startswith(CPU_TRIGGER_PREFIX)

    def watch_scope(self, worker: str, cgroup: Path) -> None:
        """Arm the trigger on a worker scope's cpu.pressure (where triggers work)."""
        if self._watcher is None or self.trigger is None:
            return
        key = cpu_trigger_key(worker)
        try:
            self._watcher.add(key, cgroup / "cpu.pressure", self.trigger)
        except psi.PsiUnavailable as exc:
            log.warning("psi_trigger_unavailable", key=key, error=str(exc))

    def unwatch_scope(self, worker: str) -> None:
        if self._watcher is not None:
            self._watcher.remove(cpu_trigger_key(worker))

    def stop(self) -> None:
        self.mode = "stopped"
        if self._timer is not None:
            self._timer.cancel()

    def _tick(self) -> None:
        self.read()
        # Jitter: at a fixed period, a neighbour that wakes on a timer of a divisor of it is
        # seen in the same phase every time (a 20 ms loop was never seen at 100 ms).
        delay = self.period * random.uniform(0.75, 1.25)
        self._timer = asyncio.get_running_loop().call_later(delay, self._tick)

    def triggered(self, key: str) -> None:
        """A CPU PSI trigger fired: read now, and let the policies decide on it."""
        self.triggers += 1
        self.read(trigger=key)
        if self.readings:  # what the decision saw; for measuring the trigger path
            last = self.readings[-1]
            log.debug("cpu_trigger", key=key, procs_running=last.procs_running,
                      workers_running=sum(w.running for w in last.workers.values()))

    def read(self, trigger: str = "") -> None:
        now = time.monotonic()
        pids = self.pids()
        try:
            reading = cpuload.read(now, pids, self._pressure_files(), trigger=trigger)
        except OSError as exc:  # /proc/stat unreadable: nothing to decide from
            log.warning("cpu_load_unreadable", error=str(exc))
            return
        self.readings.append(reading)
        while len(self.readings) > 2 and now - self.readings[0].at > WINDOW_S:
            self.readings.popleft()
        if now - self._caps_at >= CAPS_EVERY_S or pids != self._caps_pids:
            self.refresh_caps(pids)  # and at once for a worker that was just (re)started
        self.on_reading()

    def refresh_caps(self, pids: dict[str, int] | None = None) -> None:
        """Read each worker's affinity and cgroup quota again (after a limits change)."""
        self._caps_at = time.monotonic()
        self._caps_pids = pids if pids is not None else self.pids()
        caps, cpus = {}, set()
        for name, pid in self._caps_pids.items():
            try:
                allowed = os.sched_getaffinity(pid)
            except OSError:
                continue
            caps[name] = Cap(len(allowed), cgroup_cpu_quota(pid))
            cpus |= allowed
        self.caps, self.cpus = caps, cpus or os.sched_getaffinity(0)

    def _pressure_files(self) -> list[Path]:
        """The stall signal: CPU PSI outside the workers' cgroups where they have scopes
        (their own stalls, throttling included, are not the neighbours'); else the
        system's."""
        return [c / "cpu.pressure" for c in self.outside()] or [psi.SYSTEM / "cpu"]

    def view(self) -> CpuView | None:
        return cpuload.view(list(self.readings), self.cpus)

    def describe(self) -> dict[str, Any]:
        view = self.view()
        return {
            "mode": self.mode, "period_s": self.period, "why_polling": self.why_polling or None,
            "trigger": self.trigger.line().decode() if self.trigger else None,
            "triggers": self.triggers,
            "view": None if view is None else {
                "seconds": round(view.seconds, 3), "cpus": view.cpus,
                "idle": round(view.idle, 3), "others_running": round(view.others_running, 3),
                "others_cpu": round(view.others_cpu, 3),
                "stall": None if view.stall is None else round(view.stall, 4)},
        }

