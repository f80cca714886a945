"""The cgroup v2 tree as placement sees it: where it is mounted, which cgroup a process is
in, whether this process may make child cgroups, and whether a cgroup shows the limits a
backend set."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from .limits import Limits, cpu_max_line
from .scopes import ScopeError

CGROUP_ROOT = Path("/sys/fs/cgroup")


def read_text(path: Path) -> str | None:
    """A cgroup file's text, stripped; None if it cannot be read (gone, or no such file)."""
    try:
        return path.read_text().strip()
    except OSError:
        return None


def read_keyed(path: Path) -> dict[str, int] | None:
    """'key value' lines (cpu.stat, memory.events) into a dict."""
    text = read_text(path)
    if text is None:
        return None
    return {k: int(v) for k, v in (line.split() for line in text.splitlines())}


def oom_kills(cgroup: Path) -> int | None:
    """Processes in cgroup and below killed by any OOM killer (memory.events oom_kill)."""
    events = read_keyed(cgroup / "memory.events")
    return None if events is None else events.get("oom_kill", 0)


def cgroup_of(pid: int) -> Path | None:
    """The cgroup v2 directory of a process, if the unified hierarchy is mounted."""
    text = read_text(Path(f"/proc/{pid}/cgroup"))
    for line in (text or "").splitlines():
        if line.startswith("0::"):
            path = CGROUP_ROOT / line[3:].lstrip("/")
            if (path / "cgroup.procs").exists():
                return path
    return None


def cgroup2_mounted() -> bool:
    return (CGROUP_ROOT / "cgroup.controllers").exists()


def systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()


def delegated_root() -> Path | None:
    """This process's cgroup, if it may create children with cpu and memory in them."""
    own = cgroup_of(os.getpid())
    if own is None or own == CGROUP_ROOT:
        return None
    try:
        controllers = (own / "cgroup.controllers").read_text().split()
    except OSError:
        return None
    if {"cpu", "memory"} <= set(controllers) and os.access(own, os.W_OK):
        return own
    return None


def _expected(limits: Limits) -> dict[str, str]:
    def mem(n: int | None) -> str:
        return "max" if n is None else str(n)
    return {"cpu.max": cpu_max_line(limits.cpu), "memory.high": mem(limits.memory_high),
            "memory.max": mem(limits.memory_max)}


def verify(cgroup: Path, limits: Limits) -> None:
    """Raise ScopeError unless the cgroup files show these limits (or the cgroup is gone:
    its worker exited, perhaps killed by the new memory.max)."""
    wrong = []
    for name, want in _expected(limits).items():
        try:
            got = (cgroup / name).read_text().strip()
        except OSError as exc:
            if exc.errno == errno.ENODEV or not cgroup.exists():  # ENODEV: being removed
                return
            raise ScopeError(f"cannot read {cgroup / name}: {exc.strerror}") from None
        if got != want:
            wrong.append(f"{name} is {got!r}, expected {want!r}")
    if wrong:
        raise ScopeError(f"{cgroup.name}: limits not in effect: {'; '.join(wrong)}")
