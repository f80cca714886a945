"""The cgroupfs backend: child cgroups of a delegated cgroup2 subtree, written directly.

For a container with its own cgroup namespace, or a unit with Delegate=yes. cgroup v2
lets only leaves hold processes once controllers are enabled for children, so the
daemon first moves itself into a leaf of its own ("daemon"), then enables cpu, memory
and pids for the subtree and makes one child per worker.
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog

from .cgroups import verify
from .limits import Limits, cpu_max_line
from .scopes import Backend, Scope, ScopeError

log = structlog.get_logger()
PREFIX = "llm-"


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise ScopeError(f"cannot write {value!r} to {path}: {exc.strerror}") from None


def _mem(n: int | None) -> str:
    return "max" if n is None else str(n)


class CgroupfsBackend(Backend):
    name = "cgroupfs"

    def __init__(self, root: Path | None) -> None:
        if root is None:
            raise ScopeError("no delegated cgroup2 subtree: the daemon's cgroup must be "
                             "writable and have the cpu and memory controllers")
        self.root = self.parent = root
        leaf = root / "daemon"
        leaf.mkdir(exist_ok=True)
        _write(leaf / "cgroup.procs", str(os.getpid()))
        _write(root / "cgroup.subtree_control", "+cpu +memory +pids")

    def _write_limits(self, cgroup: Path, limits: Limits) -> None:
        _write(cgroup / "cpu.max", cpu_max_line(limits.cpu))
        _write(cgroup / "cpu.weight", str(limits.cpu_weight))
        _write(cgroup / "memory.high", _mem(limits.memory_high))
        _write(cgroup / "memory.max", _mem(limits.memory_max))
        _write(cgroup / "pids.max", "max" if limits.tasks_max is None else str(limits.tasks_max))

    def place(self, name: str, pid: int, limits: Limits) -> Scope:
        cgroup = self.root / f"{PREFIX}{name}"
        cgroup.mkdir(exist_ok=True)
        self._write_limits(cgroup, limits)
        _write(cgroup / "cgroup.procs", str(pid))
        verify(cgroup, limits)
        log.info("cgroup_created", cgroup=str(cgroup), pid=pid, **limits.describe())
        return Scope(name=cgroup.name, pid=pid, cgroup=cgroup, limits=limits)

    def apply(self, scope: Scope, limits: Limits) -> None:
        assert scope.cgroup is not None
        self._write_limits(scope.cgroup, limits)
        verify(scope.cgroup, limits)
        scope.limits = limits

    def release(self, scope: Scope) -> None:
        if scope.cgroup is not None:
            try:
                scope.cgroup.rmdir()
            except OSError as exc:
                log.debug("cgroup_remove_failed", cgroup=str(scope.cgroup), error=exc.strerror)

    def cleanup(self) -> list[str]:
        stale = []
        for child in self.root.glob(f"{PREFIX}*"):
            try:
                for pid in (child / "cgroup.procs").read_text().split():
                    os.kill(int(pid), 9)
                child.rmdir()
            except OSError as exc:
                log.warning("stale_cgroup_kept", cgroup=str(child), error=exc.strerror)
            stale.append(child.name)
        return stale
