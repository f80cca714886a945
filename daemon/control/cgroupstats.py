"""Read what the kernel reports for one cgroup v2 directory; never writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..placement.cgroups import CGROUP_ROOT, read_keyed, read_text
from . import psi


def read(path: Path) -> dict[str, Any]:
    """Limits, usage, events and pressure of a cgroup; missing files are None."""
    current = read_text(path / "memory.current")
    return {
        "cgroup": str(path),
        "cpu.max": read_text(path / "cpu.max"),
        "cpu.weight": read_text(path / "cpu.weight"),
        "memory.high": read_text(path / "memory.high"),
        "memory.max": read_text(path / "memory.max"),
        "memory.current": int(current) if current else None,
        "pids.max": read_text(path / "pids.max"),
        "cpu.stat": read_keyed(path / "cpu.stat"),
        "memory.events": read_keyed(path / "memory.events"),
        "pressure": {r: psi.read(path / f"{r}.pressure") for r in psi.RESOURCES},
    }


def outside_cgroups(inside: list[Path], own: Path | None = None,
                    root: Path = CGROUP_ROOT) -> list[Path]:
    """The top-level cgroups under root that hold none of the paths in inside (the
    workers' cgroups) and are not own (the daemon's cgroup, when it is itself top-level):
    the rest of the machine."""
    try:
        tops = sorted(p for p in root.iterdir() if (p / "cgroup.procs").exists())
    except OSError:
        return []
    return [top for top in tops
            if top != own and not any(p == top or top in p.parents for p in inside)]


def outside_pressure(inside: list[Path], own: Path | None = None,
                     root: Path = CGROUP_ROOT) -> dict[str, dict[str, Any]]:
    """Per resource, the parsed PSI of the outside cgroup (outside_cgroups) with the
    highest some avg10.

    The system-wide file also counts the workers' stalls on their own cpu.max; this is the
    pressure of everything else. Empty when no top-level cgroup is left to read."""
    worst: dict[str, dict[str, Any]] = {}
    for top in outside_cgroups(inside, own, root):
        for resource in psi.RESOURCES:
            parsed = psi.read(top / f"{resource}.pressure")
            if parsed and "some" in parsed and (
                    resource not in worst
                    or parsed["some"]["avg10"] > worst[resource]["some"]["avg10"]):
                worst[resource] = parsed
    return worst
