#!/usr/bin/env python3
"""Threads matched to the CPU quota vs fixed at 2, under the same cpu.max (needs systemd, root).

One daemon serves the same GGUF as two models, each worker in its own scope with the
same quota: "matched" (threads = 0: the worker follows the quota) and "fixed"
(threads = 2). Requests alternate between them, one at a time, so they never compete.
Per request: decode tokens/s (the daemon's stats) and the scope's cpu.stat
throttled_usec / nr_throttled delta (the kernel's word). Run in the guest:

    python3 bench/quota_threads.py --model /dev/shm/mid.gguf --cpu 50% --rounds 5
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from llmctl import Client
from llmctl.commands.wait import wait_ready

SETUPS = {"matched": 0, "fixed": 2}


def cpu_stat(cgroup: str) -> dict[str, int]:
    lines = Path(cgroup, "cpu.stat").read_text().splitlines()
    return {k: int(v) for k, v in (line.split() for line in lines)}


def config(model: str, cpu: str) -> str:
    return "".join(f"""
[models.{name}]
path = "{model}"
n_ctx = 512
threads = {threads}
cpu = "{cpu}"
""" for name, threads in SETUPS.items())


def run(client: Client, name: str, cgroup: str, tokens: int) -> dict[str, float]:
    before = cpu_stat(cgroup)
    stream = client.submit("the sky is blue and", model=name, max_tokens=tokens, raw=True,
                           ignore_eos=True, temperature=0.0)
    for _ in stream.events():
        pass
    after = cpu_stat(cgroup)
    stats = stream.stats or {}
    return {"setup": name, "tokens_per_s": stats.get("tokens_per_s") or 0.0,
            "total_s": stats.get("total_s", 0.0),
            "throttled_ms": (after["throttled_usec"] - before["throttled_usec"]) / 1000,
            "nr_throttled": after["nr_throttled"] - before["nr_throttled"],
            "cpu_ms": (after["usage_usec"] - before["usage_usec"]) / 1000}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--cpu", default="50%")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--csv", type=Path, default=Path("bench/results/quota_threads.csv"))
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="quota-"))
    (tmp / "config.toml").write_text(config(args.model, args.cpu))
    sock = tmp / "llm.sock"
    with open(tmp / "daemon.log", "wb") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "llm_residentd", "--config",
                                   str(tmp / "config.toml"), "--socket", str(sock), "--backend",
                                   "systemd", "--log-format", "json"],
                                  stdout=log, stderr=subprocess.STDOUT)
    rows: list[dict[str, float]] = []
    try:
        wait_ready(str(sock), None, 300)
        with Client(sock, timeout=600) as client:
            workers = {w["model"]: w for w in client.status()["workers"]}
            cgroups = {n: workers[n]["cgroup"]["cgroup"] for n in SETUPS}
            threads = {n: workers[n]["threads"] for n in SETUPS}
            for n in SETUPS:  # warm-up
                run(client, n, cgroups[n], 4)
            for r in range(args.rounds):
                order = list(SETUPS) if r % 2 == 0 else list(SETUPS)[::-1]
                for name in order:
                    row = run(client, name, cgroups[name], args.tokens)
                    rows.append({"round": r + 1, "threads": threads[name], **row})
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        daemon.terminate()
        daemon.wait(60)
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    med = {n: {k: statistics.median(r[k] for r in rows if r["setup"] == n)
               for k in ("tokens_per_s", "throttled_ms", "nr_throttled", "cpu_ms")}
           for n in SETUPS}
    print(json.dumps({"command": " ".join(sys.argv), "cpu": args.cpu, "threads": threads,
                      "median": med,
                      "tokens_per_s_ratio_matched_over_fixed":
                          med["matched"]["tokens_per_s"] / med["fixed"]["tokens_per_s"],
                      "throttled_ratio_fixed_over_matched":
                          med["fixed"]["throttled_ms"] / max(med["matched"]["throttled_ms"], 1e-9)},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
