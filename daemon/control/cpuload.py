"""What the CPUs are doing right now, read from /proc: the kernel's counters in, a view out.

`read()` takes one reading: per-CPU busy and idle time and `procs_running` from
/proc/stat, the CPU PSI total (system-wide, or summed over the cgroups outside the
workers), and per worker the state, CPU time, run-queue wait and involuntary switches of
each of its threads. `view()` turns the readings of a short window into rates: how many
other tasks wanted a CPU, how idle the workers' CPUs were, how long the workers' threads
waited. Reading only; the threads policy decides from the view (policies/threads.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..policies.base import CpuView, WorkerLoad
from . import psi

PROC = Path("/proc")
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class TaskCounters:
    """A worker process, summed over its threads."""

    threads: int = 0
    running: int = 0  # threads in state R (on a CPU, or runnable and waiting for one)
    cpu_ns: int = 0  # time on a CPU (schedstat)
    wait_ns: int = 0  # time runnable but waiting for a CPU (schedstat)
    nivcsw: int = 0  # involuntary context switches: the CPU was taken from it


@dataclass(frozen=True)
class Reading:
    at: float  # time.monotonic()
    busy: dict[int, int]  # per CPU: jiffies not idle
    idle: dict[int, int]  # per CPU: idle + iowait jiffies
    procs_running: int  # runnable tasks now, this reader included
    stall_us: int | None  # CPU PSI "some" total of the watched pressure files
    workers: dict[str, TaskCounters] = field(default_factory=dict)  # worker -> counters
    trigger: str = ""  # the PSI trigger that asked for this reading, if one did


def _proc_stat(text: str) -> tuple[dict[int, int], dict[int, int], int]:
    busy: dict[int, int] = {}
    idle: dict[int, int] = {}
    running = 0
    for line in text.splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *values = line.split()
            v = [int(x) for x in values[:8]]  # user nice system idle iowait irq softirq steal
            cpu = int(name[3:])
            idle[cpu] = v[3] + v[4]
            busy[cpu] = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
        elif line.startswith("procs_running "):
            running = int(line.split()[1])
    return busy, idle, running


def _first_int(path: Path, start: int = 0) -> list[int]:
    with open(path, "rb") as fh:
        return [int(x) for x in fh.read().split()[start:]]


def task_counters(pid: int, proc: Path = PROC) -> TaskCounters | None:
    """A process's threads summed; None once it is gone."""
    try:
        tids = os.listdir(proc / str(pid) / "task")
    except OSError:
        return None
    threads = running = cpu = wait = nivcsw = 0
    for tid in tids:
        base = proc / str(pid) / "task" / tid
        try:
            stat = (base / "stat").read_bytes()
            sched = _first_int(base / "schedstat")
            status = (base / "status").read_bytes()
        except (OSError, ValueError):
            continue  # the thread ended between listdir and read
        threads += 1
        running += stat.rsplit(b")", 1)[1].split(None, 1)[0] == b"R"
        cpu += sched[0]
        wait += sched[1]
        at = status.find(b"nonvoluntary_ctxt_switches:")
        if at >= 0:
            nivcsw += int(status[at:].split(None, 2)[1])
    return TaskCounters(threads, running, cpu, wait, nivcsw)


def stall_total(paths: Iterable[Path]) -> int | None:
    """Sum of the CPU PSI some totals (us) of these pressure files; None if none reads."""
    total, seen = 0, False
    for path in paths:
        parsed = psi.read(path)
        if parsed and "some" in parsed:
            total += int(parsed["some"]["total"])
            seen = True
    return total if seen else None


def read(now: float, pids: Mapping[str, int], pressure: Sequence[Path] = (psi.SYSTEM / "cpu",),
         proc: Path = PROC, trigger: str = "") -> Reading:
    """One reading: /proc/stat, the given CPU pressure files, and the threads of each
    worker (name -> pid)."""
    busy, idle, running = _proc_stat((proc / "stat").read_text())
    workers = {}
    for name, pid in pids.items():
        counters = task_counters(pid, proc)
        if counters is not None:
            workers[name] = counters
    return Reading(now, busy, idle, running, stall_total(pressure), workers, trigger)


def view(readings: Sequence[Reading], cpus: Iterable[int] | None = None,
         recent: int = 3) -> CpuView | None:
    """Idle and busy CPU between the first and last reading, on the CPUs given (all when
    None): /proc/stat counts in ticks of 10 ms, so these need the whole window. The
    workers' rates (schedstat counts in ns) cover the last `recent` readings, and so do
    the runnable counts (instants, averaged); after a reading that a PSI trigger asked
    for, the runnable counts are that reading's alone: the trigger says something just
    changed. None for fewer than two readings."""
    if len(readings) < 2:
        return None
    first, last = readings[0], readings[-1]
    dt = last.at - first.at
    if dt <= 0:
        return None
    chosen = sorted(set(last.busy) & set(first.busy) & set(cpus if cpus is not None
                                                             else last.busy))
    jiffies = dt * CLK_TCK
    busy = sum(last.busy[c] - first.busy[c] for c in chosen) / jiffies
    idle = sum(last.idle[c] - first.idle[c] for c in chosen) / jiffies
    tail = readings[-max(2, recent):]
    t_dt = last.at - tail[0].at
    instants = tail[-1:] if last.trigger else tail
    workers = {}
    for name in set(tail[0].workers) & set(last.workers):  # present in all of the tail
        a, b = tail[0].workers[name], last.workers[name]
        workers[name] = WorkerLoad(
            threads=b.threads,
            running=_mean(r.workers[name].running for r in instants if name in r.workers),
            cpu=(b.cpu_ns - a.cpu_ns) / 1e9 / t_dt, wait=(b.wait_ns - a.wait_ns) / 1e9 / t_dt,
            nivcsw=(b.nivcsw - a.nivcsw) / t_dt)
    ours = _mean(sum(w.running for w in r.workers.values()) for r in instants)
    # the workers' CPU over the whole window, to take it out of /proc/stat's busy time
    whole = set(first.workers) & set(last.workers)
    workers_cpu = sum(last.workers[n].cpu_ns - first.workers[n].cpu_ns for n in whole) / 1e9 / dt
    stall = None
    if first.stall_us is not None and last.stall_us is not None:
        stall = max(0.0, (last.stall_us - first.stall_us) / 1e6 / dt)
    return CpuView(
        seconds=dt, samples=len(readings), cpus=len(chosen),
        # /proc/stat ticks and schedstat's clock disagree a little: clamp
        idle=max(0.0, min(float(len(chosen)), idle)),
        others_running=max(0.0, _mean(r.procs_running for r in instants) - ours - 1),
        others_cpu=max(0.0, busy - workers_cpu), stall=stall, workers=workers,
        trigger=last.trigger)


def _mean(values: Iterable[float]) -> float:
    items = list(values)
    return sum(items) / len(items) if items else 0.0


def allowed_cpus(pids: Iterable[int]) -> set[int] | None:
    """The CPUs any of these processes may run on; None if none can be asked."""
    out: set[int] = set()
    for pid in pids:
        try:
            out |= os.sched_getaffinity(pid)
        except OSError:
            continue
    return out or None

