"""Workers into their scopes, and the scopes' limits changed live.

The backend's calls (D-Bus, cgroup writes) block, so they run off the event loop, one at a
time, each bounded by SCOPE_CALL_TIMEOUT. An OOM kill is told from any other SIGKILL by the
memory.events of the worker's scope, or of the scope's parent once the scope is gone.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import structlog

from ..wire.protocol import ProtocolError
from .cgroups import cgroup2_mounted, delegated_root, oom_kills, systemd_running
from .limits import Limits
from .scopes import Backend, Scope, ScopeError

log = structlog.get_logger()
SCOPE_CALL_TIMEOUT = 10.0  # a D-Bus call or cgroup write that takes longer is reported


class Worker(Protocol):
    """What placement reads and sets of a worker (core.workers.Worker is one)."""
    name: str
    pid: int | None
    state: str
    scope: Scope | None
    scope_error: str


class Placement:
    def __init__(self) -> None:
        self.backend = Backend()  # none until start() picks one
        self._exec = ThreadPoolExecutor(1, thread_name_prefix="scopes")
        self._oom_kills: dict[Path, int] = {}  # last oom_kill count seen per scope parent

    async def start(self, backend: str, slice_name: str, worker_user: str = "") -> None:
        """Choose the backend (auto falls back to none) and clear stale scopes."""
        try:
            self.backend = make_backend(backend, slice_name)
        except (ScopeError, ImportError, OSError) as exc:
            if backend != "auto":
                raise ScopeError(f"backend {backend}: {exc}") from exc
            log.warning("backend_unavailable", error=str(exc), using="none")
        if worker_user and os.geteuid() != 0:
            log.warning("worker_user_ignored", worker_user=worker_user,
                        reason="only a daemon running as root switches users")
        stale = await self._call(self.backend.cleanup)
        log.info("backend_ready", backend=self.backend.name, stale_scopes_removed=stale)

    async def _call(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._exec, fn, *args)
        try:
            return await asyncio.wait_for(future, SCOPE_CALL_TIMEOUT)
        except TimeoutError:
            raise ScopeError(f"{getattr(fn, '__name__', fn)} took over "
                             f"{SCOPE_CALL_TIMEOUT} s") from None

    async def place(self, worker: Worker, limits: Limits) -> Path | None:
        """Put a new worker process into its scope; returns the scope's cgroup. Without a
        scope (scope_error says why) the worker serves unlimited."""
        try:
            worker.scope = await self._call(self.backend.place, worker.name, worker.pid, limits)
            worker.scope_error = ""
        except ScopeError as exc:
            worker.scope_error = str(exc)
            log.error("scope_failed", worker=worker.name, code="scope_error", error=str(exc))
            return None
        cgroup = worker.scope.cgroup if worker.scope else None
        if cgroup is not None and cgroup.parent not in self._oom_kills:
            self._oom_kills[cgroup.parent] = oom_kills(cgroup.parent) or 0
        return cgroup

    def oom_killed(self, worker: Worker) -> bool:
        """Whether an OOM kill explains the worker's SIGKILL: its scope counted one, or,
        the scope being gone already, the count of the scope's parent went up."""
        cgroup = worker.scope.cgroup if worker.scope else None
        if cgroup is None:
            return False
        parent = oom_kills(cgroup.parent)
        seen = self._oom_kills.get(cgroup.parent, parent)
        if parent is not None:
            self._oom_kills[cgroup.parent] = parent
        own = oom_kills(cgroup)
        if own is not None:
            return own > 0
        return parent is not None and seen is not None and parent > seen

    async def release(self, worker: Worker) -> None:
        if worker.scope is not None:
            try:
                await self._call(self.backend.release, worker.scope)
            except ScopeError as exc:
                log.warning("scope_release_failed", worker=worker.name, error=str(exc))

    async def apply(self, workers: list[Worker], old: Limits, new: Limits) -> None:
        """Give every worker's scope the new limits; ProtocolError (scope_error) names the
        workers that did not take them."""
        errors = []
        for worker in workers:
            if worker.scope is None:
                # Between restarts (no process) its next scope gets the new limits.
                if self.backend.name != "none" and worker.pid is not None:
                    errors.append(f"{worker.name}: no scope ({worker.scope_error or worker.state})")
                continue
            try:
                await self._call(self.backend.apply, worker.scope, new)
            except ScopeError as exc:
                errors.append(f"{worker.name}: {exc}")
        if self.backend.name == "none" and new != old:
            raise ProtocolError("scope_error", "the none backend cannot set limits (no systemd "
                                "and no delegated cgroup2 here)")
        if errors:
            raise ProtocolError("scope_error", "; ".join(errors))

    def close(self) -> None:
        self._exec.shutdown(wait=False)


def detect() -> str:
    """systemd with a unified hierarchy, else a delegated cgroup2 subtree, else none."""
    if systemd_running() and cgroup2_mounted():
        try:
            import pystemd  # noqa: F401
        except ImportError:
            return "none"
        return "systemd"
    if cgroup2_mounted() and delegated_root() is not None:
        return "cgroupfs"
    return "none"


def make_backend(choice: str, slice_name: str) -> Backend:
    """The backend for --backend auto|systemd|cgroupfs|none; ScopeError if unusable."""
    name = detect() if choice == "auto" else choice
    if name == "systemd":
        from .systemd import SystemdBackend
        return SystemdBackend(slice_name)
    if name == "cgroupfs":
        from .cgroupfs import CgroupfsBackend
        return CgroupfsBackend(delegated_root())
    return Backend()
