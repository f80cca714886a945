"""llmctl status: the daemon, each worker, each model's queue and how its requests ended,
the workers' cgroups, and the pressure around them."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ..client import Client
from ..output import fmt_bytes, show, table
from . import EXIT_OK, Command
from .ps import KV_HEADERS, kv_columns

# How a finished request ended, by the outcome codes the daemon counts (its status op's
# "outcomes"): every code not named here is a failure.
OUTCOME_COLUMNS = {"completed": "done", "cancelled": "cancelled", "timeout": "timeout",
                   "deferred_timeout": "timeout"}


def outcome_counts(outcomes: dict[str, int]) -> dict[str, int]:
    """done, cancelled, timeout (also while deferred by a policy) and failed (the rest)."""
    counts = {"done": 0, "cancelled": 0, "timeout": 0, "failed": 0}
    for code, n in outcomes.items():
        counts[OUTCOME_COLUMNS.get(code, "failed")] += n
    return counts


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    show(args, client.status(), _text)
    return EXIT_OK


def _text(st: dict[str, Any]) -> str:
    d = st["daemon"]
    lines = [f"llm-residentd {d['version']}  pid {d['pid']}  up {d['uptime_s']:.0f}s  "
             f"backend {d['backend']}  config {d['config']}  socket {d['socket']}"]
    if d.get("reload"):
        lines.append(_fmt_reload(d["reload"]))
    lines += ["", _workers_table(st["workers"]), "", _models_table(st["models"])]
    scoped = [w for w in st["workers"] if w.get("cgroup")]
    if scoped:
        lines += ["", table(["WORKER", "UNIT", "CPU.MAX", "MEM.HIGH", "MEM.MAX", "MEM.CURRENT",
                             "THROTTLED", "HIGH/MAX/OOM", "PSI CPU/MEM some10", "EVENTS"],
                            [_scope_row(w) for w in scoped])]
    pressure = _pressure_lines(st)
    threads = [f"{w['name']}: {w['threads']} threads, {w['threads_why']}"
               for w in st["workers"] if w.get("threads_why")]
    for block in (pressure, threads):
        if block:
            lines += ["", *block]
    lines += [f"\n{w['name']}: {w[key]}" for w in st["workers"]
              for key in ("last_error", "scope_error") if w.get(key)]
    return "\n".join(lines)


def _workers_table(workers: list[dict[str, Any]]) -> str:
    return table(
        ["WORKER", "MODEL", "PID", "STATE", "THREADS", "RSS", "CPU%", "FAULTS maj/min",
         "CTXSW vol/invol", "SERVED", "RESTARTS", "SLOTS busy/free", "BATCH",
         "REQUESTS:KV cells"],
        [[w["name"], w["model"], w["pid"], w["state"], _fmt_threads(w),
          fmt_bytes(w["rss_bytes"]),
          "-" if w.get("cpu_percent") is None else f"{w['cpu_percent']:.0f}",
          _fmt_pair(w, "major_faults", "minor_faults"),
          _fmt_pair(w, "ctx_switches_voluntary", "ctx_switches_involuntary"),
          w["served"], w["restarts"], _fmt_slots(w),
          "-" if (w.get("batch") or {}).get("size") is None else f"{w['batch']['size']:.2f}",
          " ".join(f"{r['id']}:{'-' if r['kv_cells'] is None else r['kv_cells']}"
                   for r in w.get("requests") or ()) or None]
         for w in workers])


def _models_table(models: dict[str, dict[str, Any]]) -> str:
    """Each model's queue, outcomes and latencies; then the failures by code."""
    rows, failures = [], []
    for name, m in models.items():
        counts = outcome_counts(m["outcomes"])
        rows.append([name, m["state"], f"{m['queue_depth']}/{m['max_queue']}", m["running"],
                     *counts.values(), _fmt_ms(m["ttft_s"]), _fmt_ms(m["latency_s"]),
                     "-" if m["tokens_per_s"]["p50"] is None else f"{m['tokens_per_s']['p50']:.1f}",
                     *kv_columns(m)])
        failed = {k: v for k, v in sorted(m["outcomes"].items()) if k not in OUTCOME_COLUMNS}
        if failed:
            failures.append(f"{name} failed: " + ", ".join(f"{k} {v}" for k, v in failed.items()))
    columns = [c.upper() for c in outcome_counts({})]
    return "\n".join([table(["MODEL", "STATE", "QUEUE", "RUNNING", *columns,
                             "TTFT ms p50/95/99", "LATENCY ms p50/95/99", "TOK/S p50",
                             *KV_HEADERS], rows),
                      *failures])


def _pressure_lines(st: dict[str, Any]) -> list[str]:
    """PSI on the system and outside the workers, and the CPU load the daemon sees."""
    pressure = st.get("pressure", {})
    lines = [label + "  ".join(f"{r} {v['some']['avg10']:.2f}%" for r, v in values.items() if v)
             for label, values in (("system PSI some avg10: ", pressure.get("system") or {}),
                                   ("outside the workers' cgroups: ", pressure.get("outside") or {}))
             if any(values.values())]
    cpu = st.get("cpu")
    if cpu and cpu.get("view"):
        v = cpu["view"]
        how = ("read on PSI triggers and every {period_s:g} s" if cpu["mode"] == "psi-trigger"
               else "polled every {period_s:g} s: {why_polling}").format(**cpu)
        lines.append(f"CPU load: {v['others_running']:.2f} other runnable tasks, "
                     f"{v['idle']:.2f} of {v['cpus']} CPUs idle ({how})")
    return lines


def _fmt_reload(r: dict[str, Any]) -> str:
    """The last reload (SIGHUP): when, its result, and what changed or why it was refused."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["at"]))
    what = [f"{k} {', '.join(r[k])}" for k in ("added", "removed", "changed", "needs_restart")
            if r.get(k)]
    detail = "; ".join([*what, *([r["error"]] if r.get("error") else [])])
    return f"last reload {when}: {r['result']}" + (f" ({detail})" if detail else "")


def _fmt_count(n: int | None) -> str:
    """12, 7.3k, 1.2M: a counter that grows without bound, in a few characters."""
    if n is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _fmt_pair(w: dict[str, Any], first: str, second: str) -> str:
    """"3/7.3k" from two counters of a worker's status entry; "-" without a process."""
    if w.get(first) is None and w.get(second) is None:
        return "-"
    return f"{_fmt_count(w.get(first))}/{_fmt_count(w.get(second))}"


def _fmt_ms(summary: dict[str, float | None]) -> str:
    vals = [summary.get(k) for k in ("p50", "p95", "p99")]
    return "/".join("-" if v is None else f"{v * 1000:.0f}" for v in vals)


def _fmt_slots(w: dict[str, Any]) -> str:
    """"3/1": running requests and slots still free (within a policy's batch limit, which
    follows as "max 2" when it holds the worker below its slots); "-" before it loads."""
    slots, busy = w.get("slots") or 0, w.get("slots_busy", 0)
    if not slots:
        return "-"
    limit = min(slots, w.get("batch_limit") or slots)
    return f"{busy}/{max(0, limit - busy)}" + (f" max {limit}" if limit < slots else "")


def _fmt_threads(w: dict[str, Any]) -> str:
    """The count and, in a word, what set it: affinity, quota, contention or config."""
    why = (w.get("threads_why") or "").split(":", 1)[0]
    asked = f"->{w['threads_asked']}" if w.get("threads_asked") else ""
    return f"{w['threads']}{asked} {why}".strip()


def _scope_row(w: dict[str, Any]) -> list[Any]:
    cg = w["cgroup"]
    stat, events, pressure = cg.get("cpu.stat") or {}, cg.get("memory.events") or {}, cg["pressure"]

    def some10(resource: str) -> str:
        p = pressure.get(resource)
        return "-" if not p else f"{p['some']['avg10']:.1f}"
    return [w["name"], w["unit"], cg["cpu.max"], cg["memory.high"], cg["memory.max"],
            fmt_bytes(cg["memory.current"]),
            f"{stat.get('nr_throttled', 0)}x {stat.get('throttled_usec', 0) / 1e6:.1f}s",
            f"{events.get('high', 0)}/{events.get('max', 0)}/{events.get('oom_kill', 0)}",
            f"{some10('cpu')}/{some10('memory')}", w["pressure_events"]]


COMMAND = Command(
    "status", help="daemon, workers, queues, latencies",
    description="Show the daemon, each worker (pid, state, threads, RSS) and each model's "
    "queue, how its requests ended (done, cancelled, timeout, failed) and TTFT, latency "
    "and tokens/s percentiles.", run=cmd_status)
