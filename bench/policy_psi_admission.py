#!/usr/bin/env python3
"""psi-admission on vs off, same load, interleaved rounds, with and without a CPU hog (needs systemd, root).

Each run starts its own daemon (backend systemd) serving one model with `--workers`
workers, each in its own scope with the static quota `--cpu` (the research condition:
concurrency 8 under a static 50 % quota). Setup `psi` has `[[policies]] psi-admission`
in its config, setup `plain` has no policy. `--clients` closed-loop clients each send
`--requests` requests of `--tokens` tokens. Condition `hog`: `stress-ng --cpu N` runs
outside llm.slice during the load; condition `quiet` (the control) has no hog. Every
round runs both setups (order alternating) under `hog`; the first `--control-rounds`
rounds also run both under `quiet`.

Evidence: per request latency, TTFT, tokens, outcome (application); once a second the
system's and the scopes' CPU PSI totals, the scopes' cpu.stat and cpu.max (kernel); the
daemon's recorded policy actions (`events`). Run in the guest:

    python3 bench/policy_psi_admission.py --model /dev/shm/mid.gguf --csv /share/psi_admission.csv
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import policylab as lab

POLICIES = {  # setup -> its [[policies]] table, or none
    "plain": "",
    "static": 'name = "static"\ncpu = "{cpu}"\n',
    "psi": 'name = "psi-admission"\n',
    "psi-hold": 'name = "psi-admission"\nkeep_running = 0\n',
}


def config(args: argparse.Namespace, setup: str) -> str:
    text = f"""
[models.m]
path = "{args.model}"
n_ctx = 512
workers = {args.workers}
threads = {args.threads}
cpu = "{args.cpu}"
"""
    if POLICIES[setup]:
        text += "\n[[policies]]\n" + POLICIES[setup].format(cpu=args.cpu)
    if setup.startswith("psi"):
        for item in filter(None, args.policy.split(",")):
            key, value = item.split("=")
            if not (setup == "psi-hold" and key == "keep_running"):
                text += f"{key} = {value}\n"
    return text


def one_run(args: argparse.Namespace, setup: str, condition: str, rnd: int,
            position: int) -> dict[str, Any]:
    with lab.Daemon(config(args, setup), setup) as daemon:
        lab.closed_loop(daemon, "m", args.workers, 4, requests_each=1)  # warm-up, every worker
        hog = lab.start_hog(args.hog) if condition == "hog" else None
        try:
            time.sleep(args.settle)
            sampler = lab.Sampler(daemon.cgroups, pid=daemon.proc.pid)
            sampler.start()
            t_unix, t0 = time.time(), time.monotonic()
            rows = lab.closed_loop(daemon, "m", args.clients, args.tokens,
                                   requests_each=args.requests)
            wall = time.monotonic() - t0
            samples = sampler.stop()
            events = [e for e in daemon.events() if e["at"] >= t_unix]
        finally:
            if hog is not None:
                lab.stop(hog)
    tag = {"setup": setup, "condition": condition, "round": rnd, "position": position}
    for row in rows:
        row.update(tag)
    for s in samples:
        s.update(tag)
    for e in events:
        e.update(tag, t_s=round(e["at"] - t_unix, 3), values=json.dumps(e["values"]))
    summary = {**tag, "ready_s": round(daemon.ready_s, 1), "wall_s": wall,
               **lab.summarize_requests(rows, wall), "os": lab.os_deltas(samples),
               "actions": {k: sum(1 for e in events if e["action"] == k)
                           for k in ("defer", "admit", "set_limits")}}
    print(json.dumps(summary), flush=True)
    return {"rows": rows, "samples": samples, "events": events, "summary": summary}


def pooled(runs: list[dict[str, Any]], setup: str, condition: str) -> dict[str, Any]:
    mine = [r for r in runs if r["summary"]["setup"] == setup
            and r["summary"]["condition"] == condition]
    if not mine:
        return {"runs": 0}
    rows = [row for r in mine for row in r["rows"]]
    wall = sum(r["summary"]["wall_s"] for r in mine)
    out = lab.summarize_requests(rows, wall)
    out["os"] = lab.sum_os([r["summary"]["os"] for r in mine])
    out["actions"] = {k: sum(r["summary"]["actions"][k] for r in mine)
                      for k in ("defer", "admit")}
    out["runs"] = len(mine)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="0: follow the quota (default)")
    p.add_argument("--cpu", default="50%")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=2, help="requests per client per run")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--control-rounds", type=int, default=2)
    p.add_argument("--hog", type=int, default=2, help="stress-ng --cpu N in condition hog")
    p.add_argument("--settle", type=float, default=5.0, help="s between hog start and load")
    p.add_argument("--policy", default="", help="psi-admission settings, k=v,k=v")
    p.add_argument("--setups", default="static,psi", help=f"under the hog; of {list(POLICIES)}")
    p.add_argument("--control-setups", default="static,psi", help="without the hog")
    p.add_argument("--csv", type=Path, default=Path("bench/results/policy_psi_admission.csv"))
    args = p.parse_args()
    print(json.dumps({"command": " ".join(sys.argv), **lab.guest_facts()}), flush=True)
    setups = {"hog": tuple(args.setups.split(",")), "quiet": tuple(args.control_setups.split(","))}
    runs = []
    for rnd in range(1, args.rounds + 1):
        for condition in ("hog", "quiet") if rnd <= args.control_rounds else ("hog",):
            order = setups[condition] if rnd % 2 else setups[condition][::-1]
            for position, setup in enumerate(order, 1):
                runs.append(one_run(args, setup, condition, rnd, position))
    stem = args.csv.with_suffix("")
    lab.write_csv(args.csv, [row for r in runs for row in r["rows"]])
    lab.write_csv(Path(f"{stem}_samples.csv"), [s for r in runs for s in r["samples"]])
    lab.write_csv(Path(f"{stem}_events.csv"), [e for r in runs for e in r["events"]])
    result: dict[str, Any] = {"command": " ".join(sys.argv)}
    for condition in ("hog", "quiet"):
        res: dict[str, Any] = {s: pooled(runs, s, condition) for s in setups[condition]}
        if not any(r["runs"] for r in res.values()):
            continue
        base = next((s for s in ("static", "plain") if s in res), None)
        if base is None or "psi" not in res:
            result[condition] = res
            continue
        a, b = res[base], res["psi"]
        res[f"ratio_{base}_over_psi"] = {
            **{f"latency_{q}": a["latency"][q] / b["latency"][q] for q in ("p50", "p95", "p99")},
            **{f"ttft_{q}": a["ttft"][q] / b["ttft"][q] for q in ("p50", "p95", "p99")},
            "tokens_per_s": a["tokens_per_s"] / b["tokens_per_s"]}
        result[condition] = res
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
