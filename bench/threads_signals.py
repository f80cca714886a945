#!/usr/bin/env python3
"""Which kernel signal tells that another process wants the workers' CPUs? Measured.

A worker process decodes SmolLM2 without pause (greedy, EOS ignored) with T threads,
while 0, 1 or 2 neighbour processes run beside it: busy loops, or loops busy for a part
of each 20 ms. Every `--period` s the script takes one `llm_residentd.control.cpuload` reading
(the daemon's own reader), and reports each candidate signal over windows of `--window`
s, with the worker's tokens/s and the neighbours' work rate:

- `others_running`: mean runnable tasks that are not the worker (procs_running),
- `others_cpu`: CPU used by everything but the worker (/proc/stat minus its schedstat),
- `idle`: idle CPUs,
- `stall`: CPU PSI some of /proc/pressure/cpu, as a fraction of the time,
- `wait`: the worker's threads waiting for a CPU (schedstat run delay), in threads,
- `nivcsw`: the worker's involuntary context switches per second.

The thread count a rule should pick in each scenario is the one with the higher tokens/s
at no cost to the neighbours; the table shows which signal separates the scenarios.

    .venv/bin/python bench/threads_signals.py --rounds 2
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchlib import RESULTS, append_csv, smollm2
from llm_residentd.control import cpuload

PROMPT = "The history of the city begins with a small settlement on the river, where"


def decoder(model: str, threads: Any, tokens: Any, ready: Any) -> None:
    """Decode forever; apply a new thread count between tokens; count tokens."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import llama_cpp

    llm = llama_cpp.Llama(model_path=model, n_ctx=512, n_threads=threads.value,
                          n_threads_batch=threads.value, verbose=False)
    prompt = llm.tokenize(PROMPT.encode())
    current = threads.value
    ready.set()
    while True:
        for n, _ in enumerate(llm.generate(prompt, temp=0.0, reset=True)):
            if threads.value != current:
                current = threads.value
                llama_cpp.llama_set_n_threads(llm.ctx, current, current)
            with tokens.get_lock():
                tokens.value += 1
            if n >= 200:
                break


def neighbour(work: Any, duty: float) -> None:
    """Busy for duty of every 20 ms (1.0: always); counts units of work."""
    period = 0.02
    while True:
        end = time.monotonic() + period * duty
        n = 0
        while time.monotonic() < end:
            n += 1
        with work.get_lock():
            work.value += n
        if duty < 1.0:
            time.sleep(period * (1 - duty))


SCENARIOS = {  # name -> duty of each neighbour
    "quiet": (),
    "busy1": (1.0,),
    "busy2": (1.0, 1.0),
    "duty50": (0.5,),
    "duty25": (0.25,),
    "duty50x2": (0.5, 0.5),
}


def measure(pid: int, seconds: float, period: float, window: float,
            tokens: Any, work: Any) -> dict[str, Any]:
    readings = []
    t0, tok0, work0 = time.monotonic(), tokens.value, work.value
    while time.monotonic() - t0 < seconds:
        readings.append(cpuload.read(time.monotonic(), {"worker": pid}))
        time.sleep(period)
    dt = time.monotonic() - t0
    per = max(2, round(window / period) + 1)
    starts = range(0, len(readings) - per + 1, per - 1)
    views = [cpuload.view(readings[i:i + per], recent=per) for i in starts]
    views = [v for v in views if v is not None]
    row: dict[str, Any] = {"tok_s": (tokens.value - tok0) / dt, "work_s": (work.value - work0) / dt}
    signals = {
        "others_running": lambda v: v.others_running, "others_cpu": lambda v: v.others_cpu,
        "idle": lambda v: v.idle, "stall": lambda v: v.stall or 0.0,
        "workers_wait": lambda v: v.total("wait"), "workers_nivcsw": lambda v: v.total("nivcsw"),
        "workers_cpu": lambda v: v.total("cpu"), "workers_running": lambda v: v.total("running"),
    }
    for name, get in signals.items():
        values = sorted(get(v) for v in views)
        row[f"{name}_mean"] = statistics.fmean(values)
        row[f"{name}_lo"] = values[len(values) // 20]
        row[f"{name}_hi"] = values[-1 - len(values) // 20]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=8.0, help="measured per scenario")
    ap.add_argument("--settle", type=float, default=1.5, help="before measuring")
    ap.add_argument("--period", type=float, default=0.1, help="s between readings")
    ap.add_argument("--window", type=float, default=0.5, help="s per view")
    ap.add_argument("--threads", default="2,1")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--csv", default=str(RESULTS / "threads_signals.csv"))
    args = ap.parse_args()
    ctx = mp.get_context("fork")
    threads, tokens, ready = ctx.Value("i", 2), ctx.Value("q", 0), ctx.Event()
    work = ctx.Value("q", 0)
    worker = ctx.Process(target=decoder, args=(smollm2(), threads, tokens, ready), daemon=True)
    worker.start()
    ready.wait(120)
    run = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"# {' '.join(sys.argv)}\n# run {run}, {os.cpu_count()} CPUs, worker pid {worker.pid}")
    rows = []
    order = [(t, s) for s in args.scenarios.split(",") for t in map(int, args.threads.split(","))]
    try:
        for rnd in range(args.rounds):
            for t, scen in (order if rnd % 2 == 0 else order[::-1]):
                threads.value = t
                hogs = [ctx.Process(target=neighbour, args=(work, d), daemon=True)
                        for d in SCENARIOS[scen]]
                for h in hogs:
                    h.start()
                time.sleep(args.settle)
                row = {"run": run, "round": rnd, "scenario": scen, "threads": t,
                       **measure(worker.pid, args.seconds, args.period, args.window, tokens, work)}
                for h in hogs:
                    h.kill()
                    h.join()
                rows.append(row)
                print(f"{scen:9} T={t} tok/s {row['tok_s']:6.1f} work/s {row['work_s'] / 1e6:6.2f}M "
                      f"others_run {row['others_running_mean']:.2f} [{row['others_running_lo']:.2f}"
                      f"..{row['others_running_hi']:.2f}] others_cpu {row['others_cpu_mean']:.2f} "
                      f"idle {row['idle_mean']:.2f} stall {row['stall_mean']:.2f} "
                      f"wait {row['workers_wait_mean']:.2f} nivcsw {row['workers_nivcsw_mean']:.0f}",
                      flush=True)
                time.sleep(0.5)
    finally:
        worker.kill()
    append_csv(Path(args.csv), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
