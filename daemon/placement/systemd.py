"""The systemd backend: one transient scope per worker under a slice, via pystemd (D-Bus).

The daemon never writes the attribute files of cgroups systemd created: limits move with
SetUnitProperties(runtime=True), and are read back from the cgroup to catch a mismatch
(systemd 252 may leave a stale cpu.max when a quota is cleared without CPUWeight, so
every scope gets an explicit CPUWeight).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import structlog

from .cgroups import CGROUP_ROOT, cgroup_of, verify
from .limits import Limits, format_bytes
from .scopes import Backend, Scope, ScopeError

log = structlog.get_logger()
UNLIMITED = 2**64 - 1  # systemd's "infinity" for uint64 properties
STOP_TIMEOUT = 10.0  # s; the scope's processes are dead or get SIGTERM, then SIGKILL
PLACE_TIMEOUT = 5.0
UNIT_PREFIX = "llm-"


def _properties(limits: Limits) -> dict[bytes, Any]:
    quota = UNLIMITED if limits.cpu is None else round(limits.cpu * 1_000_000)
    return {
        b"CPUQuotaPerSecUSec": quota,
        b"MemoryHigh": UNLIMITED if limits.memory_high is None else limits.memory_high,
        b"MemoryMax": UNLIMITED if limits.memory_max is None else limits.memory_max,
        b"TasksMax": UNLIMITED if limits.tasks_max is None else limits.tasks_max,
    }


class SystemdBackend(Backend):
    name = "systemd"

    def __init__(self, slice_name: str) -> None:
        from pystemd.systemd1 import Manager

        self.slice = slice_name
        self.parent = CGROUP_ROOT / slice_name
        self._manager = Manager()
        self._manager.load()

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self._manager.Manager, method)(*args)
        except Exception as exc:  # pystemd raises DBusError and others
            raise ScopeError(f"systemd {method} failed: {exc}") from None

    def unit_name(self, name: str) -> str:
        return f"{UNIT_PREFIX}{name}.scope"

    def place(self, name: str, pid: int, limits: Limits) -> Scope:
        unit = self.unit_name(name)
        props = {
            b"Description": f"llm-residentd worker {name}".encode(),
            b"Slice": self.slice.encode(),
            b"CollectMode": b"inactive-or-failed",
            b"_custom": (b"PIDs", b"au", [pid]),
            **_properties(limits),
        }
        for attempt in range(3):
            try:
                self._call("StartTransientUnit", unit.encode(), b"replace", props)
                break
            except ScopeError as exc:  # a unit of that name from a dead worker may linger
                if attempt == 2 or "already" not in str(exc):
                    raise
                self._forget(unit)
        self._call("SetUnitProperties", unit.encode(), True,
                   {b"_custom": (b"CPUWeight", b"t", limits.cpu_weight)})
        cgroup = self._wait_for_cgroup(pid, unit)
        scope = Scope(name=unit, pid=pid, cgroup=cgroup, limits=limits)
        verify(cgroup, limits)
        log.info("scope_started", unit=unit, pid=pid, cgroup=str(cgroup), **limits.describe())
        return scope

    def _forget(self, unit: str) -> None:
        self._stop(unit)
        with contextlib.suppress(ScopeError):
            self._call("ResetFailedUnit", unit.encode())

    def _wait_for_cgroup(self, pid: int, unit: str) -> Path:
        deadline = time.monotonic() + PLACE_TIMEOUT
        while time.monotonic() < deadline:
            cgroup = cgroup_of(pid)
            if cgroup is not None and cgroup.name == unit:
                return cgroup
            time.sleep(0.01)
        raise ScopeError(f"pid {pid} did not appear in {unit} within {PLACE_TIMEOUT} s")

    def apply(self, scope: Scope, limits: Limits) -> None:
        unit = scope.name.encode()
        self._call("SetUnitProperties", unit, True, _properties(limits))
        if limits.cpu_weight != scope.limits.cpu_weight:
            self._call("SetUnitProperties", unit, True,
                       {b"_custom": (b"CPUWeight", b"t", limits.cpu_weight)})
        if scope.cgroup is not None:
            verify(scope.cgroup, limits)
        scope.limits = limits
        log.info("scope_limits_set", unit=scope.name, cpu=limits.describe()["cpu"],
                 memory_high=format_bytes(limits.memory_high))

    def release(self, scope: Scope) -> None:
        self._stop(scope.name, scope.cgroup)

    def _stop(self, unit: str, cgroup: Path | None = None) -> None:
        """Stop the unit and wait until its cgroup is gone. StopUnit only queues the stop,
        and the restarted worker gets a scope of the same name: a stop still pending
        could land on the new scope and kill the new worker."""
        try:
            self._call("StopUnit", unit.encode(), b"replace")
        except ScopeError as exc:
            log.debug("scope_stop_failed", unit=unit, error=str(exc))
            return
        cgroup = cgroup or CGROUP_ROOT / self.slice / unit
        deadline = time.monotonic() + STOP_TIMEOUT
        while cgroup.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        if cgroup.exists():
            log.warning("scope_still_there", unit=unit, cgroup=str(cgroup), waited_s=STOP_TIMEOUT)

    def cleanup(self) -> list[str]:
        """Stop llm-*.scope units under our slice left by an earlier run."""
        stale = []
        for unit in self._call("ListUnitsByPatterns", [], [f"{UNIT_PREFIX}*.scope".encode()]):
            name = unit[0].decode()
            if (CGROUP_ROOT / self.slice / name).exists():  # ours: under our slice
                self._stop(name)
                stale.append(name)
        return stale
