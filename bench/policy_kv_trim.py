#!/usr/bin/env python3
"""kv-trim under a memory.high squeeze: a worker decoding with a large context, with and
without the policy (needs systemd, root; run in the guest).

Each run starts a fresh daemon (page cache dropped first, so the worker faults the model
weights into its own scope) and one long request. After `--before` seconds of decoding,
the model's memory.high starts to come down from the worker's memory.current by
`--ramp-mb` MiB per second, to the same floor `--floor-mb` in every setup, as a
neighbour's growth or a memory.high tuner would push it; the run goes on for `--after`
seconds, then the request is cancelled. Setups, interleaved round by round:

- `off`: no policy; the worker keeps its large context under the squeeze;
- `kv-trim`: the kv-trim policy in shrink mode reacts to the scope's memory pressure;
- `small` (control): no policy, but the context is configured at kv-trim's min_ctx from
  the start: the same squeeze on a worker whose cache is already small.

Application: tokens/s before and after the squeeze (client-side token times), whether the
request was still being served, worker restarts. OS: memory.events high/max/oom_kill,
memory.pressure some/full totals, memory.stat workingset_refault_file and pgmajfault
deltas, memory.current; one sample row every 0.5 s in --samples.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from llmctl import Client, LlmctlError
from policylab import Daemon

SETUPS = ("off", "kv-trim", "small")


def config(model: str, n_ctx: int, policy: bool, min_ctx: int) -> str:
    text = f"""
[daemon]
psi_scope_trigger = "some 20000 1000000"

[models.m]
path = "{model}"
n_ctx = {n_ctx}
max_tokens = 100000
threads = 0
stream_interval = 0.05
"""
    if policy:
        text += f"""
[[policies]]
name = "kv-trim"
mode = "shrink"
some_above = 1.0
factor = 0.25
min_ctx = {min_ctx}
cooldown_s = 3.0
restore_after_s = 86400.0
"""
    return text


def kernel(cgroup: str) -> dict[str, int]:
    cg = Path(cgroup)
    out = {"memory_current": int((cg / "memory.current").read_text())}
    for line in (cg / "memory.events").read_text().splitlines():
        k, v = line.split()
        out[f"events_{k}"] = int(v)
    for line in (cg / "memory.stat").read_text().splitlines():
        k, v = line.split()
        if k in ("workingset_refault_file", "pgmajfault", "anon", "file"):
            out[k] = int(v)
    for line in (cg / "memory.pressure").read_text().splitlines():
        kind, *fields = line.split()
        out[f"mem_{kind}_total_us"] = int(dict(f.split("=") for f in fields)["total"])
    return out


class Decoder(threading.Thread):
    """One long request; records the time of every token event."""

    def __init__(self, sock: Path, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.sock, self.max_tokens, self.times, self.end = sock, max_tokens, [], None
        self.request = ""

    def run(self) -> None:
        with Client(self.sock, timeout=3600) as c:
            stream = c.submit("a long story about memory " * 4, model="m",
                              max_tokens=self.max_tokens,
                              ignore_eos=True, raw=True, temperature=0.0, top_k=1)
            self.request = stream.request
            for e in stream.events():
                if e["event"] == "token":
                    self.times += [time.monotonic()] * e.get("tokens", 1)
                elif e["event"] in ("done", "error"):
                    self.end = e


def rate(times: list[float], t0: float, t1: float) -> float:
    return sum(1 for t in times if t0 <= t < t1) / (t1 - t0)


def one_run(args: argparse.Namespace, setup: str, rnd: int,
            samples: list[dict[str, Any]]) -> dict[str, Any]:
    subprocess.run(["sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches"], check=True)
    n_ctx = args.min_ctx if setup == "small" else args.n_ctx
    cfg = config(args.model, n_ctx, setup == "kv-trim", args.min_ctx)
    with Daemon(cfg, f"kv-{setup}") as daemon, daemon.client(600) as c:
        cgroup = str(daemon.cgroups[0])
        dec = Decoder(daemon.sock, n_ctx - 100)
        dec.start()
        t_start = time.monotonic()
        squeeze_at = t_start + args.before
        stop_at = squeeze_at + args.after
        high, before = None, None
        while time.monotonic() < stop_at:
            now = time.monotonic()
            if now >= squeeze_at:
                if before is None:
                    before = kernel(cgroup)
                start = before["memory_current"] / 2**20
                mb = max(args.floor_mb, start - args.ramp_mb * (now - squeeze_at))
                if mb != high:
                    high = mb
                    c.call("limits", model="m", memory_high=f"{int(mb * 2**20) // 4096 * 4096}")
            w = c.status()["workers"][0]
            samples.append({"round": rnd, "setup": setup, "t": round(now - t_start, 2),
                            "tokens": len(dec.times), "n_ctx": w["n_ctx"],
                            "memory_high_mb": high,
                            "state": w["state"], **kernel(cgroup)})
            time.sleep(0.5)
        after = kernel(cgroup)
        status = c.status()["workers"][0]
        actions = c.call("events", limit=50)["events"]
        if dec.request:
            with contextlib.suppress(LlmctlError):  # it may have ended; the row says how
                c.cancel(dec.request)
        dec.join(60)
    d = {k: after[k] - before[k] for k in after if k != "memory_current"}
    return {
        "round": rnd, "setup": setup, "n_ctx_start": n_ctx, "n_ctx_end": status["n_ctx"],
        "memory_high_mb": round(high, 1),
        "tok_s_before": round(rate(dec.times, t_start + 1, squeeze_at), 2),
        "tok_s_after": round(rate(dec.times, squeeze_at, stop_at), 2),
        "tok_s_last_half": round(rate(dec.times, squeeze_at + args.after / 2, stop_at), 2),
        "served_to_end": dec.request in [r["id"] for r in status["requests"]]
        and status["restarts"] == 0,
        "restarts": status["restarts"], "end": (dec.end or {}).get("error", {}).get("code"),
        "memory_before_mb": round(before["memory_current"] / 2**20, 1),
        "memory_after_mb": round(after["memory_current"] / 2**20, 1),
        "high_events": d["events_high"], "oom_kills": d.get("events_oom_kill", 0),
        "mem_some_ms": d["mem_some_total_us"] / 1000, "mem_full_ms": d["mem_full_total_us"] / 1000,
        "refaults": d["workingset_refault_file"], "majfaults": d["pgmajfault"],
        "kv_actions": [a["result"] for a in actions if a["action"] == "shrink_kv"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a GGUF on local disk (not tmpfs)")
    p.add_argument("--n-ctx", type=int, default=32768)
    p.add_argument("--min-ctx", type=int, default=2048)
    p.add_argument("--ramp-mb", type=float, default=1.0, help="MiB per second")
    p.add_argument("--floor-mb", type=float, default=90.0)
    p.add_argument("--before", type=float, default=8.0)
    p.add_argument("--after", type=float, default=40.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--setups", default=",".join(SETUPS))
    p.add_argument("--csv", type=Path, default=Path("bench/results/policy_kv_trim.csv"))
    p.add_argument("--samples", type=Path,
                   default=Path("bench/results/policy_kv_trim_samples.csv"))
    args = p.parse_args()
    setups = args.setups.split(",")
    rows, samples = [], []
    for r in range(args.rounds):
        for setup in setups if r % 2 == 0 else setups[::-1]:
            rows.append(one_run(args, setup, r + 1, samples))
            print(json.dumps(rows[-1]), flush=True)
    for path, data in ((args.csv, rows), (args.samples, samples)):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(data[0]))
            writer.writeheader()
            writer.writerows(data)
    print(json.dumps({"command": " ".join(sys.argv)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
