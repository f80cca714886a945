"""Read what the kernel reports for one cgroup v2 directory; never writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import psi

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _keyed(path: Path) -> dict[str, int] | None:
    """'key value' lines (cpu.stat, memory.events) into a dict."""
    text = _text(path)
    if text is None:
        return None
    return {k: int(v) for k, v in (line.split() for line in text.splitlines())}


def cgroup_of(pid: int) -> Path | None:
    """The cgroup v2 directory of a process, if the unified hierarchy is mounted."""
    text = _text(Path(f"/proc/{pid}/cgroup"))
    for line in (text or "").splitlines():
        if line.startswith("0::"):
            path = CGROUP_ROOT / line[3:].lstrip("/")
            if (path / "cgroup.procs").exists():
                return path
    return None


def read(path: Path) -> dict[str, Any]:
    """Limits, usage, events and pressure of a cgroup; missing files are None."""
    current = _text(path / "memory.current")
    return {
        "cgroup": str(path),
        "cpu.max": _text(path / "cpu.max"),
        "cpu.weight": _text(path / "cpu.weight"),
        "memory.high": _text(path / "memory.high"),
        "memory.max": _text(path / "memory.max"),
        "memory.current": int(current) if current else None,
        "pids.max": _text(path / "pids.max"),
        "cpu.stat": _keyed(path / "cpu.stat"),
        "memory.events": _keyed(path / "memory.events"),
        "pressure": {r: psi.read(path / f"{r}.pressure") for r in psi.RESOURCES},
    }
