"""The worker process over its real socketpair: preempt and resume, KV trim and shrink.

Greedy decoding makes the continuation checkable: a request preempted and resumed (from
saved state or by recompute) must produce the same tokens as one that ran through.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from llm_residentd.wire.protocol import recv_frame, send_frame

N_CTX = 512
PROMPT = "the quick brown fox jumps over the lazy dog " * 3
GREEDY = {"max_tokens": 120, "temperature": 0.0, "top_k": 1, "raw": True, "ignore_eos": True,
          "seed": 1}


class WorkerProc:
    def __init__(self, model: Path, n_ctx: int = N_CTX) -> None:
        self.sock, child = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llm_residentd.worker", "--fd", str(child.fileno())],
            pass_fds=[child.fileno()])
        child.close()
        self.send({"type": "load", "path": str(model), "n_ctx": n_ctx, "n_batch": 64,
                   "threads": 1, "chat_template": False, "seed": 1, "stream_interval": 0.0})
        ready = self.recv()
        assert ready["type"] == "ready", ready
        self.n_ctx = ready["n_ctx"]

    def send(self, msg: dict[str, Any]) -> None:
        send_frame(self.sock, msg)

    def recv(self) -> dict[str, Any]:
        """The next message but the batch reports."""
        self.sock.settimeout(60)
        while True:
            msg = recv_frame(self.sock, 64 << 20)
            assert msg is not None, "worker closed its socket"
            if msg["type"] != "batch":
                return msg

    def generate(self, req: str, after: int | None = None,
                 control: dict[str, Any] | None = None,
                 resume: dict[str, Any] | None = None) -> tuple[str, dict[str, Any], list]:
        """Run one request; send `control` once `after` tokens have arrived. Returns the
        text, the final message and the kv reports seen."""
        self.send({"type": "generate", "req": req, "params": {"prompt": PROMPT, **GREEDY},
                   **({"resume": resume} if resume else {})})
        text, tokens, reports, sent = "", 0, [], False
        while True:
            msg = self.recv()
            if msg["type"] == "token":
                text += msg["text"]
                tokens += msg["tokens"]
                if after is not None and tokens >= after and not sent:
                    self.send(control)
                    sent = True
            elif msg["type"] == "kv":
                reports.append(msg)
            else:
                return text, msg, reports

    def close(self) -> None:
        self.send({"type": "shutdown"})
        self.proc.wait(timeout=30)
        self.sock.close()


@pytest.fixture(scope="module")
def worker(tiny_model_path: Path) -> Iterator[WorkerProc]:
    w = WorkerProc(tiny_model_path)
    yield w
    w.close()


@pytest.fixture(scope="module")
def reference(worker: WorkerProc) -> str:
    text, done, _ = worker.generate("ref")
    assert done["type"] == "done" and done["stats"]["completion_tokens"] == GREEDY["max_tokens"]
    return text


@pytest.mark.parametrize("state_min_tokens", [0, 10_000], ids=["restore", "recompute"])
def test_preempted_request_resumes_with_identical_output(worker: WorkerProc, reference: str,
                                                          state_min_tokens: int) -> None:
    first, msg, _ = worker.generate("p1", after=40, control={
        "type": "preempt", "req": "p1", "state_min_tokens": state_min_tokens})
    assert msg["type"] == "preempted", msg
    resume = msg["resume"]
    assert resume["generated"] >= 40 and resume["generated"] < GREEDY["max_tokens"]
    assert len(resume["context"]) == resume["prompt_tokens"] + resume["generated"]
    if state_min_tokens == 0:
        assert isinstance(resume["state"], bytes) and len(resume["state"]) > 1000
    else:
        assert resume["state"] is None
    worker.generate("other", after=None)  # the worker serves something else meanwhile
    rest, done, _ = worker.generate("p1", resume=resume)
    assert done["type"] == "done", done
    assert done["stats"]["completion_tokens"] == GREEDY["max_tokens"]
    assert first + rest == reference


def test_preempt_during_prompt_evaluation_resumes_by_recompute(tiny_model_path: Path) -> None:
    w = WorkerProc(tiny_model_path, n_ctx=2048)
    try:
        long_prompt = "lorem ipsum dolor sit amet " * 70  # ~1900 tokens
        w.send({"type": "generate", "req": "long", "params": {"prompt": long_prompt, **GREEDY}})
        w.send({"type": "preempt", "req": "long", "state_min_tokens": 0})
        msg = w.recv()
        while msg["type"] == "token":
            msg = w.recv()
        assert msg["type"] == "preempted", msg
        assert msg["resume"]["generated"] <= 1
    finally:
        w.close()


def test_trim_keeps_first_and_last_tokens_and_generation_continues(worker: WorkerProc) -> None:
    keep, tail = 8, 16
    _, done, reports = worker.generate("t1", after=60, control={
        "type": "trim_kv", "keep": keep, "tail": tail, "min_prune": 4})
    assert done["type"] == "done", done
    assert done["stats"]["completion_tokens"] == GREEDY["max_tokens"]
    (report,) = reports
    assert report["result"].startswith("trimmed"), report
    assert report["tokens_after"] == keep + tail
    assert report["tokens_before"] > report["tokens_after"] + 4


def test_trim_is_skipped_when_too_little_can_go(worker: WorkerProc) -> None:
    _, done, reports = worker.generate("t2", after=2, control={
        "type": "trim_kv", "keep": 400, "tail": 400, "min_prune": 4})
    assert done["type"] == "done"
    assert reports[0]["result"].startswith("skipped"), reports


def test_shrink_mid_request_continues_identically(tiny_model_path: Path, reference: str) -> None:
    w = WorkerProc(tiny_model_path)
    try:
        text, done, reports = w.generate("s1", after=30, control={"type": "shrink_kv",
                                                                    "n_ctx": 256})
        assert done["type"] == "done", done
        (report,) = reports
        assert report["result"] == f"n_ctx {N_CTX} -> 256", report
        assert report["n_ctx"] == 256 and report["tokens_after"] == report["tokens_before"]
        assert text == reference  # the restored state continues exactly
        # Idle: back up to the configured size, and a trim clears the cache.
        w.send({"type": "shrink_kv", "n_ctx": N_CTX})
        assert w.recv()["n_ctx"] == N_CTX
        w.send({"type": "trim_kv"})
        cleared = w.recv()
        assert cleared["result"].startswith("cleared") and cleared["tokens_after"] == 0
    finally:
        w.close()


def test_shrink_below_the_context_trims_first_or_refuses(tiny_model_path: Path) -> None:
    w = WorkerProc(tiny_model_path)
    try:
        _, done, reports = w.generate("s2", after=40, control={
            "type": "shrink_kv", "n_ctx": 32, "keep": 4, "tail": 8})
        assert done["type"] == "done" and done["stats"]["finish_reason"] == "length"
        assert reports[0]["n_ctx"] == 32 and reports[0]["tokens_after"] <= 12, reports
        w.send({"type": "shrink_kv", "n_ctx": N_CTX})
        w.recv()
        _, done, reports = w.generate("s3", after=40, control={
            "type": "shrink_kv", "n_ctx": 32, "keep": 30, "tail": 30})
        assert reports[0]["result"].startswith("refused"), reports
        assert done["stats"]["completion_tokens"] == GREEDY["max_tokens"]
    finally:
        w.close()


def test_a_request_that_needs_room_grows_a_shrunk_context_back(tiny_model_path: Path,
                                                                reference: str) -> None:
    w = WorkerProc(tiny_model_path)
    try:
        w.send({"type": "shrink_kv", "n_ctx": 64})
        assert w.recv()["n_ctx"] == 64
        text, done, reports = w.generate("g1")
        assert [(r["op"], r["n_ctx"], r["asked"]) for r in reports] == [("grow_kv", N_CTX, False)]
        assert done["stats"]["completion_tokens"] == GREEDY["max_tokens"] and text == reference
    finally:
        w.close()


ARRAY = {"type": "array", "minItems": 20, "maxItems": 20,
         "items": {"type": "string", "maxLength": 6}}


def _output(worker: WorkerProc, req: str, after: int | None = None,
            resume: dict[str, Any] | None = None, **fields: Any) -> tuple[str, dict[str, Any]]:
    """generate() with output fields (json_schema, stop) and a preempt after `after` tokens."""
    worker.send({"type": "generate", "req": req,
                 "params": {"prompt": PROMPT, **GREEDY, "ignore_eos": False, **fields},
                 **({"resume": resume} if resume else {})})
    text, tokens, sent = "", 0, False
    while True:
        msg = worker.recv()
        if msg["type"] != "token":
            return text, msg
        text += msg["text"]
        tokens += msg["tokens"]
        if after is not None and tokens >= after and not sent:
            worker.send({"type": "preempt", "req": req, "state_min_tokens": 0})
            sent = True


def test_a_preempted_grammar_request_resumes_where_its_grammar_was(worker: WorkerProc) -> None:
    reference, done = _output(worker, "gref", json_schema=ARRAY)
    assert done["type"] == "done" and done["stats"]["finish_reason"] == "stop", done
    assert len(json.loads(reference)) == 20 and done["stats"]["completion_tokens"] > 60
    first, msg = _output(worker, "g1", after=30, json_schema=ARRAY)
    assert msg["type"] == "preempted", msg
    worker.generate("other")  # the worker serves something else meanwhile
    rest, done = _output(worker, "g1", resume=msg["resume"], json_schema=ARRAY)
    assert done["type"] == "done", done
    # a grammar started afresh would open a second array here
    assert first + rest == reference


def test_a_sampled_grammar_request_resumes_inside_its_grammar(worker: WorkerProc) -> None:
    sampled = {"json_schema": ARRAY, "temperature": 1.0, "top_k": 40, "seed": 5,
               "max_tokens": 400}
    first, msg = _output(worker, "gs", after=30, **sampled)
    assert msg["type"] == "preempted", msg
    rest, done = _output(worker, "gs", resume=msg["resume"], **sampled)
    assert done["type"] == "done" and done["stats"]["finish_reason"] == "stop", done
    assert first and rest and len(json.loads(first + rest)) == 20  # one array, not two


def test_a_preempted_request_keeps_the_stop_string_start_it_held_back(
        worker: WorkerProc) -> None:
    reference, _, _ = worker.generate("sref")
    worker.send({"type": "generate", "req": "t1",
                 "params": {"prompt": PROMPT, **GREEDY, "max_tokens": 1}})
    first_token, done = worker.recv()["text"], worker.recv()
    assert done["type"] == "done" and len(first_token) >= 2 and reference.startswith(first_token)
    # A stop string that starts inside the first token's text and runs 200 characters
    # (tens of tokens): from its start, the text is held back, from the first token on,
    # so wherever the preempt lands, part of it is held.
    start = len(first_token) - 1
    stop = reference[start:start + 200]
    assert len(stop) == 200 and reference.index(stop) == start
    worker.send({"type": "generate", "req": "s1",
                 "params": {"prompt": PROMPT, **GREEDY, "stop": [stop]}})
    msg = worker.recv()
    assert msg["type"] == "token" and msg["text"] == reference[:start], msg
    worker.send({"type": "preempt", "req": "s1", "state_min_tokens": 0})
    msg = worker.recv()
    assert msg["type"] == "preempted", msg  # no more text came: it is all held
    held = msg["resume"]["held"]
    assert held and stop.startswith(held), msg["resume"]
    rest, done = _output(worker, "s1", resume=msg["resume"], stop=[stop], ignore_eos=True)
    assert done["type"] == "done" and done["stats"]["finish_reason"] == "stop", done
    # a scanner that lost the held start would let the text through and end far later
    assert rest == ""
