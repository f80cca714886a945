"""Where a worker runs: backends that put its process in a cgroup and set its limits.

- systemd:  a transient scope per worker under a slice, through pystemd (D-Bus)
- cgroupfs: child cgroups of a delegated cgroup2 subtree, written directly
- none:     no cgroups and no limits; system PSI only
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
