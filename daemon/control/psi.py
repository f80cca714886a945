"""Pressure Stall Information: parse pressure files; watch triggers with one poll() thread.

A trigger is "some|full STALL_US WINDOW_US" written to a pressure file (system-wide in
/proc/pressure, or a cgroup's cpu/memory/io.pressure). The kernel then signals POLLPRI on
that fd when tasks stalled for STALL_US within WINDOW_US, at most once per window. No
averages are polled: the daemon reacts the moment the kernel says so.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SYSTEM = Path("/proc/pressure")
RESOURCES = ("cpu", "memory", "io")
MIN_WINDOW_US, MAX_WINDOW_US = 500_000, 10_000_000
UNPRIVILEGED_WINDOW_STEP_US = 2_000_000  # the kernel's rule for non-root triggers


class PsiUnavailable(Exception):
    """PSI or its triggers cannot be used here; the message says why."""


def parse(text: str) -> dict[str, dict[str, float]]:
    """'some avg10=1.00 avg60=… total=N' lines into {"some": {"avg10": 1.0, …}, "full": …}."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if kind in ("some", "full"):
            out[kind] = {k: float(v) for k, v in (f.split("=") for f in rest.split())}
    return out


def read(path: Path) -> dict[str, dict[str, float]] | None:
    try:
        return parse(path.read_text())
    except (OSError, ValueError):
        return None


def system_pressure() -> dict[str, dict[str, dict[str, float]] | None]:
    return {r: read(SYSTEM / r) for r in RESOURCES}


@dataclass(frozen=True)
class Trigger:
    kind: str  # "some" or "full"
    stall_us: int
    window_us: int

    def check(self, privileged: bool) -> None:
        """Raise ValueError unless the kernel would take this trigger."""
        if self.kind not in ("some", "full"):
            raise ValueError(f"trigger kind {self.kind!r} is not some or full")
        if not MIN_WINDOW_US <= self.window_us <= MAX_WINDOW_US:
            raise ValueError(f"window {self.window_us} us is outside "
                             f"{MIN_WINDOW_US}..{MAX_WINDOW_US} us")
        if not 0 < self.stall_us <= self.window_us:
            raise ValueError(f"stall {self.stall_us} us must be within the window "
                             f"({self.window_us} us)")
        if not privileged and self.window_us % UNPRIVILEGED_WINDOW_STEP_US:
            raise ValueError(f"window {self.window_us} us: unprivileged triggers need a "
                             "multiple of 2 s")

    def line(self) -> bytes:
        return f"{self.kind} {self.stall_us} {self.window_us}".encode()


@dataclass(frozen=True)
class PressureEvent:
    key: str  # what the watcher registered, e.g. "system/cpu" or "smollm2-0/memory"
    path: str
    trigger: Trigger
    at: float  # time.monotonic() when poll() saw it


def open_trigger(path: Path, trigger: Trigger) -> int:
    """An fd with the trigger registered; PsiUnavailable with the reason if it can't be."""
    try:
        trigger.check(privileged=os.geteuid() == 0)
    except ValueError as exc:  # e.g. a window an unprivileged daemon may not use
        raise PsiUnavailable(f"trigger {trigger.line().decode()!r} on {path}: {exc}") from None
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    except FileNotFoundError:
        raise PsiUnavailable(f"{path} does not exist (kernel without PSI, or "
                             "booted with psi=0)") from None
    except OSError as exc:
        raise PsiUnavailable(f"cannot open {path}: {exc.strerror}") from None
    try:
        # With the NUL: /proc/pressure/* turns the last byte written into one.
        os.write(fd, trigger.line() + b"\0")
    except OSError as exc:
        os.close(fd)
        why = {errno.EOPNOTSUPP: "PSI is disabled (psi=0)",
               errno.EINVAL: "the kernel refused the trigger (triggers unsupported here?)",
               errno.EPERM: "not permitted"}.get(exc.errno, exc.strerror)
        raise PsiUnavailable(f"trigger {trigger.line().decode()!r} on {path}: {why}") from None
    return fd


class PsiWatcher:
    """Owns trigger fds; one thread poll()s them all and hands events to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 callback: Callable[[PressureEvent], None]) -> None:
        self.loop = loop
        self.callback = callback
        self.counts: dict[str, int] = {}
        self._fds: dict[int, tuple[str, str, Trigger]] = {}
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="psi-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, key: str, path: Path, trigger: Trigger) -> None:
        """Register a trigger; PsiUnavailable if the kernel won't take it."""
        fd = open_trigger(path, trigger)
        with self._lock:
            self._fds[fd] = (key, str(path), trigger)
            self.counts.setdefault(key, 0)
        os.write(self._wake_w, b"x")

    def remove(self, key: str) -> None:
        """Drop every trigger registered under key (e.g. a scope that went away)."""
        with self._lock:
            for fd in [fd for fd, (k, _, _) in self._fds.items() if k == key]:
                del self._fds[fd]
                os.close(fd)
            self.counts.pop(key, None)
        os.write(self._wake_w, b"x")

    def stop(self) -> None:
        self._stopping = True
        os.write(self._wake_w, b"x")
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        with self._lock:
            for fd in self._fds:
                os.close(fd)
            self._fds.clear()

    def _poller(self) -> select.poll:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        with self._lock:
            for fd in self._fds:
                poller.register(fd, select.POLLPRI)
        return poller

    def _run(self) -> None:
        poller = self._poller()
        while not self._stopping:
            ready = poller.poll()
            now = time.monotonic()
            for fd, mask in ready:
                if fd == self._wake_r:
                    os.read(self._wake_r, 4096)
                    poller = self._poller()
                    continue
                with self._lock:
                    entry = self._fds.get(fd)
                if entry is None:
                    continue
                if mask & (select.POLLERR | select.POLLNVAL):
                    poller.unregister(fd)  # the cgroup went away; its owner removes the key
                    continue
                key, path, trigger = entry
                with self._lock:
                    self.counts[key] = self.counts.get(key, 0) + 1
                self.loop.call_soon_threadsafe(self.callback,
                                               PressureEvent(key, path, trigger, now))
