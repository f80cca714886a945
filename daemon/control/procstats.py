"""What a process costs, for profiling (seed research 001): resident memory, page faults,
context switches and CPU time, from psutil and /proc/PID/stat; and its CPU % between
two readings. Reads only."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psutil

FIELDS = ("rss_bytes", "cpu_user_s", "cpu_system_s", "cpu_percent", "minor_faults",
          "major_faults", "ctx_switches_voluntary", "ctx_switches_involuntary")
MIN_INTERVAL_S = 0.5  # a CPU % over less is mostly noise: the previous one stands


def faults(pid: int, proc: Path = Path("/proc")) -> tuple[int, int] | None:
    """(minor, major) page faults of pid: fields 10 and 12 of /proc/PID/stat (psutil 5.9,
    Debian bookworm's, has no Process.page_faults()). None if unreadable."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The name (field 2) may hold spaces and parentheses: count from its last ")".
    rest = text[text.rindex(")") + 2:].split()
    try:
        return int(rest[7]), int(rest[9])  # fields 10 and 12; rest[0] is field 3
    except (IndexError, ValueError):
        return None


def rss_parts(pid: int, proc: Path = Path("/proc")) -> tuple[int, int] | None:
    """(anonymous, file-backed) resident bytes of pid from /proc/PID/status: a model's
    mapped weights are file-backed and shared by its workers. None if unreadable."""
    try:
        text = (proc / str(pid) / "status").read_text()
    except OSError:
        return None
    kib = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in text.splitlines())
           if k in ("RssAnon", "RssFile", "RssShmem")}
    if "RssAnon" not in kib:
        return None
    return (kib["RssAnon"] + kib.get("RssShmem", 0)) << 10, kib.get("RssFile", 0) << 10


class Sampler:
    """Readings of one process at a time (a worker's pid changes when it restarts); keeps
    the last CPU time to give a CPU % since the previous reading."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._proc: psutil.Process | None = None
        self._last: tuple[float, float] | None = None  # (when, user + system seconds)
        self._percent: float | None = None

    def read(self, pid: int | None) -> dict[str, Any]:
        """FIELDS of pid, each None without a process (or when unreadable).

        cpu_percent is over the time since the previous reading (at least MIN_INTERVAL_S
        before; a sooner reading repeats the last value), and since the process started at
        the first reading of a process: 100 is one CPU busy."""
        out: dict[str, Any] = dict.fromkeys(FIELDS)
        if pid is None:
            self._proc = None
            return out
        try:
            if self._proc is None or self._proc.pid != pid:
                self._proc, self._last, self._percent = psutil.Process(pid), None, None
            proc = self._proc
            with proc.oneshot():
                rss = proc.memory_info().rss
                cpu = proc.cpu_times()
                ctx = proc.num_ctx_switches()
                started = proc.create_time()
        except psutil.Error:
            self._proc = None
            return out
        now, used = self._clock(), cpu.user + cpu.system
        if self._last is None:
            age = time.time() - started  # create_time is wall-clock
            self._percent = 100 * used / age if age > 0 else None
            self._last = (now, used)
        elif now - self._last[0] >= MIN_INTERVAL_S:
            self._percent = 100 * (used - self._last[1]) / (now - self._last[0])
            self._last = (now, used)
        minor_major = faults(pid)
        out.update(rss_bytes=rss, cpu_user_s=cpu.user, cpu_system_s=cpu.system,
                   cpu_percent=None if self._percent is None else round(self._percent, 1),
                   ctx_switches_voluntary=ctx.voluntary,
                   ctx_switches_involuntary=ctx.involuntary)
        if minor_major is not None:
            out["minor_faults"], out["major_faults"] = minor_major
        return out

