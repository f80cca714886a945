"""How many CPUs this process may really use: affinity and cgroup CPU quota.

The default thread count follows this, never cpu_count()//2: threads spinning
against a small quota collapse throughput (ollama issue 17916).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")  # also in cgroups.py: the worker imports this module alone


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 cpu.max ("QUOTA PERIOD" or "max PERIOD") in CPUs; None if unlimited."""
    quota, _, period = text.strip().partition(" ")
    if quota == "max":
        return None
    return int(quota) / int(period or 100000)


def _v2_quota(rel: str, root: Path) -> float | None:
    """Tightest cpu.max from this cgroup up to the root."""
    limits = []
    path = root / rel.lstrip("/")
    while True:
        try:
            limit = parse_cpu_max((path / "cpu.max").read_text())
        except (OSError, ValueError):
            limit = None
        if limit is not None:
            limits.append(limit)
        if path == root or root not in path.parents:
            break
        path = path.parent
    return min(limits) if limits else None


def _v1_quota(rel: str, root: Path) -> float | None:
    for mount in ("cpu,cpuacct", "cpu"):
        base = root / mount / rel.lstrip("/")
        try:
            quota = int((base / "cpu.cfs_quota_us").read_text())
            period = int((base / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota <= 0 else quota / period
    return None


def cgroup_cpu_quota(pid: int | str = "self", root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of a process's cgroup in CPUs (v2 or v1), or None if unlimited."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":
            quota = _v2_quota(rel, root)
        elif "cpu" in controllers.split(","):
            quota = _v1_quota(rel, root)
        else:
            continue
        if quota is not None:
            return quota
    return None


def cap(affinity: int, quota: float | None) -> tuple[int, str]:
    """The most threads worth running: the allowed CPUs, cut to whole CPUs of quota, at
    least 1; and which of the two binds, as "affinity: N CPUs" or "quota: Q CPUs"."""
    whole = None if quota is None else math.floor(quota + 1e-9)
    if whole is not None and whole < affinity:
        return max(1, whole), f"quota: {quota:g} CPUs"
    return max(1, affinity), f"affinity: {affinity} CPUs"


def usable_cpus() -> tuple[int, str]:
    """Threads that fit this process's affinity and cgroup quota, and what binds."""
    return cap(len(os.sched_getaffinity(0)), cgroup_cpu_quota())
