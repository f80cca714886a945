#!/usr/bin/env python3
"""Two probes behind the psi-admission results (needs root, cgroup2; run in the guest).

1. Does a task throttled by its own cgroup's cpu.max show up in the system-wide
   /proc/pressure/cpu? One busy loop in a fresh cgroup under cpu.max max, 50 % and 25 %;
   10 s each; prints the system's CPU `some` stall, the loop's usage and throttled time.
2. What one full kernel view of the policy engine costs here (system PSI plus
   cgroupstats.read of 4 cgroups, as Service.snapshot reads for 4 workers), against
   system PSI alone.

    python3 /proj/bench/psi_probe.py
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from llm_residentd.control import cgroupstats, psi

ROOT = Path("/sys/fs/cgroup")


def some_total() -> int:
    return int(Path("/proc/pressure/cpu").read_text().splitlines()[0].split("total=")[1])


def cpu_stat(cg: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in (cg / "cpu.stat").read_text().splitlines())}


def throttling(seconds: float = 10.0) -> None:
    (ROOT / "cgroup.subtree_control").write_text("+cpu")
    for quota in ("max", "50000 100000", "25000 100000"):
        cg = ROOT / "psi-probe"
        cg.mkdir(exist_ok=True)
        (cg / "cpu.max").write_text(quota)
        loop = subprocess.Popen(["python3", "-c", "while True: pass"])
        (cg / "cgroup.procs").write_text(str(loop.pid))
        time.sleep(2)
        s0, a0, t0 = some_total(), cpu_stat(cg), time.monotonic()
        time.sleep(seconds)
        s1, a1, t1 = some_total(), cpu_stat(cg), time.monotonic()
        loop.kill()
        loop.wait()
        wall = t1 - t0
        print(f"one busy loop, cpu.max {quota!r}: system cpu some {100 * (s1 - s0) / 1e6 / wall:.1f} "
              f"% of wall, loop usage {100 * (a1['usage_usec'] - a0['usage_usec']) / 1e6 / wall:.1f} %, "
              f"throttled {100 * (a1['throttled_usec'] - a0['throttled_usec']) / 1e6 / wall:.1f} %",
              flush=True)
        time.sleep(0.5)
        cg.rmdir()


def kernel_view_cost(n: int = 50) -> None:
    cgs = [ROOT / f"psi-probe-{i}" for i in range(4)]
    for cg in cgs:
        cg.mkdir(exist_ok=True)
    try:
        c0 = time.process_time()
        for _ in range(n):
            psi.system_pressure()
            for cg in cgs:
                cgroupstats.read(cg)
        full = (time.process_time() - c0) / n
        c0 = time.process_time()
        for _ in range(n):
            psi.system_pressure()
        system = (time.process_time() - c0) / n
        print(f"kernel view, CPU per read (mean of {n}): system PSI + 4 cgroups {1000 * full:.1f} ms, "
              f"system PSI only {1000 * system:.1f} ms", flush=True)
    finally:
        for cg in cgs:
            cg.rmdir()


if __name__ == "__main__":
    throttling()
    kernel_view_cost()
