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

Research 000's table (issue 14): `--clients 1,2,4,8` runs every concurrency level;
`--slots P` gives the model `parallel = P` (one worker decoding up to P sequences in one
batch); setup `baseline` has no quota and no policy (the research's "baseline"), `static`
the quota on the worker's scope ("cgroups-only"), `psi-scope` the quota and psi-admission
counting the scope's own CPU pressure, which under a quota includes its throttling: the
research's signal ("cgroups+PSI"). `--conditions quiet` leaves the hog out, as the research
had none. The last table printed is the research's: p95 per setup and concurrency, with
the scopes' throttled time and CPU PSI:

    python3 bench/policy_psi_admission.py --model /dev/shm/mid.gguf --workers 1 --slots 8 \
        --clients 1,2,4,8 --requests-total 16 --conditions quiet --control-rounds 1 \
        --control-setups baseline,static,psi-scope --csv /share/research000.csv
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
    "baseline": "",  # and no quota at all
    "plain": "",
    "static": 'name = "static"\ncpu = "{cpu}"\n',
    "psi": 'name = "psi-admission"\n',
    "psi-hold": 'name = "psi-admission"\nkeep_running = 0\n',
    "psi-scope": 'name = "psi-admission"\nscope_pressure = true\n',
}


# Policy actions counted per run; set_batch: how many sequences a worker may batch (issue 14).
ACTIONS = ("defer", "admit", "set_limits", "set_batch")


def config(args: argparse.Namespace, setup: str) -> str:
    text = f"""
[models.m]
path = "{args.model}"
n_ctx = 512
workers = {args.workers}
threads = {args.threads}
"""
    if setup != "baseline":
        text += f'cpu = "{args.cpu}"\n'
    if args.slots:
        text += f"parallel = {args.slots}\n"
    if POLICIES[setup]:
        text += "\n[[policies]]\n" + POLICIES[setup].format(cpu=args.cpu)
    if setup.startswith("psi"):
        for item in filter(None, args.policy.split(",")):
            key, value = item.split("=")
            if not (setup == "psi-hold" and key == "keep_running"):
                text += f"{key} = {value}\n"
    return text


def one_run(args: argparse.Namespace, setup: str, condition: str, rnd: int,
            position: int, clients: int) -> dict[str, Any]:
    requests = args.requests_total // clients if args.requests_total else args.requests
    with lab.Daemon(config(args, setup), setup) as daemon:
        lab.closed_loop(daemon, "m", args.workers, 4, requests_each=1)  # warm-up, every worker
        hog = lab.start_hog(args.hog) if condition == "hog" else None
        try:
            time.sleep(args.settle)
            sampler = lab.Sampler(daemon.cgroups, pid=daemon.proc.pid)
            sampler.start()
            t_unix, t0 = time.time(), time.monotonic()
            rows = lab.closed_loop(daemon, "m", clients, args.tokens, requests_each=max(1, requests))
            wall = time.monotonic() - t0
            samples = sampler.stop()
            events = [e for e in daemon.events() if e["at"] >= t_unix]
        finally:
            if hog is not None:
                lab.stop(hog)
    tag = {"setup": setup, "condition": condition, "clients": clients, "round": rnd,
           "position": position}
    for row in rows:
        row.update(tag)
    for s in samples:
        s.update(tag)
    for e in events:
        e.update(tag, t_s=round(e["at"] - t_unix, 3), values=json.dumps(e["values"]))
    summary = {**tag, "ready_s": round(daemon.ready_s, 1), "wall_s": wall,
               **lab.summarize_requests(rows, wall), "os": lab.os_deltas(samples),
               "actions": {k: sum(1 for e in events if e["action"] == k)
                           for k in ACTIONS}}
    print(json.dumps(summary), flush=True)
    return {"rows": rows, "samples": samples, "events": events, "summary": summary}


def pooled(runs: list[dict[str, Any]], setup: str, condition: str, clients: int) -> dict[str, Any]:
    mine = [r for r in runs if (r["summary"]["setup"], r["summary"]["condition"],
                                r["summary"]["clients"]) == (setup, condition, clients)]
    if not mine:
        return {"runs": 0}
    rows = [row for r in mine for row in r["rows"]]
    wall = sum(r["summary"]["wall_s"] for r in mine)
    out = lab.summarize_requests(rows, wall)
    out["os"] = lab.sum_os([r["summary"]["os"] for r in mine])
    out["actions"] = {k: sum(r["summary"]["actions"][k] for r in mine) for k in ACTIONS}
    out["runs"] = len(mine)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="0: follow the quota (default)")
    p.add_argument("--cpu", default="50%")
    p.add_argument("--clients", default="8", help="concurrency levels, comma-separated (default: 8)")
    p.add_argument("--requests", type=int, default=2, help="requests per client per run")
    p.add_argument("--requests-total", type=int, default=0,
                   help="requests per run, shared out among the clients (instead of --requests)")
    p.add_argument("--slots", type=int, default=0,
                   help="parallel = N for the model (sequences a worker batches; 0: its default)")
    p.add_argument("--conditions", default="hog,quiet", help="of hog,quiet (default: both)")
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
    levels = [int(c) for c in args.clients.split(",")]
    conditions = [c for c in ("hog", "quiet") if c in args.conditions.split(",")]
    runs = []
    for rnd in range(1, max(args.rounds, args.control_rounds) + 1):
        for condition in conditions:
            if rnd > (args.control_rounds if condition == "quiet" else args.rounds):
                continue
            order = setups[condition] if rnd % 2 else setups[condition][::-1]
            for clients in levels:
                for position, setup in enumerate(order, 1):
                    runs.append(one_run(args, setup, condition, rnd, position, clients))
    stem = args.csv.with_suffix("")
    lab.write_csv(args.csv, [row for r in runs for row in r["rows"]])
    lab.write_csv(Path(f"{stem}_samples.csv"), [s for r in runs for s in r["samples"]])
    lab.write_csv(Path(f"{stem}_events.csv"), [e for r in runs for e in r["events"]])
    result: dict[str, Any] = {"command": " ".join(sys.argv)}
    for condition in conditions:
        for clients in levels:
            res: dict[str, Any] = {s: pooled(runs, s, condition, clients) for s in setups[condition]}
            if not any(r["runs"] for r in res.values()):
                continue
            key = condition if len(levels) == 1 else f"{condition}_{clients}"
            result[key] = res
            base = next((s for s in ("static", "plain") if s in res), None)
            psi = next((s for s in ("psi", "psi-scope") if s in res), None)
            if base is None or psi is None:
                continue
            a, b = res[base], res[psi]
            res[f"ratio_{base}_over_{psi}"] = {
                **{f"latency_{q}": a["latency"][q] / b["latency"][q] for q in ("p50", "p95", "p99")},
                **{f"ttft_{q}": a["ttft"][q] / b["ttft"][q] for q in ("p50", "p95", "p99")},
                "tokens_per_s": a["tokens_per_s"] / b["tokens_per_s"]}
    print(json.dumps(result, indent=2))
    for condition in conditions:
        print_research_table(result, condition, levels, setups[condition])
    return 0


def print_research_table(result: dict[str, Any], condition: str, levels: list[int],
                         setups: tuple[str, ...]) -> None:
    """Research 000's table: latency p95 (s) per concurrency and setup, with the kernel's
    side (the scopes' throttled time and CPU some stall, the system's CPU some stall, as
    % of the load's wall time) and the policy's defers."""
    print(f"\n{condition}: latency p95 s | tok/s | scopes throttled % | scopes CPU some % | "
          "system CPU some % | defers / set_batch")
    print("clients " + " ".join(f"{s:>48}" for s in setups))
    for clients in levels:
        res = result.get(condition if len(levels) == 1 else f"{condition}_{clients}", {})
        cells = []
        for setup in setups:
            r = res.get(setup, {})
            if not r.get("runs"):
                cells.append(f"{'-':>48}")
                continue
            os_, wall = r["os"], max(r["os"].get("wall_s", 0), 1e-9)
            thr = 100 * os_.get("scope_throttled_us", 0) / 1e6 / wall
            some = 100 * os_.get("scope_cpu_some_us", 0) / 1e6 / wall
            cells.append(f"{r['latency']['p95']:7.2f} {r['tokens_per_s']:6.1f} {thr:6.1f} {some:6.1f} "
                         f"{os_.get('sys_cpu_some_pct', float('nan')):6.1f} {r['actions']['defer']:5d} / "
                         f"{r['actions']['set_batch']:<4d}")
        print(f"{clients:>7} " + " ".join(f"{c:>48}" for c in cells))


if __name__ == "__main__":
    sys.exit(main())
