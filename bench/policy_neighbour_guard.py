#!/usr/bin/env python3
"""neighbour-guard on vs off: what a co-located CPU-bound program gets done (needs systemd, root).

The neighbour is `--neighbours` Python processes outside llm.slice, each looping over a
fixed unit of work and reporting when each unit ends and how long it took. The LLM load
is `--clients` closed-loop clients against one model (`--workers` workers, threads
following the quota) for `--duration` s. Setups, interleaved (the order rotates each
round), each with a fresh daemon:

- `plain`: no quota, no policy;
- `guard`: `[[policies]] neighbour-guard` (starts at max_cpu, cuts on the CPU PSI outside
  llm.slice);
- `static`: no policy, a static quota `--static-cpu` (the level the guard cuts down to);
- `nollm`: the neighbour alone, no daemon (its best case).

Evidence: the neighbour's units per second and per-unit latency; the LLM's request
latency, TTFT, tokens/s (application); once a second system CPU PSI, the PSI of the
neighbour's top-level cgroup, the scopes' PSI, cpu.stat and cpu.max (kernel); the
guard's recorded set_limits actions. Run in the guest:

    python3 bench/policy_neighbour_guard.py --model /dev/shm/mid.gguf --csv /share/neighbour_guard.csv
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import policylab as lab

SETUPS = ("plain", "guard", "static", "nollm")
NEIGHBOUR = """
import sys, time
n = int(sys.argv[1])
while True:
    t = time.monotonic()
    x = 0
    for i in range(n):
        x ^= i
    e = time.monotonic()
    sys.stdout.write(f"{e:.6f} {e - t:.6f}\\n")
    sys.stdout.flush()
"""


class Neighbour:
    """N CPU-bound loops; (end time, duration) of every unit of work they finish."""

    def __init__(self, procs: int, work: int) -> None:
        self.units: list[tuple[float, float]] = []
        self.lock = threading.Lock()
        self.procs = [subprocess.Popen([sys.executable, "-c", NEIGHBOUR, str(work)],
                                       stdout=subprocess.PIPE, text=True) for _ in range(procs)]
        self.readers = [threading.Thread(target=self._read, args=(p,), daemon=True)
                        for p in self.procs]
        for r in self.readers:
            r.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            end, dur = line.split()
            with self.lock:
                self.units.append((float(end), float(dur)))

    def count(self) -> dict[str, int]:
        with self.lock:
            return {"neighbour_units": len(self.units)}

    def window(self, start: float, end: float) -> list[float]:
        with self.lock:
            return [d for e, d in self.units if start <= e - d and e <= end]

    def stop(self) -> None:
        for p in self.procs:
            lab.stop(p)


def config(args: argparse.Namespace, setup: str) -> str:
    text = f"""
[models.m]
path = "{args.model}"
n_ctx = 512
workers = {args.workers}
"""
    if setup == "static":
        text += f'cpu = "{args.static_cpu}"\n'
    if setup == "guard":
        text += '\n[[policies]]\nname = "neighbour-guard"\n'
        for item in filter(None, args.policy.split(",")):
            key, value = item.split("=")
            text += f"{key} = {value}\n"
    return text


def settle(daemon: lab.Daemon, setup: str, args: argparse.Namespace) -> float:
    """Let start-up pressure pass. The guard cuts during the daemon's start (loading is CPU
    work too), so wait until it has given the quota back to max_cpu, as an idle guard
    would have; every other setup waits --settle s."""
    t0 = time.monotonic()
    if setup != "guard":
        time.sleep(args.settle)
        return args.settle
    while time.monotonic() - t0 < args.guard_wait:
        quota, _, period = lab.read_text(daemon.cgroups[0] / "cpu.max").partition(" ")
        if quota == "max" or int(quota) >= args.max_cpu * int(period) - 1:
            break
        time.sleep(0.5)
    return time.monotonic() - t0


def one_run(args: argparse.Namespace, setup: str, rnd: int, position: int) -> dict[str, Any]:
    daemon = lab.Daemon(config(args, setup), setup) if setup != "nollm" else None
    try:
        start_quota, waited = "", 0.0
        if daemon is not None:
            lab.closed_loop(daemon, "m", args.workers, 4, requests_each=1)  # warm-up
            waited = settle(daemon, setup, args)
            start_quota = lab.read_text(daemon.cgroups[0] / "cpu.max")
        else:
            time.sleep(args.settle)
        neighbour = Neighbour(args.neighbours, args.work)
        try:
            sampler = lab.Sampler(daemon.cgroups if daemon else [], extra=neighbour.count,
                                  pid=daemon.proc.pid if daemon else None)
            sampler.start()
            t_unix, t0 = time.time(), time.monotonic()
            if daemon is not None:
                rows = lab.closed_loop(daemon, "m", args.clients, args.tokens,
                                       duration_s=args.duration)
            else:
                rows = []
                time.sleep(args.duration)
            t_end = time.monotonic()
            samples = sampler.stop()
            units = neighbour.window(t0, t0 + args.duration)
        finally:
            neighbour.stop()
        events = daemon.events() if daemon else []  # t_s < 0: before the load
    finally:
        if daemon is not None:
            daemon.stop()
    tag = {"setup": setup, "round": rnd, "position": position}
    for row in rows:
        row.update(tag)
    for s in samples:
        s.update(tag)
    for e in events:
        e.update(tag, t_s=round(e["at"] - t_unix, 3), values=json.dumps(e["values"]))
    wall = t_end - t0
    summary = {**tag, "wall_s": wall, "settle_s": round(waited, 1),
               "cpu_max_at_start": start_quota, **lab.summarize_requests(rows, wall),
               "neighbour": {"units": len(units), "duration_s": args.duration,
                             "units_per_s": len(units) / args.duration,
                             "unit_ms": {k: v * 1000 for k, v in lab.pcts(units).items()}},
               "os": lab.os_deltas(samples),
               "cuts": [json.loads(e["values"]).get("cpu") for e in events
                        if e["action"] == "set_limits"]}
    print(json.dumps(summary), flush=True)
    return {"rows": rows, "samples": samples, "events": events, "units": units,
            "summary": summary}


def pooled(runs: list[dict[str, Any]], setup: str) -> dict[str, Any]:
    mine = [r for r in runs if r["summary"]["setup"] == setup]
    rows = [row for r in mine for row in r["rows"]]
    units = [u for r in mine for u in r["units"]]
    wall = sum(r["summary"]["wall_s"] for r in mine)
    out = lab.summarize_requests(rows, wall)
    out["neighbour"] = {
        "units_per_s": len(units) / sum(r["summary"]["neighbour"]["duration_s"] for r in mine),
        "unit_ms": {k: v * 1000 for k, v in lab.pcts(units).items()}}
    out["os"] = lab.sum_os([r["summary"]["os"] for r in mine])
    out["cpu_max_seen"] = sorted({c for r in mine for c in r["summary"]["os"].get(
        "cpu_max_seen", [])})
    out["set_limits_actions"] = sum(len(r["summary"]["cuts"]) for r in mine)
    out["runs"] = len(mine)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--duration", type=float, default=60.0, help="s of load per run")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--neighbours", type=int, default=2, help="neighbour processes")
    p.add_argument("--work", type=int, default=20000, help="loop iterations per unit")
    p.add_argument("--static-cpu", default="25%")
    p.add_argument("--policy", default="", help="neighbour-guard settings, k=v,k=v")
    p.add_argument("--setups", default=",".join(SETUPS))
    p.add_argument("--settle", type=float, default=5.0, help="s between warm-up and load")
    p.add_argument("--guard-wait", type=float, default=60.0,
                   help="most s to wait for the guard to restore max_cpu before the load")
    p.add_argument("--max-cpu", type=float, default=2.0, help="the guard's max_cpu (CPUs)")
    p.add_argument("--csv", type=Path, default=Path("bench/results/policy_neighbour_guard.csv"))
    args = p.parse_args()
    setups = tuple(args.setups.split(","))
    print(json.dumps({"command": " ".join(sys.argv), **lab.guest_facts()}), flush=True)
    runs = []
    for rnd in range(1, args.rounds + 1):
        k = (rnd - 1) % len(setups)
        order = setups[k:] + setups[:k]
        if rnd % 2 == 0:
            order = order[::-1]
        for position, setup in enumerate(order, 1):
            runs.append(one_run(args, setup, rnd, position))
    stem = args.csv.with_suffix("")
    lab.write_csv(args.csv, [row for r in runs for row in r["rows"]])
    lab.write_csv(Path(f"{stem}_samples.csv"), [s for r in runs for s in r["samples"]])
    lab.write_csv(Path(f"{stem}_events.csv"), [e for r in runs for e in r["events"]])
    res: dict[str, Any] = {s: pooled(runs, s) for s in setups}
    out: dict[str, Any] = {"command": " ".join(sys.argv), **res}
    if "plain" in res and "guard" in res:
        a, b = res["plain"], res["guard"]
        out["ratio_guard_over_plain"] = {
            "neighbour_units_per_s": b["neighbour"]["units_per_s"] / a["neighbour"]["units_per_s"],
            "neighbour_unit_p95": b["neighbour"]["unit_ms"]["p95"] / a["neighbour"]["unit_ms"]["p95"],
            "llm_tokens_per_s": b["tokens_per_s"] / a["tokens_per_s"],
            "llm_latency_p95": b["latency"]["p95"] / a["latency"]["p95"]}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
