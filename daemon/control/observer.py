"""The kernel side of what the policies see and of `status`: system PSI, PSI outside the
workers' cgroups, and each worker's cgroup stats. Reads the kernel, at most every
KERNEL_VIEW_TTL, and never writes; core/snapshot.py adds the workers and requests."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..placement.cgroups import cgroup_of
from ..policies.base import Pressure
from . import cgroupstats, psi

KERNEL_VIEW_TTL = 0.25  # PSI and cgroup reads shared by the events of a burst
# system PSI, PSI outside the workers' cgroups, each worker's cgroup stats
KernelView = tuple[dict[str, Pressure], dict[str, Pressure], dict[str, dict[str, Any]]]


class Observer:
    def __init__(self, cgroups: Callable[[], dict[str, Path | None]]) -> None:
        self.cgroups = cgroups  # worker name -> its scope's cgroup (None without a scope)
        self.own_cgroup = cgroup_of(os.getpid())  # read once: it does not move
        self._kernel_view: tuple[float, KernelView] | None = None

    def kernel(self, now: float) -> KernelView:
        """System and outside PSI and the workers' cgroup stats, read at most every
        KERNEL_VIEW_TTL: a burst of trigger events would otherwise reread every file for
        each event."""
        cached = self._kernel_view
        if cached is None or now - cached[0] >= KERNEL_VIEW_TTL:
            cgroups = {name: self.cgroup_stats(cgroup) or {}
                       for name, cgroup in self.cgroups().items()}
            cached = self._kernel_view = (now, (pressures(psi.system_pressure()),
                                                pressures(self.outside()), cgroups))
        return cached[1]

    def scoped(self) -> list[Path]:
        """The workers' cgroups; empty without scopes."""
        return [cgroup for cgroup in self.cgroups().values() if cgroup is not None]

    def outside(self) -> dict[str, Any]:
        """PSI outside the workers' cgroups (cgroupstats.outside_pressure); {} without scopes."""
        inside = self.scoped()
        return cgroupstats.outside_pressure(inside, self.own_cgroup) if inside else {}

    def outside_cgroups(self) -> list[Path]:
        """The top-level cgroups that hold no worker; [] without scopes."""
        inside = self.scoped()
        return cgroupstats.outside_cgroups(inside, self.own_cgroup) if inside else []

    @staticmethod
    def cgroup_stats(cgroup: Path | None) -> dict[str, Any] | None:
        """What the kernel reports for a worker's cgroup; None without one."""
        return cgroupstats.read(cgroup) if cgroup is not None else None


def pressures(parsed: dict[str, Any]) -> dict[str, Pressure]:
    out = {}
    for resource, values in parsed.items():
        if values:
            out[resource] = Pressure(some_avg10=values["some"]["avg10"],
                                     full_avg10=values.get("full", {}).get("avg10", 0.0),
                                     some_total=int(values["some"]["total"]))
    return out
