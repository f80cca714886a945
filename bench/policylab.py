"""Shared pieces of the policy benchmarks that run in the systemd guest (needs systemd, root).

Not a benchmark itself: bench/policy_psi_admission.py and bench/policy_neighbour_guard.py
import it (the scripts' directory is on sys.path). It starts a daemon with a temporary
config, drives closed-loop clients, samples the kernel's view once a second (system and
scope PSI, the PSI of the top-level cgroup the script and its hog run in, cpu.stat,
cpu.max) and reads back the policy actions the daemon recorded.
"""

from __future__ import annotations

import csv
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from llmctl import Client
from llmctl.commands.wait import wait_ready

PROMPT = "the sky is blue and"


def _top_cgroup() -> Path:
    """The top-level cgroup this script, its hog and its neighbour processes run in."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::/") and len(line) > 4:
            return Path("/sys/fs/cgroup") / line[4:].split("/")[0]
    return Path("/sys/fs/cgroup")


NEIGHBOURS = _top_cgroup()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def pcts(values: list[float]) -> dict[str, float]:
    return {"p50": percentile(values, 50), "p95": percentile(values, 95),
            "p99": percentile(values, 99)}


def psi_total(path: Path) -> tuple[int, float]:
    """(some total in us, some avg10 in %) of a pressure file; (-1, -1) if unreadable."""
    try:
        first = path.read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return -1, -1.0
    fields = dict(f.split("=") for f in first[1:])
    return int(fields["total"]), float(fields["avg10"])


def cpu_stat(cgroup: Path) -> dict[str, int]:
    try:
        lines = (cgroup / "cpu.stat").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v) for k, v in (line.split() for line in lines)}


def proc_cpu_ms(pid: int) -> float:
    """utime + stime of a process (all its threads), in ms; -1 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return -1.0
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


class Daemon:
    """A daemon on a private socket with a generated config; stopped with SIGTERM on exit."""

    def __init__(self, config: str, label: str, ready_timeout: float = 600,
                 backend: str = "systemd", log_level: str = "info") -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=f"policy-{label}-"))
        (self.tmp / "config.toml").write_text(config)
        self.sock = self.tmp / "llm.sock"
        self.started = time.monotonic()
        with open(self.tmp / "daemon.log", "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "llm_residentd", "--config", str(self.tmp / "config.toml"),
                 "--socket", str(self.sock), "--backend", backend, "--log-format", "json",
                 "--log-level", log_level],
                stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(str(self.sock), None, ready_timeout)
            # every worker, not just the first, must be up before the load starts
            deadline = time.monotonic() + ready_timeout
            while time.monotonic() < deadline:
                workers = self.status()["workers"]
                # a worker with a scope is ready once it is in it ("auto" may mean none)
                if all(w["state"] == "idle" and (w.get("cgroup") or w["backend"] == "none")
                       for w in workers):
                    break
                time.sleep(1)
            else:
                raise RuntimeError(f"workers not ready: {[w['state'] for w in workers]}")
        except BaseException:
            self.stop()
            raise
        self.ready_s = time.monotonic() - self.started
        self.cgroups = [Path(w["cgroup"]["cgroup"]) if w.get("cgroup") else Path("/nonexistent")
                        for w in self.status()["workers"]]

    def client(self, timeout: float = 900) -> Client:
        return Client(self.sock, timeout=timeout)

    def status(self) -> dict[str, Any]:
        with self.client(30) as c:
            return c.status()

    def events(self) -> list[dict[str, Any]]:
        with self.client(30) as c:
            return c.call("events", limit=500)["events"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        keep = os.environ.get("POLICY_BENCH_LOGS")  # keep the daemon's log, e.g. in /share
        if keep and (self.tmp / "daemon.log").exists():
            Path(keep).mkdir(parents=True, exist_ok=True)
            Path(keep, f"{self.tmp.name}.log").write_bytes((self.tmp / "daemon.log").read_bytes())

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Sampler(threading.Thread):
    """Once per `period` s: system CPU PSI, and summed over the worker scopes: cpu.stat,
    cpu.pressure some total; the first scope's cpu.max. `extra()` adds columns."""

    def __init__(self, cgroups: list[Path], period: float = 1.0, extra: Any = None,
                 pid: int | None = None) -> None:
        super().__init__(daemon=True)
        self.cgroups, self.period, self.extra, self.pid = cgroups, period, extra, pid
        self.rows: list[dict[str, Any]] = []
        self.halt = threading.Event()
        self.t0 = time.monotonic()

    def sample(self) -> dict[str, Any]:
        total, avg10 = psi_total(Path("/proc/pressure/cpu"))
        nbr_total, nbr_avg10 = psi_total(NEIGHBOURS / "cpu.pressure")
        row: dict[str, Any] = {"t_s": round(time.monotonic() - self.t0, 3),
                               "sys_cpu_some_us": total, "sys_cpu_avg10": avg10,
                               "nbr_cpu_some_us": nbr_total, "nbr_cpu_avg10": nbr_avg10}
        throttled = nr = usage = scope_some = 0
        for cg in self.cgroups:
            st = cpu_stat(cg)
            throttled += st.get("throttled_usec", 0)
            nr += st.get("nr_throttled", 0)
            usage += st.get("usage_usec", 0)
            scope_some += max(0, psi_total(cg / "cpu.pressure")[0])
        row.update({"scope_throttled_us": throttled, "scope_nr_throttled": nr,
                    "scope_usage_us": usage, "scope_cpu_some_us": scope_some,
                    "cpu_max": read_text(self.cgroups[0] / "cpu.max") if self.cgroups else ""})
        if self.pid is not None:
            row["daemon_cpu_ms"] = proc_cpu_ms(self.pid)
        if self.extra is not None:
            row.update(self.extra())
        return row

    def run(self) -> None:
        while not self.halt.is_set():
            self.rows.append(self.sample())
            self.halt.wait(self.period)

    def stop(self) -> list[dict[str, Any]]:
        self.halt.set()
        self.join(10)
        self.rows.append(self.sample())
        return self.rows


def one_request(client: Client, model: str, tokens: int) -> dict[str, Any]:
    """Submit and stream one request; every outcome is a row (completed or error + code)."""
    t0 = time.monotonic()
    row: dict[str, Any] = {"outcome": "", "error": "", "ttft_s": float("nan"),
                           "latency_s": float("nan"), "tokens": 0, "queue_s": float("nan"),
                           "worker_tokens_per_s": float("nan"), "submit_t": t0}
    try:
        stream = client.submit(PROMPT, model=model, max_tokens=tokens, raw=True,
                               ignore_eos=True, temperature=0.0)
        for event in stream.events():
            kind = event.get("event")
            if kind == "token":
                if row["tokens"] == 0:
                    row["ttft_s"] = time.monotonic() - t0
                row["tokens"] += 1
            elif kind == "error":
                row["outcome"] = "error"
                row["error"] = f"{event['error']['code']}: {event['error']['message']}"
        stats = stream.stats or {}
        if not row["outcome"]:
            row["outcome"] = "completed"
            row["tokens"] = stats.get("completion_tokens", row["tokens"])
            row["queue_s"] = stats.get("queue_s", float("nan"))
            row["worker_tokens_per_s"] = stats.get("tokens_per_s") or float("nan")
    except Exception as exc:  # a refused or lost request is a result too
        row["outcome"] = "error"
        row["error"] = f"{type(exc).__name__}: {exc}"
    row["latency_s"] = time.monotonic() - t0
    return row


def closed_loop(daemon: Daemon, model: str, clients: int, tokens: int, *,
                requests_each: int = 0, duration_s: float = 0.0,
                stagger_s: float = 0.0) -> list[dict[str, Any]]:
    """`clients` threads, each with its own connection, each sending the next request when
    the last one ends: `requests_each` requests, or until `duration_s` has passed."""
    rows: list[dict[str, Any]] = []
    lock = threading.Lock()
    start = time.monotonic()

    def client_main(n: int) -> None:
        time.sleep(n * stagger_s)
        seq = 0
        with daemon.client() as client:
            while True:
                if requests_each and seq >= requests_each:
                    return
                if duration_s and time.monotonic() - start >= duration_s:
                    return
                row = one_request(client, model, tokens)
                row.update({"client": n, "seq": seq,
                            "submit_t": round(row["submit_t"] - start, 3)})
                with lock:
                    rows.append(row)
                seq += 1

    threads = [threading.Thread(target=client_main, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return rows


def summarize_requests(rows: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    done = [r for r in rows if r["outcome"] == "completed"]
    lat = [r["latency_s"] for r in done]
    ttft = [r["ttft_s"] for r in done]
    tokens = sum(r["tokens"] for r in done)
    return {"accepted_or_sent": len(rows), "completed": len(done),
            "failed": len(rows) - len(done),
            "fail_reasons": sorted({r["error"] for r in rows if r["outcome"] != "completed"}),
            "latency": pcts(lat), "ttft": pcts(ttft),
            "tokens": tokens, "tokens_per_s": tokens / wall_s if wall_s > 0 else float("nan"),
            "worker_tokens_per_s_median": statistics.median(
                [r["worker_tokens_per_s"] for r in done]) if done else float("nan")}


def os_deltas(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Growth over the run of the sampled counters, and the cpu.max values seen."""
    if len(samples) < 2:
        return {}
    a, b = samples[0], samples[-1]
    wall = b["t_s"] - a["t_s"]
    out = {"wall_s": wall}
    for key in ("sys_cpu_some_us", "nbr_cpu_some_us", "scope_throttled_us", "scope_nr_throttled",
                "scope_usage_us", "scope_cpu_some_us", "daemon_cpu_ms"):
        if key not in a:
            continue
        out[key] = b[key] - a[key]
    for key in ("sys", "nbr"):
        out[f"{key}_cpu_some_pct"] = 100 * out[f"{key}_cpu_some_us"] / 1e6 / wall if wall \
            else float("nan")
    out["cpu_max_seen"] = sorted({s["cpu_max"] for s in samples})
    return out


def sum_os(runs: list[dict[str, Any]]) -> dict[str, float]:
    """The numeric OS deltas of several runs added up, with the system CPU stall as % of wall."""
    total: dict[str, float] = {}
    for run in runs:
        for k, v in run.items():
            if isinstance(v, (int, float)):
                total[k] = total.get(k, 0) + v
    for key in ("sys", "nbr"):
        total[f"{key}_cpu_some_pct"] = 100 * total.get(f"{key}_cpu_some_us", 0) / 1e6 / max(
            total.get("wall_s", 0), 1e-9)
    return total


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def start_hog(cpus: int) -> subprocess.Popen[bytes]:
    """stress-ng CPU hog in the benchmark's own cgroup (outside llm.slice)."""
    return subprocess.Popen(["stress-ng", "--cpu", str(cpus), "--quiet"])


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def guest_facts() -> dict[str, Any]:
    return {"kernel": os.uname().release, "cpus": os.cpu_count(),
            "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
