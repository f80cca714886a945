"""Where a worker runs: backends that put its process in a cgroup and set its limits.

- systemd:  a transient scope per worker under a slice, through pystemd (D-Bus)
- cgroupfs: child cgroups of a delegated cgroup2 subtree, written directly
- none:     no cgroups and no limits; system PSI only
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .cgroupstats import CGROUP_ROOT, cgroup_of
from .limits import Limits


class ScopeError(Exception):
    """A scope operation failed; the message says what and why."""


@dataclass
class Scope:
    name: str  # unit name (systemd) or cgroup directory name (cgroupfs)
    pid: int
    cgroup: Path | None  # the cgroup v2 directory, for reading stats and pressure
    limits: Limits


class Backend:
    name = "none"
    parent: Path | None = None  # the cgroup that holds every worker's scope (the slice)

    def place(self, name: str, pid: int, limits: Limits) -> Scope | None:
        """Put pid into a scope of its own with these limits (none: nowhere)."""
        return None

    def apply(self, scope: Scope, limits: Limits) -> None:
        """Change a scope's limits live and check that the kernel shows them."""
        if limits != scope.limits:
            raise ScopeError("the none backend cannot set limits (no systemd, no delegated "
                             "cgroup2); start the daemon with --backend systemd or cgroupfs")

    def release(self, scope: Scope) -> None:
        """Stop a scope whose worker exited."""

    def cleanup(self) -> list[str]:
        """Remove scopes left by an earlier run of the daemon; returns their names."""
        return []


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
        from .scope_systemd import SystemdBackend
        return SystemdBackend(slice_name)
    if name == "cgroupfs":
        from .scope_cgroupfs import CgroupfsBackend
        return CgroupfsBackend(delegated_root())
    return Backend()
