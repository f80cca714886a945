#!/usr/bin/env python3
"""Priority preemption: latency of urgent requests behind long ones, with and without it.

One daemon, one worker, the `priority` policy loaded. A background thread keeps one long
low-priority request in flight at all times; the foreground submits short priority-10
("urgent") requests one at a time, each 0.3-1.0 s after the previous one ended. Before
each urgent request the policy is switched live (`policy set`) to the next setup in
turn, so drift in the machine's speed hits every setup alike:

- `off`: min_gap=1000, so the policy never preempts (the queue still puts priority 10
  first, so this is plain priority order: the urgent request waits for the long one);
- `restore`: preempt, resume from the saved sequence state (state_min_tokens=0);
- `recompute`: preempt, resume by evaluating the context again;
- `alone` (control, before and after the rest): no background load, the floor.

Application: TTFT and latency of urgent requests (p50/p95/p99), long requests completed,
their output checked token for token against an uninterrupted run, the time to resume
(the `prefill_s` of a resumed request), by resume mode. OS: the worker scope's cpu.stat
usage_usec per request (the CPU the kernel charged while it ran). Run in the guest (see
docs/benchmarks.md); without systemd use --backend none (no OS columns).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

from llmctl import Client
from policylab import Daemon, cpu_stat, pcts, write_csv

SETUPS = {"off": {"min_gap": 1000}, "restore": {"min_gap": 1, "state_min_tokens": 0},
          "recompute": {"min_gap": 1, "state_min_tokens": 1 << 24}}
LONG_PROMPT = "a long report about the state of the scheduler and its queues " * 6
LONG = {"max_tokens": 200, "temperature": 0.0, "top_k": 1, "raw": True, "ignore_eos": True,
        "seed": 7, "priority": 0}
URGENT = {"max_tokens": 8, "temperature": 0.0, "top_k": 1, "raw": True, "ignore_eos": True,
          "priority": 10}


def config(model: str) -> str:
    return f"""
[models.m]
path = "{model}"
n_ctx = 1024
max_tokens = 1000
threads = 0
stream_interval = 0.0

[[policies]]
name = "priority"
"""


def timed(client: Client, cgroup: Path, prompt: str, params: dict[str, Any]) -> dict[str, Any]:
    """One request: client-side TTFT and latency, its text, how it was resumed, and the CPU
    the kernel charged to the worker's scope meanwhile."""
    cpu0, t0 = cpu_stat(cgroup).get("usage_usec", 0), time.monotonic()
    stream = client.submit(prompt, model="m", **params)
    text, first, resumes = "", None, []
    for event in stream.events():
        if event["event"] == "token":
            first = first or time.monotonic()
            text += event["text"]
        elif event["event"] == "preempted":
            resumes.append(event["resume"])
    end = time.monotonic()
    stats = stream.stats or {}
    return {"ttft_ms": ((first or end) - t0) * 1000, "latency_ms": (end - t0) * 1000,
            "text": text, "ok": bool(stream.stats), "preempted": len(resumes),
            "resume": "+".join(resumes), "tokens": stats.get("completion_tokens", 0),
            "prefill_ms": stats.get("prefill_s", 0) * 1000,
            "cpu_ms": (cpu_stat(cgroup).get("usage_usec", 0) - cpu0) / 1000}


class Background(threading.Thread):
    """Keeps one long request in flight until stopped; records each one."""

    def __init__(self, daemon: Daemon, reference: str) -> None:
        super().__init__(daemon=True)
        self.d, self.reference = daemon, reference
        self.stop, self.done = threading.Event(), []

    def run(self) -> None:
        with self.d.client() as client:
            while not self.stop.is_set():
                r = timed(client, self.d.cgroups[0], LONG_PROMPT, LONG)
                self.done.append({"kind": "long", "setup": r["resume"] or "none",
                                  "intact": r["text"] == self.reference, **r})


def urgent_rows(d: Daemon, setups: list[str], n: int, rng: random.Random) -> list[dict[str, Any]]:
    rows = []
    with d.client() as client:
        for i in range(n):
            for setup in setups:
                if setup in SETUPS:
                    client.call("policy", action="set", name="priority", settings=SETUPS[setup])
                time.sleep(rng.uniform(0.3, 1.0))
                r = timed(client, d.cgroups[0], "urgent: status?", URGENT)
                rows.append({"kind": "urgent", "setup": setup, "i": i, **r})
            rng.shuffle(setups)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--urgent", type=int, default=16, help="urgent requests per setup")
    p.add_argument("--alone", type=int, default=6, help="control requests before and after")
    p.add_argument("--backend", default="systemd", help="none for a run without systemd")
    p.add_argument("--csv", type=Path, default=Path("bench/results/policy_priority.csv"))
    args = p.parse_args()
    rng = random.Random(1)
    with Daemon(config(args.model), "priority", backend=args.backend) as d:
        with d.client() as client:
            reference = timed(client, d.cgroups[0], LONG_PROMPT, LONG)["text"]
        rows = urgent_rows(d, ["alone"], args.alone, rng)
        bg = Background(d, reference)
        bg.start()
        time.sleep(1.0)  # the long request is decoding
        rows += urgent_rows(d, list(SETUPS), args.urgent, rng)
        bg.stop.set()
        bg.join()
        rows += bg.done
        rows += urgent_rows(d, ["alone"], args.alone, rng)
        actions = [a for a in d.events() if a["action"] == "preempt"]
    write_csv(args.csv, [{k: v for k, v in r.items() if k != "text"} for r in rows])
    result: dict[str, Any] = {"command": " ".join(sys.argv), "preempt_actions": len(actions)}
    for setup in ["alone", *SETUPS]:
        urgent = [r for r in rows if r["kind"] == "urgent" and r["setup"] == setup]
        result[setup] = {"urgent": len(urgent), "done": sum(r["ok"] for r in urgent),
                         **{f"ttft_{k}_ms": round(v, 1)
                            for k, v in pcts([r["ttft_ms"] for r in urgent]).items()},
                         **{f"latency_{k}_ms": round(v, 1)
                            for k, v in pcts([r["latency_ms"] for r in urgent]).items()}}
    longs = [r for r in rows if r["kind"] == "long"]
    result["long"] = {"done": sum(r["ok"] for r in longs), "total": len(longs),
                      "intact": sum(r["intact"] for r in longs)}
    for mode in ("restore", "recompute"):
        once = [r for r in longs if r["resume"] == mode]  # preempted exactly once that way
        result[f"resumed_by_{mode}"] = {
            "requests": len(once),
            **{f"resume_{k}_ms": round(v, 1) for k, v in pcts([r["prefill_ms"] for r in once]).items()},
            "cpu_ms_per_request": round(sum(r["cpu_ms"] for r in once) / len(once), 1) if once else None}
    plain = [r for r in longs if not r["preempted"]]
    result["not_preempted"] = {"requests": len(plain), "cpu_ms_per_request": round(
        sum(r["cpu_ms"] for r in plain) / len(plain), 1) if plain else None}
    result["ttft_p95_ratio_off_over_restore"] = round(
        result["off"]["ttft_p95_ms"] / max(result["restore"]["ttft_p95_ms"], 1e-9), 2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
