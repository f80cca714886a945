#!/usr/bin/env python3
"""Priority preemption: latency of urgent requests behind long ones, with and without it.

One daemon, one worker, the `priority` policy loaded. A background thread keeps one long
low-priority request in flight at all times; the foreground submits short priority-10
requests one at a time, each 0.3-1.0 s after the previous one ended. Setups, switched
live with `policy set` and interleaved round by round:

- `off`: min_gap=1000, so the policy never preempts (the queue still puts priority 10
  first, so this is plain priority order: the urgent request waits for the long one);
- `restore`: preempt, resume from the saved sequence state (state_min_tokens=0);
- `recompute`: preempt, resume by evaluating the context again;
- `alone` (control): no background load, the floor for the urgent requests.

Application: TTFT and latency of urgent requests (p50/p95/p99), long requests completed,
their output checked token for token against an uninterrupted run, resume prefill time.
OS: the worker scope's cpu.stat usage_usec per setup, per long-request token. Run in the
guest (see docs/benchmarks.md); without systemd use --backend none (no OS columns).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from llmctl import Client
from llmctl.cli import wait_ready

SETUPS = {"off": {"min_gap": 1000}, "restore": {"min_gap": 1, "state_min_tokens": 0},
          "recompute": {"min_gap": 1, "state_min_tokens": 1 << 24}, "alone": {"min_gap": 1000}}
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


def usage_us(cgroup: str | None) -> int:
    if cgroup is None:
        return 0
    for line in Path(cgroup, "cpu.stat").read_text().splitlines():
        key, value = line.split()
        if key == "usage_usec":
            return int(value)
    return 0


def timed(client: Client, prompt: str, params: dict[str, Any]) -> dict[str, Any]:
    t0 = time.monotonic()
    stream = client.submit(prompt, model="m", **params)
    text, first, preempted = "", None, 0
    for event in stream.events():
        if event["event"] == "token":
            first = first or time.monotonic()
            text += event["text"]
        preempted += event["event"] == "preempted"
    end = time.monotonic()
    stats = stream.stats or {}
    return {"ttft_ms": ((first or end) - t0) * 1000, "latency_ms": (end - t0) * 1000,
            "text": text, "ok": bool(stream.stats), "preempted": preempted,
            "tokens": stats.get("completion_tokens", 0), "prefill_ms": stats.get("prefill_s", 0) * 1000}


class Background(threading.Thread):
    """Keeps one long request in flight until stopped; records each one."""

    def __init__(self, sock: Path) -> None:
        super().__init__(daemon=True)
        self.sock, self.stop, self.done = sock, threading.Event(), []

    def run(self) -> None:
        with Client(self.sock, timeout=600) as client:
            while not self.stop.is_set():
                self.done.append(timed(client, LONG_PROMPT, LONG))


def one_round(sock: Path, setup: str, urgent: int, cgroup: str | None, reference: str,
              rng: random.Random) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    with Client(sock, timeout=600) as client:
        client.call("policy", action="set", name="priority", settings=SETUPS[setup])
        bg = Background(sock) if setup != "alone" else None
        cpu0 = usage_us(cgroup)
        if bg:
            bg.start()
            time.sleep(1.0)  # the long request is decoding
        rows = []
        for i in range(urgent):
            time.sleep(rng.uniform(0.3, 1.0))
            r = timed(client, "urgent: status?", URGENT)
            rows.append({"setup": setup, "kind": "urgent", "i": i, **r})
        if bg:
            bg.stop.set()
            bg.join()
        cpu1 = usage_us(cgroup)
    longs = bg.done if bg else []
    for i, r in enumerate(longs):
        rows.append({"setup": setup, "kind": "long", "i": i, **r})
    summary = {"cpu_ms": (cpu1 - cpu0) / 1000, "long_tokens": sum(r["tokens"] for r in longs),
               "long_done": sum(r["ok"] for r in longs),
               "long_intact": sum(r["ok"] and r["text"] == reference for r in longs)}
    return rows, summary


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))] if values else 0.0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--urgent", type=int, default=8, help="urgent requests per round")
    p.add_argument("--backend", default="systemd")
    p.add_argument("--csv", type=Path, default=Path("bench/results/policy_priority.csv"))
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="prio-"))
    (tmp / "config.toml").write_text(config(args.model))
    sock = tmp / "llm.sock"
    with open(tmp / "daemon.log", "wb") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "llm_residentd", "--config",
                                   str(tmp / "config.toml"), "--socket", str(sock), "--backend",
                                   args.backend, "--log-format", "json"],
                                  stdout=log, stderr=subprocess.STDOUT)
    rows: list[dict[str, Any]] = []
    summaries: dict[str, list[dict[str, Any]]] = {s: [] for s in SETUPS}
    rng = random.Random(1)
    try:
        wait_ready(str(sock), None, 300)
        with Client(sock, timeout=600) as client:
            worker = client.status()["workers"][0]
            cgroup = (worker.get("cgroup") or {}).get("cgroup")
            reference = timed(client, LONG_PROMPT, LONG)["text"]
            timed(client, "urgent: status?", URGENT)  # warm-up
        for r in range(args.rounds):
            order = list(SETUPS) if r % 2 == 0 else list(SETUPS)[::-1]
            for setup in order:
                got, summary = one_round(sock, setup, args.urgent, cgroup, reference, rng)
                rows += [{"round": r + 1, **row} for row in got]
                summaries[setup].append(summary)
                print(json.dumps({"round": r + 1, "setup": setup, **summary}), flush=True)
    finally:
        daemon.terminate()
        daemon.wait(60)
    fields = ["round", "setup", "kind", "i", "ttft_ms", "latency_ms", "tokens", "prefill_ms",
              "preempted", "ok"]
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    result: dict[str, Any] = {"command": " ".join(sys.argv)}
    for setup in SETUPS:
        urgent = [r for r in rows if r["setup"] == setup and r["kind"] == "urgent"]
        longs = [r for r in rows if r["setup"] == setup and r["kind"] == "long"]
        resumed = [r["prefill_ms"] for r in longs if r["preempted"]]
        s = summaries[setup]
        long_tokens = sum(x["long_tokens"] for x in s)
        result[setup] = {
            **{f"ttft_p{q}_ms": round(pct([r["ttft_ms"] for r in urgent], q), 1)
               for q in (50, 95, 99)},
            **{f"latency_p{q}_ms": round(pct([r["latency_ms"] for r in urgent], q), 1)
               for q in (50, 95, 99)},
            "urgent_done": sum(r["ok"] for r in urgent), "urgent": len(urgent),
            "long_done": sum(x["long_done"] for x in s), "long": len(longs),
            "long_intact": sum(x["long_intact"] for x in s),
            "preemptions": sum(r["preempted"] for r in longs),
            "resume_prefill_ms_median": round(statistics.median(resumed), 2) if resumed else None,
            "cpu_ms_per_long_token": round(sum(x["cpu_ms"] for x in s) / long_tokens, 3)
            if long_tokens else None,
        }
    off, restore = result["off"], result["restore"]
    result["ttft_p95_ratio_off_over_restore"] = round(
        off["ttft_p95_ms"] / max(restore["ttft_p95_ms"], 1e-9), 2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
